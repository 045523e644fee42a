"Packed rows (`qlora_nb.packing`) train like the same rows unpacked: same logits per example, same loss, same gradients."
import pytest
import torch

from qlora_nb.data import load_data, make_collator, tokenize_dataset
from qlora_nb.loss import causal_lm_loss
from qlora_nb.models import load_base
from qlora_nb.packing import first_fit, make_packed_collator, pack_rows
from qlora_nb.recompute import ATTENTIONS, set_up_training_kernels
from qlora_nb.trainer import Trainer
from qlora_nb.callback.core import Callback

MAX_LENGTH = 128
KERNELS = [(attention, recompute) for attention in ATTENTIONS for recompute in (False, True)]


@pytest.fixture(scope="module")
def tiny(one_thread):
    "The tiny Llama in fp32 and its tokenizer."
    return load_base("tiny", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def rows(tiny):
    "Tokenized rows of the embedded training data, trained on every token: each example's first label is a real token."
    examples, _ = load_data("train")
    tokenized, _ = tokenize_dataset(examples.select(range(40)), tiny[1], max_length=64, mask_prompt=False)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tokenized]
    assert all(r["labels"][0] != -100 for r in rows)
    return rows


def _loss_and_grads(model, batch):
    "The batch's mean loss and the gradient of every parameter."
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), 16,
                          position_ids=batch.get("position_ids"))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_pack_rows_keeps_each_example_whole_and_apart(rows):
    packed = pack_rows(rows, MAX_LENGTH)
    members = first_fit([len(r["input_ids"]) for r in rows], MAX_LENGTH)
    assert len(packed) == len(members) < len(rows)
    assert [i for group in members for i in group] != list(range(len(rows)))  # first fit did put a later row back into an earlier one
    for row, group in zip(packed, members):
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["seq_lens"]) <= MAX_LENGTH
        assert row["seq_lens"] == [len(rows[i]["input_ids"]) for i in group]
        start = 0
        for i in group:
            n = len(rows[i]["input_ids"])
            assert row["input_ids"][start:start + n] == rows[i]["input_ids"]
            assert row["position_ids"][start:start + n] == list(range(n))
            assert row["labels"][start] == -100 and row["labels"][start + 1:start + n] == rows[i]["labels"][1:]
            start += n
    assert pack_rows(rows, MAX_LENGTH) == packed  # deterministic


def test_no_example_learns_from_the_previous_ones_last_token(rows):
    "The model scores token t on label t+1: at each boundary, the previous example's last token predicts nothing."
    packed = pack_rows(rows, MAX_LENGTH)
    batch = make_packed_collator(type("Tok", (), {"pad_token_id": 0, "eos_token_id": 2})())(packed)
    shifted = batch["labels"][:, 1:]  # (B, T-1): the target of tokens 0..T-2
    starts = batch["position_ids"][:, 1:] == 0  # (B, T-1): token t+1 begins an example (or the pad tail)
    assert starts.sum() >= len(rows) - len(packed)
    assert (shifted[starts] == -100).all()


def test_pack_rows_errors(rows):
    with pytest.raises(ValueError, match="max_length=1 is out of range"): pack_rows(rows, 1)
    longest = max(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[longest]["input_ids"])
    with pytest.raises(ValueError, match=rf"rows\[{longest}\] has {n} tokens, more than max_length={n - 1}: tokenize with max_length<={n - 1}"):
        pack_rows(rows, n - 1)
    with pytest.raises(ValueError, match="no position_ids: pack them with pack_rows"):
        make_packed_collator(type("Tok", (), {"pad_token_id": 0})())(rows[:2])


@pytest.mark.parametrize("attention,recompute", KERNELS)
def test_packed_logits_equal_each_example_alone(tiny, rows, attention, recompute):
    model, tokenizer = tiny
    set_up_training_kernels(model, attention, recompute); model.train()
    few = rows[:8]
    batch = make_packed_collator(tokenizer)(pack_rows(few, MAX_LENGTH))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits  # (B, T, V)
        for b, group in enumerate(first_fit([len(r["input_ids"]) for r in few], MAX_LENGTH)):
            start = 0
            for i in group:
                alone = model(input_ids=torch.tensor([few[i]["input_ids"]])).logits[0]  # (n, V)
                torch.testing.assert_close(logits[b, start:start + len(alone)], alone, rtol=1e-5, atol=1e-5)
                start += len(alone)


@pytest.mark.parametrize("attention,recompute", KERNELS)
def test_packed_loss_and_gradients_equal_unpacked(tiny, rows, attention, recompute):
    model, tokenizer = tiny
    set_up_training_kernels(model, attention, recompute); model.train()
    few = rows[:8]
    packed_loss, packed_grads = _loss_and_grads(model, make_packed_collator(tokenizer)(pack_rows(few, MAX_LENGTH)))
    padded_loss, padded_grads = _loss_and_grads(model, make_collator(tokenizer)(few))  # the same rows, one padded batch
    with torch.no_grad(): losses = [causal_lm_loss(model, torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])) for r in few]
    counts = [len(r["labels"]) - 1 for r in few]  # every label but the first is scored
    weighted = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    assert abs(float(packed_loss / weighted) - 1) < 1e-5
    assert abs(float(packed_loss / padded_loss) - 1) < 1e-5
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


class _StepLosses(Callback):
    def __init__(self): self.losses = []
    def after_step(self, trainer): self.losses.append(trainer.step_loss)


def test_training_on_packed_rows(rows):
    model, tokenizer = load_base("tiny", device="cpu", dtype="fp32", seed=1)
    set_up_training_kernels(model, "auto", recompute=True)
    packed = pack_rows(rows, MAX_LENGTH)
    eval_rows = rows[:8]
    losses = _StepLosses()
    trainer = Trainer(model, packed, make_packed_collator(tokenizer), eval_data=pack_rows(eval_rows, MAX_LENGTH), callbacks=[losses],
                      batch_size=2, max_steps=12, lr=3e-3, warmup_steps=0, schedule="constant", device="cpu", dtype="fp32", seed=0)
    packed_eval = trainer.evaluate()["eval_loss"]
    trainer.eval_data, trainer.collate_fn = eval_rows, make_collator(tokenizer)
    assert abs(trainer.evaluate()["eval_loss"] / packed_eval - 1) < 1e-5  # eval on packed rows = eval on the rows unpacked
    trainer.eval_data, trainer.collate_fn = pack_rows(eval_rows, MAX_LENGTH), make_packed_collator(tokenizer)
    trainer.fit()
    assert len(losses.losses) == 12 and all(loss == loss for loss in losses.losses)
    assert sum(losses.losses[-3:]) < 0.9 * sum(losses.losses[:3])
    assert trainer.evaluate()["eval_loss"] < packed_eval

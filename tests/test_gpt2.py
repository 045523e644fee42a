"GPT-2-style models (transformers' Conv1D): quantized as bitsandbytes does, adapted and saved as PEFT does, trained, every method saved, exported."
import copy, json

import bitsandbytes.functional as bnbF
import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from qlora_nb.callback.core import Callback
from qlora_nb.core import set_seed
from qlora_nb.data import make_collator
from qlora_nb.kernels import exact_matmuls
from qlora_nb.lora import LoRAConfig, LoRALinear, add_lora, find_targets, load_adapter, merge_lora, save_adapter, trainable_report
from qlora_nb.methods import METHOD_CHOICES, add_method, load_trainable, method_setup, save_trainable
from qlora_nb.models import load_base
from qlora_nb.prepare import build_datasets
from qlora_nb.quant_linear import NF4Linear, quantize_model
from qlora_nb.recompute import set_up_training_kernels
from qlora_nb.testing import tiny_gpt2
from qlora_nb.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
BLOCK_LINEARS = 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "base")


def gpt2(folder):
    return load_base(str(folder), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def ids(folder):
    _, tokenizer = gpt2(folder)
    return tokenizer(["A week has seven days, and a year has twelve months."], return_tensors="pt")["input_ids"]  # (1, T)


def randomized(model, std=0.05):
    "`model` with LoRA's B (zero at the start) drawn at random, so the adapter changes the logits."
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear): module.lora_B.weight.normal_(0, std)
    return model


def test_load_base_reads_a_local_gpt2_folder(folder):
    model, tokenizer = gpt2(folder)
    assert type(model).__name__ == "GPT2LMHeadModel" and sum(isinstance(m, Conv1D) for m in model.modules()) == BLOCK_LINEARS
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"  # GPT-2 ships no pad token: pad with EOS
    batch = make_collator(tokenizer)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"][1].tolist() == [8, tokenizer.eos_token_id, tokenizer.eos_token_id]


def test_quantized_conv1d_is_bitsandbytes_quantization_of_the_transpose(folder):
    "Each Conv1D becomes a 4-bit (out, in) linear holding bitsandbytes' codes of W.T; its output is the dequantized layer's, bit for bit."
    model, _ = gpt2(folder)
    originals = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in model.named_modules() if isinstance(m, Conv1D)}
    quantize_model(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert layers.keys() == originals.keys() and not isinstance(model.lm_head, NF4Linear)
    x = torch.randn(3, 64)
    for name, layer in layers.items():
        weight, bias = originals[name]  # weight: (in, out)
        packed, state = bnbF.quantize_4bit(weight.T.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
        assert layer.fan_in_fan_out and (layer.out_features, layer.in_features) == (weight.shape[1], weight.shape[0])
        assert torch.equal(layer.weight, packed), name
        dense = bnbF.dequantize_4bit(packed, state)  # (out, in)
        assert torch.equal(layer.dequantize(), dense), name
        inputs = x if layer.in_features == 64 else torch.randn(3, layer.in_features)
        with torch.no_grad(), exact_matmuls(): assert torch.equal(layer(inputs), F.linear(inputs, dense) + bias), name


def test_targets_find_conv1d_layers_but_not_the_tied_head(folder):
    model, _ = gpt2(folder)
    every = find_targets(model, LoRAConfig())
    assert len(every) == BLOCK_LINEARS and "lm_head" not in every
    assert find_targets(model, LoRAConfig(target_modules=["c_attn"])) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert find_targets(model, LoRAConfig(target_modules=r".*\.mlp\.c_(fc|proj)")) == [
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    quantize_model(model)
    assert find_targets(model, LoRAConfig()) == every


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_loads_in_peft_with_equal_logits(folder, ids, tmp_path, use_dora):
    "Our adapter on an unquantized GPT-2, saved, loads in PEFT with fan_in_fan_out and gives our logits; merged, the same."
    model, _ = gpt2(folder)
    set_seed(1)
    randomized(add_lora(model, LoRAConfig(r=4, alpha=8, use_dora=use_dora)))
    with torch.no_grad(): ours = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["use_dora"] is use_dora and len(config["target_modules"]) == BLOCK_LINEARS
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert theirs.peft_config["default"].fan_in_fan_out
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(merge_lora(copy.deepcopy(model))(ids).logits, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.merge_and_unload()(ids).logits, ours, atol=1e-5, rtol=0)


def test_peft_adapter_loads_into_ours(folder, ids, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    set_seed(2)
    theirs = peft.get_peft_model(base, LoRAConfig(r=4, alpha=8).to_peft(fan_in_fan_out=True))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name: param.normal_(0, 0.05)
        expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(gpt2(folder)[0], tmp_path / "adapter")
    with torch.no_grad(): torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)


class _Losses(Callback):
    def __init__(self): self.losses = []
    def after_step(self, trainer): self.losses.append(trainer.step_loss)


def test_qlora_on_gpt2_trains(folder, tmp_path, embedded_subset):
    "4-bit base, LoRA on the Conv1D layers, the trainer on real rows padded with EOS: the loss falls; the adapter round-trips."
    model, tokenizer = gpt2(folder)
    set_up_training_kernels(model, "auto", recompute=True)
    quantize_model(model)
    add_method(model, "lora", LoRAConfig(r=8, alpha=16), seed=0)
    assert sum(isinstance(m, LoRALinear) and isinstance(m.base_layer, NF4Linear) for m in model.modules()) == BLOCK_LINEARS
    splits = build_datasets(tokenizer, *embedded_subset(tmp_path, 32, 8), max_length=64)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in splits["train"]]
    losses = _Losses()
    trainer = Trainer(model, rows, make_collator(tokenizer), eval_data=rows[:8], callbacks=[losses], batch_size=4, max_steps=10,
                      lr=1e-2, schedule="constant", device="cpu", dtype="fp32", seed=0)
    before = trainer.evaluate()["eval_loss"]
    trainer.fit()
    assert trainer.evaluate()["eval_loss"] < before - 0.1
    assert sum(losses.losses[-3:]) < sum(losses.losses[:3])
    folder_out = save_trainable(model.eval(), tmp_path / "adapter", "lora")
    assert json.loads((folder_out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    fresh, _ = gpt2(folder)
    quantize_model(fresh)
    load_trainable(fresh, folder_out, method="lora")
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad(), exact_matmuls(): assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", METHOD_CHOICES)
@pytest.mark.parametrize("quantize", [False, True])
def test_every_method_saves_and_loads_on_gpt2(folder, ids, tmp_path, name, quantize):
    if name == "full" and quantize: pytest.skip("full fine-tuning refuses a 4-bit base")
    method, overrides = method_setup(name)
    model, _ = gpt2(folder)
    if quantize: quantize_model(model)
    add_method(model, method, LoRAConfig(r=4, **overrides), bottleneck_size=8)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad: param.add_(torch.randn_like(param) * 0.02)
        expected = model(ids).logits
    saved = save_trainable(model, tmp_path / name, name)
    fresh, _ = gpt2(folder)
    if quantize: quantize_model(fresh)
    load_trainable(fresh, saved)
    with torch.no_grad(): assert torch.equal(fresh(ids).logits, expected)


def test_a_gpt2_folder_does_not_load_into_a_llama(folder, tmp_path):
    model, _ = gpt2(folder)
    add_method(model, "bitfit")
    saved = save_trainable(model, tmp_path / "bitfit", "bitfit")
    llama, _ = load_base("tiny", device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="was saved from a GPT2LMHeadModel; it cannot load into a LlamaForCausalLM"):
        load_trainable(llama, saved)


def test_bitfit_on_a_4bit_base_reports_its_biases(folder):
    "The report counts the biases BitFit trains, the 4-bit layers' included (it once said 0)."
    for model in (gpt2(folder)[0], load_base("tiny", device="cpu", dtype="fp32")[0]):
        add_method(quantize_model(model), "bitfit")
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trained > 0 and trainable_report(model).trainable_params == trained


def test_a_gpt2_run_exports_every_way(folder, tmp_path):
    from qlora_nb.export import EXPORT_KINDS, export_run
    from qlora_nb.testing import fake_run
    report = export_run(fake_run(tmp_path / "run", model=str(folder)), tmp_path / "export", gguf_type="q8_0", check_outputs=0)
    assert sorted(report["exports"]) == sorted(EXPORT_KINDS)
    for kind, entry in report["exports"].items(): assert entry["check"]["argmax_agreement"] == 1.0, kind
    assert report["exports"]["merged"]["check"]["rel_diff"] < 1e-5 and report["exports"]["adapter"]["check"]["max_abs_diff"] < 1e-5
    assert report["exports"]["nf4"]["check"]["linear4bit_layers"] == BLOCK_LINEARS
    assert report["exports"]["gguf"]["check"]["rel_diff"] < 1e-5 and report["exports"]["gguf"]["check"]["tokenizer_agrees"]

"""qlora_nb.rank_allocation on the tiny model: the budget holds at every step, ranks move away from uniform, the schedule
reaches its target, the conversion to plain LoRA is exact and loads in PEFT with equal logits, bad arguments are refused."""
import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_nb.callback.core import Callback
from qlora_nb.core import set_seed
from qlora_nb.lora import LoRALinear, save_adapter, load_adapter, trainable_report
from qlora_nb.models import load_base
from qlora_nb.rank_allocation import (BudgetGuard, RankAllocator, RankHeatmap, SVDLinear, adapter_cost, add_svd_lora, budget_schedule,
                                      rank_grid, to_lora, uniform_budget)
from qlora_nb.testing import random_token_rows, stack_rows
from qlora_nb.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 24


class CostLog(Callback):
    "Records the adapter's cost and the budget in force after every update."
    order = 12
    def __init__(self, allocator): self.allocator, self.seen = allocator, []
    def after_step(self, trainer): self.seen.append((trainer.step, adapter_cost(trainer.model, self.allocator.unit), self.allocator.budget))


@pytest.fixture(scope="module")
def trained():
    "The tiny model with SVD LoRA at r=6, trained 24 steps down to the parameter count of uniform r=4."
    set_seed(0)
    model = add_svd_lora(load_base("tiny", device="cpu", dtype="fp32")[0], r=6, alpha=16)
    allocator = RankAllocator(uniform_budget(model, 4), interval=2, warmup_fraction=0.1, final_fraction=0.25)
    log, view = CostLog(allocator), RankHeatmap(allocator, min_seconds=0)
    rows = random_token_rows(96, length=16, vocab=model.config.vocab_size)
    trainer = Trainer(model, rows, stack_rows, callbacks=[allocator, BudgetGuard(allocator), log, view], batch_size=4, max_steps=STEPS,
                      lr=1e-2, device="cpu", dtype="fp32", seed=0)
    trainer.fit()
    return model.eval(), allocator, log, view


def test_budget_holds_at_every_step_and_reaches_the_target(trained):
    model, allocator, log, _ = trained
    assert [step for step, _, _ in log.seen] == list(range(1, STEPS + 1))
    for step, cost, budget in log.seen: assert cost <= budget, (step, cost, budget)
    budgets = [budget for _, _, budget in log.seen]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # the budget never grows
    target = uniform_budget(model, 4)
    assert allocator.budget == target == budgets[-1] and budgets[0] == uniform_budget(model, 6)
    assert log.seen[-1][1] <= target and log.seen[-1][1] > 0.9 * target  # spent, not just under
    first_final = STEPS - allocator.final_steps
    assert all(b == target for s, _, b in log.seen if s >= first_final)
    assert budget_schedule(first_final, STEPS, 10.0, 4.0, 2, 6) == 4.0


def test_ranks_move_away_from_uniform(trained):
    model, allocator, _, _ = trained
    ranks = allocator.ranks()
    assert len(set(ranks.values())) >= 3, ranks
    assert max(ranks.values()) == 6 and min(ranks.values()) < 4  # some layers keep all, some give up more than uniform would
    assert [h["ranks"] for h in allocator.history][0] == {n: 6 for n in ranks}


def test_heatmap_widget_follows_the_ranks(trained):
    _, allocator, _, view = trained
    assert view.updates == STEPS + 1
    assert [list(row) for row in view.widget.data[0].z] == rank_grid(allocator.ranks())[2]
    assert f"step {STEPS}" in view.widget.layout.title.text


def test_conversion_is_exact_and_peft_loads_it_with_equal_logits(trained, tmp_path):
    model, allocator, _, _ = trained
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)
    before, cost = model(ids).logits, adapter_cost(model)
    ranks = allocator.ranks()
    to_lora(model)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    assert {n: m.r for n, m in model.named_modules() if isinstance(m, LoRALinear)} == {n: r for n, r in ranks.items() if r}
    assert trainable_report(model).trainable_params == cost
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and all(ranks[n] == r for n, r in config["rank_pattern"].items())
    base, _ = load_base("tiny", device="cpu", dtype="fp32")
    base.save_pretrained(tmp_path / "tiny")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"), tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(ids).logits, before, atol=1e-5, rtol=0)
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"), tmp_path / "adapter").eval()
    torch.testing.assert_close(ours(ids).logits, before, atol=1e-5, rtol=0)
    from qlora_nb.serve.engine import read_adapter
    with pytest.raises(ValueError, match="have ranks or alphas of their own"):  # the batched server says so, instead of a shape error
        read_adapter("allocated", tmp_path / "adapter", base)


def test_bad_budget_and_schedule_arguments_are_refused():
    with pytest.raises(ValueError, match=r"target_budget=0 is out of range"): RankAllocator(0)
    with pytest.raises(ValueError, match=r"unit='bytes' is not one of"): RankAllocator(100, unit="bytes")
    with pytest.raises(ValueError, match=r"warmup_fraction \+ final_fraction = 1.0 leaves no step to prune in"):
        RankAllocator(100, warmup_fraction=0.6, final_fraction=0.4)
    with pytest.raises(ValueError, match=r"interval=0 is out of range"): RankAllocator(100, interval=0)
    with pytest.raises(ValueError, match=r"initial_budget=5 is out of range"): budget_schedule(0, 10, 5, 8, 1, 1)
    with pytest.raises(ValueError, match=r"warmup_steps \+ final_steps = 10 leaves no step"): budget_schedule(0, 10, 9, 8, 5, 5)
    with pytest.raises(ValueError, match=r"r=0 must be a positive int"): SVDLinear(torch.nn.Linear(4, 4), r=0)
    model = add_svd_lora(load_base("tiny", device="cpu", dtype="fp32")[0], r=2)
    rows = random_token_rows(8, length=8, vocab=model.config.vocab_size)
    too_big = RankAllocator(uniform_budget(model, 3))
    with pytest.raises(ValueError, match=r"is more than the adapter holds at the start"):
        Trainer(model, rows, stack_rows, callbacks=[too_big], batch_size=4, max_steps=4, device="cpu", dtype="fp32").fit()
    with pytest.raises(ValueError, match="has no SVDLinear layers"):
        Trainer(load_base("tiny", device="cpu", dtype="fp32")[0].requires_grad_(True), rows, stack_rows, callbacks=[RankAllocator(10)],
                batch_size=4, max_steps=4, device="cpu", dtype="fp32").fit()


# --- method: adalora in a run (recipe, CLI, checkpoints, evaluation) ---

from safetensors.torch import load_file

from qlora_nb.cli import main
from qlora_nb.recipe import build, evaluate_run
from qlora_nb.runlog import read_run_log

ADALORA = {"model": "tiny", "quant": "nf4", "method": "adalora", "lora_r": 6, "target_r": 3, "max_steps": 12, "save_steps": 6,
           "eval_steps": None, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "em_examples": 0, "ppl_max_tokens": 0, "eval_rows": 8,
           "progress": False, "data": "train", "threads": 1}


class StopAt(Callback):
    "Stops the run after `step`, once the checkpointer has saved it."
    order = 200
    def __init__(self, step): self.step = step
    def after_step(self, trainer):
        if trainer.step == self.step: trainer.stop_reason = "test stop"


def test_adalora_run_keeps_its_budget_and_saves_plain_lora(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *[f"--set={k}={json.dumps(v)}" for k, v in ADALORA.items()], "--out", str(out)]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    base = load_base("tiny", device="cpu", dtype="fp32")[0]
    add_svd_lora(base, r=6)
    assert sum(t.numel() for t in tensors.values()) <= uniform_budget(base, 3)  # the budget of uniform r=3, in parameters
    assert config["rank_pattern"] and max(config["rank_pattern"].values()) <= 6
    events = [r for r in read_run_log(out) if r.get("event") == "lora_ranks"]
    assert events[0]["step"] == 0 and events[-1]["cost"] <= events[-1]["budget"] < events[0]["budget"]
    result = evaluate_run(out, {"em_examples": 6, "em_max_new_tokens": 2})
    assert result["after"]["n"] == 6  # the saved plain-LoRA adapter loads onto the bare base


def test_adalora_run_resumes_bit_for_bit(tmp_path):
    straight = build({**ADALORA, "out": str(tmp_path / "straight")}).fit()
    stopped = build({**ADALORA, "out": str(tmp_path / "stopped")}, callbacks=[StopAt(6)]).fit()
    assert stopped.trainer.step == 6 and (tmp_path / "stopped" / "checkpoints" / "step-000006" / "callback-RankAllocator.safetensors").is_file()
    resumed = build({**ADALORA, "out": str(tmp_path / "stopped")}, resume=True).fit()
    assert resumed.trainer.step == 12
    ours, theirs = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("straight", "stopped"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert straight.callback(RankAllocator).history == resumed.callback(RankAllocator).history


def test_training_dashboard_draws_the_ranks_of_an_adalora_run(tmp_path):
    from qlora_nb.dashboard import TrainingDashboard, default_run_config
    dash = TrainingDashboard(default_run_config(method="adalora", lora_r=6, target_r=3, max_steps=12, eval_steps=None, lr=1e-2, threads=1),
                             tmp_path, interval=0.1)
    assert dash.start()
    dash.wait(240)
    assert dash.error is None and dash.run.trainer.step == 12
    dash.board.poll(force=True)
    panel = dash.board.rank_panel
    assert panel.widget.children == (panel.fig,)
    last = [r for r in read_run_log(dash.run_dir) if r.get("event") == "lora_ranks"][-1]
    assert [list(row) for row in panel.fig.data[0].z] == rank_grid(last["ranks"])[2]
    assert f"step {last['step']}" in panel.fig.layout.title.text and panel.fig.data[0].zmax == 6

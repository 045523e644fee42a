"`qlora-nb train` with `stages:`: the layout a staged run leaves, exact resume, the refusals, and task_arithmetic's merged adapter."
import contextlib, io, json

import pytest
import torch
from safetensors.torch import load_file

from qlora_nb.callback.core import Callback
from qlora_nb.cli import main
from qlora_nb.continual import deltas_applied, merged_deltas
from qlora_nb.stages import STAGES_FILE, train_stages
from qlora_nb.export import load_run_model
from qlora_nb.methods import load_trainable, trainable_state
from qlora_nb.recipe import build_model, evaluate_run

# the tiny model, a few steps per stage, a handful of test rows: each run takes seconds
FAST = {"model": "tiny", "quant": "none", "dtype": "fp32", "lora_r": 4, "batch_size": 4, "lr": 1e-3, "save_steps": 2, "eval_steps": 2,
        "em_max_new_tokens": 4, "eval_rows": 8, "progress": False}
TWO_TASKS = [["uppercase"], ["km_to_m"]]
FAST_FLAGS = ["--model", "tiny", "--quant", "none", "--dtype", "fp32", "--lora-r", "4", "--batch-size", "4", "--lr", "1e-3",
              "--max-steps", "4", "--set", "em_max_new_tokens=4", "--set", "eval_rows=8", "--set", "progress=false",
              "--set", "fisher_rows=4", "--set", "ppl_max_tokens=64"]


def staged(tmp_path, name:str, **settings) -> dict:
    "A fast two-task staged run's config, in `tmp_path / name`."
    return {**FAST, "stages": TWO_TASKS, "max_steps": 8, "em_examples": 2, "ppl_max_tokens": 0, "out": str(tmp_path / name), **settings}


def adapter_tensors(run_dir) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def ewc_run(tmp_path_factory, one_thread):
    "`qlora-nb train --stages 2 --stage-method ewc` on the embedded tasks: its folder and what it printed."
    out = tmp_path_factory.mktemp("stages") / "ewc"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(["train", *FAST_FLAGS, "--stages", "2", "--stage-method", "ewc", "--set", "em_examples=15", "--out", str(out)])
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()


def test_cli_stages_layout_and_eval(ewc_run):
    out, printed = ewc_run
    assert "max_steps 4 split over them as evenly as possible" in printed and "stage 1: " in printed and "(2 steps)" in printed
    assert "== forgetting matrix" in printed and "after        stage 1   stage 2" in printed and "average forgetting" in printed
    assert "final accuracy" in printed and "stage 2 done: 2 steps" in printed
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.json", "stage-1", "stage-2", "stages.json"]
    state = json.loads((out / STAGES_FILE).read_text())
    assert state["plan"]["steps"] == [2, 2] and state["plan"]["stage"]["stage_method"] == "ewc"
    assert sorted(t for stage in state["plan"]["stages"] for t in stage) == sorted(state["results"][0]["evaluation"]["per_task"])  # all 15
    assert len(state["matrix"]) == 2 and all(len(row) == 2 for row in state["matrix"]) and len(state["perplexity"]) == 2
    assert state["average_forgetting"] == pytest.approx(state["matrix"][0][0] - state["matrix"][1][0])
    for stage in ("stage-1", "stage-2"):
        files = {p.name for p in (out / stage).iterdir()}
        assert {"config.json", "checkpoints", "adapter", "run.jsonl", "report.html", "ewc.safetensors"} <= files, files
        records = [json.loads(line) for line in (out / stage / "run.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["type"] == "step"] == [1, 2] and records[-1]["event"] == "evaluation"
    ewc = load_file(out / "stage-2" / "ewc.safetensors")
    assert any(k.startswith("anchor.") for k in ewc) and any(k.startswith("fisher.") for k in ewc)
    final, last_stage = adapter_tensors(out), adapter_tensors(out / "stage-2")
    assert final.keys() == last_stage.keys() and all(torch.equal(final[k], last_stage[k]) for k in final)
    assert json.loads((out / "config.json").read_text())["stages"] == 2
    result = evaluate_run(out, {"em_examples": 15})
    assert result["after"]["n"] == 15 and set(result["after"]["per_task"]) == set(result["before"]["per_task"])


class Interrupt(Callback):
    "Raise after update `step` of stage `stage`, like a process killed there."
    def __init__(self, stage:int, step:int): self.stage, self.step = stage, step
    def after_step(self, trainer):
        if trainer.run_dir.name == f"stage-{self.stage}" and trainer.step == self.step: raise RuntimeError("interrupted")


@pytest.mark.parametrize("method, stop_step", [("replay", 3), ("ewc", 3), ("ewc", 1), ("task_arithmetic", 3)])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, one_thread, method, stop_step):
    # stop_step 3: stage 2 resumes from its checkpoint at step 2; stop_step 1: it has none and starts from stage 1's adapter
    settings = {"stage_method": method, "replay_share": 0.5, "fisher_rows": 4}
    whole = train_stages(staged(tmp_path, "whole", **settings), print_fn=lambda line: None)
    with pytest.raises(Exception, match="interrupted"):
        train_stages(staged(tmp_path, "cut", **settings), print_fn=lambda line: None, callbacks=[Interrupt(2, stop_step)])
    assert len(json.loads((tmp_path / "cut" / STAGES_FILE).read_text())["results"]) == 1  # stage 1 finished, stage 2 did not
    printed = []
    resumed = train_stages(staged(tmp_path, "cut", **settings), resume=True, print_fn=printed.append)
    assert "stage 1: finished before, read back from stages.json" in printed
    assert any(line.startswith("stage 2: resuming from") for line in printed) == (stop_step == 3)
    expected, got = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "cut")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed["matrix"] == whole["matrix"]
    if method == "ewc":
        for name, tensor in load_file(tmp_path / "whole" / "stage-2" / "ewc.safetensors").items():
            assert torch.equal(tensor, load_file(tmp_path / "cut" / "stage-2" / "ewc.safetensors")[name]), name


def test_bad_input_is_refused_before_any_work(tmp_path, capsys, ewc_run):
    def error(*argv) -> str:
        assert main(["train", *FAST_FLAGS, "--out", str(tmp_path / "run"), *argv]) == 2
        return capsys.readouterr().err
    assert "stages[1] names 'km_to_mm', which is not a task; the tasks are: " in error("--stages", "[[uppercase], [km_to_mm]]")
    assert "stages=16 is not allowed: the training rows have 15 tasks" in error("--stages", "16", "--max-steps", "16", "--set", "em_examples=15")
    assert "em_examples=2: the 2 test rows hold no row of task(s)" in error("--stages", "3", "--set", "em_examples=2")
    assert "stages must be a number of stages >= 2" in error("--stages", "1")
    assert "set packing: false" in error("--stages", "2", "--packing", "true")
    assert "max_steps=4 is split over 5 stages" in error("--stages", "5")
    assert "holds no staged run to resume" in error("--stages", "[[uppercase], [km_to_m]]", "--resume")
    assert not (tmp_path / "run").exists()  # nothing was started
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WORLD_SIZE", "2"); env.setenv("RANK", "0")
        assert "stages trains in one process" in error("--stages", "[[uppercase], [km_to_m]]")
    out, _ = ewc_run  # a finished staged run: changing its plan on resume is refused, naming what changed
    assert main(["train", *FAST_FLAGS, "--stages", "2", "--stage-method", "ewc", "--set", "em_examples=15", "--out", str(out)]) == 2
    assert "holds another run (stages.json, stage-1, stage-2); pass --resume" in capsys.readouterr().err
    assert main(["train", *FAST_FLAGS, "--stages", "3", "--stage-method", "replay", "--max-steps", "6", "--set", "em_examples=15",
                 "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the run was planned with other settings" in err and "stage_method: the run has 'ewc', this config has 'replay'" in err
    assert "max_steps: the run has 4, this config has 6" in err and "steps: the run has [2, 2], this config has [2, 2, 2]" in err


def test_task_arithmetic_saves_the_merged_adapter(tmp_path, one_thread):
    config = staged(tmp_path, "ta", stage_method="task_arithmetic", max_steps=6, lr=1e-2)
    summary = train_stages(config, print_fn=lambda line: None)
    out = tmp_path / "ta"
    saved_config = json.loads((out / "config.json").read_text())
    assert (saved_config["lora_r"], saved_config["lora_alpha"]) == (8, 64.0)  # rank r·S, alpha·S: the same scale
    assert json.loads((out / STAGES_FILE).read_text())["config"]["lora_r"] == 4  # the config as given
    merged, tokenizer = load_run_model(out)
    model, _ = build_model({**json.loads((out / STAGES_FILE).read_text())["config"], "lora_dropout": 0.0})
    adapters = [trainable_state(load_trainable(model, out / f"stage-{k}" / "adapter")) for k in (1, 2)]
    assert not torch.equal(adapters[0][next(k for k in adapters[0] if "lora_B" in k)], adapters[1][next(k for k in adapters[1] if "lora_B" in k)])
    ids = torch.randint(0, 2000, (2, 16))  # (B, T)
    model.eval()
    with torch.no_grad(), deltas_applied(model, merged_deltas(model, adapters, "task_arithmetic")): expected = model(ids).logits  # (B, T, V)
    with torch.no_grad(): got = merged(ids).logits  # (B, T, V)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - model(ids).logits).abs().max() > 1e-4  # the merge is more than the last stage's adapter
    assert len(summary["matrix"]) == 2
    assert evaluate_run(out)["after"]["n"] == 2


def test_several_processes_are_refused_before_any_start(tmp_path, capsys):
    assert main(["train", "--model", "tiny", "--stages", "2", "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert "stages trains in one process: drop --nproc" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

"Runs reported to TensorBoard and MLflow hold the run log's numbers, read back with each library's own reader; report.html says what ran."
import json, subprocess, sys
from pathlib import Path

import pytest

from qlora_nb.callback.report import MLflowSink, TensorBoardSink, make_sinks, mlflow_metrics, tensorboard_scalars
from qlora_nb.runlog import RunLog, read_run_log, write_report
from qlora_nb.testing import fake_run_records, tiny_run

REPO = Path(__file__).resolve().parent.parent
EVALUATION = {"type": "event", "event": "evaluation", "step": 12,
              "before": {"exact_match": 0.125, "perplexity": 30.5, "per_task": {"math": 0.0, "qa": 0.25}, "main_metric": {"qa": "rougeL"}},
              "after": {"exact_match": 0.5, "perplexity": 28.25, "heldout_perplexity": 4.5, "per_task": {"math": 0.5, "qa": 0.75},
                        "main_metric": {"qa": "rougeL"}, "metrics": {"math": {"exact_match": 0.5}, "qa": {"rougeL": 0.75, "bleu": 0.5}}}}


def fit_to(run_dir:Path, max_steps:int, checkpoint:Path|None=None) -> RunLog:
    "A tiny fit to `max_steps` (resumed from `checkpoint`) whose run log reports to TensorBoard and MLflow; its RunLog."
    trainer = tiny_run(run_dir, max_steps=max_steps)
    log = next(cb for cb in trainer.callbacks if isinstance(cb, RunLog))
    log.sinks = make_sinks(["tensorboard", "mlflow"], run_dir, "tiny")
    if checkpoint is not None: trainer.load_checkpoint(checkpoint)
    trainer.fit()
    return log


def tracked(run_dir:Path, log:RunLog) -> tuple[dict, dict]:
    "The scalars TensorBoard and the metrics MLflow hold for the run in `run_dir`, read with their own readers."
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    mlflow_sink = next(s for s in log.sinks if isinstance(s, MLflowSink))
    return tensorboard_scalars(run_dir / "tensorboard"), mlflow_metrics(mlflow_sink.tracking_uri, run_id)


def logged(records:list[dict], kind:str, key:str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r["type"] == kind]


def assert_same(board:list, losses:list):
    "TensorBoard keeps float32: the same steps, the values to float32 precision."
    assert [s for s, _ in board] == [s for s, _ in losses]
    assert [v for _, v in board] == pytest.approx([v for _, v in losses], rel=1e-6)


def test_trackers_hold_the_run_logs_numbers(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = fit_to(tmp_path, 12)
    log.append(EVALUATION)  # the final evaluation, appended by the run's owner after the fit
    records = read_run_log(tmp_path)
    board, mlflow = tracked(tmp_path, log)
    losses, eval_losses = logged(records, "step", "loss"), logged(records, "eval", "eval_loss")
    assert [s for s, _ in losses] == list(range(1, 13)) and eval_losses
    assert mlflow["train/loss"] == losses and mlflow["eval/loss"] == eval_losses  # MLflow keeps doubles: equal
    assert mlflow["train/lr"] == logged(records, "step", "lr")
    assert_same(board["train/loss"], losses)
    assert_same(board["eval/loss"], eval_losses)
    for name, value in (("exact_match_before", 0.125), ("exact_match_after", 0.5), ("perplexity_after", 28.25),
                        ("heldout_perplexity_after", 4.5), ("qa/rougeL_after", 0.75), ("math/exact_match_before", 0.0)):
        assert mlflow[f"evaluation/{name}"] == [(12, value)], name
        assert board[f"evaluation/{name}"] == [(12, pytest.approx(value))], name
    from mlflow.tracking import MlflowClient
    run = MlflowClient(log.sinks[1].tracking_uri).get_run(json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"])
    assert run.data.params["model"] == "tiny_llama" and run.data.params["max_steps"] == "12" and run.info.status == "FINISHED"


def test_a_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fit_to(tmp_path, 8)
    checkpoint = tmp_path / "checkpoints" / "step-000008"
    fit_to(tmp_path, 12, checkpoint)  # went on to step 12, then was killed ...
    log = fit_to(tmp_path, 12, checkpoint)  # ... and resumed from its checkpoint at step 8
    records = read_run_log(tmp_path)
    losses = logged(records, "step", "loss")
    assert [s for s, _ in losses] == list(range(1, 13))
    board, mlflow = tracked(tmp_path, log)
    assert mlflow["train/loss"] == losses and mlflow["eval/loss"] == logged(records, "eval", "eval_loss")
    assert_same(board["train/loss"], losses)
    (tmp_path / "report.html").write_text("<html></html>")
    log.add_artifacts([tmp_path / "report.html", tmp_path / "checkpoints" / "step-000008"])
    artifacts = next((tmp_path / "mlruns" / "artifacts").glob("*/artifacts"))
    assert (artifacts / "report.html").is_file() and (artifacts / "step-000008").is_dir()


def test_make_sinks_names_what_is_wrong(tmp_path, monkeypatch):
    assert make_sinks(None, tmp_path, "a") == [] and make_sinks("none", tmp_path, "a") == []
    sinks = make_sinks("tensorboard,mlflow", tmp_path, "a")
    assert [type(s) for s in sinks] == [TensorBoardSink, MLflowSink]
    assert sinks[0].log_dir == tmp_path.resolve() / "tensorboard"
    assert sinks[1].tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    with pytest.raises(ValueError, match="report_to='wandb' is not one of 'tensorboard', 'mlflow'"): make_sinks(["wandb"], tmp_path, "a")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid:5000")
    assert make_sinks(["mlflow"], tmp_path, "a")[0].tracking_uri == "http://tracking.invalid:5000"
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "mlflow" else find_spec(name, *args))
    with pytest.raises(ModuleNotFoundError, match="report_to='mlflow' needs the mlflow-skinny package: pip install mlflow-skinny"):
        make_sinks(["tensorboard", "mlflow"], tmp_path, "a")


def test_imports_stay_light():
    code = ("import sys, qlora_nb.runlog, qlora_nb.callback.report; "
            "print(sorted(m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_report_says_what_ran(tmp_path):
    config = {"model": "tiny", "lr": 0.001, "lora_r": 8, "target_modules": ["q_proj", "v_proj"], "report_to": ["tensorboard"]}
    environment = {"asked": {"device": "auto", "dtype": "auto"},
                   "resolved": {"device": "cpu", "dtype": "float32", "attention": "sdpa"},
                   "versions": {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2", "qlora_nb": "0.1.0"},
                   "machine": {"cpu": "AMD EPYC 7B13", "cpu_flags": ["avx2", "avx512f"], "gpu": None, "cores": 2},
                   "git_commit": "0123abcd", "command": "qlora-nb train --data my.jsonl", "defaults": {"model": "tiny", "lr": 0.0002, "lora_r": 8}}
    data_report = {"splits": {"train": {"rows": 90, "truncated": 3, "skipped": ["my.jsonl:7: no output"], "notes": ["2 duplicates dropped"]},
                              "val": {"rows": 10, "truncated": 0, "skipped": []}}, "notes": ["val held out: 10% of train"]}
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fake_run_records(12) + [EVALUATION]))
    (tmp_path / "config.json").write_text(json.dumps(config, indent=1))
    (tmp_path / "environment.json").write_text(json.dumps(environment))
    (tmp_path / "data_report.json").write_text(json.dumps(data_report))
    page = write_report(tmp_path).read_text()
    for expected in (
        "<tr class=changed><td>lr</td><td>0.001  (default 0.0002)</td></tr>", "<tr><td>lora_r</td><td>8</td></tr>",
        "<td>target_modules</td><td>[&quot;q_proj&quot;, &quot;v_proj&quot;]</td>", "1 of 5 settings differ from the defaults",
        "<tr><td>device</td><td>auto</td><td>cpu</td></tr>", "<tr><td>dtype</td><td>auto</td><td>float32</td></tr>",
        "<tr><td>attention</td><td>–</td><td>sdpa</td></tr>", "<tr><td>bitsandbytes</td><td>0.50.2</td></tr>",
        "<tr><td>cpu</td><td>AMD EPYC 7B13</td></tr>", "<tr><td>cpu_flags</td><td>avx2, avx512f</td></tr>", "<tr><td>gpu</td><td>–</td></tr>",
        "<tr><td>git commit</td><td>0123abcd</td></tr>", "<tr><td>command</td><td>qlora-nb train --data my.jsonl</td></tr>",
        "<th>split</th><th>rows</th><th>truncated</th><th>skipped</th>",
        "<tr><td>train</td><td>90</td><td>3</td><td>1</td></tr>", "<tr><td>val</td><td>10</td><td>0</td><td>0</td></tr>",
        "<li>val held out: 10% of train</li>", "<li>train: 2 duplicates dropped</li>",
        "<tr><td>exact-match (all)</td><td>12.5%</td><td>50.0%</td></tr>", "<tr><td>perplexity, general text</td><td>30.50</td><td>28.25</td></tr>",
        "<tr><td>perplexity, held-out rows</td><td>–</td><td>4.50</td></tr>", "<tr><td>exact-match: math</td><td>0.0%</td><td>50.0%</td></tr>",
        "<tr><td>rougeL: qa</td><td>25.0%</td><td>75.0%</td></tr>"):
        assert expected in page, expected
    assert json.dumps(config) not in page and "{&quot;model&quot;" not in page and '{"model"' not in page  # no raw JSON dump


def test_report_without_the_side_files(tmp_path):
    records = fake_run_records(5, alert_at=None)
    records[0]["config"] = {"lr": 0.001}
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = write_report(tmp_path).read_text()
    assert "<tr><td>lr</td><td>0.001</td></tr>" in page  # the config from the meta record, nothing marked without defaults
    assert "What really ran" not in page and "<h2>Data</h2>" not in page and "no evaluation recorded" in page

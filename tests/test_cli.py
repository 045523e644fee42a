"The `qlora-nb train` command: bad input is refused before any work, and a run leaves the documented layout."
import json

import pytest
from safetensors.torch import load_file

from qlora_nb.cli import main
from qlora_nb.settings import SETTINGS

FAST = ["--model", "tiny", "--quant", "none", "--max-steps", "6", "--save-steps", "3", "--eval-steps", "3", "--lr", "1e-3",
        "--set", "em_examples=15", "--set", "em_max_new_tokens=4", "--set", "ppl_max_tokens=128", "--set", "eval_rows=8",
        "--set", "progress=false"]


def _error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_config_key_lists_allowed(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: tiny\nlearning_rate: 0.001\n")
    err = _error(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert "unknown key 'learning_rate'" in err and "allowed keys: model, data" in err and "lora_r" in err
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize("argv, message", [
    (["--lora-r", "0"], "lora_r=0 is not allowed: lora_r must be int in [1, 1024]"),
    (["--quant", "nf5"], "quant='nf5' is not allowed: quant must be one of 'nf4', 'fp4', 'none'"),
    (["--max-steps", "-3"], "max_steps=-3"),
    (["--lr", "fast"], "lr='fast' is not allowed"),
    (["--set", "lora_dropout=1.5"], "lora_dropout=1.5 is not allowed: lora_dropout must be float in [0.0, 0.99]"),
    (["--set", "warmup"], "expected KEY=VALUE"),
])
def test_out_of_range_values_are_refused(tmp_path, capsys, argv, message):
    err = _error(capsys, ["train", "--model", "tiny", "--out", str(tmp_path / "run"), *argv])
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_bad_config_files(tmp_path, capsys):
    assert "does not exist" in _error(capsys, ["train", "--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "expected a mapping of settings" in _error(capsys, ["train", "--config", str(tmp_path / "list.json")])
    (tmp_path / "bad.json").write_text(json.dumps({"schedule": "exponential"}))
    assert "schedule='exponential' is not allowed: schedule must be one of 'constant', 'linear', 'cosine'" in \
        _error(capsys, ["train", "--config", str(tmp_path / "bad.json")])


def test_missing_model_path_is_refused(tmp_path, capsys):
    err = _error(capsys, ["train", "--model", str(tmp_path / "nowhere"), "--quant", "none", "--out", str(tmp_path / "run")])
    assert "neither a built-in" in err


def test_run_layout_and_refusals(tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"seed": 3, "lora_r": 4}))  # JSON config, then flags on top
    assert main(["train", "--config", str(config), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert f"adapter: {out / 'adapter'}" in printed and f"report: {out / 'report.html'}" in printed
    assert "exact_match" in printed and "perplexity on the general text" in printed and "== data" in printed
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "config.json", "data_report.json", "environment.json",
                                                     "eval_before.json", "report.html", "run.jsonl"]

    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors and all(k.startswith("base_model.model.") for k in tensors)
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # training moved B away from 0

    records = [json.loads(line) for line in (out / "run.jsonl").read_text().splitlines()]
    assert records[0]["type"] == "meta" and records[0]["config"]["seed"] == 3
    assert [r["step"] for r in records if r["type"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["type"] == "eval"] == [3, 6]
    step = next(r for r in records if r["type"] == "step")
    for key in ("loss", "lr", "grad_norm", "grad_norm_preclip", "update_ratio", "tokens_per_s", "eta_s", "peak_rss", "threads"): assert key in step
    evaluation = records[-1]
    assert evaluation["event"] == "evaluation" and set(evaluation["before"]["per_task"]) == set(evaluation["after"]["per_task"])
    assert len(evaluation["after"]["per_task"]) == 15 and evaluation["after"]["n"] == 15
    assert [p.name for p in (out / "checkpoints").iterdir()] and (out / "checkpoints" / "step-000006" / "adapter").is_dir()

    report = (out / "report.html").read_text()
    assert "exact-match (all)" in report and "gradient norm" in report
    assert '<script src="http' not in report and "plotly" in report.lower()  # plotly inlined: works offline

    # the folder now holds a run: refused without --resume/--overwrite; both together are refused too
    assert "holds another run" in _error(capsys, ["train", "--out", str(out), *FAST])
    assert "contradict each other" in _error(capsys, ["train", "--out", str(out), "--resume", "--overwrite", *FAST])
    assert main(["train", "--out", str(out), "--overwrite", *FAST, "--max-steps", "2", "--set", "em_examples=0"]) == 0
    assert [r["step"] for r in map(json.loads, (out / "run.jsonl").read_text().splitlines()) if r["type"] == "step"] == [1, 2]


def test_resume_without_checkpoint_is_refused(tmp_path, capsys):
    assert "holds no complete checkpoint" in _error(capsys, ["train", "--out", str(tmp_path / "empty"), "--resume", *FAST])


def test_every_setting_is_documented(capsys):
    assert main(["train", "--list-settings"]) == 0
    listing = capsys.readouterr().out
    assert all(key in listing for key in SETTINGS)

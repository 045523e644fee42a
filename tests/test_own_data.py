"""Issue 16 as a new user meets it: their own files through `qlora-nb` run as a subprocess, the README's way.

Every run here must end without a traceback and without a warning line; every bad input must be refused with
the file and line, before a model loads, leaving the run directory as it was."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "data"
QUICK = ["--model", "tiny", "--quant", "nf4", "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2", "--lr", "1e-3",
         "--em-max-new-tokens", "4", "--ppl-max-tokens", "128", "--eval-rows", "8", "--progress", "false"]


def qlora_nb(*args, cwd=None, check=True):
    "Run `qlora-nb ARGS` as a user would; return the finished process (stdout and stderr as text)."
    env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, "-m", "qlora_nb.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    if check: assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def assert_clean(done):
    "No traceback and no warning line anywhere in what the command printed."
    text = done.stdout + done.stderr
    assert "Traceback" not in text, text
    noisy = [line for line in text.splitlines() if "Warning" in line or "warn(" in line]
    assert not noisy, "\n".join(noisy)


def evaluation(run_dir:Path) -> dict:
    return [json.loads(line) for line in (run_dir / "run.jsonl").read_text().splitlines()][-1]


@pytest.mark.parametrize("name, extra", [
    ("alpaca.jsonl", []),
    ("chat.jsonl", []),
    ("sharegpt.json", []),
    ("qa.csv", ["--fields", "{instruction: question, output: answer}"]),
])
def test_own_file_trains_and_is_evaluated_on_its_own_held_out_rows(tmp_path, name, extra):
    out = tmp_path / "run"
    done = qlora_nb("train", "--data", FIXTURES / name, "--out", out, *QUICK, *extra)
    assert_clean(done)
    assert "held out" in done.stdout and "== data" in done.stdout, done.stdout
    report = json.loads((out / "data_report.json").read_text())
    assert report, report
    after = evaluation(out)["after"]
    assert after["n"] > 0 and after["n"] < 100  # the held-out share of the file, not the embedded test split
    rows = [json.loads(line) for line in (out / "run.jsonl").read_text().splitlines()]
    assert rows[0]["type"] == "meta"
    html = (out / "report.html").read_text()
    assert name in html and "What really ran" in html, html[:2000]
    environment = json.loads((out / "environment.json").read_text())
    assert environment["asked"]["dtype"] == "auto" and environment["resolved"]["dtype"] in ("float32", "bfloat16")
    assert environment["versions"]["torch"] and environment["versions"]["bitsandbytes"] and environment["machine"]["cores"] >= 1


def test_plain_text_file_is_scored_by_held_out_perplexity(tmp_path):
    out = tmp_path / "run"
    done = qlora_nb("train", "--data", FIXTURES / "notes.txt", "--out", out, *QUICK)
    assert_clean(done)
    assert "held-out text rows" in done.stdout, done.stdout
    after = evaluation(out)["after"]
    assert after["heldout_perplexity"] > 1 and after["n_text"] > 0


def test_dirty_file_is_reported_with_file_and_line(tmp_path):
    out = tmp_path / "run"
    done = qlora_nb("train", "--data", FIXTURES / "dirty.jsonl", "--out", out, *QUICK, check=False)
    text = done.stdout + done.stderr
    assert "dirty.jsonl:" in text, text  # a bad row is named by file:line, whether it stops the run or is reported
    if done.returncode == 0:
        report = json.loads((out / "data_report.json").read_text())
        assert "dirty.jsonl:" in json.dumps(report)
    else:
        assert done.returncode == 2 and "Traceback" not in text and not out.exists()


def test_bad_data_fails_before_the_model_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "Say bye.", "output": \n')
    out = tmp_path / "run"
    for _ in range(2):  # the same command fails the same way twice: no debris makes it "another run"
        done = qlora_nb("train", "--data", bad, "--out", out, *QUICK, check=False)
        assert done.returncode == 2 and f"{bad}:2" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "holds another run" not in done.stderr and not out.exists()


def test_missing_data_and_broken_yaml_are_refused_with_where(tmp_path):
    done = qlora_nb("train", "--data", tmp_path / "nowhere.jsonl", "--out", tmp_path / "run", *QUICK, check=False)
    assert done.returncode == 2 and "nowhere.jsonl" in done.stderr and not (tmp_path / "run").exists()
    config = tmp_path / "broken.yaml"
    config.write_text("model: tiny\nlr: [1e-3\nlora_r: 4\n")
    done = qlora_nb("train", "--config", config, check=False)
    assert done.returncode == 2 and f"{config}:" in done.stderr and "not valid YAML" in done.stderr and "Traceback" not in done.stderr


def test_resume_of_a_finished_and_of_an_interrupted_run(tmp_path):
    out = tmp_path / "run"
    qlora_nb("train", "--out", out, *QUICK, "--em-examples", "15")
    done = qlora_nb("train", "--out", out, *QUICK, "--em-examples", "15", "--resume")  # finished: nothing left to train
    assert_clean(done)
    assert "steps: 4" in done.stdout
    # killed after its last checkpoint, before it saved the adapter and the evaluation: resume finishes the job
    for name in ("adapter", "report.html"): subprocess.run(["rm", "-rf", str(out / name)], check=True)
    done = qlora_nb("train", "--out", out, *QUICK, "--em-examples", "15", "--resume")
    assert_clean(done)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and "== summary" in done.stdout


@pytest.mark.parametrize("method", ["dora", "bitfit", "adapter"])
def test_every_method_has_a_flag_and_evaluates(tmp_path, method):
    out = tmp_path / "run"
    done = qlora_nb("train", "--method", method, "--out", out, *QUICK, "--em-examples", "15")
    assert_clean(done)
    assert "trainable" in done.stdout
    done = qlora_nb("eval", out, "--json", tmp_path / "eval.json")
    assert_clean(done)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["after"]["exact_match"] == evaluation(out)["after"]["exact_match"]


def test_help_names_the_formats_and_gives_examples():
    text = qlora_nb("train", "--help").stdout
    for word in (".jsonl", ".csv", ".parquet", ".txt", "messages", "conversations", "instruction", "fields", "examples:", "qlora-nb eval"):
        assert word in text, word
    top = qlora_nb("--help").stdout
    for command in ("train", "eval", "search", "sweep", "export", "serve"): assert command in top


def test_no_evaluation_announced_when_switched_off(tmp_path):
    done = qlora_nb("train", "--out", tmp_path / "run", *QUICK, "--em-examples", "0", "--ppl-max-tokens", "0")
    assert "evaluating" not in done.stdout and "exact-match" not in done.stdout, done.stdout


def test_packing_and_trackers_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    done = qlora_nb("train", "--out", out, *QUICK, "--em-examples", "15", "--packing", "true", "--report-to", "tensorboard,mlflow")
    assert_clean(done)
    from qlora_nb.callback.report import tensorboard_scalars
    scalars = tensorboard_scalars(out / "tensorboard")
    assert "train/loss" in scalars and "evaluation/exact_match_after" in scalars, sorted(scalars)
    assert (out / "mlruns").is_dir()


def test_gpt2_style_model_folder_trains_and_exports(tmp_path):
    from qlora_nb.testing import tiny_gpt2
    folder = tiny_gpt2(tmp_path / "gpt2")
    out = tmp_path / "run"
    done = qlora_nb("train", "--model", folder, "--out", out, *QUICK[2:], "--em-examples", "15")
    assert_clean(done)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and "c_attn" in json.dumps(config["target_modules"])
    exported = qlora_nb("export", out, "--format", "merged", "--out", tmp_path / "merged", "--allow-output-problems")  # a random model's answers
    assert_clean(exported)
    assert "outputs: 30 answers checked" in exported.stdout, exported.stdout


def test_mixing_and_augmentation_from_a_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {FIXTURES / 'alpaca.jsonl'}\naugmentation: paraphrase\naugment_p: 0.5\n"
                      "task_weights: {arithmetic: 3, capital: 1}\n")
    out = tmp_path / "run"
    done = qlora_nb("train", "--config", config, "--out", out, *QUICK)
    assert_clean(done)
    assert json.loads((out / "config.json").read_text())["task_weights"] == {"arithmetic": 3.0, "capital": 1.0}
    config.write_text(f"data: {FIXTURES / 'alpaca.jsonl'}\ntask_weights: {{astronomy: 2}}\n")
    done = qlora_nb("train", "--config", config, "--out", tmp_path / "other", *QUICK, check=False)
    assert done.returncode == 2 and "astronomy" in done.stderr and "Traceback" not in done.stderr, done.stderr

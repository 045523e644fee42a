"Exact resume: a run killed with SIGKILL mid-training, then resumed, ends with the same adapter bytes as an uninterrupted run."
import json, os, signal, subprocess, sys, time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent

# Runs the CLI; a positive delay slows every optimizer step so the test can kill it between checkpoints.
SCRIPT = """
import sys, time
from qlora_nb import trainer
from qlora_nb.cli import main
delay = float(sys.argv[1])
if delay:
    original = trainer.Trainer.train_step
    def slow_step(self, micro_batches):
        original(self, micro_batches); time.sleep(delay)
    trainer.Trainer.train_step = slow_step
sys.exit(main(sys.argv[2:]))
"""

ARGS = ["train", "--model", "tiny", "--quant", "none", "--max-steps", "24", "--save-steps", "4", "--eval-steps", "8",
        "--batch-size", "4", "--lr", "1e-3", "--set", "lora_dropout=0.1", "--set", "em_examples=0", "--set", "ppl_max_tokens=0",
        "--set", "eval_rows=8", "--set", "progress=false", "--set", "keep_last=1"]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("QLORA_NB_DTYPE", None)
    return env


def _command(out, delay=0.0, *extra):
    return [sys.executable, "-c", SCRIPT, str(delay), *ARGS, "--out", str(out), *extra]


def _run(out, *extra):
    return subprocess.run(_command(out, 0.0, *extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _steps(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "run.jsonl").read_text().splitlines()) if r["type"] == "step"]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _run(straight)
    assert done.returncode == 0, done.stderr[-3000:]

    process = subprocess.Popen(_command(killed, 0.4), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        while not (killed / "checkpoints" / "step-000008" / "trainer_state.json").is_file():
            assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint at step 8 within 240 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "adapter").exists(), "the killed run must not have finished"
    steps_at_kill = _steps(killed)
    assert 8 <= steps_at_kill[-1][0] < 24

    resumed = _run(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight_bytes = (straight / "adapter" / "adapter_model.safetensors").read_bytes()
    resumed_bytes = (killed / "adapter" / "adapter_model.safetensors").read_bytes()
    assert straight_bytes == resumed_bytes
    # the resumed log was cut back to its checkpoint, so every step appears once, with the uninterrupted losses
    assert _steps(killed) == _steps(straight)
    events = [r.get("event") for r in map(json.loads, (killed / "run.jsonl").read_text().splitlines()) if r["type"] == "event"]
    assert "resume" in events and "fit_end" in events

    # resuming with different settings is refused, naming what differs
    refused = _run(killed, "--resume", "--lora-r", "8")
    assert refused.returncode == 2
    assert "lora_r: checkpoint has 16, this run has 8" in refused.stderr

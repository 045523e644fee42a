"The trainer and monitors on a CUDA device: bf16 autocast where supported, CUDA memory readings, checkpoints with CUDA RNG, resume. Skipped without CUDA."
import json, math

import pytest
import torch

from qlora_nb.callback.core import Callback, CancelFitException
from qlora_nb.callback.monitor import GradientMonitor, StabilityMonitor, ThroughputMonitor
from qlora_nb.core import compute_dtype
from qlora_nb.trainer import (Checkpointer, EvalEvery, RunLog, Trainer, latest_checkpoint, random_token_rows, read_run_log,
                              stack_rows, tiny_llama)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class StopAt(Callback):
    def __init__(self, step): self.stop_at = step
    def after_step(self, trainer):
        if trainer.step == self.stop_at: raise CancelFitException()


def _run(folder, stop_at=None, resume=False, max_steps=16):
    monitors = [ThroughputMonitor(), GradientMonitor(), StabilityMonitor(warn=False)]
    callbacks = monitors + [EvalEvery(8), RunLog(folder / "run.jsonl"), Checkpointer(folder / "checkpoints", save_steps=4)]
    if stop_at: callbacks.append(StopAt(stop_at))
    trainer = Trainer(tiny_llama(), random_token_rows(48), stack_rows, eval_data=random_token_rows(8, seed=1), callbacks=callbacks,
                      batch_size=4, grad_accum=2, max_steps=max_steps, lr=1e-2, warmup_steps=2, device="cuda",
                      fingerprint={"model": "tiny_llama"})
    if resume: trainer.load_checkpoint(latest_checkpoint(folder / "checkpoints"))
    trainer.fit()
    return trainer, monitors


def test_cuda_training_bf16_memory_and_resume(tmp_path):
    trainer, (throughput, gradients, stability) = _run(tmp_path / "a")
    assert trainer.amp_dtype == compute_dtype("cuda")
    print(f"autocast dtype on {torch.cuda.get_device_name()}: {trainer.amp_dtype}")
    assert all(p.device.type == "cuda" for p in trainer.trainable.values())
    steps = [r for r in read_run_log(tmp_path / "a" / "run.jsonl") if r["type"] == "step"]
    assert len(steps) == 16 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(r["cuda_allocated"] > 0 and r["cuda_reserved"] >= r["cuda_allocated"] and r["cuda_peak_allocated"] > 0 for r in steps)
    assert len(gradients.grad_norms) == 16 and stability.issues == []

    _run(tmp_path / "b", stop_at=10)
    resumed, _ = _run(tmp_path / "b", resume=True)
    differences = {n: float((p - resumed.trainable[n]).abs().max()) for n, p in trainer.trainable.items()}
    exact = all(torch.equal(p, resumed.trainable[n]) for n, p in trainer.trainable.items())
    print(f"resume on CUDA bit-exact: {exact}; largest difference {max(differences.values()):.3g}")
    assert max(differences.values()) < 1e-4, differences
    losses = lambda folder: [r["loss"] for r in read_run_log(folder / "run.jsonl") if r["type"] == "step"]
    assert len(losses(tmp_path / "b")) == 16


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_cuda_bnb_optimizers(tmp_path, optimizer):
    pytest.importorskip("bitsandbytes")
    trainer = Trainer(tiny_llama(), random_token_rows(32), stack_rows, batch_size=4, max_steps=12, lr=1e-2, device="cuda",
                      optimizer=optimizer)
    first = None
    class First(Callback):
        def after_step(self, t):
            nonlocal first
            if first is None: first = t.step_loss
    trainer.callbacks = [First()]
    trainer.fit()
    assert trainer.step_loss < first
    trainer.save_checkpoint(tmp_path / "ckpt")
    trainer.load_checkpoint(tmp_path / "ckpt")

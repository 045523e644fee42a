"The trainer and monitors on a CUDA device: bf16 autocast where supported, CUDA memory readings, checkpoints with CUDA RNG, resume. Skipped without CUDA."
import math

import pytest
import torch

from qlora_nb.callback.core import Callback, CancelFitException
from qlora_nb.callback.monitor import GradientMonitor, StabilityMonitor, ThroughputMonitor
from qlora_nb.core import compute_dtype
from qlora_nb.runlog import RunLog, read_run_log
from qlora_nb.testing import random_token_rows, stack_rows, tiny_llama
from qlora_nb.trainer import Checkpointer, EvalEvery, Trainer, latest_checkpoint

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


def _tensors(state, prefix=()) -> dict:
    "Every tensor in a nested optimizer state (bitsandbytes nests its own under one key), by key path, on the CPU."
    if torch.is_tensor(state): return {prefix: state.detach().cpu().clone()}
    if isinstance(state, dict): return {k: v for key, value in state.items() for k, v in _tensors(value, prefix + (key,)).items()}
    return {}


def _optimizer_state(trainer) -> dict:
    return _tensors(trainer.optimizer.state_dict()["state"])


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_cuda_bnb_optimizers(tmp_path, optimizer, device="cuda"):
    pytest.importorskip("bitsandbytes")
    make = lambda: Trainer(tiny_llama(), random_token_rows(32), stack_rows, batch_size=4, max_steps=12, lr=1e-2, device=device,
                           optimizer=optimizer, schedule="constant")  # the update after the checkpoint has a non-zero lr
    trainer = make()
    first = None
    class First(Callback):
        def after_step(self, t):
            nonlocal first
            if first is None: first = t.step_loss
    trainer.callbacks = [First()]
    trainer.fit()
    assert trainer.step_loss < first
    trainer.save_checkpoint(tmp_path / "ckpt")
    saved_state = _optimizer_state(trainer)
    assert any(path[-1] in ("state1", "exp_avg") for path in saved_state), sorted(saved_state)
    at_checkpoint = {n: p.detach().clone() for n, p in trainer.trainable.items()}
    next_rows = [[0, 1, 2, 3]]
    trainer.train_step(next_rows)  # one more update from the checkpointed state, dropout drawing from the saved RNG
    expected = {n: p.detach().clone() for n, p in trainer.trainable.items()}

    restored = make()  # a fresh model and optimizer: everything the next update depends on comes from the checkpoint
    restored.model.train()
    restored.load_checkpoint(tmp_path / "ckpt")
    restored_state = _optimizer_state(restored)
    assert restored_state.keys() == saved_state.keys()
    for key, value in saved_state.items(): assert torch.equal(restored_state[key], value), key
    assert restored.step == 12
    for name, param in restored.trainable.items(): assert torch.equal(param.cpu(), at_checkpoint[name].cpu()), name
    restored.train_step(next_rows)
    # CUDA kernels (sdpa's backward) may differ in the last bits from run to run; a wrong restore (optimizer moments,
    # RNG, step) is off by a good part of the update itself
    update = max(float((expected[n] - at_checkpoint[n]).abs().max()) for n in expected)
    differences = {n: float((p - expected[n]).abs().max()) for n, p in restored.trainable.items()}
    print(f"{optimizer}: the update after the restore is bit-exact: {max(differences.values()) == 0}; update {update:.3g}")
    assert max(differences.values()) <= 0.05 * update, (differences, update)

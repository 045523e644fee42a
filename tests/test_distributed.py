"""Training in two processes on gloo: equal to one process, exact resume after every rank is killed, an elastic restart
after one is killed, a dead rank that stops the run, two launchers training together, and FSDP."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from qlora_nb.serve.cache import free_port

REPO = Path(__file__).resolve().parent.parent

ARGS = ["train", "--model", "tiny", "--max-steps", "6", "--save-steps", "2", "--eval-steps", "3", "--batch-size", "2",
        "--lr", "1e-3", "--dtype", "fp32", "--set", "lora_dropout=0.1", "--set", "em_examples=0", "--set", "ppl_max_tokens=0",
        "--set", "eval_rows=8", "--set", "progress=false", "--set", "keep_last=3"]

# Each process runs the CLI with every optimizer step slowed down, so that a test can kill it between checkpoints.
SLOW_SCRIPT = """
import sys, time
from qlora_nb import trainer
from qlora_nb.cli import main
original = trainer.Trainer.train_step
def slow_step(self, micro_batches):
    original(self, micro_batches); time.sleep(0.5)
trainer.Trainer.train_step = slow_step
sys.exit(main(sys.argv[1:]))
"""


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)  # the launcher gives each process its share of the cores
    return env


def _cli(out, *extra):
    return [sys.executable, "-m", "qlora_nb.cli", *ARGS, "--out", str(out), *extra]


def _run(out, *extra, timeout=300):
    done = subprocess.run(_cli(out, *extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _slow_torchrun(tmp_path, out, *torchrun_flags):
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", *torchrun_flags,
               str(script), *ARGS, "--out", str(out)]
    return subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(path, process, seconds=240):
    deadline = time.time() + seconds
    while not path.is_file():
        assert process.poll() is None, f"the run ended before {path} appeared: {process.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"no {path} within {seconds} s"
        time.sleep(0.05)


def _records(out, kind):
    return [r for r in map(json.loads, (out / "run.jsonl").read_text().splitlines()) if r["type"] == kind]


def _adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _worker_of_rank(launcher_pid, rank):
    "The pid of the worker with RANK=rank among the launcher's children."
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ: return int(child)
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    "An uninterrupted 2-process run (grad_accum 1 each), the reference of the tests below."
    out = tmp_path_factory.mktemp("ddp") / "run"
    _run(out, "--nproc", "2")
    return out


def test_two_processes_equal_one_with_twice_the_accumulation(two_processes, tmp_path):
    one = tmp_path / "one"
    _run(one, "--grad-accum", "2")
    steps_one, steps_two = _records(one, "step"), _records(two_processes, "step")
    assert [s["step"] for s in steps_two] == [1, 2, 3, 4, 5, 6]  # rank 0 alone wrote the log
    for a, b in zip(steps_one, steps_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for a, b in zip(_records(one, "eval"), _records(two_processes, "eval")):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    assert _max_diff(_adapter(one), _adapter(two_processes)) <= 1e-6
    assert len(steps_two[-1]["rank_tokens_per_s"]) == 2 and len(steps_two[-1]["rank_peak_rss"]) == 2
    assert json.loads((two_processes / "environment.json").read_text())["resolved"]["device"] == "cpu"
    checkpoint = two_processes / "checkpoints" / "step-000006"
    assert {p.name for p in checkpoint.glob("rng*.pt")} == {"rng.pt", "rng-rank1.pt"}  # every rank's generators
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2


def test_every_rank_killed_then_resumed_matches_uninterrupted(two_processes, tmp_path):
    out = tmp_path / "killed"
    launcher = _slow_torchrun(tmp_path, out)
    try:
        _wait_for(out / "checkpoints" / "step-000002" / "trainer_state.json", launcher)
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and both ranks
    finally:
        launcher.wait(timeout=60)
    assert not (out / "adapter").exists()
    _run(out, "--nproc", "2", "--resume")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (two_processes / "adapter" / "adapter_model.safetensors").read_bytes()
    assert [s["loss"] for s in _records(out, "step")] == [s["loss"] for s in _records(two_processes, "step")]


def test_resume_on_one_process_keeps_the_global_batch(two_processes, tmp_path):
    out = tmp_path / "fewer"
    shutil.copytree(two_processes, out)
    for late in ("step-000004", "step-000006"): shutil.rmtree(out / "checkpoints" / late)
    shutil.rmtree(out / "adapter")
    done = _run(out, "--resume")
    assert "resuming a 2-process run on 1: grad_accum 1 -> 2 per process" in done.stderr
    assert _max_diff(_adapter(out), _adapter(two_processes)) <= 1e-6


def test_elastic_restart_after_a_rank_dies(two_processes, tmp_path):
    out = tmp_path / "elastic"
    launcher = _slow_torchrun(tmp_path, out, "--max-restarts=1")
    try:
        _wait_for(out / "checkpoints" / "step-000002" / "trainer_state.json", launcher)
        os.kill(_worker_of_rank(launcher.pid, 1), signal.SIGKILL)
        assert launcher.wait(timeout=300) == 0, launcher.stderr.read()[-3000:]
    finally:
        if launcher.poll() is None: os.killpg(launcher.pid, signal.SIGKILL)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (two_processes / "adapter" / "adapter_model.safetensors").read_bytes()
    assert "resume" in [r.get("event") for r in _records(out, "event")]


def test_a_dead_rank_stops_the_run_and_is_named(tmp_path):
    out = tmp_path / "dead"
    command = [*_cli(out, "--nproc", "2"), "--max-steps", "3000"]  # the later flag wins: long enough to be killed mid-run
    launcher = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        _wait_for(out / "checkpoints" / "step-000002" / "trainer_state.json", launcher)
        victim = _worker_of_rank(launcher.pid, 1)
        os.kill(victim, signal.SIGKILL)
        assert launcher.wait(timeout=60) == 1
    finally:
        if launcher.poll() is None: os.killpg(launcher.pid, signal.SIGKILL)
    assert f"rank 1 (pid {victim}) was killed by SIGKILL" in launcher.stderr.read()


def test_two_launchers_train_together(two_processes, tmp_path):
    out, port = tmp_path / "nodes", free_port()
    nodes = [subprocess.Popen(_cli(out, "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                                   "--master-port", str(port)), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes: assert node.wait(timeout=300) == 0, node.stderr.read()[-3000:]
    assert _max_diff(_adapter(out), _adapter(two_processes)) <= 1e-6


def test_fsdp_trains_like_ddp_saves_peft_and_resumes(two_processes, tmp_path):
    out = tmp_path / "fsdp"
    _run(out, "--nproc", "2", "--shard", "fsdp")
    for a, b in zip(_records(two_processes, "step"), _records(out, "step")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert _max_diff(_adapter(out), _adapter(two_processes)) <= 1e-5
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    finished = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    for late in ("step-000004", "step-000006"): shutil.rmtree(out / "checkpoints" / late)
    shutil.rmtree(out / "adapter")
    _run(out, "--nproc", "2", "--shard", "fsdp", "--resume")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == finished


def _frozen_stay_local(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    from qlora_nb.distributed import data_parallel, start_process_group
    from qlora_nb.lora import LoRAConfig, add_lora
    from qlora_nb.quant_linear import NF4Linear, quantize_model
    from qlora_nb.testing import tiny_llama
    from qlora_nb.trainer import LanguageModelLoss
    parallel, _ = start_process_group(torch.device("cpu"))
    model = add_lora(quantize_model(tiny_llama(dropout=0.0)), LoRAConfig(r=4))
    codes = next(m for m in model.modules() if isinstance(m, NF4Linear)).weight
    if rank == 1: codes.add_(1)  # frozen weights that differ from rank 0's would be overwritten by a broadcast
    wrapped = data_parallel(LanguageModelLoss(model, chunk_size=16), parallel)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))  # each rank its own rows
    wrapped(ids, ids).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    everyone = [None, None]
    torch.distributed.all_gather_object(everyone, grads)
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    results[rank] = {"codes_sum": int(codes.sum()), "same_grads": all(torch.equal(everyone[0][n], everyone[1][n]) for n in grads),
                     "n_grads": len(grads), "trainable": sum(p.requires_grad for p in model.parameters()), "frozen_grads": frozen_grads}
    torch.distributed.destroy_process_group()


def test_only_trainable_gradients_are_reduced_and_frozen_weights_never_sent():
    results = mp.Manager().dict()
    mp.spawn(_frozen_stay_local, args=(free_port(), results), nprocs=2, join=True)
    zero, one = results[0], results[1]
    assert one["codes_sum"] != zero["codes_sum"]  # rank 1's frozen codes were never replaced by rank 0's
    assert zero["same_grads"] and zero["n_grads"] == zero["trainable"] > 0  # the LoRA gradients were averaged
    assert zero["frozen_grads"] == [] and one["frozen_grads"] == []

"""Data-parallel training on this machine's cores: N processes of 1 thread against 1 process of N threads.

Three runs of `qlora-nb train` on the same rows and the same global batch (`--batch-size` rows x N micro-batches
per update), each for `--steps` updates with no evaluation and one checkpoint at the end:

- `threads`: 1 process, N threads, grad_accum N;
- `processes`: N processes of 1 thread through `--nproc N` (torchrun, gloo), grad_accum 1 each;
- `one rank alone`: 1 process, 1 thread, grad_accum 1: what each rank of `processes` computes, without the others.

It prints the median step time and tokens/s of each (the first update, warm-up, left out), the ratio of
`processes` to `threads`, and the share of a data-parallel step not spent computing: 1 - (one rank alone) / (processes),
which is the all-reduce of the LoRA gradients plus waiting for the slower rank. With the CPU model and flags.

    .venv/bin/python bench/ddp.py [--model smollm2-135m|tiny] [--nproc 2] [--steps 6] [--batch-size 4] [--max-length 128]
"""
import argparse, json, os, statistics, subprocess, sys, tempfile
from pathlib import Path

from qlora_nb.core import machine_info

REPO = Path(__file__).resolve().parent.parent


def train(out:Path, args, *extra, threads:int|None=None) -> dict:
    "Run `qlora-nb train` and return the median step time and tokens per step of its updates after the first."
    command = [sys.executable, "-m", "qlora_nb.cli", "train", "--model", args.model, "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--dtype", args.dtype,
               "--set", "eval_steps=null", "--set", "save_steps=null", "--set", "em_examples=0", "--set", "ppl_max_tokens=0",
               "--set", "progress=false", "--out", str(out), "--overwrite", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None: command += ["--threads", str(threads)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode: sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    steps = [r for r in map(json.loads, (out / "run.jsonl").read_text().splitlines()) if r["type"] == "step"][1:]
    return {"step_time": statistics.median(s["step_time"] for s in steps), "tokens": statistics.median(s["tokens"] for s in steps),
            "records": steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    n = args.nproc
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        threads = train(tmp / "threads", args, "--grad-accum", str(n), threads=n)
        processes = train(tmp / "processes", args, "--nproc", str(n))
        alone = train(tmp / "alone", args, threads=1)
    rate = lambda run, ranks=1: run["tokens"] * ranks / run["step_time"]  # a rank's step record counts its own tokens
    info = machine_info()
    print(f"{info['cpu']} ({info['cores']} cores; flags {' '.join(info['cpu_flags'])})")
    print(f"{args.model}, {args.dtype}, global batch {n} x {args.batch_size} rows of {args.max_length} tokens, {args.steps} updates")
    print(f"1 process x {n} threads:  {threads['step_time']:.3f} s/step  {rate(threads):8.0f} tokens/s")
    print(f"{n} processes x 1 thread:  {processes['step_time']:.3f} s/step  {rate(processes, n):8.0f} tokens/s"
          f"  ({rate(processes, n) / rate(threads):.2f}x the threads)")
    print(f"one rank alone, 1 thread: {alone['step_time']:.3f} s/step")
    print(f"communication and waiting: {1 - alone['step_time'] / processes['step_time']:.1%} of a data-parallel step")
    ranks = processes["records"][-1].get("rank_tokens_per_s")
    if ranks: print("tokens/s per rank at the last step: " + ", ".join(f"rank {r}: {v:.0f}" for r, v in enumerate(ranks)))


if __name__ == "__main__":
    main()

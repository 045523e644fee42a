"""One QLoRA training step (forward, backward, AdamW) of SmolLM2-135M on the CPU: native vs peft+bnb vs plain fp32 LoRA.

Each configuration runs in its own subprocess (`qlora_nb.memory.measure_in_subprocess`), so every peak RSS is clean.
The step time (wall and CPU) is the median of the steps after the first (which compiles kernels and warms caches);
`-bf16` runs a bf16 base under bf16 autocast (fast where the CPU has bf16 dot products), `-lean` adds gradient
checkpointing, and `native-mmap` is `native` with glibc told to return freed big blocks at once. The peak RSS is
the kernel's high-water mark during the steps (reset after loading) and, separately, over the whole process.
On a shared machine step times drift by 10% and more over minutes: `--rounds N` runs the configurations N times,
round-robin, and reports medians.

    .venv/bin/python bench/lora.py                      # 135M, batch 4 x 128, r=16 on all linear layers
    .venv/bin/python bench/lora.py --steps 5 --rounds 2
    .venv/bin/python bench/lora.py --model tiny --steps 3
"""
import argparse, json, statistics, sys, time
from pathlib import Path

from qlora_nb.core import human_bytes
from qlora_nb.memory import measure_in_subprocess

CONFIGS = {  # name -> measure_step settings; 'native*' are ours, the others the references
    "native": dict(backend="native", quantize=True, chunk_size=256),
    "native-bf16": dict(backend="native", quantize=True, chunk_size=256, dtype="bf16"),
    "native-lean": dict(backend="native", quantize=True, chunk_size=256, gradient_checkpointing=True),
    "native-bf16-lean": dict(backend="native", quantize=True, chunk_size=256, dtype="bf16", gradient_checkpointing=True),
    "fp32-lora": dict(backend="native", quantize=False, chunk_size=256),
    "bf16-lora": dict(backend="native", quantize=False, chunk_size=256, dtype="bf16"),
    "peft+bnb": dict(backend="peft+bnb", quantize=True, chunk_size=None),
    "peft+bnb-bf16": dict(backend="peft+bnb", quantize=True, chunk_size=None, dtype="bf16"),
    # not run by default:
    "native-hf-loss": dict(backend="native", quantize=True, chunk_size=None),
    "native-mmap": dict(backend="native", quantize=True, chunk_size=256, malloc_mmap_threshold=1 << 20),
}
DEFAULT_CONFIGS = [name for name in CONFIGS if name not in ("native-hf-loss", "native-mmap")]
OURS, PEFT_BNB = ("native", "native-bf16"), ("peft+bnb", "peft+bnb-bf16")


def fastest(runs, names):
    "The name of the fastest configuration among `names` that ran."
    ran = [name for name in names if name in runs]
    return min(ran, key=lambda name: runs[name]["step"]) if ran else None


def goal_lines(runs):
    "(what, ratio, goal) for every goal whose configurations ran."
    lines, ours, theirs = [], fastest(runs, OURS), fastest(runs, PEFT_BNB)
    def ratio(what, top, bottom, field, goal):
        if top in runs and bottom in runs: lines.append((f"{what}, {top} / {bottom}", runs[top][field] / runs[bottom][field], goal))
    if ours and theirs: ratio("step time, fastest", ours, theirs, "step", 0.9)
    ratio("step time", "native", "fp32-lora", "step", 1.1)
    ratio("step time", "native-bf16", "bf16-lora", "step", 1.1)
    for top in ("native", "native-lean", "native-bf16", "native-bf16-lean"):
        bottom = "peft+bnb-bf16" if "bf16" in top else "peft+bnb"
        ratio("step peak RSS", top, bottom, "step_peak", 0.7)
        ratio("step time", top, bottom, "step", 0.9)
    return lines


def measure(name, args, label=""):
    "One configuration in a fresh subprocess: its figures, printed as a line."
    start = time.perf_counter()
    run = measure_in_subprocess(model=args.model, r=args.r, alpha=2 * args.r, batch_size=args.batch_size, seq_len=args.seq_len,
                                steps=args.steps, estimate=CONFIGS[name]["backend"] == "native", **CONFIGS[name])
    run["step"] = statistics.median(run["step_seconds"][1:])
    run["cpu"] = statistics.median(run["step_cpu_seconds"][1:])
    run["step_peak"] = run["step_peak_rss"]
    run["process_peak"] = max(run["load_peak_rss"], run["step_peak_rss"])
    print(f"{name:>15}{label}: {run['step']:6.2f} s/step, {run['cpu']:6.2f} CPU s/step (all steps {', '.join(f'{s:.1f}' for s in run['step_seconds'])}), "
          f"loaded {human_bytes(run['loaded_rss'])}, step peak {human_bytes(run['step_peak'])}, "
          f"process peak {human_bytes(run['process_peak'])}, first loss {run['losses'][0]:.5f} "
          f"[{time.perf_counter() - start:.0f} s]", flush=True)
    if "estimate" in run:
        print(f"{'':>17}estimate {human_bytes(run['estimate']['total'])} = {run['estimate']['total'] / run['step_peak']:.2f}x the step peak", flush=True)
    return run


def combined(runs):
    "The last run, with step time and peaks replaced by their medians over all rounds."
    medians = {key: statistics.median(run[key] for run in runs) for key in ("step", "cpu", "step_peak", "process_peak")}
    return {**runs[-1], **medians, "rounds": len(runs)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration; the first is a warm-up")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=1, help="run the configurations this many times, round-robin; report medians")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lora.json")
    args = parser.parse_args(argv)
    if args.steps < 2: parser.error("--steps must be at least 2 (the first step is a warm-up)")
    if args.rounds < 1: parser.error("--rounds must be at least 1")

    rounds = {name: [] for name in args.configs}
    for round_index in range(args.rounds):  # round-robin, so that a slow spell of a shared machine hits every config
        for name in args.configs: rounds[name].append(measure(name, args, f" (round {round_index + 1})" if args.rounds > 1 else ""))
    runs = {name: combined(measured) for name, measured in rounds.items()}

    print(f"\n{args.model}, batch {args.batch_size} x {args.seq_len}, LoRA r={args.r} on all linear layers, AdamW"
          + (f", medians of {args.rounds} rounds" if args.rounds > 1 else ""))
    for what, value, goal in goal_lines(runs):
        print(f"  {what:<58} {value:5.2f}x  (goal <= {goal}x: {'met' if value <= goal else 'NOT met'})")
    for name, run in runs.items():
        if "estimate" in run:
            ratio = run["estimate"]["total"] / run["step_peak"]
            print(f"  {'memory estimate / step peak, ' + name:<58} {ratio:5.2f}x  (goal 0.8-1.2x: {'met' if 0.8 <= ratio <= 1.2 else 'NOT met'})")
    for ours, other in (("native", "peft+bnb"), ("native", "native-hf-loss"), ("native-bf16", "peft+bnb-bf16")):
        if ours in runs and other in runs:
            print(f"  first-step loss, {ours} - {other:<15} {runs[ours]['losses'][0] - runs[other]['losses'][0]:+.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))
    print(f"\nraw figures: {args.out}")


if __name__ == "__main__":
    sys.exit(main())

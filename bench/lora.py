"""One QLoRA training step (forward, backward, AdamW) of SmolLM2-135M on the CPU: native vs peft+bnb vs plain fp32 LoRA.

Each configuration runs in its own subprocess (`qlora_nb.memory.measure_in_subprocess`), so every peak RSS is clean.
The step time (wall and CPU) is the median of the steps after the first (which compiles kernels and warms caches);
`native-mmap` is `native` with glibc told to return freed big blocks at once. The peak RSS is
the kernel's high-water mark during the steps (reset after loading) and, separately, over the whole process.

    .venv/bin/python bench/lora.py                      # 135M, batch 4 x 128, r=16 on all linear layers
    .venv/bin/python bench/lora.py --model tiny --steps 3
"""
import argparse, json, statistics, sys, time
from pathlib import Path

from qlora_nb.core import human_bytes
from qlora_nb.memory import measure_in_subprocess

CONFIGS = {  # name -> measure_step settings; 'native' is ours, the others are the references
    "native": dict(backend="native", quantize=True, chunk_size=256),
    "native-hf-loss": dict(backend="native", quantize=True, chunk_size=None),
    "native-mmap": dict(backend="native", quantize=True, chunk_size=256, malloc_mmap_threshold=1 << 20),
    "fp32-lora": dict(backend="native", quantize=False, chunk_size=256),
    "peft+bnb": dict(backend="peft+bnb", quantize=True, chunk_size=None),
}
GOALS = [  # (what, numerator, denominator, field, at most)
    ("step time, native / peft+bnb", "native", "peft+bnb", "step", 0.9),
    ("step time, native / fp32 LoRA", "native", "fp32-lora", "step", 1.1),
    ("CPU time per step, native / peft+bnb", "native", "peft+bnb", "cpu", 0.9),
    ("CPU time per step, native / fp32 LoRA", "native", "fp32-lora", "cpu", 1.1),
    ("step peak RSS, native / peft+bnb", "native", "peft+bnb", "step_peak", 0.7),
    ("process peak RSS, native / peft+bnb", "native", "peft+bnb", "process_peak", 0.7),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration; the first is a warm-up")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lora.json")
    args = parser.parse_args(argv)
    if args.steps < 2: parser.error("--steps must be at least 2 (the first step is a warm-up)")

    runs = {}
    for name in args.configs:
        start = time.perf_counter()
        run = measure_in_subprocess(model=args.model, r=args.r, alpha=2 * args.r, batch_size=args.batch_size, seq_len=args.seq_len,
                                    steps=args.steps, estimate=CONFIGS[name]["backend"] == "native", **CONFIGS[name])
        run["step"] = statistics.median(run["step_seconds"][1:])
        run["cpu"] = statistics.median(run["step_cpu_seconds"][1:])
        run["step_peak"] = run["step_peak_rss"]
        run["process_peak"] = max(run["load_peak_rss"], run["step_peak_rss"])
        runs[name] = run
        print(f"{name:>15}: {run['step']:6.2f} s/step, {run['cpu']:6.2f} CPU s/step (all steps {', '.join(f'{s:.1f}' for s in run['step_seconds'])}), "
              f"loaded {human_bytes(run['loaded_rss'])}, step peak {human_bytes(run['step_peak'])}, "
              f"process peak {human_bytes(run['process_peak'])}, first loss {run['losses'][0]:.5f} "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)
        if "estimate" in run:
            print(f"{'':>17}estimate {human_bytes(run['estimate']['total'])} = {run['estimate']['total'] / run['step_peak']:.2f}x the step peak", flush=True)

    print(f"\n{args.model}, batch {args.batch_size} x {args.seq_len}, LoRA r={args.r} on all linear layers, AdamW, fp32 compute")
    for what, top, bottom, field, goal in GOALS:
        if top in runs and bottom in runs:
            ratio = runs[top][field] / runs[bottom][field]
            print(f"  {what:<40} {ratio:5.2f}x  (goal <= {goal}x: {'met' if ratio <= goal else 'NOT met'})")
    if "native" in runs:
        for other in ("peft+bnb", "fp32-lora", "native-hf-loss"):
            if other in runs:
                print(f"  first-step loss, native - {other:<15} {runs['native']['losses'][0] - runs[other]['losses'][0]:+.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))
    print(f"\nraw figures: {args.out}")


if __name__ == "__main__":
    sys.exit(main())

"""Step time of a training run with and without the live dashboard, on the tiny model.

"Without" is the run as `recipe.build` makes it for every front-end (monitors, run log, checkpoints). "With" adds what the dashboard
adds: the `TrainingControl` callback in the loop, and a `RunDashboard` following the run log in its poller thread,
redrawing its plotly FigureWidget at most twice a second. Runs alternate (A B A B ...) so that load on the machine
hits both alike; we compare the median step time (ThroughputMonitor's `step_time`) and print the ratio.
Goal: the dashboard changes step time by less than 3%. On a machine shared with other work, wall-clock step times
swing by more than that, so the script also prints the process's CPU time per step (all threads, the dashboard's
poller included), which other processes do not disturb.

    .venv/bin/python bench/dashboard.py [--steps 60] [--repeats 3]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qlora_nb.callback.control import TrainingControl
from qlora_nb.dashboard import RunDashboard, default_run_config
from qlora_nb.recipe import build


def one_run(run_dir: Path, steps: int, with_dashboard: bool) -> tuple[list[float], int, float, float]:
    "Train `steps` steps; return the step times after the first 5 (warm-up), the redraws, and CPU seconds per step: all, and the dashboard's."
    config = default_run_config(quant="none", max_steps=steps, eval_steps=None, warmup_steps=0)
    control = TrainingControl() if with_dashboard else None
    trainer = build(dict(config, out=str(run_dir)), callbacks=[control] if control else [], warn=False).trainer
    board = None
    if with_dashboard:
        board = RunDashboard(interval=0.5)
        board.open(run_dir, follow=True, must_exist=False)
    cpu_start = time.process_time()
    trainer.fit()
    cpu_per_step = (time.process_time() - cpu_start) / steps  # every thread of the process, the poller's included
    renders, dashboard_cpu = 0, 0.0
    if board is not None:
        board.unfollow()
        renders, dashboard_cpu = board.plots.renders, board.cpu_seconds
        assert board.runs[0].data.last_step["step"] == steps, "the dashboard missed steps"
    monitor = next(cb for cb in trainer.callbacks if type(cb).__name__ == "ThroughputMonitor")
    return [h["step_time"] for h in monitor.history[5:]], renders, cpu_per_step, dashboard_cpu / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    times, cpu, dashboard_cpu = {False: [], True: []}, {False: [], True: []}, []
    renders = 0
    with tempfile.TemporaryDirectory() as tmp:
        one_run(Path(tmp) / "warmup", 6, False)  # imports, tokenizer training, first-call costs
        for repeat in range(args.repeats):
            for with_dashboard in (False, True):
                step_times, redraws, cpu_per_step, poll_cpu = one_run(Path(tmp) / f"run-{repeat}-{int(with_dashboard)}", args.steps, with_dashboard)
                times[with_dashboard] += step_times
                cpu[with_dashboard].append(cpu_per_step)
                if with_dashboard: dashboard_cpu.append(poll_cpu)
                renders += redraws
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    ratio = with_ / without
    print(f"tiny model, {args.steps} steps x {args.repeats} runs each, median step time:")
    print(f"  without dashboard  {without * 1e3:8.2f} ms")
    print(f"  with dashboard     {with_ * 1e3:8.2f} ms   ({renders} redraws in all)")
    print(f"  ratio with/without {ratio:.3f}  (goal < 1.03: {'met' if ratio < 1.03 else 'NOT met'})")
    cpu_without, cpu_with = statistics.median(cpu[False]), statistics.median(cpu[True])
    print("process CPU time per step (all threads; robust to other load on the machine):")
    print(f"  without {cpu_without * 1e3:.2f} ms, with {cpu_with * 1e3:.2f} ms, ratio {cpu_with / cpu_without:.3f}")
    own = statistics.median(dashboard_cpu)
    print("the dashboard's own work (log reading and redraws, its thread's CPU time) per training step:")
    print(f"  {own * 1e3:.2f} ms = {own / cpu_without:.2%} of a step's CPU time without it (goal < 3%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trainer's overhead (callbacks, run log, monitors, progress bar) against a bare loop doing the same steps.

Both train the same model, built as a run builds it (`recipe.build_model`: SmolLM2-135M with LoRA r=16 on all
linear layers, or `--model tiny`), on the same batches: collate, forward with the run's chunked loss, backward, clip to max_norm, AdamW step, schedule step, zero_grad. They alternate in
rounds of `--steps` steps, so machine load affects both alike; we compare the median per-step time of each and
print the overhead as a ratio, by wall clock and by this process's CPU time (steadier on a shared machine; run
with OMP_NUM_THREADS=1 so CPU time is not inflated by threads waiting for each other). Goal: under 3%.

With `--busy`, the bare loop runs quietly with one thread per core, then again while another process keeps one core
busy: with as many threads as before (what torch does by itself) and with the thread count `callback.threads`
chooses from the cores left free. It prints each s/step and the share of the quiet throughput each keeps
(goal: at least 40%).

With `--packing`, the same bare loop instead trains on the embedded training rows twice over: padded to the
longest row of each batch (`data.make_collator`), and packed into rows of `--max-length` tokens (`packing.pack_rows`,
`packing.make_packed_collator`), alternating in rounds, and prints the real (non-pad) tokens per second of each and
their ratio, with the CPU model and flags.

    .venv/bin/python bench/train.py [--model smollm2-135m|tiny] [--quant none|nf4] [--steps 5] [--rounds 3] [--packing]
"""
import argparse, io, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import torch

from qlora_nb.callback.threads import compute_threads, usable_cores
from qlora_nb.callback.monitor import GradientMonitor, ProgressBar, StabilityMonitor, ThroughputMonitor
from qlora_nb.core import machine_info
from qlora_nb.data import make_collator
from qlora_nb.packing import make_packed_collator, pack_rows
from qlora_nb.prepare import build_datasets
from qlora_nb.loss import causal_lm_loss
from qlora_nb.settings import resolve_config
from qlora_nb.recipe import build_model
from qlora_nb.runlog import RunLog
from qlora_nb.trainer import LRSchedule, Trainer, epoch_order


def bare_steps(model, rows, collate, optimizer, scheduler, order, max_norm, chunk_size):
    "The same work as Trainer.train_step, with nothing around it."
    params = [p for p in model.parameters() if p.requires_grad]
    for micro_batches in order:
        for indices in micro_batches:
            batch = collate([rows[i] for i in indices])
            loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), chunk_size,
                                  position_ids=batch.get("position_ids"))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step(); optimizer.zero_grad(set_to_none=True); scheduler.step()


def compare_packing(model, tokenizer, rows, args, chunk_size):
    "Real tokens/s of the bare loop on padded and on packed batches of the same rows, alternating in rounds."
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule("constant"))
    packed = pack_rows(rows, args.max_length)
    ways = {"padded": (rows, make_collator(tokenizer)), "packed": (packed, make_packed_collator(tokenizer))}
    rates = {name: [] for name in ways}
    for name, (data, collate) in ways.items():  # warm up allocator and kernels
        bare_steps(model, data, collate, optimizer, scheduler, epoch_order(len(data), 0, 0, args.batch_size)[:1], 0.3, chunk_size)
    for round_index in range(args.rounds):
        for name, (data, collate) in ways.items():
            steps = epoch_order(len(data), 0, round_index + 1, args.batch_size)[:args.steps]
            real_tokens = sum(len(data[i]["input_ids"]) for micro_batches in steps for batch in micro_batches for i in batch)  # no pads inside a packed row
            start = time.perf_counter()
            bare_steps(model, data, collate, optimizer, scheduler, steps, 0.3, chunk_size)
            rates[name].append(real_tokens / (time.perf_counter() - start))
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {rates[name][-1]:.0f} tok/s" for name in ways))
    padded, packed_rate = statistics.median(rates["padded"]), statistics.median(rates["packed"])
    lengths = [len(r["input_ids"]) for r in rows]
    machine = machine_info()
    print(f"model {args.model} (quant {args.quant}, {args.dtype}, attention {getattr(model.config, '_attn_implementation', '?')}), "
          f"{len(rows)} rows of {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.1f}) -> {len(packed)} packed rows "
          f"of {args.max_length}; batch {args.batch_size}; {args.rounds} rounds of {args.steps} steps each")
    print(f"CPU {machine['cpu'] or '?'} ({', '.join(machine['cpu_flags']) or 'no speed flags'}), {machine['cores']} cores, "
          f"{torch.get_num_threads()} threads")
    print(f"real tokens/s: padded {padded:.0f}, packed {packed_rate:.0f}; packed/padded = {packed_rate / padded:.2f}x")


def compare_busy(model, rows, collate, args, chunk_size):
    "Seconds per step of the bare loop: quiet, then beside a busy process with all threads and with the free cores' count."
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule("constant"))
    order, cores = epoch_order(len(rows), 0, 0, args.batch_size), usable_cores()
    def seconds_per_step(threads, round_index):
        torch.set_num_threads(threads)
        steps = order[round_index * args.steps:(round_index + 1) * args.steps]
        start = time.perf_counter()
        bare_steps(model, rows, collate, optimizer, scheduler, steps, 0.3, chunk_size)
        return (time.perf_counter() - start) / args.steps
    seconds_per_step(cores, 0)  # warm up allocator and kernels
    quiet = seconds_per_step(cores, 1)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        all_threads = seconds_per_step(cores, 2)
        with compute_threads() as chosen: governed = seconds_per_step(chosen, 3)
    finally: busy.kill()
    machine = machine_info()
    print(f"model {args.model} (quant {args.quant}, {args.dtype}), batch {args.batch_size}, {args.steps} steps each; "
          f"CPU {machine['cpu'] or '?'} ({', '.join(machine['cpu_flags'])}), {cores} cores")
    print(f"quiet, {cores} threads: {quiet:.2f} s/step")
    print(f"one busy process, {cores} threads: {all_threads:.2f} s/step, {quiet / all_threads:.0%} of the quiet throughput")
    print(f"one busy process, {chosen} thread(s) from the free cores: {governed:.2f} s/step, {quiet / governed:.0%} of the quiet throughput (goal: >= 40%)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quant", default="none", choices=["none", "nf4"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--packing", action="store_true", help="compare packed with padded batches instead")
    parser.add_argument("--busy", action="store_true", help="measure beside a busy process, with all threads and with the free cores' count")
    args = parser.parse_args()

    config = resolve_config(overrides=dict(model=args.model, quant=args.quant, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                                           device="cpu", dtype=args.dtype))
    model, tokenizer = build_model(config)
    model.train()
    data = build_datasets(tokenizer, max_length=args.max_length)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data["train"]]
    collate = make_collator(tokenizer)
    total = args.steps * args.rounds
    if args.packing: return compare_packing(model, tokenizer, rows, args, config["loss_chunk_size"])
    if args.busy: return compare_busy(model, rows, collate, args, config["loss_chunk_size"])

    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [ThroughputMonitor(), GradientMonitor(), StabilityMonitor(warn=False),
                     RunLog(Path(tmp) / "run.jsonl"), ProgressBar(file=io.StringIO())]
        trainer = Trainer(model, rows, collate, callbacks=callbacks, batch_size=args.batch_size, max_steps=total,
                          lr=2e-4, warmup_steps=2, device="cpu", dtype=args.dtype, max_norm=0.3, loss_chunk_size=config["loss_chunk_size"])
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule("cosine", 2, total))
        order = epoch_order(len(rows), 0, 0, args.batch_size)
        bare_times, trainer_times, bare_cpu, trainer_cpu = [], [], [], []
        bare_steps(model, rows, collate, optimizer, scheduler, order[:1], 0.3, trainer.loss_chunk_size)  # warm up allocator and kernels
        for round_index in range(args.rounds):
            steps = order[round_index * args.steps:(round_index + 1) * args.steps]
            start, cpu_start = time.perf_counter(), time.process_time()
            bare_steps(model, rows, collate, optimizer, scheduler, steps, 0.3, trainer.loss_chunk_size)
            bare_times.append((time.perf_counter() - start) / args.steps); bare_cpu.append((time.process_time() - cpu_start) / args.steps)
            trainer.max_steps = (round_index + 1) * args.steps
            start, cpu_start = time.perf_counter(), time.process_time()
            trainer.fit()  # epoch_order(seed=0, epoch=0): the same rows as the bare round
            trainer_times.append((time.perf_counter() - start) / args.steps); trainer_cpu.append((time.process_time() - cpu_start) / args.steps)
            print(f"round {round_index + 1}: bare {bare_times[-1]:.3f} s/step ({bare_cpu[-1]:.3f} CPU s), "
                  f"trainer {trainer_times[-1]:.3f} s/step ({trainer_cpu[-1]:.3f} CPU s)")

    bare, full = statistics.median(bare_times), statistics.median(trainer_times)
    bare_c, full_c = statistics.median(bare_cpu), statistics.median(trainer_cpu)
    print(f"model {args.model} (quant {args.quant}), batch {args.batch_size} x {args.max_length} tokens max, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds of {args.steps} steps")
    print(f"bare loop: {bare:.3f} s/step; trainer with monitors, run log and progress bar: {full:.3f} s/step")
    print(f"CPU time: bare {bare_c:.3f} s/step, trainer {full_c:.3f} s/step")
    print(f"overhead: {full / bare - 1:+.1%} by wall clock, {full_c / bare_c - 1:+.1%} by CPU time (goal: under +3%)")


if __name__ == "__main__":
    main()

"""Serving under concurrent load: `qlora-nb serve` (continuous batching across adapters) against `--max-batch 1` and a naive server.

Three servers run in turn as subprocesses on 127.0.0.1, each serving the same base with the same two adapters:
  batched   `qlora-nb serve` as shipped: NF4 base, up to --max-batch 16 sequences of any adapter decoded together,
            a queue of 32 (--max-queue), the in-process response cache;
  batch-1   the same server with `--max-batch 1` (one request decodes at a time; a long queue, no cache);
  naive     a minimal FastAPI app in this file: transformers + PEFT `generate` per request, one at a time, on the
            fp32 base with both adapters loaded in PEFT (`set_adapter` per request).
The adapters are `qlora_nb.testing.fake_run` adapters (random, non-zero B; no training): "adapter-a", and
"adapter-b", the same with B negated, so the two differ on the one base. Throughput does not depend on what the
weights learned.

Clients send requests concurrently (closed loop: each sends its next request when the last one is answered), half
to each adapter, `--tokens` new tokens each (greedy; `ignore_eos` when the server accepts it, so every answer has
the same length), every prompt distinct so that no answer comes from the cache, and the same prompts for every server. Every server
runs on torch's default threads (one per core) unless OMP_NUM_THREADS says otherwise. Reported per level: requests/s,
generated tokens/s, p50/p99 latency and time to first token (streamed; the naive server does not stream, so its
first token is its whole answer), status counts, and the batch-size distribution from /metrics. Then the goals,
as ratios:
  at 16 clients: tokens/s >= 4x batch-1's and >= 6x naive's; mixed-adapter batches >= 0.8x single-adapter ones;
  p50 time to first token at 16 clients <= 3x the idle one (1 client);
  64 clients at once against a queue of 32: every request answered 200 or 429, none lost or answered twice, and
  the server's memory back within 10% of its idle level afterwards;
  a cache hit answered in under 5 ms at p99.

    .venv/bin/python bench/serve.py [--model smollm2-135m|tiny] [--clients 1 4 16 64] [--tokens 64] [--requests 2]
"""
import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ADAPTERS = ("adapter-a", "adapter-b")
OVERLOAD_CLIENTS, OVERLOAD_QUEUE = 64, 32


# ---- the two adapters -------------------------------------------------------------------------------------------
def make_adapters(model: str, folder: Path) -> list[Path]:
    "Two run directories on `model`: a random fake_run adapter, and the same with lora_B negated."
    from safetensors.torch import load_file, save_file
    from qlora_nb.testing import fake_run
    first = fake_run(folder / ADAPTERS[0], model=model, seed=0)
    second = folder / ADAPTERS[1]
    shutil.copytree(first, second)
    weights = second / "adapter" / "adapter_model.safetensors"
    tensors = {k: (-v if "lora_B" in k else v).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return [first, second]


# ---- the naive baseline: transformers + PEFT generate per request -----------------------------------------------
def naive_app(model_name: str, adapters: dict):
    "A FastAPI app answering POST /v1/completions with PEFT `generate`, one request at a time."
    import torch
    from fastapi import FastAPI
    from peft import PeftModel
    from qlora_nb.export import run_config
    from qlora_nb.models import load_base
    seed = run_config(next(iter(adapters.values())))["seed"]  # the tiny base is made from the run's seed
    base, tokenizer = load_base(model_name, dtype="fp32", device="cpu", seed=seed)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]] / "adapter"), adapter_name=names[0])
    for name in names[1:]: model.load_adapter(str(adapters[name] / "adapter"), adapter_name=name)
    model.eval()
    lock, app = threading.Lock(), FastAPI()

    @app.get("/health")
    def health(): return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: dict):  # a plain def: FastAPI runs it in its thread pool; the lock makes it one at a time
        ids = tokenizer(body["prompt"], return_tensors="pt", add_special_tokens=False)
        new = int(body.get("max_tokens", 16))
        with lock, torch.no_grad():
            model.set_adapter(body["model"])
            out = model.generate(**ids, max_new_tokens=new, min_new_tokens=new if body.get("ignore_eos") else None,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)  # (1, T_prompt + T_new)
        completion = out[0, ids["input_ids"].shape[1]:]
        return {"object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": tokenizer.decode(completion, skip_special_tokens=True), "finish_reason": "length"}],
                "usage": {"prompt_tokens": ids["input_ids"].shape[1], "completion_tokens": len(completion)}}
    return app


def naive_main(argv):
    "Run the naive server (this script with --naive-server)."
    import uvicorn
    parser = argparse.ArgumentParser()
    parser.add_argument("--naive-server", action="store_true")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("adapters", nargs="+")
    args = parser.parse_args(argv)
    app = naive_app(args.model, {Path(p).name: Path(p) for p in args.adapters})
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# ---- servers as subprocesses --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    "A server subprocess on a free port: started, waited for (GET /health), its RSS read, stopped with SIGTERM."
    def __init__(self, name: str, argv: list[str], log: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # every server on torch's own thread count (or OMP_NUM_THREADS, as given)
        self.process = subprocess.Popen([sys.executable, *argv, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.name} server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200: return self
            except httpx.HTTPError: pass
            time.sleep(0.5)
        raise TimeoutError(f"the {self.name} server was not ready after {timeout:.0f} s; see {self.log.name}")

    def rss(self) -> int:
        import psutil
        return psutil.Process(self.process.pid).memory_info().rss

    def metrics(self):
        from qlora_nb.serve.monitor import parse_metrics
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text, time.monotonic())

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try: self.process.wait(timeout=60)
            except subprocess.TimeoutExpired: self.process.kill(); self.process.wait()
        self.log.close()


def batched_server(model: str, runs: list[Path], folder: Path, max_batch: int, max_queue: int, cache: str, tokens: int) -> Server:
    code = "import sys; from qlora_nb.serve.app import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    argv = ["-c", code, *map(str, runs), "--base", model, "--max-batch", str(max_batch), "--max-queue", str(max_queue),
            "--cache", cache, "--max-tokens-cap", str(max(tokens, 16)), "--timeout", "600"]
    return Server(f"max-batch {max_batch}", argv, folder / f"server-batch{max_batch}.log")


def naive_server(model: str, runs: list[Path], folder: Path) -> Server:
    return Server("naive", [str(Path(__file__).resolve()), "--naive-server", "--model", model, *map(str, runs)], folder / "server-naive.log")


# ---- clients ------------------------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int, stream: bool, ignore_eos: bool) -> dict:
    "Send one completion request; its status, latency, time to first token and generated tokens."
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    if ignore_eos: body["ignore_eos"] = True
    if stream: body.update(stream=True, stream_options={"include_usage": True})
    start, first, generated = time.perf_counter(), None, 0
    try:
        if not stream:
            response = await client.post(url + "/v1/completions", json=body)
            done = time.perf_counter()
            if response.status_code == 200: generated = response.json()["usage"]["completion_tokens"]
            return {"status": response.status_code, "latency": done - start, "ttft": done - start, "tokens": generated, "model": model}
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code, "latency": time.perf_counter() - start, "ttft": None, "tokens": 0, "model": model}
            chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]": continue
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("text"):
                    chunks += 1
                    first = first or time.perf_counter()
                if event.get("usage"): generated = event["usage"]["completion_tokens"]
            done = time.perf_counter()
            return {"status": 200, "latency": done - start, "ttft": (first or done) - start, "tokens": generated or chunks, "model": model}
    except httpx.HTTPError as e:
        return {"status": f"error: {type(e).__name__}", "latency": time.perf_counter() - start, "ttft": None, "tokens": 0, "model": model}


async def load(url: str, clients: int, requests: int, tokens: int, adapters, stream: bool, ignore_eos: bool, tag: str) -> tuple[list, float]:
    "`clients` concurrent closed-loop clients, each sending `requests` requests (client i to adapters[i % len]); results and wall time."
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def client_loop(i):
            model = adapters[i % len(adapters)]
            return [await one_request(client, url, model, f"Request {tag}-{i}-{r}: convert {i * 7 + r} km to meters, then explain.",
                                      tokens, stream, ignore_eos) for r in range(requests)]
        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop(i) for i in range(clients)))
        return [r for rs in results for r in rs], time.perf_counter() - start


def percentile(values: list, q: float) -> float:
    "The q-quantile (nearest rank) of `values`; NaN when empty."
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] if values else math.nan


def summarize(results: list, seconds: float, before=None, after=None) -> dict:
    ok = [r for r in results if r["status"] == 200]
    statuses = {}
    for r in results: statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    row = {"requests": len(results), "statuses": statuses, "seconds": seconds,
           "requests_per_s": len(ok) / seconds, "tokens_per_s": sum(r["tokens"] for r in ok) / seconds,
           "latency_p50": percentile([r["latency"] for r in ok], 0.5), "latency_p99": percentile([r["latency"] for r in ok], 0.99),
           "ttft_p50": percentile([r["ttft"] for r in ok], 0.5), "ttft_p99": percentile([r["ttft"] for r in ok], 0.99)}
    if before is not None and after is not None:
        old, new = before.buckets.get("qlora_nb_batch_size", {}), after.buckets.get("qlora_nb_batch_size", {})
        cumulative = {upper: count - old.get(upper, 0.0) for upper, count in sorted(new.items())}
        dist, below, lower = {}, 0.0, 0
        for upper, count in cumulative.items():
            if count - below: dist[f">{lower:g}" if math.isinf(upper) else f"<={upper:g}"] = int(count - below)
            below, lower = count, upper
        steps = after.values.get("qlora_nb_batch_size_count", 0) - before.values.get("qlora_nb_batch_size_count", 0)
        rows = after.values.get("qlora_nb_batch_size_sum", 0) - before.values.get("qlora_nb_batch_size_sum", 0)
        row.update(batch_distribution=dist, mean_batch=rows / steps if steps else math.nan,
                   served=after.values.get("qlora_nb_requests_total", 0) - before.values.get("qlora_nb_requests_total", 0))
    return row


def show(server: str, clients: int, row: dict):
    batches = f"  mean batch {row['mean_batch']:.1f} {row['batch_distribution']}" if "mean_batch" in row else ""
    print(f"{server:>10} {clients:>3} clients: {row['requests_per_s']:6.2f} req/s {row['tokens_per_s']:8.1f} tok/s  "
          f"latency p50 {row['latency_p50']:.2f} p99 {row['latency_p99']:.2f} s  first token p50 {row['ttft_p50']:.3f} "
          f"p99 {row['ttft_p99']:.3f} s  {row['statuses']}{batches}", flush=True)


def accepts_ignore_eos(url: str, model: str) -> bool:
    "Whether the server takes vLLM's `ignore_eos` (else answers may end before --tokens)."
    response = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0, "ignore_eos": True}, timeout=300)
    return response.status_code == 200


# ---- the scenarios ------------------------------------------------------------------------------------------------
def run_levels(server: Server, levels, args, stream: bool, ignore_eos: bool, results: dict, metrics: bool = True):
    for clients in levels:
        before = server.metrics() if metrics else None
        rows, seconds = asyncio.run(load(server.url, clients, args.requests, args.tokens, ADAPTERS, stream, ignore_eos, f"level-{clients}"))
        results[server.name, clients] = summarize(rows, seconds, before, server.metrics() if metrics else None)
        show(server.name, clients, results[server.name, clients])


def overload(server: Server, args, ignore_eos: bool) -> dict:
    "64 clients at once, one request each, against the queue of 32: statuses, requests counted by the server, memory."
    import gc; gc.collect()
    idle = server.rss()
    before = server.metrics()
    rows, seconds = asyncio.run(load(server.url, OVERLOAD_CLIENTS, 1, args.tokens, ADAPTERS, True, ignore_eos, "overload"))
    row = summarize(rows, seconds, before, server.metrics())
    time.sleep(args.settle)
    row.update(idle_rss=idle, after_rss=server.rss(), answered=len(rows))
    show(server.name, OVERLOAD_CLIENTS, row)
    return row


def cache_hits(server: Server, n: int = 200) -> dict:
    "One request to fill the cache, then `n` identical ones one after another: client-side latency of the hits."
    body = {"model": ADAPTERS[0], "prompt": "Convert 3 km to meters.", "max_tokens": 8, "temperature": 0}
    with httpx.Client(timeout=300) as client:
        client.post(server.url + "/v1/completions", json=body).raise_for_status()
        before = server.metrics()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            client.post(server.url + "/v1/completions", json=body).raise_for_status()
            times.append(time.perf_counter() - start)
    hits = server.metrics().values.get("qlora_nb_cache_hits_total", 0) - before.values.get("qlora_nb_cache_hits_total", 0)
    return {"p50": percentile(times, 0.5), "p99": percentile(times, 0.99), "hits": hits, "requests": n}


def goal(name: str, value: float, target: float, higher: bool = True) -> bool:
    met = value >= target if higher else value <= target
    print(f"  {'PASS' if met else 'FAIL'}  {name}: {value:.2f} ({'>=' if higher else '<='} {target:g})")
    return met


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="the base: smollm2-135m (the measurement) or tiny (a quick check)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrent clients per level")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--baselines", choices=["all", "batch-1", "naive", "none"], default="all")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after the overload before memory is read again")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results, verdicts = {}, []
    baseline_levels = [c for c in args.clients if c <= 16]
    with tempfile.TemporaryDirectory(prefix="qlora-bench-serve-") as tmp:
        folder = Path(tmp)
        runs = make_adapters(args.model, folder)
        print(f"base {args.model}, adapters {', '.join(ADAPTERS)}; {args.tokens} new tokens a request, {args.requests} per client", flush=True)
        server = batched_server(args.model, runs, folder, 16, OVERLOAD_QUEUE, "memory", args.tokens).wait_ready()
        try:
            ignore_eos = accepts_ignore_eos(server.url, ADAPTERS[0])
            if not ignore_eos: print("note: the server refuses ignore_eos, so answers may end before --tokens; tokens/s counts what was generated")
            asyncio.run(load(server.url, 2, 1, 4, ADAPTERS, True, ignore_eos, "warmup"))
            run_levels(server, [c for c in args.clients if c != OVERLOAD_CLIENTS], args, True, ignore_eos, results)
            if 16 in args.clients:  # the same load, all to one adapter
                before = server.metrics()
                rows, seconds = asyncio.run(load(server.url, 16, args.requests, args.tokens, ADAPTERS[:1], True, ignore_eos, "single"))
                results["single-adapter", 16] = summarize(rows, seconds, before, server.metrics())
                show("1 adapter", 16, results["single-adapter", 16])
            if OVERLOAD_CLIENTS in args.clients: results["overload"] = overload(server, args, ignore_eos)
            results["cache"] = cache_hits(server)
            print(f"cache hits: p50 {results['cache']['p50'] * 1e3:.2f} ms, p99 {results['cache']['p99'] * 1e3:.2f} ms "
                  f"({results['cache']['hits']:.0f} hits counted by the server)", flush=True)
        finally: server.stop()
        for name in ("batch-1", "naive"):
            if args.baselines not in ("all", name) or not baseline_levels: continue
            baseline = (batched_server(args.model, runs, folder, 1, 1024, "off", args.tokens) if name == "batch-1"
                        else naive_server(args.model, runs, folder)).wait_ready()
            baseline.name = name
            try:
                asyncio.run(load(baseline.url, 1, 1, 4, ADAPTERS, name != "naive", ignore_eos, "warmup"))
                run_levels(baseline, baseline_levels, args, stream=name != "naive", ignore_eos=ignore_eos, results=results, metrics=name != "naive")
            finally: baseline.stop()
    print("\ngoals")
    ours = results.get(("max-batch 16", 16))
    if ours:
        for name, target in (("batch-1", 4.0), ("naive", 6.0)):
            if (name, 16) in results: verdicts.append(goal(f"16 clients, tokens/s vs {name}", ours["tokens_per_s"] / results[name, 16]["tokens_per_s"], target))
        if ("single-adapter", 16) in results:
            verdicts.append(goal("mixed-adapter vs single-adapter tokens/s", ours["tokens_per_s"] / results["single-adapter", 16]["tokens_per_s"], 0.8))
        if ("max-batch 16", 1) in results:
            verdicts.append(goal("p50 first token, 16 clients vs idle", ours["ttft_p50"] / results["max-batch 16", 1]["ttft_p50"], 3.0, higher=False))
    if "overload" in results:
        row = results["overload"]
        only_200_429 = set(row["statuses"]) <= {"200", "429"} and row["answered"] == OVERLOAD_CLIENTS
        print(f"  {'PASS' if only_200_429 else 'FAIL'}  64 clients, queue {OVERLOAD_QUEUE}: {row['statuses']}, "
              f"{row['answered']} answers to {OVERLOAD_CLIENTS} requests, {row['served']:.0f} counted by the server")
        verdicts.append(only_200_429 and row["served"] == OVERLOAD_CLIENTS)
        verdicts.append(goal("memory after the overload / idle", row["after_rss"] / row["idle_rss"], 1.10, higher=False))
    if "cache" in results: verdicts.append(goal("cache hit p99 (ms)", results["cache"]["p99"] * 1e3, 5.0, higher=False))
    print(f"{sum(verdicts)} of {len(verdicts)} goals met")
    if args.json:
        Path(args.json).write_text(json.dumps({(k if isinstance(k, str) else f"{k[0]}@{k[1]}"): v for k, v in results.items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    if "--naive-server" in sys.argv: naive_main(sys.argv[1:])
    else: sys.exit(main())

"""Greedy decoding at batch 1 against its peers and against this machine's memory bandwidth, all measured in one run.

Batch 1, greedy, `--new-tokens` (64) new tokens from one fixed prompt, `--threads` (2) threads, end to end (the prompt's
prefill included), best and median of `--runs`:
- ours: the embedded SmolLM2-135M with NF4Linear layers as `recipe.build_model` quantizes it (the run's quant settings;
  no training kernels, no adapters), decoded by transformers' `generate`;
- bitsandbytes' 4-bit model (NF4, double quant, fp32 compute) from the same fp32 weights, as bench/quant.py builds it;
- llama.cpp on the embedded GGUF (Q4_1) when llama-cpp-python is importable here or `make llama-cpp` has built
  `.venv-llama` (then it runs there, in a subprocess): the same prompt tokens, greedy (temperature 0, top_k 1), EOS ignored.
And the limits of this machine, measured in the same run: the memory read bandwidth (a 256 MiB fp32 `.sum()`), the bytes
one decoded token must read (the 4-bit codes and their absmax, the fp32 head, one embedding row, the KV cache), hence a
floor in ms/token and each path's fraction of it; our ms/token split into the 4-bit layers, the head and the rest
(framework: generate, the cache, the mask, the sampling). Goals (issue 20): ours >= 1x llama.cpp's tokens/s and >= 50%
of the floor, with the tokens of the eager fp32 path (the same 4-bit model under `exact_matmuls`: plain dequantize +
matmul, no fused or row kernels).

Run: .venv/bin/python bench/decode.py [--new-tokens 64] [--runs 3] [--threads 2] [--model smollm2-135m|tiny] [--profile]"""
import argparse, copy, json, os, statistics, subprocess, sys, time, warnings
from pathlib import Path

import torch  # first: bench/quant.py sets OMP_WAIT_POLICY for its own tensor part, and libgomp has read the environment by now
from torch import nn

OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
sys.path.insert(0, str(Path(__file__).parent))
from quant import layer_milliseconds, timed, to_bnb_4bit  # noqa: E402

# give llama.cpp's subprocess (libgomp too) the caller's setting back
if OMP_WAIT_POLICY is None: os.environ.pop("OMP_WAIT_POLICY", None)
else: os.environ["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
warnings.filterwarnings("ignore")

from qlora_nb.core import check_in, check_range, machine_info  # noqa: E402
from qlora_nb.kernels import exact_matmuls, fused_kernel, fused_matmul_4bit, fused_weights  # noqa: E402
from qlora_nb.models import load_base, smollm2_gguf_path  # noqa: E402
from qlora_nb.quant_linear import NF4Linear, quantize_model  # noqa: E402
from qlora_nb.settings import resolve_config  # noqa: E402

PROMPT = "Question: What are the three primary colors of light?\nAnswer:"
LLAMA_VENV_PYTHON = Path(__file__).resolve().parent.parent / ".venv-llama" / "bin" / "python"

# Runs in llama-cpp-python's python: greedy decoding of the given prompt tokens, timed end to end like `generate`.
LLAMA_SCRIPT = r"""
import json, sys, time
import llama_cpp
args = json.loads(sys.argv[1])
llm = llama_cpp.Llama(model_path=args["gguf"], n_ctx=args["n_ctx"], n_threads=args["threads"],
                      n_threads_batch=args["threads"], seed=0, verbose=False)
def run(new_tokens):
    llm.reset()  # no prefix reuse: every run prefills the prompt again, as generate does
    tokens, start = [], time.perf_counter()
    for token in llm.generate(args["prompt"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)  # EOS does not stop it: the same number of tokens as ours
        if len(tokens) == new_tokens: break
    return time.perf_counter() - start, tokens
run(4)  # warm-up
results = [run(args["new_tokens"]) for _ in range(args["runs"])]
print(json.dumps({"seconds": [s for s, _ in results], "tokens": results[0][1], "version": llama_cpp.__version__}))
"""


def our_model(name:str):
    "The base in fp32 and its NF4Linear copy, quantized with a run's quant settings (as `recipe.build_model` does)."
    config = resolve_config(overrides={"model": name, "dtype": "fp32", "device": "cpu"})
    base, tokenizer = load_base(config["model"], dtype=torch.float32, device="cpu", seed=config["seed"])
    quantized = quantize_model(copy.deepcopy(base), quant_type=config["quant"], blocksize=config["blocksize"],
                               double_quant=config["double_quant"], skip=("lm_head",), decode_kernel=config["decode_kernel"])
    return base.eval(), quantized.eval(), tokenizer


def greedy(model, prompt:torch.Tensor,  # (1, T) token ids
           new_tokens:int) -> tuple[list[int], float]:
    "The `new_tokens` greedy tokens after `prompt` (EOS ignored) and the seconds `generate` took, prefill included."
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # (1, T + new_tokens)
        seconds = time.perf_counter() - start
    return out[0, prompt.shape[1]:].tolist(), seconds


def decode_interleaved(models:dict, prompt:torch.Tensor, new_tokens:int, runs:int) -> dict:
    "Per model: the seconds of each run and its tokens; models take turns, so that a busy machine slows them all alike."
    for model in models.values(): greedy(model, prompt, 4)  # warm-up (compiles the kernels)
    results = {name: {"seconds": [], "tokens": None} for name in models}
    for _ in range(runs):
        for name, model in models.items():
            tokens, seconds = greedy(model, prompt, new_tokens)
            results[name]["seconds"].append(seconds); results[name]["tokens"] = tokens
    return results


def llama_cpp_python() -> str|None:
    "A python that can import llama_cpp: this one, else `.venv-llama`'s (`make llama-cpp`); None where there is none."
    try:
        import llama_cpp  # noqa: F401
        return sys.executable
    except ImportError: return str(LLAMA_VENV_PYTHON) if LLAMA_VENV_PYTHON.is_file() else None


def decode_llama_cpp(python:str, prompt:list[int], new_tokens:int, runs:int, threads:int) -> dict:
    "llama.cpp's seconds per run and tokens on the embedded GGUF, from `LLAMA_SCRIPT` run by `python`."
    args = {"gguf": str(smollm2_gguf_path()), "prompt": prompt, "new_tokens": new_tokens, "runs": runs, "threads": threads,
            "n_ctx": len(prompt) + new_tokens + 16}
    done = subprocess.run([python, "-c", LLAMA_SCRIPT, json.dumps(args)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0: raise RuntimeError(f"llama.cpp's run failed ({python}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_bandwidth(mebibytes:int=256, repeats:int=9) -> float:
    "Memory read bandwidth in GB/s: an fp32 tensor far bigger than the caches, summed; the best of `repeats` (a limit, not a typical)."
    big = torch.ones(mebibytes * 2**20 // 4)
    big.sum()  # warm-up: threads started
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter(); big.sum(); best = min(best, time.perf_counter() - start)
    return big.nbytes / best / 1e9


def kernel_milliseconds(model:nn.Module, repeats:int=200) -> float:
    "Milliseconds one token spends in the fused 4-bit kernel alone: every NF4Linear's `fused_matmul_4bit` on a random row, no module around it."
    total = 0.0
    with torch.inference_mode():
        for layer in [m for m in model.modules() if isinstance(m, NF4Linear)]:
            row, packed, absmax_and_code = torch.randn(1, layer.in_features), layer.packed_codes(), fused_weights(layer.quant_state)
            total += timed(lambda: fused_matmul_4bit(row, packed, layer.quant_state, *absmax_and_code), repeats)
    return 1000 * total


def quantized_bytes(model:nn.Module, absmax_as_read:bool=False) -> int:
    "Bytes of every NF4Linear's codes and absmax: as stored (8-bit absmax + their own absmax), or as our kernel reads them (fp32)."
    total = 0
    for layer in [m for m in model.modules() if isinstance(m, NF4Linear)]:
        state = layer.quant_state
        total += layer.packed_codes().nbytes + (layer.bias.nbytes if layer.bias is not None else 0)
        if absmax_as_read: total += state.absmax.numel() * 4  # `fused_weights`: one fp32 absmax a block
        else: total += state.absmax.nbytes + (state.state2.absmax.nbytes if state.nested else 0)
    return total


def kv_cache_bytes(config, positions:float, bytes_per_value:int) -> float:
    "Bytes of keys and values attention reads at a token that sees `positions` earlier positions."
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * bytes_per_value * positions


def token_bytes(model:nn.Module, mean_positions:float) -> dict:
    "What one decoded token of `model` reads, by part: 4-bit layers, head, one embedding row, the rest, the fp32 KV cache."
    head, embedding = model.lm_head.weight, model.get_input_embeddings().weight
    quantized_params = {id(p) for m in model.modules() if isinstance(m, NF4Linear) for p in m.parameters()}
    rest = sum(p.nbytes for p in model.parameters() if id(p) not in quantized_params | {id(head), id(embedding)})
    return {"4-bit layers": quantized_bytes(model), "head": head.nbytes, "embedding row": embedding[0].nbytes,
            "norms": rest, "KV cache": kv_cache_bytes(model.config, mean_positions, 4)}


def gguf_token_bytes(config, mean_positions:float) -> float:
    "What one token of llama.cpp reads: every tensor of the GGUF (its tied embedding is the head) and an f16 KV cache."
    from gguf import GGUFReader
    return sum(int(t.n_bytes) for t in GGUFReader(smollm2_gguf_path()).tensors) + kv_cache_bytes(config, mean_positions, 2)


def profile_generate(model, prompt:torch.Tensor, new_tokens:int, rows:int=25):
    "Where a token's time goes: torch's operators (self time) and Python's functions (cProfile), over one `generate`."
    import cProfile, pstats
    from torch.profiler import ProfilerActivity, profile
    greedy(model, prompt, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof: greedy(model, prompt, new_tokens)
    print(f"\n== torch profiler, one generate of {new_tokens} tokens, by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    profiler = cProfile.Profile()
    profiler.enable(); greedy(model, prompt, new_tokens); profiler.disable()
    print(f"\n== cProfile, one generate of {new_tokens} tokens (cProfile's own cost inflates the Python part)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(rows)


def rate(seconds:list[float], new_tokens:int) -> tuple[float, float]:
    "Tokens/s of the best and of the median run."
    return new_tokens / min(seconds), new_tokens / statistics.median(seconds)


def first_difference(a:list[int], b:list[int]) -> str:
    "'equal', or where two token lists part."
    if a == b: return "equal"
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"differ from token {at} on"


def main(args):
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"== greedy decoding, batch 1, {args.new_tokens} new tokens, {args.runs} runs, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}\n"
          f"CPU: {info['cpu']}, {info['cores']} cores, flags {' '.join(info['cpu_flags'])}; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f} (another busy process slows every path, torch's most)")
    bandwidth = read_bandwidth()
    base, ours, tokenizer = our_model(args.model)
    prompt = torch.tensor([tokenizer(PROMPT)["input_ids"]])  # (1, T)
    bnb_model = to_bnb_4bit(base)  # in place: the fp32 base is not needed any more
    timings = decode_interleaved({"ours": ours, "bnb": bnb_model}, prompt, args.new_tokens, args.runs)
    with exact_matmuls(): eager_tokens, _ = greedy(ours, prompt, args.new_tokens)
    python = llama_cpp_python() if args.model == "smollm2-135m" else None
    llama = decode_llama_cpp(python, prompt[0].tolist(), args.new_tokens, args.runs, args.threads) if python else None

    mean_positions = prompt.shape[1] + (args.new_tokens - 1) / 2
    parts = token_bytes(ours, mean_positions)
    floor_ms = sum(parts.values()) / bandwidth / 1e6
    ours_best, ours_median = rate(timings["ours"]["seconds"], args.new_tokens)
    bnb_best, bnb_median = rate(timings["bnb"]["seconds"], args.new_tokens)
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s (256 MiB fp32 sum)")
    print(f"bytes a token reads, ours: {sum(parts.values()) / 1e6:.1f} MB ("
          + ", ".join(f"{name} {value / 1e6:.2f}" for name, value in parts.items())
          + f"); our kernel reads the absmax as fp32: 4-bit layers {quantized_bytes(ours, True) / 1e6:.1f} MB")
    print(f"floor: {floor_ms:.2f} ms/token = {1000 / floor_ms:.0f} tok/s")
    rows = [("ours: NF4Linear + transformers", ours_best, ours_median, floor_ms),
            ("bitsandbytes 4-bit", bnb_best, bnb_median, floor_ms)]  # the same bytes as ours: 4-bit codes, 8-bit absmax, fp32 head
    if llama is not None:
        llama_best, llama_median = rate(llama["seconds"], args.new_tokens)
        gguf_floor_ms = gguf_token_bytes(ours.config, mean_positions) / bandwidth / 1e6
        print(f"llama.cpp's floor: {gguf_floor_ms:.2f} ms/token (its GGUF's bytes, Q8_0 head, f16 KV cache)")
        rows.append((f"llama.cpp {llama['version']} (GGUF Q4_1)", llama_best, llama_median, gguf_floor_ms))
    print(f"{'path':34} {'tok/s best':>10} {'median':>7} {'ms/token':>9} {'of its floor':>13} {'of our floor':>13}")
    for name, best, median, its_floor_ms in rows:
        print(f"{name:34} {best:10.1f} {median:7.1f} {1000 / best:9.2f} {its_floor_ms * best / 1000:12.0%} {floor_ms * best / 1000:12.0%}")
    print(f"ours / bnb = {ours_best / bnb_best:.2f}x", end="")
    if llama is not None: print(f"   ours / llama.cpp = {ours_best / llama_best:.2f}x (goal >= 1x)")
    else:
        print("\nllama.cpp: not measured: " + ("the tiny model has no GGUF" if args.model != "smollm2-135m" else
              "llama-cpp-python is not importable and .venv-llama is missing (`make llama-cpp` builds it, about 6 minutes)"))
    print(f"ours at {floor_ms * ours_best / 1000:.0%} of the floor (goal >= 50%)")
    print(f"tokens: ours vs the eager fp32 path (exact_matmuls): {first_difference(timings['ours']['tokens'], eager_tokens)}"
          f"; bnb vs ours: {first_difference(timings['bnb']['tokens'], timings['ours']['tokens'])}"
          + (f"; llama.cpp vs ours: {first_difference(llama['tokens'], timings['ours']['tokens'])}" if llama else ""))
    if timings["ours"]["tokens"] != eager_tokens: print("WARNING: our tokens are not the eager fp32 path's")

    layers_ms = layer_milliseconds(ours, NF4Linear)  # each NF4Linear called as a module: its kernel and the Python around it
    kernels_ms = kernel_milliseconds(ours) if fused_kernel() is not None else float("nan")
    head_ms = layer_milliseconds(ours.lm_head, nn.Linear)
    token_ms = 1000 / ours_best
    print(f"our {token_ms:.2f} ms/token: 4-bit layers {layers_ms:.2f} ms (floor {parts['4-bit layers'] / bandwidth / 1e6:.2f}; "
          f"the fused kernel alone {kernels_ms:.2f}), head {head_ms:.2f} ms (floor {parts['head'] / bandwidth / 1e6:.2f}), "
          f"the rest (framework: generate, cache, attention, norms) {token_ms - layers_ms - head_ms:.2f} ms")
    if args.profile: profile_generate(ours, prompt, args.new_tokens)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each run generates (4-1024)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each path (1-20)")
    parser.add_argument("--threads", type=int, default=2, help="torch's and llama.cpp's threads (1-256)")
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or 'tiny' (no llama.cpp: it has no GGUF)")
    parser.add_argument("--profile", action="store_true", help="then profile one generate of ours: torch operators and Python functions")
    args = parser.parse_args()
    check_range(args.new_tokens, "--new-tokens", 4, 1024); check_range(args.runs, "--runs", 1, 20)
    check_range(args.threads, "--threads", 1, 256); check_in(args.model, ("smollm2-135m", "tiny"), "--model")
    main(args)

"""Quantizer speed against bitsandbytes' CPU path and a plain memory copy, all measured in this run.

1. quantize_4bit / dequantize_4bit of a 4096x4096 tensor, fp32 and bf16, blocksize 64, double quantization on and off.
   Goals: quantize >= 10x faster than bitsandbytes, dequantize at least as fast, bit-exact (checked here).
2. Greedy generation, batch 1, 64 new tokens, through NF4Linear vs bitsandbytes 4-bit (fp32 compute) vs fp32.
   Goal: >= 1.5x bitsandbytes' tokens/s. On a CPU with AVX512-BF16 both 4-bit models multiply through bitsandbytes'
   fused bf16 kernel (with identical logits), so the ratio measures what each layer costs around it; NF4Linear's
   exact fp32 path (`exact_matmuls`) is timed too. Both models keep SmolLM2's tied fp32 head; `quantize_model` makes
   it a `DecodeLinear` (a compiled one-row kernel), bitsandbytes' stack keeps nn.Linear. The per-token line splits
   the time between the head, the 4-bit layers and the rest.
3. --fused: our fused 4-bit matmul (`fused_matmul_4bit`, used with autograd off for up to FUSED_MAX_ROWS fp32 rows)
   against dequantize + matmul, the path it replaces, on SmolLM2's layer shapes for 1 to 64 rows, with the
   machine's fp32 GEMM rate on the same shapes as the floor. Prints where the fused kernel stops winning.

Our dequantize_4bit (qlora_nb.kernels) puts big outputs in transparent huge pages; bitsandbytes and the copy get ordinary pages, as
their users do. To compare the kernels alone, the tensor part runs again in a subprocess with THP_MEM_ALLOC_ENABLE=1,
which makes PyTorch put every big allocation (bitsandbytes' outputs and the copy too) in huge pages.

Run: .venv/bin/python bench/quant.py [--skip-generate | --skip-tensor | --fused] [--repeats N] [--no-thp-rerun]"""
import argparse, os, statistics, subprocess, sys, time, warnings

# On a shared, oversubscribed CPU, OpenMP threads that spin-wait after each parallel region steal the cores the next
# region needs (measured here: 5-10x slower small ops after an inductor kernel). Sleeping waits help both libraries
# with the big tensors. Decoding is the opposite, hundreds of tiny parallel regions a token that each wait for
# sleeping threads to wake (both 4-bit models ran at half speed with PASSIVE), so the generation part runs in its own
# process under the caller's OpenMP settings, which by default spin a little, then sleep.
CALLER_ENV = dict(os.environ)
if "--skip-tensor" not in sys.argv: os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from torch import nn

warnings.filterwarnings("ignore")
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402

from qlora_nb.quant import quantize_4bit  # noqa: E402
from qlora_nb.kernels import (FUSED_MAX_ROWS, bnb_cpu_kernels, dequantize_4bit, exact_matmuls, fused_kernel,  # noqa: E402
                              fused_matmul_4bit, fused_weights, use_kernels)
from qlora_nb.quant_linear import NF4Linear, quantize_model  # noqa: E402


def timed(fn, repeats):
    "Median seconds of `repeats` calls after one warm-up call (which also compiles)."
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_interleaved(fns, repeats):
    "Median seconds of each function, calling them in turn so that a busy machine slows them all alike."
    for fn in fns: fn()  # warm-up (compiles)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter(); fn(); bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def bench_tensor(repeats):
    pages = "huge pages for every allocation (THP_MEM_ALLOC_ENABLE=1)" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "huge pages for our outputs only"
    print(f"== 4096x4096, blocksize 64, torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, median of {repeats}, {pages}")
    print(f"{'dtype':6} {'DQ':3} | {'quantize ms':>11} {'bnb ms':>8} {'x bnb':>6} {'copy ms':>8} {'x copy':>6} |"
          f" {'dequant ms':>10} {'bnb ms':>8} {'x bnb':>6} {'copy ms':>8} {'x copy':>6} | exact")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        A = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).to(dtype)
        for double_quant in (True, False):
            packed, state = quantize_4bit(A, "nf4", 64, double_quant)
            ref_packed, ref_state = bnbF.quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            out = dequantize_4bit(packed, state)
            exact = (torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
                     and torch.equal(out, bnbF.dequantize_4bit(ref_packed, ref_state)))
            t_q, t_q_bnb, t_copy_in = timed_interleaved([
                lambda: quantize_4bit(A, "nf4", 64, double_quant),
                lambda: bnbF.quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=double_quant),
                lambda: A.clone()], repeats)  # the input's bytes: what quantize must at least read
            t_dq, t_dq_bnb, t_copy_out = timed_interleaved([
                lambda: dequantize_4bit(packed, state),
                lambda: bnbF.dequantize_4bit(ref_packed, ref_state),
                lambda: out.clone()], repeats)  # the output's bytes: what dequantize must at least write
            name = str(dtype).removeprefix("torch.")[:6]
            print(f"{name:6} {'on' if double_quant else 'off':3} | {t_q*1e3:11.1f} {t_q_bnb*1e3:8.1f} {t_q_bnb/t_q:6.1f} "
                  f"{t_copy_in*1e3:8.1f} {t_copy_in/t_q:6.2f} | {t_dq*1e3:10.1f} {t_dq_bnb*1e3:8.1f} {t_dq_bnb/t_dq:6.2f} "
                  f"{t_copy_out*1e3:8.1f} {t_copy_out/t_dq:6.2f} | {exact}")
            rows.append((t_q_bnb / t_q, t_dq_bnb / t_dq, exact))
    print(f"quantize speed-up over bnb: min {min(r[0] for r in rows):.1f}x (goal >= 10x); "
          f"dequantize: min {min(r[1] for r in rows):.2f}x (goal >= 1x); all bit-exact: {all(r[2] for r in rows)}")


def load_model():
    "SmolLM2-135M if qlora_nb.models can load it, else a random model of the same shape (speed does not depend on values)."
    try:
        from qlora_nb.models import load_base
        loaded = load_base("smollm2-135m", dtype=torch.float32, device="cpu")
        model = loaded[0] if isinstance(loaded, tuple) else getattr(loaded, "model", loaded)
        return model.float().eval(), "smollm2-135m"
    except Exception as e:  # not prepared here: same architecture, random weights
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
        torch.manual_seed(0)
        return LlamaForCausalLM(config).float().eval(), f"random LlamaForCausalLM, SmolLM2-135M shape ({type(e).__name__})"


def to_bnb_4bit(model):
    "Replace every nn.Linear but lm_head by bitsandbytes' Linear4bit (NF4, double quant, fp32 compute)."
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=layer)
        if linear.bias is not None: layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        model.set_submodule(name, layer.to("cpu"))
    return model.eval()


def tokens_per_second(model, new_tokens=64, runs=2):
    prompt = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 355]])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up, compiles
        best = min(timed_once(lambda: model.generate(prompt, **kwargs)) for _ in range(runs))
    return new_tokens / best


def layer_milliseconds(model, kind, repeats=200):
    "Milliseconds one token spends in `model`'s layers of type `kind`: each called once on a random row (median of repeats)."
    total = 0.0
    with torch.inference_mode():
        for layer in [m for m in model.modules() if isinstance(m, kind)]:
            row = torch.randn(1, 1, layer.in_features)
            total += timed(lambda: layer(row), repeats)
    return 1000 * total


def timed_once(fn):
    start = time.perf_counter(); fn(); return time.perf_counter() - start


def bench_generate():
    import copy
    base, what = load_model()
    print(f"\n== greedy generation, batch 1, 64 new tokens: {what}, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    fp32 = tokens_per_second(base)
    quantized = quantize_model(copy.deepcopy(base))
    ours = tokens_per_second(quantized)
    with exact_matmuls(): exact = tokens_per_second(quantized)
    with use_kernels(decode_kernel=False): undecoded = tokens_per_second(quantized)
    theirs_model = to_bnb_4bit(copy.deepcopy(base))
    theirs = tokens_per_second(theirs_model)
    if bnb_cpu_kernels():
        print("(on this CPU bitsandbytes' 4-bit matmul is its fused AVX512-BF16 kernel, in bf16 whatever the compute dtype;"
              " NF4Linear calls the same kernel when autograd is off)")
    print(f"fp32: {fp32:.1f} tok/s   NF4Linear: {ours:.1f} tok/s   NF4Linear exact fp32: {exact:.1f} tok/s"
          f"   bnb 4-bit (fp32 compute): {theirs:.1f} tok/s")
    print(f"NF4Linear / bnb = {ours/theirs:.2f}x (goal >= 1.5x)   exact / bnb = {exact/theirs:.2f}x   NF4Linear / fp32 = {ours/fp32:.2f}x")
    print(f"NF4Linear without its decode kernels (fused 4-bit matmul, one-row head): {undecoded:.1f} tok/s; with them "
          f"{ours/undecoded:.2f}x that (fused kernel here: {'yes' if fused_kernel() else 'no'}; bitsandbytes' bf16 one: "
          f"{'yes' if bnb_cpu_kernels() else 'no'})")
    print(f"per token: NF4Linear {1000/ours:.1f} ms, bnb {1000/theirs:.1f} ms; of which the fp32 lm_head "
          f"{layer_milliseconds(quantized.lm_head, nn.Linear):.1f} ms (quantize_model's DecodeLinear) vs "
          f"{layer_milliseconds(theirs_model.lm_head, nn.Linear):.1f} ms (nn.Linear), "
          f"the 4-bit layers {layer_milliseconds(quantized, NF4Linear):.1f} ms (NF4Linear) vs "
          f"{layer_milliseconds(theirs_model, bnb.nn.Linear4bit):.1f} ms (bnb Linear4bit)")


def bench_fused(repeats):
    "Our fused 4-bit matmul against dequantize + matmul, by rows, on SmolLM2's shapes; the fp32 GEMM rate as the floor."
    if fused_kernel() is None: print("no fused kernel on this machine (it needs AVX2, FMA and a C compiler)"); return
    print(f"\n== fused 4-bit matmul vs dequantize + matmul, fp32, NF4 blocksize 64 double quant, torch threads {torch.get_num_threads()}")
    print(f"{'shape':>12} {'rows':>5} {'fused':>9} {'dequant+mm':>11} {'speed-up':>9} {'dense mm':>9} {'fused vs dense':>15}")
    crossover = {}
    for out_features, in_features in [(576, 576), (1536, 576), (576, 1536)]:
        layer = NF4Linear.from_linear(nn.Linear(in_features, out_features, bias=False)).eval()
        packed, state = layer.weight, layer.quant_state
        absmax, code, dense = *fused_weights(state), dequantize_4bit(packed, state)
        for rows in (1, 2, 4, 8, 16, 32, 64):
            x = torch.randn(rows, in_features)
            fused = timed(lambda: fused_matmul_4bit(x, packed, state, absmax, code), repeats)
            with torch.inference_mode(), use_kernels(decode_kernel=False):  # the layer's own path: dequantize into its scratch buffer
                eager = timed(lambda: layer(x), repeats)
            floor = timed(lambda: x @ dense.T, repeats)  # the weight already in fp32: no dequantizing at all
            if fused > eager: crossover.setdefault((out_features, in_features), rows)
            print(f"{out_features:>5}x{in_features:<6} {rows:>5} {fused * 1e6:>7.0f}us {eager * 1e6:>9.0f}us {eager / fused:>8.2f}x"
                  f" {floor * 1e6:>7.0f}us {floor / fused:>14.2f}x")
    print(f"fused slower than dequantize + matmul from (shape: rows): {crossover or 'never, up to 64 rows'}; FUSED_MAX_ROWS = {FUSED_MAX_ROWS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-tensor", action="store_true", help="only the generation part")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-thp-rerun", action="store_true", help="skip the rerun with huge pages for every allocation")
    parser.add_argument("--fused", action="store_true", help="only the fused 4-bit matmul against dequantize + matmul, by rows")
    args = parser.parse_args()
    if args.fused: bench_fused(args.repeats); sys.exit(0)
    if not args.skip_tensor: bench_tensor(args.repeats)
    if not args.skip_tensor and not args.no_thp_rerun and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        print("\n(kernels alone: the same with THP_MEM_ALLOC_ENABLE=1, in a subprocess)", flush=True)
        subprocess.run([sys.executable, __file__, "--skip-generate", "--no-thp-rerun", "--repeats", str(args.repeats)],
                       env={**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}, check=True)
    if args.skip_tensor: bench_generate()
    elif not args.skip_generate: subprocess.run([sys.executable, __file__, "--skip-tensor"], env=CALLER_ENV, check=True)

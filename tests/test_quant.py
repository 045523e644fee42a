"""qlora_nb.quant (the reference) and qlora_nb.kernels (the fast paths) against the installed bitsandbytes: a sweep
of shapes x dtypes x blocksizes x quant types x double quantization, the edge cases, the torch.compile path,
safetensors in both directions, a hypothesis property test, the kernel switches and the bitsandbytes version gate.
Run: .venv/bin/python -m pytest tests/test_quant.py -q"""
import itertools, math

import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from safetensors.torch import load_file, save_file

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF

from qlora_nb.quant import BLOCKSIZES, QuantState, block_absmax, code_midpoints, dequantize_4bit_reference, quantize_4bit
from qlora_nb.kernels import (bnb_cpu_dequantize, bnb_cpu_kernels, bnb_verified, dequantize_4bit, exact_matmuls, fused_kernel,
                              use_kernels)
from qlora_nb.quant_linear import DecodeLinear, NF4Linear, quantize_model

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch._dynamo.disable(recursive=True)  # bnb's own torch.compile'd fallbacks would compile per shape: run them eagerly
def bnb_quantize(A, quant_type, blocksize, double_quant):
    return bnbF.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


@torch._dynamo.disable(recursive=True)
def bnb_dequantize_flat(packed, state):
    """bitsandbytes' dequantize_4bit on the flattened tensor, reshaped back.

    bnb 0.50's CPU kernel indexes each row's absmax as row * (columns // blocksize), wrong when the row length is
    not a multiple of the blocksize; on the flat (1, numel) view it is right, and it is the same kernel."""
    numel = math.prod(state.shape)
    flat_state = bnbF.QuantState(state.absmax, shape=torch.Size([1, numel]), code=state.code, blocksize=state.blocksize,
                                 quant_type=state.quant_type, dtype=state.dtype, offset=state.offset, state2=state.state2)
    out = bnbF.dequantize_4bit(packed, flat_state)
    return out.reshape(state.shape)


def assert_same_as_bnb(A, quant_type="nf4", blocksize=64, double_quant=True, fast=None):
    "Every stored tensor, the packed state dict and the dequantized values must be torch.equal to bitsandbytes'."
    packed, state = quantize_4bit(A, quant_type, blocksize, double_quant, fast=fast)
    ref_packed, ref_state = bnb_quantize(A, quant_type, blocksize, double_quant)
    assert torch.equal(packed, ref_packed), "packed bytes differ"
    assert torch.equal(state.absmax, ref_state.absmax), "absmax differs"
    assert torch.equal(state.code, ref_state.code)
    if double_quant:
        assert torch.equal(state.offset, ref_state.offset), "offset differs"
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax), "nested absmax differs"
        assert torch.equal(state.state2.code, ref_state.state2.code)
    ours, theirs = state.as_dict(packed=True), ref_state.as_dict(packed=True)
    assert list(ours) == list(theirs)
    for key in ours: assert torch.equal(ours[key], theirs[key]), key
    out = dequantize_4bit(packed, state, fast=fast)
    assert out.dtype == A.dtype and out.shape == A.shape
    assert torch.equal(out, bnb_dequantize_flat(ref_packed, ref_state)), "dequantized values differ"
    assert torch.equal(dequantize_4bit_reference(packed, state), out), "the reference and the kernel differ"
    return packed, state, out


# ---- the sweep: 4 shapes x 3 dtypes x 8 blocksizes x 2 quant types x 2 (double quant) = 384 cases ----
SHAPES = [(3, 33), (7, 128), (1, 4097), (2, 3, 50)]  # odd counts, partial blocks, rows shorter than a block


@pytest.mark.parametrize("quant_type,double_quant", list(itertools.product(("nf4", "fp4"), (True, False))))
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_sweep_against_bnb(quant_type, double_quant, blocksize):
    gen = torch.Generator().manual_seed(blocksize)
    for shape, dtype in itertools.product(SHAPES, DTYPES):
        A = (torch.randn(shape, generator=gen) * 3).to(dtype)
        assert_same_as_bnb(A, quant_type, blocksize, double_quant)


def test_bnb_cpu_kernel_row_bug_is_why_we_compare_flat():
    "Documents the bnb 0.50 CPU dequantize bug the flat comparison works around (shape[-1] % blocksize != 0)."
    A = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    ref_packed, ref_state = bnb_quantize(A, "nf4", 64, False)
    ours = dequantize_4bit(*quantize_4bit(A, double_quant=False))
    assert torch.equal(ours, bnb_dequantize_flat(ref_packed, ref_state))
    assert (ours - A).abs().max() < 0.5  # ours is right; bnb's direct call on (8, 96) has errors near 2


# ---- edge cases ----
def _midpoint_tensor(quant_type, n, scale=2.0):
    "Values exactly on the decision boundaries between codes (after scaling by the block's absmax)."
    mids = code_midpoints(quant_type)
    x = mids[torch.arange(n) % 15] * scale
    x[::64] = scale  # every block's absmax is `scale`, so x / absmax is exactly a midpoint
    return x


EDGE_CASES = {
    "all_zero": lambda: torch.zeros(256),
    "zero_blocks_and_partial_zero_tail": lambda: torch.cat([torch.randn(128), torch.zeros(64 + 30)]),
    "constant": lambda: torch.full((64 * 300,), 0.5),  # every absmax equal: the nested block is all-equal too
    "huge_outlier": lambda: torch.randn(512).index_fill_(0, torch.tensor([7]), 3e38),
    "huge_negative_outlier": lambda: torch.randn(512).index_fill_(0, torch.tensor([300]), -1e30),
    "subnormal": lambda: torch.randn(256) * 1e-40,
    "subnormal_and_normal_blocks": lambda: torch.cat([torch.randn(64) * 1e-42, torch.randn(64)]),
    "tiny_tail": lambda: torch.cat([torch.randn(64), torch.tensor([1e-39, -2e-39, 0.0])]),
    "one_value": lambda: torch.tensor([-3.0]),
    "two_values": lambda: torch.tensor([0.25, -1.5]),
    "fp16_max": lambda: torch.tensor([65504.0, -65504.0] * 40),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_edge_cases(case, quant_type):
    torch.manual_seed(0)
    A = EDGE_CASES[case]()
    for dtype, double_quant in itertools.product(DTYPES, (True, False)):
        if dtype == torch.float16 and A.abs().max() > 65504: continue
        assert_same_as_bnb(A.to(dtype), quant_type, 64, double_quant)


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("blocksize", (32, 64, 256))
def test_ties_on_midpoints(quant_type, blocksize):
    A = _midpoint_tensor(quant_type, 64 * 40)
    packed, state, _ = assert_same_as_bnb(A, quant_type, blocksize, False)


def test_bad_input():
    with pytest.raises(ValueError, match="A.dtype=torch.float64 is not supported"): quantize_4bit(torch.zeros(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="A.dtype=torch.int64"): quantize_4bit(torch.zeros(64, dtype=torch.int64))
    with pytest.raises(ValueError, match="A is empty"): quantize_4bit(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="blocksize=16 is not one of"): quantize_4bit(torch.zeros(64), blocksize=16)
    with pytest.raises(ValueError, match="nan"): quantize_4bit(torch.tensor([1.0, float("nan")] * 64))
    with pytest.raises(ValueError, match="-inf"): quantize_4bit(torch.tensor([1.0, float("-inf")] * 64).bfloat16())
    packed, state = quantize_4bit(torch.randn(10, 64))
    for dequantize in (dequantize_4bit, dequantize_4bit_reference):
        with pytest.raises(ValueError, match="packed has"): dequantize(packed[:-1], state)
        bad = QuantState(state.absmax[:-1], state.shape, state.code, 64, "nf4", torch.float32, state.offset, state.state2)
        with pytest.raises(ValueError, match="absmax has 9 entries"): dequantize(packed, bad)
        bad = QuantState(state.absmax, state.shape, state.code, 64, "nf5", torch.float32, state.offset, state.state2)
        with pytest.raises(ValueError, match="quant_state.quant_type='nf5'"): dequantize(packed, bad)
        bad = QuantState(state.absmax, state.shape, state.code, 64, "nf4", torch.float64, state.offset, state.state2)
        with pytest.raises(ValueError, match="quant_state.dtype"): dequantize(packed, bad)


# ---- the torch.compile path must give the same bytes as eager and as bnb ----
@pytest.mark.parametrize("dtype,quant_types", [(torch.float32, ("nf4", "fp4")), (torch.bfloat16, ("nf4",))])
def test_compiled_path_matches_bnb(dtype, quant_types):
    torch.manual_seed(1)
    A = torch.randn(256, 1030).to(dtype)  # not a multiple of 64: a partial last block and odd rows
    A[3, 5] = 1e4; A[200, :64] = 0; A[100, 64:128] = _midpoint_tensor("nf4", 64)
    for quant_type in quant_types:
        packed, state, out = assert_same_as_bnb(A, quant_type, 64, True, fast=True)
        eager_packed, eager_state = quantize_4bit(A, quant_type, 64, True, fast=False)
        assert torch.equal(packed, eager_packed)
        assert torch.equal(out, dequantize_4bit(eager_packed, eager_state, fast=False))


# ---- safetensors, both directions ----
def _bnb_linear4bit(linear, quant_type="nf4", double_quant=True):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant, module=layer)
    if linear.bias is not None: layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes on the move


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_ours_to_bnb_linear4bit(quant_type, double_quant, tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    ours = NF4Linear.from_linear(linear, quant_type=quant_type, double_quant=double_quant)
    save_file(ours.state_dict(), tmp_path / "layer.safetensors")
    loaded = load_file(tmp_path / "layer.safetensors")
    weight = bnb.nn.Params4bit.from_prequantized(loaded["weight"], {k: v for k, v in loaded.items() if k.startswith("weight.")},
                                                 device="cpu")
    ref = _bnb_linear4bit(linear, quant_type, double_quant)  # built by bnb from the same weights
    assert torch.equal(weight.data, ref.weight.data)
    assert torch.equal(bnbF.dequantize_4bit(weight.data, weight.quant_state), ours.dequantize())
    layer = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, quant_type=quant_type)
    layer.weight, layer.bias = weight, nn.Parameter(loaded["bias"], requires_grad=False)
    layer.eval()
    x = torch.randn(4, 256)
    with torch.no_grad():
        with exact_matmuls(): torch.testing.assert_close(layer(x), ours(x), rtol=2e-2, atol=2e-2)  # bnb's CPU matmul runs in bf16
        if bnb_cpu_kernels(): assert torch.equal(layer(x), ours(x))  # the same kernel on both sides


def test_bnb_linear4bit_to_ours(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    ref = _bnb_linear4bit(linear)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "bnb.safetensors")
    ours = NF4Linear.from_linear(nn.Linear(128, 64))
    ours.load_state_dict(load_file(tmp_path / "bnb.safetensors"))
    assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(ref.weight.data, ref.weight.quant_state))
    assert torch.equal(ours.bias, linear.bias)
    x = torch.randn(3, 128)
    with torch.no_grad(): torch.testing.assert_close(ours(x), linear(x), rtol=0.2, atol=0.2)


def test_quantize_model_matches_bnb_layers():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    quantize_model(model)
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, NF4Linear)
        ref_packed, ref_state = bnb_quantize(weight, "nf4", 64, True)
        assert torch.equal(layer.weight, ref_packed)
        assert torch.equal(layer.dequantize(), bnbF.dequantize_4bit(ref_packed, ref_state))
    assert isinstance(model.lm_head, nn.Linear)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", True), ("nf4", False)])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 1024, 4096])
@pytest.mark.parametrize("shape", [(48, 4096), (3, 8192)])
def test_bnb_cpu_dequantize_is_bit_identical(quant_type, double_quant, blocksize, shape):
    "NF4Linear's training path (bitsandbytes' CPU kernel into a scratch buffer) gives dequantize_4bit's bits."
    torch.manual_seed(blocksize)
    packed, state = quantize_4bit(torch.randn(shape) * 3, quant_type, blocksize, double_quant)
    for dtype in DTYPES:
        out = bnb_cpu_dequantize(packed, state, torch.empty(shape, dtype=dtype))
        if blocksize >= 2048: assert out is None  # bitsandbytes' own CPU path falls back there too
        else: assert out is not None and torch.equal(out, dequantize_4bit_reference(packed, state, dtype))
    layer = NF4Linear(packed, state)
    assert torch.equal(layer.dequantize(scratch=True), layer.dequantize())


def ours_and_bnb(quant_type="nf4", double_quant=True, blocksize=64, vocab_size=300):
    "A random tied-head Llama quantized by `quantize_model`, and the same model in bnb.nn.Linear4bit."
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=True)
    ours = LlamaForCausalLM(config).eval()
    theirs = LlamaForCausalLM(config).eval()
    theirs.load_state_dict(ours.state_dict())
    for name, linear in [(n, m) for n, m in theirs.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32,
                                  compress_statistics=double_quant, quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double_quant, blocksize=blocksize, module=layer)
        theirs.set_submodule(name, layer.to("cpu").eval())
    return quantize_model(ours, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant), theirs


@pytest.mark.skipif(not bnb_cpu_kernels(), reason="bitsandbytes has no AVX512-BF16 kernel on this CPU")
@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 128), ("nf4", False, 32)])
def test_inference_equals_bnb_model(quant_type, double_quant, blocksize):
    "With autograd off, a model quantized by us gives the logits of the same model in bnb.nn.Linear4bit, bit for bit."
    ours, theirs = ours_and_bnb(quant_type, double_quant, blocksize)  # a head too small for DecodeLinear's row kernel
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
        with exact_matmuls(): exact = ours(ids).logits
    assert not torch.equal(exact, theirs(ids).logits.detach())  # the exact path really is another computation
    prompt = ids[:1, :4]
    torch.testing.assert_close(ours.generate(prompt, max_new_tokens=8, do_sample=False),
                               theirs.generate(prompt, max_new_tokens=8, do_sample=False), rtol=0, atol=0)


@pytest.mark.skipif(not bnb_cpu_kernels(), reason="bitsandbytes has no AVX512-BF16 kernel on this CPU")
def test_decode_head_generates_as_bnb():
    "With a head big enough for DecodeLinear's one-row kernel, greedy decoding gives bnb's tokens, and logits to fp32 rounding."
    ours, theirs = ours_and_bnb(vocab_size=4096)
    assert isinstance(ours.lm_head, DecodeLinear) and type(theirs.lm_head) is nn.Linear
    prompt = torch.randint(0, 4096, (1, 5))
    with torch.no_grad():
        last = ours.model(prompt).last_hidden_state[:, -1:]  # (1, 1, hidden): one row, as in decoding
        assert ours.lm_head._uses_row_kernel(last)
        torch.testing.assert_close(ours.lm_head(last), theirs.lm_head(last), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.generate(prompt, max_new_tokens=16, do_sample=False),
                               theirs.generate(prompt, max_new_tokens=16, do_sample=False), rtol=0, atol=0)


# ---- hypothesis: random shapes and values ----
# Round-trip error bounds set the way bitsandbytes' tests set theirs: the mean absolute error of N(0, 1) data,
# measured with bitsandbytes 0.50.2 over seeds 0..199 (256 x 256 tensors, blocksize 64, double quantization on),
# bound mean +- 7 sigma:  nf4: mean 0.072850, sigma 0.000278    fp4: mean 0.096621, sigma 0.000399
GAUSSIAN_ERR = {"nf4": (0.072850, 0.000278), "fp4": (0.096621, 0.000399)}
MAX_HALF_GAP = {q: float(((c := bnbF.get_4bit_type(q, device="cpu").sort().values)[1:] - c[:-1]).max() / 2) for q in ("nf4", "fp4")}


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_gaussian_error_within_measured_bounds(quant_type):
    mean, sigma = GAUSSIAN_ERR[quant_type]
    for seed in range(3):
        A = torch.randn(256, 256, generator=torch.Generator().manual_seed(1000 + seed))
        err = (dequantize_4bit(*quantize_4bit(A, quant_type)) - A).abs().mean().item()
        assert abs(err - mean) < 7 * sigma, (err, mean, sigma)


finite_floats = st.floats(min_value=-6e4, max_value=6e4, allow_nan=False, allow_infinity=False, width=32)  # finite in fp16 too


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(finite_floats, min_size=1, max_size=700), rows=st.integers(1, 3),
       quant_type=st.sampled_from(("nf4", "fp4")), blocksize=st.sampled_from((32, 64, 128)),
       double_quant=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_property_roundtrip(values, rows, quant_type, blocksize, double_quant, dtype):
    A = torch.tensor(values * rows).to(dtype)
    packed, state, out = assert_same_as_bnb(A, quant_type, blocksize, double_quant)
    if not double_quant:
        # every value lands within half the widest code gap of its block's absmax (plus the output rounding)
        absmax = block_absmax(state).repeat_interleave(blocksize)[: A.numel()]
        bound = absmax * MAX_HALF_GAP[quant_type] * (1 + 1e-6) + out.float().abs() * torch.finfo(dtype).eps
        assert ((out.float() - A.float()).abs() <= bound + 1e-30).all()


# ---- the kernel switches and the bitsandbytes version gate ----
def test_unverified_bnb_version_falls_back_with_the_same_bits(monkeypatch):
    "On a bitsandbytes release the C calls were not checked against, nothing is handed to C and every result keeps its bits."
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(512, 96), "fp4", 64, True)
    x = torch.randn(3, 512)
    with torch.no_grad(), exact_matmuls(): exact = layer(x)
    trained = layer.dequantize(scratch=True).clone()
    monkeypatch.setattr(bnb, "__version__", "0.99.0")
    assert not bnb_verified() and bnb_cpu_kernels() == {}
    assert bnb_cpu_dequantize(layer.weight, layer.quant_state, torch.empty(96, 512)) is None
    assert torch.equal(layer.dequantize(scratch=True), trained)
    assert torch.equal(trained, dequantize_4bit_reference(layer.weight, layer.quant_state))
    with torch.no_grad(), use_kernels(decode_kernel=False): assert torch.equal(layer(x), exact)  # no bitsandbytes kernel: exact
    with torch.no_grad(): assert layer._uses_fused_kernel(x) == (fused_kernel() is not None)  # ours needs no bitsandbytes


def test_exact_matmuls_in_one_thread_leaves_another_thread_fast():
    "A dashboard trains in its own thread: an evaluation that asks for exact matmuls must not switch its kernels off."
    import threading
    ours, _ = ours_and_bnb(vocab_size=4096)
    last = torch.randn(1, 1, 128)
    entered, release, seen = threading.Event(), threading.Event(), []
    def evaluation():
        with exact_matmuls():
            entered.set(); release.wait(10)
    worker = threading.Thread(target=evaluation); worker.start()
    entered.wait(10)
    with torch.no_grad(): seen.append(ours.lm_head._uses_row_kernel(last))  # this thread, while the other is inside
    release.set(); worker.join()
    assert seen == [True]


def test_decode_kernel_switch_keeps_tokens_and_logits_close():
    "decode_kernel off (F.linear) and on (compiled row kernel) give the same greedy tokens, logits within fp32 rounding."
    ours, _ = ours_and_bnb(vocab_size=4096)
    prompt = torch.randint(0, 4096, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last = ours.model(prompt).last_hidden_state[:, -1:]  # (1, 1, hidden)
        with use_kernels(decode_kernel=True): fast = ours.lm_head(last)
        with use_kernels(decode_kernel=False): exact = ours.lm_head(last)
    assert torch.equal(exact, torch.nn.functional.linear(last, ours.lm_head.weight))
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5)  # measured: max 1.8e-7 on logits of magnitude ~1
    with use_kernels(decode_kernel=True): tokens_fast = ours.generate(prompt, max_new_tokens=8, do_sample=False)
    with use_kernels(decode_kernel=False): tokens_exact = ours.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens_fast, tokens_exact)


def test_cpu_kernels_switch_keeps_training_bits():
    "cpu_kernels off and on give the same training forward and input gradient, bit for bit (the C dequantize is exact)."
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(256, 64), "nf4", 64, True)
    results = []
    for cpu_kernels in (True, False):
        x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with use_kernels(cpu_kernels=cpu_kernels):
            y = layer(x); y.pow(2).sum().backward()
        results.append((y.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.skipif(not bnb_cpu_kernels(), reason="bitsandbytes has no AVX512-BF16 kernel on this CPU")
def test_cpu_kernels_switch_inference_within_bf16_tolerance():
    "With autograd off, cpu_kernels on (fused bf16) and off (exact fp32) agree to bf16 rounding: 2e-2 relative, 3e-3 typical."
    ours, _ = ours_and_bnb()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with use_kernels(cpu_kernels=True): fast = ours(ids).logits
        with use_kernels(cpu_kernels=False): exact = ours(ids).logits
    assert not torch.equal(fast, exact)
    assert ((fast - exact).norm() / exact.norm()).item() < 2e-2

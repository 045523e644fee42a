"""qlora_nb.methods: every method trains, native QLoRA matches PEFT LoRA on the dequantized weights, and the backends interoperate."""
import copy, subprocess, sys

import peft
import pytest
import torch

from qlora_nb.core import set_seed
from qlora_nb.lora import LoRAConfig, LoRALinear, add_lora, load_adapter
from qlora_nb.export import dequantize_model
from qlora_nb.loss import causal_lm_loss
from qlora_nb.methods import METHODS, load_for_training, prepare_model
from qlora_nb.models import load_base
from qlora_nb.quant_linear import quantize_model


def tiny():
    model, _ = load_base("tiny", device="cpu", dtype="fp32", seed=0)
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_matches_peft_on_dequantized_weights(ids, use_dora):
    "QLoRA is LoRA on the dequantized weights: logits and gradients equal PEFT's LoRA on those weights."
    config = LoRAConfig(r=4, alpha=8, use_dora=use_dora)
    quantized = quantize_model(tiny())
    reference = dequantize_model(copy.deepcopy(quantized))
    set_seed(3); ours = add_lora(quantized, config)
    set_seed(3); theirs = peft.get_peft_model(reference, config.to_peft())
    with torch.no_grad():
        for (name, a), (_, b) in zip(sorted((n, p) for n, p in ours.named_parameters() if p.requires_grad),
                                     sorted((n, p) for n, p in theirs.named_parameters() if p.requires_grad)):
            assert torch.equal(a, b), name  # the same init
            noise = torch.randn_like(a) * 0.05
            a.add_(noise); b.add_(noise)
    our_out, their_out = ours(ids, labels=ids), theirs(ids, labels=ids)
    torch.testing.assert_close(our_out.logits, their_out.logits, atol=1e-5, rtol=0)
    our_out.loss.backward(); their_out.loss.backward()
    ours_grads = sorted((n, p.grad) for n, p in ours.named_parameters() if p.requires_grad)
    theirs_grads = sorted((n, p.grad) for n, p in theirs.named_parameters() if p.requires_grad)
    for (name, a), (_, b) in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method,quantize", [(m, q) for m in METHODS for q in (False, True) if not (m == "full" and q)])
def test_every_method_learns(ids, method, quantize):
    "Six AdamW steps on one batch lower the loss, and only the trained parameters move."
    set_seed(0)
    model = prepare_model(tiny(), method, quantize=quantize, lora_config=LoRAConfig(r=4), bottleneck_size=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = causal_lm_loss(model, ids, ids, chunk_size=8)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, param in model.named_parameters():
        if name in frozen: assert torch.equal(param, frozen[name]), name


def test_peft_bnb_adapter_loads_into_native_qlora(tmp_path, ids):
    "An adapter trained on the standard stack loads into our 4-bit model and gives the same update."
    config = LoRAConfig(r=4, alpha=8)
    standard, _ = load_for_training("tiny", backend="peft+bnb", device="cpu", dtype="fp32", lora_config=config)
    optimizer = torch.optim.AdamW([p for p in standard.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        standard(ids, labels=ids).loss.backward(); optimizer.step(); optimizer.zero_grad()
    standard.save_pretrained(tmp_path / "adapter")
    native, _ = load_for_training("tiny", backend="native", device="cpu", dtype="fp32", lora_config=config)
    from qlora_nb.lora import remove_lora
    native = load_adapter(remove_lora(native), tmp_path / "adapter")
    assert sum(isinstance(m, LoRALinear) for m in native.modules()) == 28
    with torch.no_grad():
        ours, theirs = native(ids).logits, standard(ids).logits
        assert (ours - theirs).abs().max() < 2e-2  # bitsandbytes' CPU matmul is ~2e-3 off fp32 per layer
        with standard.disable_adapter(): update = (theirs - standard(ids).logits).abs().max()
    assert update > 5e-2  # the adapter's effect is much larger than the backends' difference


def lora_weights(model):
    "Every LoRA parameter of `model`, by name, detached."
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("quantize", [False, True])
def test_same_seed_same_lora_init(tmp_path, quantize):
    "load_for_training draws LoRA's init from `seed`, as seeding by hand and then add_lora does, whatever it loads."
    base, tokenizer = load_base("tiny", device="cpu", dtype="fp32", seed=5)
    base.save_pretrained(tmp_path / "base"); tokenizer.save_pretrained(tmp_path / "base")  # a folder: loading draws nothing
    config = LoRAConfig(r=4)
    loaded = [lora_weights(load_for_training(str(tmp_path / "base"), device="cpu", dtype="fp32", quantize=quantize,
                                             lora_config=config, seed=7)[0]) for _ in range(2)]
    by_hand, _ = load_base(str(tmp_path / "base"), device="cpu", dtype="fp32")
    if quantize: quantize_model(by_hand)
    set_seed(7); by_hand = lora_weights(add_lora(by_hand, config))
    assert loaded[0].keys() == loaded[1].keys() == by_hand.keys() and len(by_hand) == 2 * 7 * 4
    for name, weight in by_hand.items():
        assert torch.equal(loaded[0][name], weight) and torch.equal(loaded[1][name], weight), name


def test_nothing_registered_at_import():
    "Importing qlora_nb registers no attention with transformers: set_up_training_kernels does, when a model asks for it."
    code = """
from transformers import AttentionInterface
import qlora_nb.recompute, qlora_nb.methods, qlora_nb.memory
from qlora_nb.recompute import RECOMPUTED_ATTENTION, set_up_training_kernels
from qlora_nb.models import load_base
assert RECOMPUTED_ATTENTION not in AttentionInterface().valid_keys()
set_up_training_kernels(load_base("tiny", device="cpu", dtype="bf16")[0], RECOMPUTED_ATTENTION)
assert RECOMPUTED_ATTENTION in AttentionInterface().valid_keys()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_method_setup_maps_every_choice():
    from qlora_nb.methods import METHOD_CHOICES, METHODS, method_setup
    assert {name: method_setup(name) for name in METHOD_CHOICES} == {
        "lora": ("lora", {}), "rslora": ("lora", {"use_rslora": True}), "dora": ("lora", {"use_dora": True}),
        "adapter": ("adapter", {}), "bitfit": ("bitfit", {}), "full": ("full", {})}
    assert all(method_setup(name)[0] in METHODS for name in METHOD_CHOICES)
    with pytest.raises(ValueError, match="method='qlora' is not one of"): method_setup("qlora")


@pytest.mark.parametrize("name,quantize", [(m, q) for m in ("lora", "rslora", "dora", "adapter", "bitfit", "full") for q in (False, True)
                                           if not (m == "full" and q)])
def test_every_method_saves_and_loads(tmp_path, ids, name, quantize):
    "save_trainable -> load_trainable into a fresh (equally quantized) tiny model gives the trained model's logits exactly."
    import json
    from qlora_nb.methods import add_method, load_trainable, method_setup, save_trainable
    method, overrides = method_setup(name)
    model = tiny()
    if quantize: quantize_model(model)
    add_method(model, method, LoRAConfig(r=4, **overrides), seed=1, bottleneck_size=8)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad: param.add_(torch.randn_like(param) * 0.02)
        expected = model(ids).logits
    folder = save_trainable(model, tmp_path / "saved", name)
    info = json.loads((folder / "method.json").read_text())
    assert info["method"] == name and info["architecture"] == "LlamaForCausalLM"
    lora_files = (folder / "adapter_config.json").is_file(), (folder / "adapter_model.safetensors").is_file()
    assert lora_files == ((True, True) if method == "lora" else (False, False))
    assert (folder / "trainable.safetensors").is_file() == (method != "lora")
    fresh = tiny()
    if quantize: quantize_model(fresh)
    load_trainable(fresh, folder, method=name)
    with torch.no_grad(): assert torch.equal(fresh(ids).logits, expected)
    with pytest.raises(FileExistsError): save_trainable(model, tmp_path / "saved", name)
    save_trainable(model, tmp_path / "saved", name, overwrite=True)


def test_load_trainable_refuses_another_method(tmp_path):
    from qlora_nb.methods import add_method, load_trainable, save_trainable
    bitfit = save_trainable(add_method(tiny(), "bitfit"), tmp_path / "bitfit", "bitfit")
    dora = save_trainable(add_method(tiny(), "lora", LoRAConfig(r=4, use_dora=True)), tmp_path / "dora", "dora")
    with pytest.raises(ValueError, match="holds a 'bitfit' result, not method='adapter'"): load_trainable(tiny(), bitfit, method="adapter")
    with pytest.raises(ValueError, match="holds a 'dora' result, not method='lora'"): load_trainable(tiny(), dora, method="lora")
    with pytest.raises(ValueError, match="is set up for lora; load it into the base model"):
        load_trainable(add_lora(tiny(), LoRAConfig(r=4)), bitfit)
    with pytest.raises(ValueError, match="method='rslora' needs LoRAConfig\\(use_rslora=True\\)"):
        save_trainable(add_lora(tiny(), LoRAConfig(r=4)), tmp_path / "x", "rslora")
    assert not (tmp_path / "x").exists()

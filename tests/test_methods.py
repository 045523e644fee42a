"""qlora_nb.methods: every method trains, native QLoRA matches PEFT LoRA on the dequantized weights, and the backends interoperate."""
import copy

import peft
import pytest
import torch
from torch import nn

from qlora_nb.core import set_seed
from qlora_nb.lora import LoRAConfig, LoRALinear, add_lora, load_adapter, save_adapter
from qlora_nb.memory import causal_lm_loss
from qlora_nb.methods import METHODS, load_for_training, prepare_model
from qlora_nb.models import load_base
from qlora_nb.quant_linear import NF4Linear, quantize_model


def tiny():
    model, _ = load_base("tiny", device="cpu", dtype="fp32", seed=0)
    return model


def dequantized(model):
    "A copy of a 4-bit model with every NF4Linear turned back into an nn.Linear holding the dequantized weight."
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad(): linear.weight.copy_(module.dequantize())
            model.set_submodule(name, linear)
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_matches_peft_on_dequantized_weights(ids, use_dora):
    "QLoRA is LoRA on the dequantized weights: logits and gradients equal PEFT's LoRA on those weights."
    config = LoRAConfig(r=4, alpha=8, use_dora=use_dora)
    quantized = quantize_model(tiny())
    reference = dequantized(quantized)
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

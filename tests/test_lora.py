"""PEFT interoperability of qlora_nb.lora: adapter files both ways, and output/gradient parity with peft.get_peft_model."""
import copy, json

import peft
import pytest
import torch

from qlora_nb.core import set_seed
from qlora_nb.lora import (LoRAConfig, LoRALinear, add_lora, load_adapter, merge_lora, save_adapter,
                           trainable_report)
from qlora_nb.models import load_base

VARIANTS = {
    "lora": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=8, use_rslora=True),
    "dora": dict(r=4, alpha=8, use_dora=True),
    "gaussian-qv": dict(r=2, alpha=4, init="gaussian", target_modules=["q_proj", "v_proj"]),
    "list-layer1": dict(r=3, alpha=3, target_modules=["up_proj", "down_proj"], layers_to_transform=[1]),
}
OURS_ONLY = {"regex-layer1": dict(r=3, alpha=3, target_modules=r".*\.mlp\.(up|down)_proj", layers_to_transform=[1, 3])}


def tiny():
    "The tiny Llama in fp32 on the CPU, the same weights every call."
    model, _ = load_base("tiny", device="cpu", dtype="fp32", seed=0)
    return model


def perturb(model, scale=0.05, seed=2):
    "Give every trainable tensor a random nudge, so B != 0 and the magnitudes move."
    set_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad: param.add_(torch.randn_like(param) * scale)
    return model


@pytest.mark.parametrize("variant", [*VARIANTS, *OURS_ONLY])
def test_peft_loads_our_adapter(tmp_path, ids, variant):
    ours = perturb(add_lora(tiny(), LoRAConfig(**{**VARIANTS, **OURS_ONLY}[variant])))
    expected = ours(ids).logits
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny(), tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=0)
    assert (expected - tiny()(ids).logits).abs().max() > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("variant", VARIANTS)
def test_we_load_peft_adapter(tmp_path, ids, variant):
    theirs = perturb(peft.get_peft_model(tiny(), LoRAConfig(**VARIANTS[variant]).to_peft()))
    theirs.eval()
    expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny(), tmp_path / "peft")
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)
    # and back: our save of what we loaded is what PEFT saved
    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny(), tmp_path / "ours").eval()
    torch.testing.assert_close(again(ids).logits, expected, atol=1e-5, rtol=0)


def test_modules_to_save_round_trip(tmp_path, ids):
    "A trained copy of the (tied) output head travels with the adapter, both ways."
    config = LoRAConfig(r=4, alpha=8, use_dora=True, modules_to_save=["lm_head"])
    ours = perturb(add_lora(tiny(), config))
    assert ours.lm_head.weight.requires_grad and not ours.model.embed_tokens.weight.requires_grad
    expected = ours(ids).logits
    save_adapter(ours, tmp_path / "adapter")
    reloaded = load_adapter(tiny(), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-6, rtol=0)
    theirs = peft.PeftModel.from_pretrained(tiny(), tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=0)


def named_lora_params(model):
    "LoRA parameters by qlora_nb's names: PEFT's '.default' adapter name and 'base_model.model.' dropped."
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad: continue
        name = name.removeprefix("base_model.model.").replace(".default.weight", ".weight").replace(".default", "")
        name = name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
        out[name] = param
    return out


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "gaussian-qv"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_parity_with_get_peft_model(ids, variant, dropout):
    "From the same seed the adapters start equal; after a nudge, logits, loss and every gradient match PEFT's."
    config = LoRAConfig(**VARIANTS[variant], dropout=dropout)
    base = tiny()
    set_seed(3); theirs = peft.get_peft_model(copy.deepcopy(base), config.to_peft())
    set_seed(3); ours = add_lora(copy.deepcopy(base), config)
    their_params, our_params = named_lora_params(theirs), named_lora_params(ours)
    assert sorted(their_params) == sorted(our_params)
    for name, param in their_params.items():  # the same init, not merely the same shapes
        assert torch.equal(param, our_params[name]), name
    perturb(theirs); perturb(ours)
    for name, param in their_params.items(): assert torch.equal(param, our_params[name]), name
    theirs.train(); ours.train()
    set_seed(4); their_out = theirs(ids, labels=ids)
    set_seed(4); our_out = ours(ids, labels=ids)
    torch.testing.assert_close(our_out.logits, their_out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_out.loss, their_out.loss, atol=1e-6, rtol=0)
    their_out.loss.backward(); our_out.loss.backward()
    for name, param in their_params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(our_params[name].grad, param.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_trainable_report_matches_peft():
    config = LoRAConfig(r=8, alpha=16, use_dora=True)
    theirs = peft.get_peft_model(tiny(), config.to_peft())
    trainable, total = theirs.get_nb_trainable_parameters()
    report = trainable_report(add_lora(tiny(), config))
    assert (report.trainable_params, report.total_params) == (trainable, total)
    assert report.trainable_bytes == 4 * trainable


def test_merge_matches_peft_merge_and_unload(ids):
    config = LoRAConfig(r=4, alpha=8, use_dora=True)
    base = tiny()
    set_seed(3); theirs = perturb(peft.get_peft_model(copy.deepcopy(base), config.to_peft()))
    set_seed(3); ours = perturb(add_lora(copy.deepcopy(base), config))
    their_merged, our_merged = theirs.merge_and_unload(), merge_lora(ours)
    for (name, a), (_, b) in zip(their_merged.state_dict().items(), our_merged.state_dict().items()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)


def test_bad_adapters(tmp_path, ids):
    ours = perturb(add_lora(tiny(), LoRAConfig(r=4, alpha=8)))
    path = save_adapter(ours, tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    # a different rank in the config than in the tensors
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    model = tiny()
    with pytest.raises(ValueError, match=r"do not fit the model, e.g. base_model.model.model.layers.0.* adapter \(4, (\d+)\), model needs \(8, \1\)"):
        load_adapter(model, path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # refused before any change
    # targets the model does not have
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    with pytest.raises(ValueError, match="matches no linear layer of LlamaForCausalLM; its linear layers are: model.layers.N.self_attn.q_proj"):
        load_adapter(tiny(), path)
    for key, value in [("peft_type", "IA3"), ("rank_pattern", {"q_proj": 2}), ("bias", "all")]:
        (path / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=key):
            load_adapter(tiny(), path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        load_adapter(tiny(), path)


def test_saved_module_needs_a_matching_lora(tmp_path):
    "An adapter with a trained lm_head copy cannot be poured into a LoRA without one (it would overwrite the tied embeddings)."
    ours = perturb(add_lora(tiny(), LoRAConfig(r=4, alpha=8, modules_to_save=["lm_head"])))
    path = save_adapter(ours, tmp_path / "adapter")
    other = add_lora(tiny(), LoRAConfig(r=4, alpha=8))
    embeddings = other.model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match="name no module of the model, e.g. base_model.model.lm_head.weight"):
        load_adapter(other, path)
    assert torch.equal(other.model.embed_tokens.weight, embeddings)

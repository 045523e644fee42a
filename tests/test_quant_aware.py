"Quantization-aware LoRA on the tiny model: after quant-aware last steps the merged NF4 model is the trained model, to the bit; after naive training it is not."
import json

import pytest
import torch

from qlora_nb.data import make_collator
from qlora_nb.kernels import exact_matmuls
from qlora_nb.lora import LoRAConfig, LoRALinear
from qlora_nb.methods import load_for_training
from qlora_nb.prepare import build_datasets
from qlora_nb.quant_aware import (QuantAwareLoRALinear, QuantAwareSteps, fake_quantized, fake_quantized_weight, merge_nf4,
                                  quant_aware_check)
from qlora_nb.quant_linear import NF4Linear
from qlora_nb.trainer import Trainer

STEPS = 6


@pytest.fixture(scope="module")
def rows_and_tokenizer():
    _, tokenizer = load_for_training("tiny", quantize=True, lora_config=LoRAConfig(r=4), dtype="fp32", device="cpu", recompute=False)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in build_datasets(tokenizer, max_length=32)["train"].select(range(48))]
    return rows, tokenizer


def train(rows, tokenizer, quant_aware_steps, dtype="fp32"):
    "A short QLoRA run on the tiny model, with or without quant-aware last steps; the trained model."
    torch.set_num_threads(1)
    model, _ = load_for_training("tiny", quantize=True, lora_config=LoRAConfig(r=4, alpha=16), dtype=dtype, device="cpu", seed=0, recompute=False)
    callbacks = [QuantAwareSteps(last_steps=quant_aware_steps)] if quant_aware_steps else []
    Trainer(model, rows, make_collator(tokenizer), callbacks=callbacks, batch_size=4, max_steps=STEPS, lr=2e-2, seed=0,
            device="cpu", dtype=dtype).fit()
    return model.eval()


def ids(tokenizer):
    return tokenizer(["Convert 3 km to meters.", "Reverse the order of the words: a b c"], return_tensors="pt", padding=True)["input_ids"]


def test_quant_aware_merge_is_the_trained_model(rows_and_tokenizer):
    rows, tokenizer = rows_and_tokenizer
    model = train(rows, tokenizer, quant_aware_steps=3)
    assert all(type(m) is QuantAwareLoRALinear and not m.fake_quant for m in model.modules() if isinstance(m, LoRALinear))
    deployed = merge_nf4(model)
    assert not any(isinstance(m, LoRALinear) for m in deployed.modules())
    assert sum(isinstance(m, NF4Linear) for m in deployed.modules()) == 4 * 7  # every linear of the 4 layers, no LoRA
    check = quant_aware_check(model, deployed, ids(tokenizer))
    assert check["equal"] and check["rel_diff_vs_training"] == 0.0
    with torch.no_grad(), exact_matmuls(), fake_quantized(model):
        assert torch.equal(deployed(ids(tokenizer)).logits, model(ids(tokenizer)).logits)  # logits equal: the training-time forward


def test_naive_merge_changes_the_model(rows_and_tokenizer):
    rows, tokenizer = rows_and_tokenizer
    model = train(rows, tokenizer, quant_aware_steps=0)
    assert not any(isinstance(m, QuantAwareLoRALinear) for m in model.modules())
    deployed = merge_nf4(model)
    with torch.no_grad(), exact_matmuls():
        adapter, merged = model(ids(tokenizer)).logits, deployed(ids(tokenizer)).logits
    assert not torch.equal(adapter, merged)
    assert float((adapter - merged).abs().max() / adapter.abs().max()) > 1e-3  # a real change, not float rounding


def test_quant_aware_training_changes_the_adapter(rows_and_tokenizer):
    "The last steps see a different forward, so the same run with and without them ends with different adapters."
    rows, tokenizer = rows_and_tokenizer
    naive, aware = train(rows, tokenizer, 0), train(rows, tokenizer, 3)
    a, b = naive.model.layers[0].self_attn.q_proj.lora_B.weight, aware.model.layers[0].self_attn.q_proj.lora_B.weight
    assert not torch.equal(a, b)


def test_quant_aware_bf16(rows_and_tokenizer):
    "In bf16 (autocast) the fake-quantized weights are still those of the merged NF4 model, bit for bit."
    rows, tokenizer = rows_and_tokenizer
    model = train(rows, tokenizer, quant_aware_steps=2, dtype="bf16")
    deployed = merge_nf4(model)
    for name, layer in deployed.named_modules():
        if isinstance(layer, NF4Linear):
            assert layer.compute_dtype == torch.bfloat16
            assert torch.equal(layer.dequantize(), fake_quantized_weight(model.get_submodule(name)).detach()), name


def test_a_quant_aware_run_evaluates_and_exports_as_it_trained(tmp_path, capsys):
    "`quant_aware_steps` in a run's config: the run evaluates its merged NF4 form, and `export --format nf4 --quant-aware` writes it, exact."
    from qlora_nb.export import export_main, export_run
    from qlora_nb.recipe import build, fit_and_evaluate
    config = {"model": "tiny", "max_steps": 4, "quant_aware_steps": 2, "batch_size": 2, "max_length": 32, "lr": 1e-2, "em_examples": 4,
              "ppl_max_tokens": 0, "eval_steps": None, "save_steps": None, "progress": False, "out": str(tmp_path / "run")}
    summary = fit_and_evaluate(build(config, overwrite=True, warn=False))
    assert summary["steps"] == 4
    steps = [json.loads(line) for line in (tmp_path / "run" / "run.jsonl").read_text().splitlines()]
    assert [r.get("fake_quant") for r in steps if r["type"] == "step"] == [False, False, True, True]
    with pytest.raises(ValueError, match="exports the nf4 format alone"):
        export_run(tmp_path / "run", tmp_path / "export", kinds=["nf4", "merged"], quant_aware=True, check_outputs=0)
    assert export_main([str(tmp_path / "run"), "--format", "nf4", "--quant-aware", "--check-outputs", "0", "--out", str(tmp_path / "export")]) == 0
    assert "quant-aware: its logits equal the trained model's to the bit" in capsys.readouterr().out
    report = json.loads((tmp_path / "export" / "export.json").read_text())
    assert report["exports"]["nf4"]["exact"] and report["exports"]["nf4"]["check"]["argmax_agreement"] == 1.0
    from qlora_nb.serve.engine import adapter_source
    with pytest.raises(ValueError, match="it is meant to run merged into NF4, not as an adapter"):
        adapter_source(tmp_path / "run")  # the server refuses the run: its adapter alone is another model

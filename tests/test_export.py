"Exports of a really trained QLoRA run, each loaded by the other library and compared on logits."
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from qlora_nb.export import EXPORT_KINDS, export_main, export_run, load_run_model, logits_of
from qlora_nb.search import SEARCHABLE, search_data, train_trial
from qlora_nb.models import load_base

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, embedded_subset):
    "A QLoRA run of the tiny model (NF4 base, blocksize 128, LoRA r=4), trained for 6 steps."
    tmp = tmp_path_factory.mktemp("export")
    _, tokenizer = load_base("tiny", device="cpu", dtype="fp32")
    splits = search_data(tokenizer, *embedded_subset(tmp, 32, 16))
    params = {**SEARCHABLE, "r": 4, "alpha": 8, "lr": 3e-2, "blocksize": 128}
    train_trial(params, tmp / "run", splits, quantize=True, max_steps=6, eval_steps=6, device="cpu", dtype="fp32")
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(trained_run):
    return export_run(trained_run, kinds=EXPORT_KINDS)


def test_the_adapter_was_trained(trained_run):
    model, _ = load_run_model(trained_run)
    norms = [float(p.detach().norm()) for n, p in model.named_parameters() if "lora_B" in n]
    assert norms and max(norms) > 0  # B started at zero: training moved it


def test_merged_loads_in_transformers(trained_run, exported):
    from transformers import AutoModelForCausalLM
    model, tokenizer = load_run_model(trained_run)  # LoRA on the NF4 base, as trained
    reference = logits_of(model, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(exported["exports"]["merged"]["path"], dtype=torch.float32, use_safetensors=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    diff = (logits_of(merged, tokenizer) - reference).abs().max()
    assert diff < 1e-4 * reference.abs().max(), diff


def test_nf4_loads_with_bitsandbytes_config(trained_run, exported):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    path = Path(exported["exports"]["nf4"]["path"])
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4"
    quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                             bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config, dtype=torch.float32)
    layers = [m for m in loaded.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 28 and layers[0].weight.quant_state.blocksize == 128
    # ours: the merged model quantized by qlora_nb's NF4Linear with the same blocksize
    merged = AutoModelForCausalLM.from_pretrained(exported["exports"]["merged"]["path"], dtype=torch.float32)
    _, tokenizer = load_base("tiny", device="cpu", dtype="fp32")
    dense = logits_of(merged, tokenizer)
    from qlora_nb.quant_linear import quantize_model
    ours = logits_of(quantize_model(merged, blocksize=128, skip=("lm_head",)), tokenizer)
    theirs = logits_of(loaded, tokenizer)
    to_ours, to_dense = (theirs - ours).abs().max(), (ours - dense).abs().max()
    assert to_ours < 0.03 * ours.abs().max(), to_ours  # bitsandbytes' CPU kernel keeps the absmax in bf16
    assert to_ours < to_dense / 3, (to_ours, to_dense)  # far below the 4-bit error itself: the same quantized weights


def test_adapter_loads_in_peft(trained_run, exported, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from qlora_nb.lora import load_adapter
    base, tokenizer = load_base("tiny", device="cpu", dtype="fp32")
    base.save_pretrained(tmp_path / "base")
    ours = load_adapter(load_base("tiny", device="cpu", dtype="fp32")[0], exported["exports"]["adapter"]["path"])
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
                                       exported["exports"]["adapter"]["path"]).eval()
    diff = (logits_of(ours.eval(), tokenizer) - logits_of(theirs, tokenizer)).abs().max()
    assert diff < 1e-5, diff


def test_export_report_and_checks(exported, trained_run):
    report = json.loads((trained_run / "export" / "export.json").read_text())
    assert sorted(report["exports"]) == sorted(EXPORT_KINDS)
    assert report["exports"]["merged"]["check"]["rel_diff"] < 1e-4
    assert report["exports"]["nf4"]["check"]["linear4bit_layers"] == 28
    assert report["exports"]["adapter"]["check"]["argmax_agreement"] == 1.0


def test_cli_refuses_a_run_without_adapter(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.jsonl").write_text("")
    assert export_main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "qlora-nb export: error: run" in err and "has no adapter" in err


def test_python_m_export(trained_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "qlora_nb.export", str(trained_run), "--kind", "adapter", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "adapter: " in result.stdout and "verified" in result.stdout
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_run_without_quantization_exports_merged(tmp_path):
    "A plain LoRA run (quant: none): the merged model is base + BA, no dequantization involved."
    from qlora_nb.export import fake_run, run_settings
    run = fake_run(tmp_path / "run", quant="none")
    assert run_settings(run)["quant"] == "none"
    report = export_run(run, tmp_path / "out", kinds="merged")
    assert list(report["exports"]) == ["merged"] and report["exports"]["merged"]["check"]["rel_diff"] < 1e-5
    assert not (tmp_path / "out" / "nf4").exists()

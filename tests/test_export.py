"Exports of a really trained QLoRA run, each loaded by the other library and compared on logits."
import json, os, subprocess, sys, tempfile
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
    data = search_data(tokenizer, *embedded_subset(tmp, 32, 16))
    params = {**SEARCHABLE, "r": 4, "alpha": 8, "lr": 3e-2, "blocksize": 128}
    train_trial(params, tmp / "run", data, quantize=True, max_steps=6, eval_steps=6, device="cpu", dtype="fp32")
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(trained_run):
    return export_run(trained_run, kinds=EXPORT_KINDS, allow_output_problems=True)  # six steps on a random model: its answers loop


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
    from qlora_nb.export import run_settings
    from qlora_nb.testing import fake_run
    run = fake_run(tmp_path / "run", quant="none")
    assert run_settings(run)["quant"] == "none"
    report = export_run(run, tmp_path / "out", kinds="merged", check_outputs=0)
    assert list(report["exports"]) == ["merged"] and report["exports"]["merged"]["check"]["rel_diff"] < 1e-5
    assert not (tmp_path / "out" / "nf4").exists()


def test_a_failed_export_leaves_no_scratch_folder(trained_run, tmp_path, monkeypatch):
    "An nf4-only export merges into a scratch folder first; it is removed when a verification fails, as when all goes well."
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(ValueError, match="the nf4 export does not reproduce the run's logits"):
        export_run(trained_run, tmp_path / "failing", kinds="nf4", rtol={"nf4": -1.0}, check_outputs=0)
    assert list(scratch.iterdir()) == []
    export_run(trained_run, tmp_path / "ok", kinds="nf4", verify=False, check_outputs=0)
    assert list(scratch.iterdir()) == [] and (tmp_path / "ok" / "nf4" / "model.safetensors").is_file()


def test_the_run_model_is_the_recipes(trained_run):
    "load_run_model builds the base from the run's config.json through the recipe: same seed, same quantization, the trained adapter."
    from qlora_nb.export import run_config
    from qlora_nb.lora import is_quantized
    config = run_config(trained_run)
    assert (config["quant"], config["blocksize"], config["lora_r"], config["max_length"]) == ("nf4", 128, 4, 128)
    model, _ = load_run_model(trained_run)
    assert sum(is_quantized(m) for m in model.modules()) == 28
    assert all(m.blocksize == 128 for m in model.modules() if is_quantized(m))


# ---- GGUF -------------------------------------------------------------------------------------------------------------
def test_gguf_loads_in_transformers(trained_run, exported):
    "transformers' GGUF loader reads the f16 file back: the merged model's logits within 1e-3, the same tokenizer."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(exported["exports"]["gguf"]["path"])
    assert path.name == "model-f16.gguf" and path.parent.name == "gguf"
    merged = AutoModelForCausalLM.from_pretrained(exported["exports"]["merged"]["path"], dtype=torch.float32)
    _, tokenizer = load_base("tiny", device="cpu", dtype="fp32")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    reference, theirs = logits_of(merged, tokenizer), logits_of(loaded, tokenizer)
    assert (theirs - reference).abs().max() < 1e-3
    assert (theirs.argmax(-1) == reference.argmax(-1)).all()
    read_back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Convert 3 km to meters."}], tokenize=False, add_generation_prompt=True)
    for text in ["A week has seven days.", chat, "  spaces\tand 123 digits\n"]:
        assert read_back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert read_back.chat_template == tokenizer.chat_template
    check = exported["exports"]["gguf"]["check"]
    assert check["rel_diff"] < 1e-5 and check["tokenizer_agrees"]  # exactly the f16-rounded weights


def test_gguf_metadata_is_what_llama_cpp_reads(exported):
    import gguf
    reader = gguf.GGUFReader(exported["exports"]["gguf"]["path"])
    field = lambda key: reader.fields[key].contents()
    assert field("general.architecture") == "llama" and field("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv"), field("llama.rope.dimension_count")) == (4, 128, 4, 2, 32)
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    assert len(field("tokenizer.ggml.tokens")) == 2048 and field("tokenizer.ggml.tokens")[field("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert "<|im_start|>" in field("tokenizer.chat_template")
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(names) == 1 + 1 + 4 * 9 and "output.weight" not in names  # tied head: llama.cpp reuses token_embd
    assert names["blk.3.ffn_down.weight"] == "F16" and names["output_norm.weight"] == "F32"


def test_gguf_q8_0_from_the_command_line(trained_run, tmp_path, capsys):
    import gguf
    from transformers import AutoModelForCausalLM
    assert export_main([str(trained_run), "--format", "gguf", "--type", "q8_0", "--out", str(tmp_path), "--check-outputs", "0"]) == 0
    assert "gguf: " in capsys.readouterr().out
    path = tmp_path / "gguf" / "model-q8_0.gguf"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    report = json.loads((tmp_path / "export.json").read_text())["exports"]["gguf"]
    assert report["type"] == "q8_0" and report["check"]["rel_diff"] < 1e-5 and report["check"]["rounding_rel_diff"] < 0.03
    merged, tokenizer = load_run_model(trained_run)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    reference = logits_of(merged, tokenizer)
    assert (logits_of(loaded, tokenizer) - reference).abs().max() < 0.03 * reference.abs().max()


def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    from qlora_nb.export import export_gguf
    _, tokenizer = load_base("tiny", device="cpu", dtype="fp32")
    opt = OPTForCausalLM(OPTConfig(vocab_size=2048, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="GGUF export writes the llama and gpt2 architectures; this model is model_type='opt'; export it as merged or nf4"):
        export_gguf(opt, tokenizer, tmp_path / "opt.gguf")
    relu_gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_embd=32, n_layer=1, n_head=2, activation_function="relu"))
    with pytest.raises(ValueError, match="GGUF export writes llama.cpp's GPT-2 architecture; this model has activation_function='relu'"):
        export_gguf(relu_gpt2, tokenizer, tmp_path / "gpt2.gguf")
    biased = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, attention_bias=True))
    with pytest.raises(ValueError, match="attention_bias=True"):
        export_gguf(biased, tokenizer, tmp_path / "biased.gguf")
    assert list(tmp_path.iterdir()) == []


def test_gguf_write_is_atomic(trained_run, tmp_path, monkeypatch):
    "A write that fails half-way leaves neither the file nor its temporary behind; an existing file is kept unless overwrite."
    import gguf
    from qlora_nb.export import export_gguf
    model, tokenizer = load_run_model(trained_run)
    from qlora_nb.export import dequantize_model
    from qlora_nb.lora import merge_lora
    merged = merge_lora(dequantize_model(model))
    def broken(self, *args, **kwargs): raise OSError("disk full")
    with monkeypatch.context() as patched:
        patched.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
        with pytest.raises(OSError, match="disk full"):
            export_gguf(merged, tokenizer, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []
    export_gguf(merged, tokenizer, tmp_path / "model.gguf")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        export_gguf(merged, tokenizer, tmp_path / "model.gguf")
    export_gguf(merged, tokenizer, tmp_path / "model.gguf", "q8_0", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]

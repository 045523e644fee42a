"Every tutorial notebook, executed by papermill with small parameters into a temporary folder, and what it wrote."
import json
import math
from pathlib import Path

import nbformat
import papermill
import pytest

REPO = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((REPO / "nbs" / "tutorials").glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"

# small parameters per tutorial: seconds each on a CPU
SMALL = {
    "01_quant_study": {"quant_types": ["nf4", "fp4", "int4", "int8"], "blocksizes": [64, 256], "n_random": 4096, "max_layers": 2},
    "02_finetune": {"max_steps": 4, "eval_steps": 2, "em_examples": 2, "batch_size": 2, "max_length": 32, "lr": 1e-2},
    "03_methods": {"methods": ["lora", "dora", "qlora", "bitfit"], "max_steps": 3, "batch_size": 2, "max_length": 32},
}


def run_tutorial(path, tmp_path):
    "Execute the tutorial at `path` with its small parameters; return (output dir, executed notebook)."
    out = tmp_path / "out"
    known = papermill.inspect_notebook(str(path))
    parameters = {k: v for k, v in SMALL.get(path.stem, {}).items() if k in known}
    executed = tmp_path / path.name
    papermill.execute_notebook(str(path), str(executed), parameters={**parameters, "output_dir": str(out)}, kernel_name="python3",
                               progress_bar=False, cwd=str(path.parent))
    return out, nbformat.read(executed, as_version=4)


def plotly_outputs(nb):
    return [o["data"][PLOTLY] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if PLOTLY in o.get("data", {})]


def test_every_tutorial_is_a_papermill_workflow():
    assert TUTORIALS, "no notebooks in nbs/tutorials"
    for path in TUTORIALS:
        parameters = papermill.inspect_notebook(str(path))
        assert "output_dir" in parameters, f"{path.name}: its parameters cell has no output_dir"
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata.get("kernelspec", {}).get("name") == "python3", path.name
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged parameters"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_and_writes_its_outputs(path, tmp_path):
    out, nb = run_tutorial(path, tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    figures = sorted((out / "figures").glob("*.html"))
    assert figures and (out / "figures" / "plotly.min.js").stat().st_size > 1e6  # figures open offline
    for figure in figures: assert "Plotly.newPlot" in figure.read_text()
    assert plotly_outputs(nb), "the executed notebook shows no chart"
    CHECKS.get(path.stem, lambda *a: None)(metrics, out, nb)


def check_quant_study(metrics, out, nb):
    rows = metrics["rows"]
    assert len(rows) == 4 * 2 * 4  # 4 formats x 2 blocksizes x (3 random tensors + the model's layers)
    assert metrics["n_layers"] == 2 and metrics["n_weights"] > 10_000
    for row in rows:
        assert 0 < row["relative_rmse"] < 1 and 0 < row["mse"] and row["max_abs_error"] > 0, row
        assert row["sqnr_db"] == pytest.approx(-20 * math.log10(row["relative_rmse"])), row
    by = {(r["source"], r["quant_type"], r["blocksize"]): r for r in rows}
    # stored bits for 4096 values at blocksize 64 with double quantization: 4-bit codes, 64 absmax of 8 bits, one fp32 above them
    assert by[("normal", "nf4", 64)]["bits_per_param"] == pytest.approx(4 + (64 * 8 + 32) / 4096)
    assert by[("normal", "int8", 256)]["bits_per_param"] == pytest.approx(8 + 32 / 256)
    assert by[("normal", "nf4", 64)]["relative_rmse"] < by[("normal", "fp4", 64)]["relative_rmse"]
    assert by[("normal", "int8", 64)]["relative_rmse"] < by[("normal", "nf4", 64)]["relative_rmse"] / 4
    assert by[("student-t3", "nf4", 64)]["relative_rmse"] < by[("student-t3", "nf4", 256)]["relative_rmse"]
    assert metrics["nf4_64_layers_relative_rmse"] == by[("model layers", "nf4", 64)]["relative_rmse"]
    titles = [f["layout"]["title"]["text"] for f in plotly_outputs(nb)]
    assert any("blocksize" in t for t in titles) and any("Bits per parameter" in t for t in titles)


def check_finetune(metrics, out, nb):
    assert metrics["steps"] == 4 and metrics["quant"] == "nf4" and metrics["model"] == "tiny"
    for key in ("eval_loss", "final_train_loss", "first_train_loss", "perplexity", "train_seconds", "seconds"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    assert metrics["final_train_loss"] < metrics["first_train_loss"]  # 4 steps at a high rate on the tiny model
    assert 0 <= metrics["exact_match"] <= 1 and 0 <= metrics["exact_match_before"] <= 1
    assert metrics["peak_memory_bytes"] > 10 * 2**20
    steps = [json.loads(line) for line in (out / "run.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["type"] == "step"] == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "report.html").is_file()
    loss_chart = next(f for f in plotly_outputs(nb) if f["layout"]["title"]["text"].startswith("Loss"))
    assert loss_chart["data"][0]["y"][-1] == pytest.approx(metrics["final_train_loss"])


def check_methods(metrics, out, nb):
    results = metrics["methods"]
    assert [r["method"] for r in results] == ["lora", "dora", "qlora", "bitfit"]
    for r in results:
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] > 0, r
        assert 0 < r["trainable_params"] < r["total_params"], r
        assert r["seconds"] > 0, r
    by = {r["method"]: r for r in results}
    assert by["bitfit"]["trainable_params"] < by["lora"]["trainable_params"] < by["dora"]["trainable_params"]


CHECKS = {"01_quant_study": check_quant_study, "02_finetune": check_finetune, "03_methods": check_methods}

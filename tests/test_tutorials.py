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
    "04_continual": {"model": "tiny", "steps_per_stage": 2, "batch_size": 2, "eval_rows": 1, "fisher_rows": 2, "ppl_tokens": 32,
                     "max_length": 48, "max_new_tokens": 4},
    "08_task_temperature": {"model": "tiny", "max_steps": 2, "batch_size": 2, "max_length": 48, "test_rows": 2, "small_rows": 4},
    "07_meta_init": {"model": "tiny", "meta_steps": 2, "inner_steps": 2, "adapt_steps": 2, "shots": 4, "test_rows": 2, "max_length": 32},
    "06_rank_allocation": {"model": "tiny", "tasks": ["uppercase", "last_word"], "target_r": 2, "initial_r": 3, "big_r": 4, "steps": 6,
                           "batch_size": 2, "interval": 2, "max_length": 32, "test_rows_per_task": 2},
    "05_quant_aware": {"model": "tiny", "tasks": ["uppercase", "last_word"], "steps": 4, "quant_aware_steps": 2, "eval_rows_per_task": 2,
                       "max_new_tokens": 4, "batch_size": 4, "max_length": 32, "lr": 1e-2},
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


def check_meta_init(metrics, out, nb):
    assert metrics["multi_task_steps"] == metrics["meta_steps"] * metrics["inner_steps"] == 4  # the same number of steps for both
    assert not set(metrics["held_out"]) & set(metrics["meta_tasks"]) and len(metrics["meta_tasks"]) == 12
    assert [(r["task"], r["start"]) for r in metrics["rows"]] == [(t, s) for t in metrics["held_out"] for s in ("zero init", "multi-task", "meta init")]
    for r in metrics["rows"]: assert 0 <= r["em_before"] <= 1 and 0 <= r["em_after"] <= 1, r
    assert metrics["goal_met"] == (metrics["mean_em_after"]["meta init"] > metrics["mean_em_after"]["zero init"])
    config = json.loads((out / "meta_init" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and (out / "meta_init" / "adapter_model.safetensors").is_file()


def check_rank_allocation(metrics, out, nb):
    small, big, allocated = metrics["results"]
    assert [r["adapter"] for r in metrics["results"]] == ["uniform r=2", "uniform r=4", "allocated"]
    assert 0 < allocated["trainable_params"] <= small["trainable_params"] < big["trainable_params"]  # the budget held
    assert allocated["params_while_training"] > small["trainable_params"]  # it started at 1.5x
    assert metrics["budget_history"][-1]["budget"] == small["trainable_params"] >= metrics["budget_history"][-1]["cost"]
    for r in metrics["results"]: assert 0 <= r["exact_match"] <= 1 and math.isfinite(r["final_loss"]), r
    assert metrics["goal_met"] == (metrics["goal_same_params"] or metrics["goal_like_big"])
    config = json.loads((out / "adapter_allocated" / "adapter_config.json").read_text())
    assert sum(metrics["final_ranks"].values()) == sum(config["rank_pattern"].get(n, config["r"]) for n in config["target_modules"])
    titles = [f["layout"]["title"]["text"] for f in plotly_outputs(nb)]
    assert any(t.startswith("Allocated ranks") for t in titles)


def check_quant_aware(metrics, out, nb):
    assert metrics["steps"] == 4 and metrics["quant_aware_steps"] == 2 and metrics["test_rows"] == 4
    assert metrics["quant_aware_logits_equal"] is True  # the merged NF4 model is the quant-aware training forward, to the bit
    assert len(metrics["forms"]) == 8 and all(0 <= r["exact_match"] <= 1 for r in metrics["forms"])
    assert len(metrics["losses"]["naive"]) == len(metrics["losses"]["quant_aware"]) == 4
    assert metrics["goal_met"] == (metrics["naive_requant_loss"] > 0 and metrics["quant_aware_loss"] <= metrics["naive_requant_loss"] / 3)
    titles = [f["layout"]["title"]["text"] for f in plotly_outputs(nb)]
    assert any(t.startswith("Held-out exact-match by deployed form") for t in titles)


def check_task_temperature(metrics, out, nb):
    assert metrics["counts"] == {"uppercase": 200, "km_to_m": 200, "last_word": 200, "weekday_after": 4, "reverse_words": 4}
    shares = metrics["expected_shares"]
    assert shares["T=1"]["uppercase"] == pytest.approx(200 / 608) and shares["uniform"]["reverse_words"] == pytest.approx(0.2)
    assert shares["T=1"]["reverse_words"] < shares["T=3"]["reverse_words"] < shares["uniform"]["reverse_words"]
    assert list(metrics["results"]) == ["T=1", "T=3", "uniform"]
    for name, result in metrics["results"].items():
        assert set(result["exact_match_per_task"]) == set(result["main_metric_per_task"]) == set(metrics["counts"]), name
        assert all(0 <= v <= 1 for v in result["exact_match_per_task"].values()), name
        run = json.loads((out / "runs" / name.replace("=", "") / "config.json").read_text())
        assert run["task_temperature"] == {"T=1": 1.0, "T=3": 3.0, "uniform": None}[name]


def check_continual(metrics, out, nb):
    assert list(metrics["results"]) == ["naive", "replay", "ewc", "task_arithmetic", "ties"] and metrics["steps_per_stage"] == 2
    tasks = [t for stage in metrics["stages"] for t in stage]
    assert len(tasks) == len(set(tasks)) == 15 and [len(stage) for stage in metrics["stages"]] == [5, 5, 5]
    for name, r in metrics["results"].items():
        assert len(r["matrix"]) == 3 and all(len(row) == 3 and all(0 <= v <= 1 for v in row) for row in r["matrix"]), name
        assert len(r["perplexity"]) == 3 and all(p > 1 for p in r["perplexity"]), name
        assert r["average_forgetting"] == pytest.approx(sum(max(r["matrix"][i][j] for i in range(2)) - r["matrix"][2][j] for j in range(2)) / 2)
        if name != "ties": assert r["matrix"][0] == metrics["results"]["naive"]["matrix"][0], name  # the shared first stage
    assert metrics["goal"]["judged"] == (metrics["results"]["naive"]["average_forgetting"] > 0)
    titles = [f["layout"]["title"]["text"] for f in plotly_outputs(nb)]
    assert any(t.startswith("Forgetting matrices") for t in titles)


CHECKS = {"01_quant_study": check_quant_study, "02_finetune": check_finetune, "03_methods": check_methods, "07_meta_init": check_meta_init, "08_task_temperature": check_task_temperature,
          "06_rank_allocation": check_rank_allocation, "05_quant_aware": check_quant_aware,
          "04_continual": check_continual}

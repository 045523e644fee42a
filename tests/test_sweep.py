"Papermill sweeps on a toy notebook: runs, resume, a failing run, two workers, the report, and bad YAML."
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from qlora_nb.sweep import ERROR, EXECUTED, FINISHED, load_results, load_sweep, results_table, run_sweep, sweep_main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sweep"


@pytest.fixture
def project(tmp_path):
    "A copy of the sweep fixtures: the toy notebook and its YAML files."
    shutil.copytree(FIXTURES, tmp_path / "sweep")
    return tmp_path / "sweep"


def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_list_sweep_two_workers_failure_recorded_then_resume(project, tmp_path):
    runs_dir = tmp_path / "runs"
    lines = []
    cwd = os.getcwd()
    statuses = run_sweep(project / "list.yaml", runs_dir, log=lines.append)  # workers: 2 from the file
    assert os.getcwd() == cwd  # two notebooks at once never move this process's working directory
    sweep_dir = runs_dir / "list"
    assert {n: s["status"] for n, s in statuses.items()} == {
        "lr=0.5_label=first": "finished", "lr=0.25_steps=2_label=second": "finished", "broken": "failed"}
    assert "to run with 2 worker(s)" in lines[0]

    # each run: its executed notebook with the injected parameters, and what the notebook wrote to output_dir
    first, second, broken = (sweep_dir / n for n in statuses)
    assert metrics(first)["eval_loss"] == pytest.approx(2.0 * 0.5**3)
    assert metrics(second)["eval_loss"] == pytest.approx(2.0 * 0.75**2) and metrics(second)["label"] == "second"
    assert metrics(first)["pid"] != metrics(second)["pid"]  # separate kernels
    assert metrics(first)["cwd"] == metrics(second)["cwd"] == str(project)  # each kernel starts in the notebook's folder
    executed = nbformat.read(second / EXECUTED, as_version=4)
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "steps = 2" in injected.source and f"output_dir = \"{second}\"" in injected.source

    # the failure: its error cell and exception recorded, no marker, and the sweep went on
    assert (first / FINISHED).is_file() and not (broken / FINISHED).exists()
    error = json.loads((broken / ERROR).read_text())["error"]
    assert error["ename"] == "ValueError" and "toy run toy failed on purpose" in error["evalue"]
    assert "if fail: raise ValueError" in error["source"] and isinstance(error["cell_index"], int)
    assert "ValueError" in error["traceback"] and "\x1b[" not in error["traceback"]
    assert (broken / EXECUTED).is_file() and not (broken / "metrics.json").exists()

    # the report: the table has every run and the error, charts for the four metrics, plotly.js inline (offline)
    report = (sweep_dir / "report.html").read_text()
    for text in ("lr=0.5_label=first", "broken", "ValueError: toy run toy failed on purpose", "final eval loss", "exact-match",
                 "run time (s)", "peak memory (bytes)"):
        assert text in report, text
    assert report.count("Plotly.newPlot") == 4 and "<script src=\"http" not in report and len(report) > 1_000_000
    notebook = nbformat.read(sweep_dir / "report.ipynb", as_version=4)
    plots = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(plots) == 4
    eval_loss = next(p for p in plots if p["data"]["application/vnd.plotly.v1+json"]["layout"]["title"]["text"] == "final eval loss")
    bars = eval_loss["data"]["application/vnd.plotly.v1+json"]["data"][0]
    assert bars["x"] == ["lr=0.5_label=first", "lr=0.25_steps=2_label=second"]
    assert bars["y"] == pytest.approx([0.25, 1.125])

    # resume: finished runs are skipped untouched, the failed one runs again
    marker_before = (first / FINISHED).stat().st_mtime_ns
    lines.clear()
    again = run_sweep(project / "list.yaml", runs_dir, workers=1, log=lines.append)
    assert "2 already finished, 1 to run" in lines[0]
    assert again["lr=0.5_label=first"]["skipped"] and "skipped" not in again["broken"]
    assert (first / FINISHED).stat().st_mtime_ns == marker_before

    # the CLI says which runs failed and exits 1; --report-only rebuilds the report from the folder
    (sweep_dir / "report.html").unlink()
    assert sweep_main([str(project / "list.yaml"), "--runs-dir", str(runs_dir), "--report-only"]) == 0
    assert (sweep_dir / "report.html").is_file()


def test_two_worker_processes_give_the_serial_results(project, tmp_path):
    "Runs in processes of their own, one failing: the statuses, metrics, errors and report table of a serial sweep."
    serial = run_sweep(project / "list.yaml", tmp_path / "serial", workers=1, log=lambda line: None)
    parallel = run_sweep(project / "list.yaml", tmp_path / "parallel", workers=2, log=lambda line: None)
    assert {n: s["status"] for n, s in parallel.items()} == {n: s["status"] for n, s in serial.items()} == {
        "lr=0.5_label=first": "finished", "lr=0.25_steps=2_label=second": "finished", "broken": "failed"}
    assert parallel["broken"]["error"]["ename"] == "ValueError" and parallel["lr=0.5_label=first"]["parameters"] == {"lr": 0.5, "label": "first"}

    def comparable(rows):  # what differs between any two sweeps: times and process ids
        return [{**r, "seconds": None, "metrics": {k: v for k, v in r["metrics"].items() if k != "pid"},
                 "error": r["error"] and {k: r["error"][k] for k in ("cell_index", "execution_count", "source", "ename", "evalue")}} for r in rows]
    serial_rows, parallel_rows = (comparable(load_results(tmp_path / kind / "list")) for kind in ("serial", "parallel"))
    assert parallel_rows == serial_rows and len(serial_rows) == 3
    assert results_table(parallel_rows) == results_table(serial_rows)
    assert (tmp_path / "parallel" / "list" / "report.html").is_file()


def test_grid_sweep_resumes_an_interrupted_run(project, tmp_path):
    runs_dir = tmp_path / "runs"
    assert sweep_main([str(project / "grid.yaml"), "--runs-dir", str(runs_dir)]) == 0
    sweep_dir = runs_dir / "grid"
    assert [r["run"] for r in load_results(sweep_dir)] == ["lr=0.5", "lr=0.25"]
    assert metrics(sweep_dir / "lr=0.25")["eval_loss"] == pytest.approx(2.0 * 0.75**4)

    # a crash mid-run leaves outputs but no marker: the run starts over and no stale file survives it
    crashed = sweep_dir / "lr=0.25"
    (crashed / FINISHED).unlink()
    (crashed / "stale.txt").write_text("from the crashed run")
    kept = (sweep_dir / "lr=0.5" / FINISHED).stat().st_mtime_ns
    statuses = run_sweep(project / "grid.yaml", runs_dir, log=lambda line: None)
    assert statuses["lr=0.5"]["skipped"] and statuses["lr=0.25"]["status"] == "finished" and "skipped" not in statuses["lr=0.25"]
    assert not (crashed / "stale.txt").exists() and (crashed / FINISHED).is_file()
    assert (sweep_dir / "lr=0.5" / FINISHED).stat().st_mtime_ns == kept

    # changed parameters under the same run name: the old result doesn't count as finished
    text = (project / "grid.yaml").read_text().replace("steps: 4", "steps: 1")
    (project / "grid.yaml").write_text(text)
    statuses = run_sweep(project / "grid.yaml", runs_dir, log=lambda line: None, report=False)
    assert not any(s.get("skipped") for s in statuses.values())
    assert metrics(sweep_dir / "lr=0.5")["eval_loss"] == pytest.approx(1.0)


BAD = [
    ("notebook: toy.ipynb\ngrid: {lr: [0.1], stepz: [3]}\n", ValueError, "bad.yaml: grid.stepz: unknown parameter; toy.ipynb's parameters cell has: lr, steps, fail, label, output_dir"),
    ("notebook: toy.ipynb\nparameters: {lrr: 1}\nruns: [{lr: 0.1}]\n", ValueError, "bad.yaml: parameters.lrr: unknown parameter"),
    ("notebook: toy.ipynb\nruns: [{lr: 0.1}, {label: x, speed: 2}]\n", ValueError, "bad.yaml: runs[1].speed: unknown parameter"),
    ("notebook: toy.ipynb\ngrid: {}\n", ValueError, "bad.yaml: grid: empty"),
    ("notebook: toy.ipynb\ngrid:\n", ValueError, "bad.yaml: grid: empty"),
    ("notebook: toy.ipynb\ngrid: {lr: []}\n", ValueError, "bad.yaml: grid.lr: expected a non-empty list"),
    ("notebook: toy.ipynb\nruns: []\n", ValueError, "bad.yaml: runs: empty"),
    ("notebook: nowhere.ipynb\ngrid: {lr: [0.1]}\n", FileNotFoundError, "bad.yaml: notebook: nowhere.ipynb not found"),
    ("grid: {lr: [0.1]}\n", ValueError, "bad.yaml: missing key 'notebook'"),
    ("notebook: toy.ipynb\ngrid: {lr: [0.1]}\nruns: [{lr: 0.2}]\n", ValueError, "exactly one of 'grid'"),
    ("notebook: toy.ipynb\ngrid: {steps: [2.5]}\n", ValueError, "steps=2.5 is not an integer"),
    ("notebook: toy.ipynb\ngrid: {lr: [fast]}\n", ValueError, "lr='fast' is not a number"),
    ("notebook: toy.ipynb\ngrid: {output_dir: [a]}\n", ValueError, "grid.output_dir: output_dir is set by the sweep"),
    ("notebook: toy.ipynb\nworkers: 0\ngrid: {lr: [0.1]}\n", ValueError, "workers=0 is out of range"),
    ("notebook: toy.ipynb\ngird: {lr: [0.1]}\n", ValueError, "bad.yaml: unknown key 'gird'"),
    ("notebook: toy.ipynb\ngrid:\n  lr: [0.1\n", ValueError, "bad.yaml:4: invalid YAML"),
]


@pytest.mark.parametrize("text,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_yaml_fails_before_any_run(project, tmp_path, text, error, message):
    (project / "bad.yaml").write_text(text)
    with pytest.raises(error, match=None) as info:
        run_sweep(project / "bad.yaml", tmp_path / "runs")
    assert message in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_notebook_without_parameters_cell(project):
    nb = nbformat.read(project / "toy.ipynb", as_version=4)
    for cell in nb.cells: cell.metadata.pop("tags", None)
    nbformat.write(nb, project / "plain.ipynb")
    (project / "plain.yaml").write_text("notebook: plain.ipynb\ngrid: {lr: [0.1]}\n")
    with pytest.raises(ValueError, match="plain.yaml: notebook: plain.ipynb has no cell tagged 'parameters'"):
        load_sweep(project / "plain.yaml")


def test_cli_module_dry_run_and_bad_file(project):
    result = subprocess.run([sys.executable, "-m", "qlora_nb.sweep", str(project / "list.yaml"), "--dry-run"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [l.split()[0] for l in result.stdout.splitlines()] == ["lr=0.5_label=first", "lr=0.25_steps=2_label=second", "broken"]
    (project / "bad.yaml").write_text("notebook: toy.ipynb\ngrid: {rate: [1]}\n")
    result = subprocess.run([sys.executable, "-m", "qlora_nb.sweep", str(project / "bad.yaml")], capture_output=True, text=True)
    assert result.returncode == 2 and "bad.yaml: grid.rate: unknown parameter" in result.stderr


def test_the_shipped_tutorial_sweep_is_valid():
    "The example sweep next to the tutorials names real parameters of its notebook."
    from qlora_nb.sweep import load_sweep
    sweep = load_sweep(Path(__file__).resolve().parent.parent / "nbs" / "tutorials" / "finetune_sweep.yaml")
    assert list(sweep.runs) == ["quant=nf4_lora_r=4", "quant=nf4_lora_r=16", "quant=fp4_lora_r=4", "quant=fp4_lora_r=16"]
    assert sweep.runs["quant=fp4_lora_r=16"] == {"model": "tiny", "max_steps": 16, "quant": "fp4", "lora_r": 16}

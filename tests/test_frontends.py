"Every front-end is a client of the recipe: the CLI and the dashboard train the same adapter from one config, a run's log feeds the dashboard's views whoever started it, and no module of the package imports the command line."
import ast, json, os, subprocess, sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
QLORA_NB = Path(sys.executable).parent / "qlora-nb"

# One short run on the tiny model: 4-bit base, LoRA, no evaluation before or after, one checkpoint at the end.
CONFIG = {"model": "tiny", "quant": "nf4", "max_steps": 6, "batch_size": 4, "lr": 1e-3, "lora_r": 4, "lora_alpha": 8.0,
          "seed": 3, "warmup_steps": 2, "eval_steps": None, "eval_rows": 8, "save_steps": None, "em_examples": 0,
          "ppl_max_tokens": 0, "progress": False}

# The dashboard as a user drives it: a form holding CONFIG, Start, then wait for the training thread.
DASHBOARD_SCRIPT = """
import json, sys
from qlora_nb.dashboard import TrainingDashboard
from qlora_nb.settings import resolve_config
dash = TrainingDashboard(resolve_config(overrides=json.loads(sys.argv[1])), run_root=sys.argv[2])
assert dash.start(), dash.form.errors()
dash.wait(600)
assert dash.phase == "finished", dash.state.value
print(dash.run_dir)
"""


def _env():
    # one thread in both processes, so both reduce in the same order
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("QLORA_NB_DTYPE", None)
    return env


def _set_flags(config):
    return [arg for key, value in config.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def test_cli_and_dashboard_train_the_same_adapter(tmp_path):
    cli_out = tmp_path / "cli"
    cli = subprocess.run([str(QLORA_NB), "train", "--out", str(cli_out), *_set_flags(CONFIG)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    dashboard = subprocess.run([sys.executable, "-c", DASHBOARD_SCRIPT, json.dumps(CONFIG), str(tmp_path / "dashboard")], cwd=tmp_path,
                               env=_env(), capture_output=True, text=True, timeout=600)
    assert dashboard.returncode == 0, dashboard.stderr[-3000:]
    dashboard_out = Path(dashboard.stdout.strip().splitlines()[-1])

    settings = lambda out: {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k not in ("out", "progress")}
    assert settings(cli_out) == settings(dashboard_out)
    steps = lambda out: [(r["step"], r["loss"]) for r in map(json.loads, (out / "run.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert len(steps(cli_out)) == 6 and steps(cli_out) == steps(dashboard_out)
    adapter = lambda out: (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert adapter(cli_out) == adapter(dashboard_out)


def test_a_recipe_run_replays_with_per_module_gradient_norms(tmp_path, one_thread):
    "A run made with the default settings logs per-module gradient norms, so the dashboard's heatmap has data."
    from qlora_nb.callback.monitor import GradientMonitor
    from qlora_nb.dashboard import RunDashboard
    from qlora_nb.recipe import build
    from qlora_nb.runlog import short_module_name
    run = build({"model": "tiny", "quant": "none", "out": str(tmp_path / "run"), "max_steps": 3, "eval_steps": None,
                 "save_steps": None, "em_examples": 0, "ppl_max_tokens": 0, "progress": False})
    run.fit()
    modules = run.callback(GradientMonitor).modules
    board = RunDashboard()
    board.open(tmp_path / "run")
    heatmap = board.plots.trace("heatmap")
    assert list(heatmap.x) == [1, 2, 3]
    assert list(heatmap.y) == [short_module_name(m) for m in modules] and modules
    z = np.asarray(heatmap.z, dtype=float)  # (modules, steps) log10 norms
    assert z.shape == (len(modules), 3) and np.isfinite(z).all()


def _imported_modules(path: Path, package: str) -> set[str]:
    "The absolute names of the modules `path` imports (relative imports resolved against `package`)."
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import): names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import cli`
    return names


def test_no_module_of_the_package_imports_the_cli():
    package_dir = REPO / "qlora_nb"
    offenders = []
    for path in sorted(package_dir.rglob("*.py")):
        if path.name == "cli.py" and path.parent == package_dir: continue
        package = ".".join(("qlora_nb", *path.relative_to(package_dir).parent.parts))
        if any(name == "qlora_nb.cli" or name.startswith("qlora_nb.cli.") for name in _imported_modules(path, package)):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"these modules import qlora_nb.cli; front-ends must use qlora_nb.recipe instead: {offenders}"


def test_the_import_check_sees_relative_and_lazy_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from ..cli import main\n    from . import cli\n")
    assert "qlora_nb.cli" in _imported_modules(sample, "qlora_nb.callback")
    assert "qlora_nb.callback.cli" in _imported_modules(sample, "qlora_nb.callback")

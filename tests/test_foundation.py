"The nbdev loop and the one-command setup: a notebook edit reaches the package, and drift fails the sync check."
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def copy_project(tmp_path):
    "A copy of the files the sync check reads, in a git repo of its own."
    for name in ("settings.ini", "setup.py", "Makefile", "README.md", "_quarto.yml", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "nbs", tmp_path / "nbs", symlinks=True, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(REPO / "qlora_nb", tmp_path / "qlora_nb", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def sync_check(project):
    "Run `make sync-check` in `project` with this venv, without reinstalling it."
    stamp = REPO / ".venv" / ".installed"
    return subprocess.run(["make", "-s", "sync-check", f"BIN={VENV_BIN}", f"STAMP={stamp}", "-o", str(stamp)],
                          cwd=project, capture_output=True, text=True)


def test_sync_check_passes_on_the_repo(tmp_path):
    result = sync_check(copy_project(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leave no diff" in result.stdout


def test_hand_edit_of_the_package_fails_the_sync_check(tmp_path):
    project = copy_project(tmp_path)
    core = project / "qlora_nb" / "core.py"
    core.write_text(core.read_text() + "\nHAND_EDIT = 1\n")
    result = sync_check(project)
    assert result.returncode != 0
    assert "qlora_nb/core.py" in result.stdout
    assert "HAND_EDIT" not in core.read_text()  # nbdev_export put the notebook's version back


def test_notebook_edit_reaches_the_package(tmp_path):
    import nbformat
    project = copy_project(tmp_path)
    nb_path = project / "nbs" / "00_core.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("#| export\ndef added_in_the_notebook(): return 42"))
    nbformat.write(nb, nb_path)
    subprocess.run([VENV_BIN / "nbdev_export"], cwd=project, check=True)
    assert "def added_in_the_notebook(): return 42" in (project / "qlora_nb" / "core.py").read_text()


def test_readme_is_generated_from_index():
    from qlora_nb.docs import notebook_markdown
    import nbformat
    expected = notebook_markdown(nbformat.read(REPO / "nbs" / "index.ipynb", as_version=4))
    assert (REPO / "README.md").read_text() == expected
    lines = [l for l in expected.splitlines() if l.strip()]
    assert lines[0] == "# qlora_nb" and "make demo" in expected.split("## ")[0] and "make test" in expected.split("## ")[0]


def test_pip_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("package,prefix", [("nbdev", "2."), ("torch", "2.13.0")])
def test_pinned_lines(package, prefix):
    from importlib.metadata import version
    assert version(package).startswith(prefix)

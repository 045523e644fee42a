"""The dashboards in a real browser: JupyterLab on 127.0.0.1, Debian's headless Chromium driven by playwright.

Each test writes a small notebook into a temporary server root, opens it in JupyterLab, runs all cells, drives the
widgets by clicking them, reads the plotly figures back from the page, and keeps screenshots in tests/artifacts.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: install Debian's `chromium` package "
                                                             "to run the browser tests (a downloaded browser is never used)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "A JupyterLab server on 127.0.0.1 with a random port and token, serving a temporary root folder."
    root = tmp_path_factory.mktemp("lab")
    port, token = free_port(), os.urandom(16).hex()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(root / ".jupyter-config"), JUPYTER_RUNTIME_DIR=str(root / ".jupyter-runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(root / ".lab-settings"), JUPYTERLAB_WORKSPACES_DIR=str(root / ".lab-workspaces"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    news = root / ".lab-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)  # no "get notified about Jupyter news?" popup over the screenshots
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # the kernel must import this checkout's qlora_nb, whatever the server's working folder
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [str(VENV_BIN / "jupyter"), "lab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
               "--LabApp.news_url=", "--LabServerApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: command.append("--allow-root")
    log = open(root / "jupyter.log", "w")
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as response:
                    if response.status == 200: break
            except OSError: pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not start:\n{(root / 'jupyter.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "token": token, "root": root}
    finally:
        server.terminate()
        try: server.wait(15)
        except subprocess.TimeoutExpired: server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    playwright_sync = pytest.importorskip("playwright.sync_api")
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def write_notebook(folder: Path, name: str, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / name
    nbformat.write(nb, path)
    return path


@pytest.fixture
def pages(browser, artifacts_dir, request):
    "Pages opened by a test; each gets a screenshot under tests/artifacts when the test fails."
    opened, failures_before = [], request.session.testsfailed
    yield opened
    failed = request.session.testsfailed > failures_before  # the call's report is logged before teardown
    for i, page in enumerate(opened):
        if failed and not page.is_closed():
            page.screenshot(path=str(artifacts_dir / f"{request.node.name}-failure-{i}.png"), full_page=True)
        if not page.is_closed(): page.close()


def open_and_run(browser, lab, notebook: str, width=1400, height=1800):
    "Open `notebook` in JupyterLab, wait for its kernel, run all cells; return the page."
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(60_000)
    page.goto(f"{lab['url']}/lab/tree/{notebook}?token={lab['token']}&reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
    started = lambda: page.evaluate("""() => Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))
        .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))""")
    for attempt in range(4):  # a click that lands while the kernel is still connecting runs nothing: try again
        page.locator(".jp-Notebook").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
        deadline = time.monotonic() + 15
        while not started() and time.monotonic() < deadline: page.wait_for_timeout(250)
        if started(): return page
    raise AssertionError(f"Run All Cells did not start {notebook} in 4 tries")


def plotly_traces(page) -> list[dict]:
    "Name and number of points of every trace of every plotly figure on the page."
    return page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(gd =>
        (gd.data || []).map(t => ({name: t.name || '', type: t.type || 'scatter', visible: t.visible,
            n: t.type === 'heatmap' ? (t.z || []).length : (t.x || []).length})))""")


def wait_for(page, condition, timeout=90.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value: return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the page says:\n{page.inner_text('body')[-1500:]}")
        page.wait_for_timeout(250)


def button(page, label: str):
    return page.locator(f".jupyter-widgets.widget-button:has-text('{label}')").first


def test_training_dashboard_in_jupyterlab(lab, browser, pages, artifacts_dir):
    "Start a tiny run from the dashboard, watch the loss plot fill, stop it; the stop leaves a checkpoint."
    runs = lab["root"] / "runs"
    write_notebook(lab["root"], "dashboard.ipynb", [
        "from qlora_nb.dashboard import TrainingDashboard, default_run_config\n"
        f"dash = TrainingDashboard(default_run_config(quant='nf4', max_steps=2000, eval_steps=20), run_root={str(runs)!r})\n"
        "dash"])
    page = open_and_run(browser, lab, "dashboard.ipynb")
    pages.append(page)
    start = button(page, "Start")
    start.wait_for(state="visible", timeout=120_000)
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    page.screenshot(path=str(artifacts_dir / "dashboard-0-ready.png"), full_page=True)
    start.click()

    def loss_points():
        traces = plotly_traces(page)
        return max((t["n"] for t in traces if t["name"] and not t["name"].startswith("run 0") and t["name"].endswith("loss")), default=0)
    wait_for(page, lambda: loss_points() >= 5, timeout=120, what="the loss plot to get points")
    page.screenshot(path=str(artifacts_dir / "dashboard-1-training.png"), full_page=True)
    button(page, "Stop").click()
    page.wait_for_selector("text=stopped from the dashboard", timeout=60_000)
    page.wait_for_timeout(1500)  # the final flush
    page.screenshot(path=str(artifacts_dir / "dashboard-2-stopped.png"), full_page=True)

    body = page.inner_text("body")
    assert re.search(r"step \d+/2000, loss \d", body), body[-2000:]
    heatmap = [t for t in plotly_traces(page) if t["type"] == "heatmap"]
    assert heatmap and heatmap[0]["n"] > 0, heatmap  # one row per LoRA module
    run_dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    checkpoints = sorted((run_dirs[0] / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "trainer_state.json").is_file(), checkpoints
    records = [json.loads(line) for line in (run_dirs[0] / "run.jsonl").read_text().splitlines()]
    fit_end = [r for r in records if r.get("event") == "fit_end"]
    assert len(fit_end) == 1 and fit_end[0]["stop_reason"] == "stopped from the dashboard", records[-3:]
    assert (run_dirs[0] / "adapter" / "adapter_model.safetensors").is_file()  # the run went back to its checkpoint and saved
    assert button(page, "Start").is_enabled() and not button(page, "Stop").is_enabled()
    page.close()


def test_quantization_explorer_in_jupyterlab(lab, browser, pages, artifacts_dir):
    "Pick int8, then heavy-tailed random weights, and measure the perplexity effect; the page follows each control."
    write_notebook(lab["root"], "explorer.ipynb", [
        "from qlora_nb.explore import QuantExplorer, MemoryEstimator\nexplorer = QuantExplorer('tiny', ppl_tokens=128)\nexplorer",
        "from qlora_nb.dashboard import default_run_config\n"
        "estimator = MemoryEstimator(default_run_config(batch_size=2, max_length=32), runtime=0)  # runtime=0: no subprocess probe\n"
        "estimator"])
    page = open_and_run(browser, lab, "explorer.ipynb")
    pages.append(page)
    page.wait_for_selector("text=bits/param", timeout=120_000)
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(artifacts_dir / "explorer-0-nf4.png"), full_page=True)
    assert "4.127 bits/param" in page.inner_text("body")
    levels = lambda: next((t["n"] for t in plotly_traces(page) if t["name"] == "code levels"), 0)
    assert levels() == 16 * 3, plotly_traces(page)

    page.locator(".widget-toggle-button:has-text('int8')").first.click()
    page.wait_for_selector("text=8.500 bits/param", timeout=30_000)
    wait_for(page, lambda: levels() == 255 * 3, timeout=30, what="the int8 code levels")
    page.locator("select").filter(has_text="random heavy-tailed").first.select_option("random heavy-tailed")
    page.wait_for_selector("text=random heavy-tailed 512×512", timeout=30_000)
    button(page, "Measure perplexity").click()
    page.wait_for_selector("text=full precision", timeout=60_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(artifacts_dir / "explorer-1-int8-heavy.png"), full_page=True)
    body = page.inner_text("body")
    assert re.search(r"perplexity of tiny on 128 tokens of the general text: [\d.]+ full precision → [\d.]+ with int8", body), body[-1500:]
    blocks = next(t["n"] for t in plotly_traces(page) if t["name"] == "block RMS error")
    assert 0 < blocks <= 2000, blocks  # 4096 blocks, grouped to at most max_blocks points

    button(page, "Estimate").click()
    page.wait_for_selector("text=predicted peak", timeout=60_000)
    wait_for(page, lambda: next((t["n"] for t in plotly_traces(page) if t["name"] == "predicted"), 0) >= 8, timeout=30,
             what="the memory breakdown bars")
    estimator = page.locator(".jp-OutputArea-output:has-text('qlora_nb memory estimator')").first
    estimator.scroll_into_view_if_needed()
    page.wait_for_timeout(1000)
    estimator.screenshot(path=str(artifacts_dir / "explorer-2-memory.png"))  # JupyterLab scrolls inside its panel
    assert re.search(r"tiny, nf4 blocksize 64, LoRA r=8, 2 × 32 tokens: predicted peak [\d.]+ MiB", page.inner_text("body"))

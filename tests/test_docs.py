"The offline documentation site: it builds, every notebook has a page, links resolve, and a plotly page renders in Chromium."
import importlib
import inspect
import re
from pathlib import Path

import pytest

from qlora_nb.docs import broken_links, build_site, doc_anchor

REPO = Path(__file__).resolve().parent.parent
NBS = REPO / "nbs"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def notebooks():
    "Every notebook the site must show, relative to nbs/."
    return sorted(str(p.relative_to(NBS)) for p in NBS.rglob("*.ipynb")
                  if not any(part.startswith((".", "_")) for part in p.relative_to(NBS).parts))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once. The quantization tutorial is executed (its copy is reused from build/executed while unchanged);
    `make docs` executes every notebook, and tests/test_tutorials.py runs each tutorial, so one executed page keeps this fast."""
    out = tmp_path_factory.mktemp("docs") / "site"
    lines = []
    pages = build_site(NBS, out, REPO / "_quarto.yml", execute="tutorials/01*", executed_dir=REPO / "build" / "executed", log=lines.append)
    return out, pages, lines


def test_every_notebook_has_a_page(site):
    out, pages, _ = site
    expected = {name[:-6] + ".html" for name in notebooks()} | {"api.html"}
    assert {str(p.relative_to(out)) for p in pages} == expected
    index = (out / "index.html").read_text()
    for name in notebooks():  # the sidebar on the home page links every page
        assert f'href="{name[:-6]}.html"' in index, name
    assert "tutorials/01_quant_study.html" in expected


def test_internal_links_resolve(site):
    out, _, lines = site
    assert broken_links(out) == []
    assert not any("broken" in line for line in lines), lines
    # the check itself finds a broken link
    page = out / "00_core.html"
    text = page.read_text()
    page.write_text(text.replace("</main>", '<a href="00a_models.html#no-such-anchor">x</a><a href="gone.html">y</a></main>'))
    try: assert broken_links(out) == ["00_core.html: 00a_models.html#no-such-anchor (no such anchor)", "00_core.html: gone.html (no such file)"]
    finally: page.write_text(text)


def test_api_reference_like_show_doc(site):
    "Every public function and class a module notebook exports has a doc block with its signature and docstring."
    out, _, _ = site
    import nbformat
    checked = 0
    for name in notebooks():
        nb = nbformat.read(NBS / name, as_version=4)
        default_exp = next((m[1] for c in nb.cells if c.cell_type == "code" for m in [re.search(r"^#\|\s*default_exp\s+(\S+)", c.source, re.M)] if m), None)
        if default_exp is None: continue
        module = importlib.import_module(f"qlora_nb.{default_exp}")
        page = (out / (name[:-6] + ".html")).read_text()
        for symbol in getattr(module, "__all__", []):
            obj = getattr(module, symbol)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or getattr(obj, "__module__", None) != module.__name__: continue
            found = re.search(rf'<h3 (?=[^>]*class="doc-name")(?=[^>]*id="{re.escape(doc_anchor(symbol))}")', page)
            assert found, f"{name}: no doc block for {symbol}"
            block = page[found.start():][:12000]
            doc = (inspect.getdoc(obj) or "").split("\n")[0]
            assert "signature" in block and f"{symbol}" in block, symbol
            if doc: assert re.sub(r"`([^`]+)`", r"<code>\1</code>", doc.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")).split("<code>")[0][:40] in block, symbol
            checked += 1
    assert checked > 50
    assert len(re.findall(r'id="trainer"', (out / "05_trainer.html").read_text())) == 1  # the title gives way to the class
    core = (out / "00_core.html").read_text()
    assert "inclusive bounds, None for open" in core  # parameter comments, as nbdev's docments shows them
    assert "def set_seed(" not in core  # export cells show their doc blocks, not their code
    api = (out / "api.html").read_text()
    assert 'href="00_core.html#set_seed"' in api and 'href="09_sweep.html#run_sweep"' in api


def test_tutorial_pages_show_their_executed_plots(site):
    out, _, _ = site
    page = (out / "tutorials" / "01_quant_study.html").read_text()
    assert page.count('class="plotly-graph-div"') >= 2 and '<script src="../plotly.min.js">' in page
    assert "relative RMS error by blocksize" in page  # the executed copy's printed table
    assert "tags=" not in page and "injected-parameters" not in page
    assert not any(line.startswith("warning") for line in site[2]), site[2]  # it executed without failing


def test_plotly_page_renders_in_headless_chromium(site, artifacts_dir):
    if not CHROMIUM.exists(): pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package to run the browser test")
    from playwright.sync_api import sync_playwright
    out, _, _ = site
    page_path = out / "tutorials" / "01_quant_study.html"
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_selector(".plotly-graph-div .main-svg", timeout=30_000)
            charts = page.locator(".plotly-graph-div")
            assert charts.count() >= 2
            traces = page.locator(".plotly-graph-div .scatterlayer .trace").count()
            assert traces >= 4  # one line per format and source
            charts.first.scroll_into_view_if_needed()
            shot = artifacts_dir / "docs_quant_study_chart.png"
            charts.first.screenshot(path=str(shot))
            page.screenshot(path=str(artifacts_dir / "docs_quant_study_page.png"), full_page=False)
            box = charts.first.bounding_box()
        finally:
            browser.close()
    assert errors == []
    assert box["width"] > 300 and box["height"] > 200
    assert shot.stat().st_size > 10_000


def test_a_notebook_that_fails_to_execute_is_reported_and_still_gets_a_page(tmp_path):
    import shutil
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
    shutil.copy(REPO / "settings.ini", tmp_path / "settings.ini")
    (tmp_path / "_quarto.yml").write_text("website:\n  title: t\n  sidebar:\n    contents:\n      - index.ipynb\n")
    (tmp_path / "nbs" / "tutorials").mkdir(parents=True)
    kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nbformat.write(new_notebook(cells=[new_markdown_cell("# Home")], metadata=kernel), tmp_path / "nbs" / "index.ipynb")
    nbformat.write(new_notebook(cells=[new_markdown_cell("# Broken"), new_code_cell("raise ValueError('no luck')")], metadata=kernel),
                   tmp_path / "nbs" / "tutorials" / "broken.ipynb")
    failures, lines = [], []
    pages = build_site(tmp_path / "nbs", tmp_path / "site", tmp_path / "_quarto.yml", execute="tutorials/*",
                       executed_dir=tmp_path / "executed", log=lines.append, failures=failures)
    assert len(failures) == 1 and "broken.ipynb: cell 1 failed while building the docs: ValueError: no luck" in failures[0]
    assert {str(p.relative_to(tmp_path / "site")) for p in pages} == {"index.html", "tutorials/broken.html", "api.html"}
    assert "no luck" in (tmp_path / "site" / "tutorials" / "broken.html").read_text()  # the stored notebook, highlighted
    assert broken_links(tmp_path / "site") == []

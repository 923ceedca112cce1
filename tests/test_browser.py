"""The labs and the book in a real browser: headless Chromium driven by Selenium (tests marked `browser`).

* JupyterLab, started on 127.0.0.1 with a token, runs notebook 00 and lesson 1's temperature explorer
  as a student would: no error outputs, the widgets show up as controls (not as text, not as "Error
  displaying widget"), and changing a control redraws its figure.
* The book, built from the notebooks that this session executed, opened page by page from disk
  (``file://``): every image loads, every widget shows its static figure, math is typeset, code is not
  cut off, and nothing is fetched from the network.

Chromium runs with the network blocked (no host name resolves but 127.0.0.1, and the proxy is a closed
local port), so anything that a page would fetch from the internet fails and is reported. The tests are
skipped, with the reason, where Chromium, chromedriver or Selenium is missing: `.ci/run` installs
Debian's `chromium` and `chromium-driver`, and Selenium comes with the test extra. Selenium Manager
(which would download a driver) is never used: the driver is the chromedriver on PATH.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat
import pytest

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # without the test extra every test here is skipped (see chromium_and_driver)
    webdriver = None

if TYPE_CHECKING:
    from conftest import ExecutedNotebooks

pytestmark = [pytest.mark.browser, pytest.mark.notebook]

REPO = Path(__file__).resolve().parents[1]
START_HERE = REPO / "notebooks" / "00_start_here.ipynb"
LESSON_1 = REPO / "notebooks" / "01_hinton_kd.ipynb"
TEMPERATURE_EXPLORER_TAG = "temperature-explorer"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
RUN_TIMEOUT_S = 600  # one notebook run in JupyterLab (with an empty cache it trains the teacher first)
REDRAW_TIMEOUT_S = 60
# JupyterLab settings for the test's fresh settings folder: every cell stays in the page (no windowing,
# so that the cells' outputs can be inspected), and no news or update notifications over the cells.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


# ------------------------------------------------------------------------------------------- the browser


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def chromium_and_driver() -> tuple[str, str]:
    """Paths of Chromium and its driver; skips the test with the reason when one is missing."""
    if webdriver is None:
        pytest.skip("Selenium is not installed (it comes with the test extra: pip install -e '.[test]')")
    browser = next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("Chromium", browser), ("chromedriver", driver)) if path is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not found on PATH; on Debian or Ubuntu: "
            "apt-get install chromium chromium-driver (.ci/run does this)"
        )
    assert browser is not None and driver is not None
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile and no network beyond 127.0.0.1."""
    chromium, chromedriver = chromium_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # Chromium will not start its sandbox as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        # No network: a proxy that refuses connections, and no host name resolves but 127.0.0.1
        # (Chromium never sends 127.0.0.1 through a proxy, so JupyterLab is still reached).
        f"--proxy-server=http://127.0.0.1:{free_port()}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # With the driver's path given, Selenium does not run Selenium Manager (which would download one).
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_script_timeout(REDRAW_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float, message: str) -> Any:
    """``condition(driver)`` once it is truthy; fails with ``message`` after ``timeout`` seconds."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        pass
    pytest.fail(f"{message} (waited {timeout:.0f} s)")


# ---------------------------------------------------------------------------------------------- JupyterLab


@dataclass(frozen=True)
class JupyterLab:
    url: str
    token: str
    root: Path  # the folder the server serves

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}"


def answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def jupyterlab(
    tmp_path_factory: pytest.TempPathFactory, executed_notebooks: ExecutedNotebooks
) -> Iterator[JupyterLab]:
    """JupyterLab on 127.0.0.1 (a free port, a random token) serving a temporary folder, with the quick
    preset and this session's temporary cache (so the teacher that notebook 00 trained is reused)."""
    chromium_and_driver()  # skip before starting a server that no browser will visit
    root = tmp_path_factory.mktemp("jupyterlab-root")
    state = tmp_path_factory.mktemp("jupyterlab-state")
    for name, settings in LAB_SETTINGS.items():
        path = state / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "KDBOOK_PRESET": "quick",
        "KDBOOK_CACHE": str(executed_notebooks.cache),
        # Fresh settings and workspaces: no tabs restored from another session, nothing written to ~.
        "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
    }
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--ServerApp.allow_root=True",  # CI runs as root
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run cells with JupyterLab's commands
    ]  # fmt: skip
    log_path = state / "jupyterlab.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not answers(f"{url}/api/status?token={token}"):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield JupyterLab(url, token, root)
    finally:
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down, then exits
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # the server's own process group: it and its kernels
            server.wait()


# JavaScript run in JupyterLab's page. PANEL_JS finds the open notebook (its path is arguments[0]).
PANEL_JS = """
const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
if (!panel || !panel.context || panel.context.path !== arguments[0] || !panel.sessionContext) return null;
const codeCells = panel.content.widgets.filter((cell) => cell.model.type === 'code');
"""
KERNEL_READY_JS = (
    PANEL_JS
    + """
const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
return Boolean(kernel) && panel.sessionContext.kernelDisplayStatus === 'idle' && codeCells.length > 0;
"""
)
RUN_ALL_JS = """
window.kdbookRun = null;
window.jupyterapp.commands.execute('notebook:run-all-cells').then(
    (result) => { window.kdbookRun = {result: result}; },
    (error) => { window.kdbookRun = {error: String(error)}; });
"""
# The run is over when the command has returned, the kernel is idle, and every code cell has run (or
# one failed, which stops the run).
RUN_FINISHED_JS = (
    PANEL_JS
    + """
if (window.kdbookRun === null || panel.sessionContext.kernelDisplayStatus !== 'idle') return null;
const pending = codeCells.filter(
    (cell) => cell.model.executionCount === null && cell.model.sharedModel.getSource().trim() !== '');
const failed = codeCells.some(
    (cell) => cell.model.outputs.toJSON().some((output) => output.output_type === 'error'));
return (pending.length === 0 || failed) ? window.kdbookRun : null;
"""
)
CELLS_JS = (
    PANEL_JS
    + """
return codeCells.map((cell) => ({
    source: cell.model.sharedModel.getSource(),
    outputs: cell.model.outputs.toJSON(),
    text: Array.from(cell.node.querySelectorAll('.jp-OutputArea-output')).map((o) => o.innerText).join('\\n'),
    dropdowns: cell.node.querySelectorAll('.jp-OutputArea-output .widget-dropdown select').length,
    sliders: Array.from(cell.node.querySelectorAll('.jp-OutputArea-output .widget-slider'))
        .map((slider) => (slider.querySelector('.widget-label') || {}).textContent || ''),
    figure: (cell.node.querySelector('.jp-OutputArea-output img') || {}).src || null,
}));
"""
)
# An element in the output of code cell arguments[1]: arguments[2] is a CSS selector.
CELL_ELEMENT_JS = (
    PANEL_JS
    + """
return codeCells[arguments[1]].node.querySelector('.jp-OutputArea-output ' + arguments[2]);
"""
)
SLIDER_HANDLE_JS = (
    PANEL_JS
    + """
const output = codeCells[arguments[1]].node;
const sliders = Array.from(output.querySelectorAll('.jp-OutputArea-output .widget-slider'));
const slider = sliders.find((s) => (s.querySelector('.widget-label') || {}).textContent === arguments[2]);
return slider ? slider.querySelector('.noUi-handle') : null;
"""
)


@dataclass(frozen=True)
class LabCell:
    """A code cell as JupyterLab shows it after a run."""

    index: int
    source: str
    outputs: list[dict[str, Any]]
    text: str  # the outputs' text as rendered
    dropdowns: int  # ipywidgets dropdowns (<select>) in the outputs
    sliders: list[str]  # the labels of the ipywidgets sliders in the outputs
    figure: str | None  # the src (a data: URL) of the first image in the outputs


class LabNotebook:
    """A notebook open in JupyterLab, driven through JupyterLab's own commands and the page."""

    def __init__(self, browser: WebDriver, lab: JupyterLab, name: str) -> None:
        self.browser, self.name = browser, name
        browser.get(lab.notebook_url(name))
        wait_for(browser, lambda d: d.execute_script(KERNEL_READY_JS, name), 120, f"{name}: no idle kernel")

    def run_all(self) -> list[LabCell]:
        """Run every cell (JupyterLab's "Run All Cells") and wait for the end."""
        self.browser.execute_script(RUN_ALL_JS)
        outcome = wait_for(
            self.browser,
            lambda d: d.execute_script(RUN_FINISHED_JS, self.name),
            RUN_TIMEOUT_S,
            f"{self.name}: the run did not finish",
        )
        assert "error" not in outcome, f"{self.name}: JupyterLab could not run the cells: {outcome['error']}"
        return self.cells()

    def cells(self) -> list[LabCell]:
        found = self.browser.execute_script(CELLS_JS, self.name)
        return [LabCell(index, **cell) for index, cell in enumerate(found)]

    def element(self, cell: int, selector: str) -> Any:
        return self.browser.execute_script(CELL_ELEMENT_JS, self.name, cell, selector)

    def assert_redraws(self, cell: int, change: Callable[[], None], what: str) -> None:
        """``change()`` alters a control of code cell ``cell``; its figure must be replaced by a new one."""
        before = self.cells()[cell].figure
        assert before, f"{what}: no figure under the controls"
        change()
        wait_for(
            self.browser,
            lambda d: self.cells()[cell].figure not in (None, before),
            REDRAW_TIMEOUT_S,
            f"{what}: the figure was not redrawn after the control changed",
        )


def assert_ran_cleanly_with_live_widgets(cells: list[LabCell], name: str) -> None:
    """No error output, and every widget is a live ipywidgets control, not text or an error message."""
    for cell in cells:
        for output in cell.outputs:
            assert output.get("output_type") != "error", (
                f"{name}, code cell {cell.index} raised {output.get('ename')}: {output.get('evalue')}\n"
                f"{cell.source[:500]}"
            )
        where = f"{name}, code cell {cell.index}"
        assert "Error displaying widget" not in cell.text, f"{where}: {cell.text[:300]}"
        assert "(children=" not in cell.text, f"{where} shows a widget as text (no widget manager)"
    assert any(cell.dropdowns or cell.sliders for cell in cells), f"{name}: no dropdown or slider rendered"


def temperature_explorer_copy(source: Path, target: Path) -> None:
    """Lesson 1 cut after the cell tagged ``temperature-explorer`` (the soft-target temperature widget)."""
    notebook = nbformat.read(source, as_version=4)
    tagged = [
        index
        for index, cell in enumerate(notebook.cells)
        if TEMPERATURE_EXPLORER_TAG in cell.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, (
        f"{source.name}: {len(tagged)} cells tagged {TEMPERATURE_EXPLORER_TAG!r}; tag the soft-target "
        "temperature widget cell (and only it)"
    )
    notebook.cells = notebook.cells[: tagged[0] + 1]
    nbformat.write(notebook, target)


DIRTY_JS = PANEL_JS + "\nreturn panel.context.model.dirty;"
SAVE_JS = """
const done = arguments[arguments.length - 1];
window.jupyterapp.commands.execute('docmanager:save').then(() => done('saved'), (error) => done(String(error)));
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("relative", ["01_hinton_kd.ipynb", "student/01_hinton_kd.ipynb"])
def test_opening_a_lesson_in_jupyterlab_leaves_its_file_as_committed(
    browser: WebDriver, jupyterlab: JupyterLab, relative: str
) -> None:
    """With autosave on, a lesson that JupyterLab marks modified on opening would be rewritten by merely
    opening it: the committed file must be in the form JupyterLab writes, so that opening it (kernel
    started, nothing run) and saving it changes no byte."""
    source = REPO / "notebooks" / relative
    name = f"opened-{source.parent.name}-{source.name}"
    shutil.copy(source, jupyterlab.root / name)
    LabNotebook(browser, jupyterlab, name)
    time.sleep(2)  # let JupyterLab apply whatever it changes on load (kernel info, metadata)
    assert browser.execute_script(DIRTY_JS, name) is False, f"JupyterLab marks {relative} modified on opening"
    assert browser.execute_async_script(SAVE_JS) == "saved"
    assert (jupyterlab.root / name).read_bytes() == source.read_bytes(), (
        f"JupyterLab saves {relative} in another form than the committed one: commit notebooks as JupyterLab "
        "writes them (python scripts/editions.py publish writes the student editions that way)"
    )


@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
def test_start_here_runs_in_jupyterlab_and_its_dropdown_redraws(
    browser: WebDriver, jupyterlab: JupyterLab
) -> None:
    shutil.copy(START_HERE, jupyterlab.root / START_HERE.name)  # a copy: notebooks/ stays untouched
    notebook = LabNotebook(browser, jupyterlab, START_HERE.name)
    cells = notebook.run_all()
    assert_ran_cleanly_with_live_widgets(cells, START_HERE.name)

    with_dropdown = [cell.index for cell in cells if cell.dropdowns and cell.figure]
    assert with_dropdown, "notebook 00 shows no interactive_figure with a dropdown"
    cell = with_dropdown[0]
    dropdown = Select(notebook.element(cell, ".widget-dropdown select"))
    values = [option.get_attribute("value") for option in dropdown.options]
    assert len(values) > 1, "the dropdown has a single option: nothing to change"
    other = next(value for value in values if value != dropdown.first_selected_option.get_attribute("value"))
    notebook.assert_redraws(cell, lambda: dropdown.select_by_value(other), f"00, code cell {cell}")


@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
def test_temperature_explorer_runs_in_jupyterlab_and_its_slider_redraws(
    browser: WebDriver, jupyterlab: JupyterLab
) -> None:
    name = "01_hinton_kd_to_the_temperature_explorer.ipynb"
    temperature_explorer_copy(LESSON_1, jupyterlab.root / name)
    notebook = LabNotebook(browser, jupyterlab, name)
    cells = notebook.run_all()
    assert_ran_cleanly_with_live_widgets(cells, name)

    explorer = cells[-1]  # the tagged cell ends the copy
    assert "T" in explorer.sliders, f"the temperature explorer shows no slider labelled T: {explorer.sliders}"
    handle = browser.execute_script(SLIDER_HANDLE_JS, name, explorer.index, "T")
    readout = notebook.element(explorer.index, ".widget-slider .widget-readout")
    before = readout.text

    def raise_temperature() -> None:  # as a student would with the keyboard: two steps to the right
        handle.click()
        handle.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)

    notebook.assert_redraws(explorer.index, raise_temperature, "lesson 1, temperature explorer")
    assert readout.text != before, "the figure changed but the slider's value did not"


# ---------------------------------------------------------------------------------------------- the book


# Run in a book page once it has loaded: waits for MathJax and the images, then reports what a reader
# would see. Widgets: each widget view with its model's state (to tell tqdm's progress bars, which have
# no figure, from the rest) and whether a loaded image sits in the same cell output.
PAGE_REPORT_JS = r"""
const done = arguments[arguments.length - 1];
const typeset = (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve();
const images = Array.from(document.images);
images.forEach((image) => { image.loading = 'eager'; });
const decoded = Promise.all(images.map((image) => image.decode().catch(() => null)));
Promise.all([typeset, decoded]).then(() => {
    const stateScript = document.querySelector('script[type="application/vnd.jupyter.widget-state+json"]');
    const state = stateScript ? JSON.parse(stateScript.textContent).state : {};
    const isProgressBar = (id) => {
        const model = state[id] || {};
        if (['FloatProgressModel', 'IntProgressModel'].includes(model.model_name)) return true;
        const children = (model.state || {}).children || [];
        return children.some((child) => isProgressBar(child.replace('IPY_MODEL_', '')));
    };
    const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]');
    const widgets = Array.from(views).map((view) => {
        const id = JSON.parse(view.textContent).model_id;
        const output = view.closest('.cell_output') || view.parentElement;
        const figures = Array.from(output.querySelectorAll('img'));
        return {id: id, progressBar: isProgressBar(id),
                figure: figures.some((image) => image.complete && image.naturalWidth > 0)};
    });
    const rawTex = [];
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        if (node.parentElement.closest('pre, code, script, style, textarea, mjx-container')) continue;
        if (/\\\(|\\\[|\$\$/.test(node.textContent)) rawTex.push(node.textContent.trim().slice(0, 80));
    }
    const cutOff = Array.from(document.querySelectorAll('div.highlight pre'))
        .filter((pre) => pre.offsetParent !== null && pre.scrollWidth > pre.clientWidth + 1)
        .map((pre) => pre.textContent.split('\n').sort((a, b) => b.length - a.length)[0].slice(0, 80));
    done({
        images: images.map((image) => ({src: image.getAttribute('src').slice(0, 120),
                                        loaded: image.complete && image.naturalWidth > 0})),
        widgets: widgets,
        formulas: document.querySelectorAll('.math').length,
        typesetFormulas: document.querySelectorAll('.math mjx-container').length,
        texErrors: document.querySelectorAll('mjx-merror').length,
        mathjax: Boolean(window.MathJax && MathJax.startup),
        rawTex: rawTex,
        cutOff: cutOff,
        widgetErrors: document.body.innerText.includes('Error displaying widget'),
    });
});
"""


REDIRECT = re.compile(r'^<meta http-equiv="Refresh" content="0; url=([^"]+)" />\s*$')


def book_pages(html: Path) -> list[Path]:
    """The book's pages, without the redirect pages (index.html) that only send the reader to another."""
    assets = {"_static", "_sources", "_images"}
    pages = sorted(path for path in html.rglob("*.html") if not assets & set(path.relative_to(html).parts))
    redirects = {page: REDIRECT.match(page.read_text()) for page in pages}
    for page, redirect in redirects.items():
        if redirect:
            assert (page.parent / redirect.group(1)).is_file(), f"{page.name} redirects to a missing page"
    return [page for page, redirect in redirects.items() if redirect is None]


def page_problems(name: str, report: dict[str, Any], failed_loads: list[str]) -> list[str]:
    """What a reader of page ``name`` would find broken, from ``PAGE_REPORT_JS``'s report."""
    problems = [f"{name}: tried to load from the network: {message}" for message in failed_loads]
    problems += [f"{name}: image did not load: {im['src']}" for im in report["images"] if not im["loaded"]]
    problems += [
        f"{name}: widget {widget['id']} has no static figure in its output"
        for widget in report["widgets"]
        if not widget["progressBar"] and not widget["figure"]
    ]
    if report["formulas"] and not report["mathjax"]:
        problems.append(f"{name}: {report['formulas']} formulas, but MathJax did not load")
    elif report["typesetFormulas"] < report["formulas"]:
        missing = report["formulas"] - report["typesetFormulas"]
        problems.append(f"{name}: {missing} of {report['formulas']} formulas not typeset")
    if report["texErrors"]:
        problems.append(f"{name}: {report['texErrors']} formulas have TeX errors")
    problems += [f"{name}: raw TeX in the text: {text!r}" for text in report["rawTex"]]
    problems += [f"{name}: code cut off at the column's edge: {line!r}" for line in report["cutOff"]]
    if report["widgetErrors"]:
        problems.append(f"{name}: shows 'Error displaying widget'")
    return problems


LINK = re.compile(r'href="(?!https?:|mailto:|#)([^"#]+\.html)#([^"]+)"')


@pytest.mark.timeout(1800)  # the book needs every notebook executed: this test runs them if no test has
def test_links_to_a_section_of_another_page_land_on_that_section(built_book: Path) -> None:
    """E.g. each lesson's "Differences from the paper" links to its paper's part of the appendix."""
    broken, checked = [], 0
    for page in book_pages(built_book):
        for target, section in set(LINK.findall(page.read_text())):
            checked += 1
            destination = (page.parent / target).resolve()
            ids = (
                set(re.findall(r'id="([^"]+)"', destination.read_text())) if destination.is_file() else set()
            )
            if section not in ids:
                broken.append(f"{page.relative_to(built_book)} -> {target}#{section}")
    assert checked, "no page links to a section of another page; the lessons link to the appendix's sections"
    assert not broken, "links to sections that do not exist:\n" + "\n".join(broken)


@pytest.mark.timeout(1800)  # the book needs every notebook executed: this test runs them if no test has
def test_every_book_page_loads_offline_with_figures_and_math(browser: WebDriver, built_book: Path) -> None:
    pages = book_pages(built_book)
    names = {str(page.relative_to(built_book)) for page in pages}
    assert {"intro.html", "lessons/00_start_here.html", "lessons/01_hinton_kd.html"} <= names, names
    problems: list[str] = []
    images = widgets = formulas = 0
    browser.get(
        "about:blank"
    )  # leave any JupyterLab page first: its "beforeunload" warning is logged on leaving
    browser.get_log("browser")  # drop earlier tests' messages
    for page in pages:
        name = str(page.relative_to(built_book))
        browser.get(page.as_uri())
        report = browser.execute_async_script(PAGE_REPORT_JS)
        # Chromium logs every failed load (here: anything from the internet) with the source "network".
        log = browser.get_log("browser")
        failed_loads = [entry["message"] for entry in log if entry["source"] == "network"]
        problems += page_problems(name, report, failed_loads)
        # An error from the book's own pages and scripts (a script included twice, say), not the network's.
        problems += [f"{name}: console error: {entry['message'][:160]}" for entry in log
                     if entry["level"] == "SEVERE" and entry["source"] != "network"]  # fmt: skip
        images += len(report["images"])
        widgets += sum(not widget["progressBar"] for widget in report["widgets"])
        formulas += report["typesetFormulas"]
    assert not problems, f"{len(problems)} problems in the book:\n" + "\n".join(problems)
    assert images and widgets and formulas, (
        f"the book shows {images} images, {widgets} widgets and {formulas} typeset formulas; the executed "
        "lessons have all three, so the pages were not checked"
    )

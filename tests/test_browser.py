"""What a ComfyUI user sees: the Textual Inversion example in ComfyUI's own front end, in headless
Chromium driven by Playwright, against a real server (``python main.py --cpu`` on loopback, this
repository as a custom node, a temporary ``--base-directory``).

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest -m browser tests/test_browser.py

The workflow is loaded through the front end (``app.loadGraphData``, what Templates does), made
small for the CPU by setting its widgets in the page, queued from the page, and the live chart is
checked in the page: its widget on the training node, the run's points, and after a page reload the
same points read back from the server.  Screenshots go to the test's temporary folder (printed).

Skipped, with the reason, where Playwright, Chromium (``/usr/bin/chromium`` or ``LIKENESS_CHROMIUM``)
or ``COMFYUI_PATH`` is missing.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from support import tiny_checkpoints
from support.comfy_runtime import REPO
from support.comfy_server import started_server

CHROMIUM = Path(os.environ.get("LIKENESS_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TI = "LikenessTrainTextualInversion"
STEPS = 6
CHART_TYPES = {TI, "LikenessTrainDreamBoothLoRA", "LikenessTrainDreamBoothFull", "LikenessTrainPivotal",
               "LikenessSeedSelect"}

# Loads the example through the front end and makes it CPU-sized by widget name (as a user would).
LOAD_SMALL = """async ([workflow, ckpt, steps]) => {
  await window.app.loadGraphData(workflow);
  const set = (type, values) => {
    for (const node of window.app.graph.nodes.filter((n) => n.type === type)) {
      for (const [name, value] of Object.entries(values)) {
        const w = node.widgets.find((x) => x.name === name);
        if (!w) throw new Error(`${type} has no widget ${name}`);
        w.value = value;
      }
    }
  };
  set("CheckpointLoaderSimple", { ckpt_name: ckpt });
  set("LikenessLoadImageFolder", { resolution: 64 });
  set("LikenessTrainTextualInversion", { steps, batch_size: 1, preview_every: 2, preview_steps: 1 });
  set("EmptyLatentImage", { width: 64, height: 64 });
  set("KSampler", { steps: 1 });
  window.app.graph.setDirtyCanvas(true, true);
}"""

# What the chart widget of every Likeness training node holds.
CHARTS = """(type) => window.app.graph.nodes.filter((n) => n.type === type).map((n) => ({
  id: n.id,
  widgets: n.widgets.map((w) => w.name),
  steps: n.likenessLoss ? n.likenessLoss.step : null,
  total: n.likenessLoss ? n.likenessLoss.total : null,
}))"""

FOCUS = """(type) => {
  const node = window.app.graph.nodes.find((n) => n.type === type);
  window.app.canvas.ds.scale = 1;
  window.app.canvas.centerOnNode(node);
  window.app.graph.setDirtyCanvas(true, true);
}"""


# Every node of the loaded graph that the server lists as charted, with its widgets.
CHARTED = """async () => {
  const info = await (await fetch("/api/likeness/progress")).json();
  return window.app.graph.nodes.filter((n) => info.chart_nodes.includes(n.type) || n.likenessLoss
                                           || (n.widgets ?? []).some((w) => w.name === "likeness_loss_chart"))
    .map((n) => ({ type: n.type, widgets: (n.widgets ?? []).map((w) => w.name) }));
}"""


def _playwright():
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (Debian: apt-get install chromium; or set LIKENESS_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright; the system Chromium is used)")
    return sync_playwright


@pytest.fixture(scope="module")
def server(comfy_checkout, tmp_path_factory):
    _playwright()
    ckpt = tiny_checkpoints.ensure_tiny_checkpoint("sd15")
    with started_server(comfy_checkout, tmp_path_factory.mktemp("comfy_base_browser"), ckpt,
                        {"likeness_example": {"captions": True}}) as srv:
        srv.request("POST", "/settings/Comfy.TutorialCompleted", True)  # no first-visit Templates dialog
        yield srv


def _wait_for_run(server, before: set, timeout: float = 600) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        history = server.get("/history")
        new = [h for k, h in history.items() if k not in before and h.get("status", {}).get("completed")]
        if new:
            return new[0]
        time.sleep(1)
    raise TimeoutError(f"the run queued from the page did not finish:\n{server.log_tail()}")


def _open(page, server) -> None:
    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)


@pytest.mark.browser
@pytest.mark.comfyui
def test_the_example_shows_a_live_chart_that_survives_a_reload(server, tmp_path):
    workflow = json.loads((REPO / "example_workflows" / "textual_inversion.json").read_text(encoding="utf-8"))
    errors: list[str] = []
    with _playwright()() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            _open(page, server)
            page.evaluate(LOAD_SMALL, [workflow, tiny_checkpoints.CHECKPOINTS["sd15"], STEPS])
            charts = page.evaluate(CHARTS, TI)
            assert charts and all("likeness_loss_chart" in c["widgets"] for c in charts), charts
            before = set(server.get("/history"))
            page.evaluate("() => window.app.queuePrompt(0, 1)")
            entry = _wait_for_run(server, before)
            assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
            page.wait_for_function(f"() => ({CHARTS})('{TI}')[0].steps?.length === {STEPS}", timeout=30_000)
            assert page.evaluate(CHARTS, TI)[0]["steps"] == list(range(1, STEPS + 1))
            page.evaluate(FOCUS, TI)
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "textual_inversion_chart.png"))

            page.reload(wait_until="domcontentloaded")  # the front end restores the graph; the chart asks the server
            _open(page, server)
            page.wait_for_function(f"() => ({CHARTS})('{TI}')[0]?.steps?.length === {STEPS}", timeout=60_000)
            page.evaluate(FOCUS, TI)
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "textual_inversion_after_reload.png"))
        finally:
            browser.close()
    print(f"\nscreenshots: {tmp_path}")
    ours = [e for e in errors if "likeness" in e.lower()]
    assert not ours, ours


@pytest.mark.browser
@pytest.mark.comfyui
def test_every_example_gives_its_long_running_nodes_the_chart(server, tmp_path):
    """Each template, loaded as Templates loads it: every node the server flags for the live chart
    (the trainers and SeedSelect) has the chart widget, without a run."""
    seen = set()
    with _playwright()() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            _open(page, server)
            for path in sorted((REPO / "example_workflows").glob("*.json")):
                page.evaluate("(wf) => window.app.loadGraphData(wf)", json.loads(path.read_text(encoding="utf-8")))
                charted = page.evaluate(CHARTED)
                assert charted and all("likeness_loss_chart" in c["widgets"] for c in charted), (path.name, charted)
                # no other node draws a chart (not even one with the id the last run's node had)
                assert {c["type"] for c in charted} <= CHART_TYPES, (path.name, charted)
                seen |= {c["type"] for c in charted}
                page.evaluate(FOCUS, charted[0]["type"])
                page.wait_for_timeout(300)
                page.screenshot(path=str(tmp_path / f"{path.stem}.png"))
        finally:
            browser.close()
    print(f"\nscreenshots: {tmp_path}")
    assert seen == CHART_TYPES

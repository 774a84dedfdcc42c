"""What a ComfyUI user sees: the example workflows in ComfyUI's own front end, in headless Chromium
driven by Playwright, against a real server (``python main.py --cpu`` on loopback, this repository as
a custom node, a temporary ``--base-directory``).

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest -q -p no:cacheprovider -m browser tests/test_browser.py

Each example is loaded through the front end (``app.loadGraphData``, what Templates does), made
small for the CPU by setting its widgets in the page, queued with the page's Run button, and checked
in the page: the chart widget on every long-running node holds the run's points, the preview image
is shown, no console error comes from the extension.  The chart survives a page reload (the points
are read back from the server), and the page's Cancel button leaves the last good file on disk.
Screenshots go to ``LIKENESS_BROWSER_ARTIFACTS`` or a pytest temporary folder (printed with ``-s``).

Skipped, with the reason, where Playwright, Chromium (``/usr/bin/chromium`` or ``LIKENESS_CHROMIUM``)
or ``COMFYUI_PATH`` is missing.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest

from likeness.trainers.formats.embedding import load_embedding
from support import tiny_checkpoints
from support.comfy_runtime import REPO
from support.comfy_server import EMBEDDING_WARNING, matching_lines, run_prompt, started_server
from support.tiny_clip_vision import FILE as TINY_CV

CHROMIUM = Path(os.environ.get("LIKENESS_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TI = "LikenessTrainTextualInversion"
STEPS = 6
CHART_TYPES = {TI, "LikenessTrainDreamBoothLoRA", "LikenessTrainDreamBoothFull", "LikenessTrainPivotal",
               "LikenessSeedSelect"}

# Loads an example through the front end and makes it CPU-sized by widget name (as a user would):
# ``small`` maps a node type to the widget values it gets.
LOAD_SMALL = """async ([workflow, small]) => {
  await window.app.loadGraphData(workflow);
  for (const [type, values] of Object.entries(small)) {
    for (const node of window.app.graph.nodes.filter((n) => n.type === type)) {
      for (const [name, value] of Object.entries(values)) {
        const w = node.widgets.find((x) => x.name === name);
        if (!w) throw new Error(`${type} has no widget ${name}`);
        w.value = value;
      }
    }
  }
  window.app.graph.setDirtyCanvas(true, true);
}"""


def small_settings(steps: int, **trainer) -> dict:
    """Widget values that make every example CPU-sized: the tiny checkpoint and CLIP vision model,
    64 px images and latents, one sampling step, ``steps`` training steps (SeedSelect: iterations)
    with one preview (at the last step: previews cost most of a CPU run), one class image;
    ``trainer`` overrides the trainers' values."""
    train = {"steps": steps, "batch_size": 1, "preview_every": steps, **trainer}
    return {
        "CheckpointLoaderSimple": {"ckpt_name": tiny_checkpoints.CHECKPOINTS["sd15"]},
        "CLIPVisionLoader": {"clip_name": TINY_CV},
        "LikenessLoadImageFolder": {"resolution": 64},
        TI: {**train, "preview_steps": 1},
        "LikenessTrainDreamBoothLoRA": {**train, "num_class_images": 1},
        "LikenessTrainDreamBoothFull": {**train, "num_class_images": 1},
        "LikenessTrainPivotal": {**train, "num_class_images": 1},
        "LikenessSeedSelect": {"width": 64, "height": 64, "steps": 3, "iterations": steps},
        "BasicScheduler": {"steps": 3},
        "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
        "KSampler": {"steps": 1},
    }


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


# After a run: what every charted node of the page holds (points, total, loaded preview images).
RUN_STATE = """(types) => window.app.graph.nodes.filter((n) => types.includes(n.type)).map((n) => ({
  id: String(n.id), type: n.type,
  widgets: (n.widgets ?? []).map((w) => w.name),
  steps: n.likenessLoss ? n.likenessLoss.step : [],
  total: n.likenessLoss ? n.likenessLoss.total : null,
  images: (n.imgs ?? []).filter((img) => img.complete && img.naturalWidth > 0).length,
}))"""


# Each Likeness node with advanced inputs: the widgets shown folded, then after pressing its
# "show advanced settings" button (pressed again after, to leave the node as it was).
FOLD = """() => window.app.graph.nodes.filter((n) => n.type.startsWith("Likeness")).map((n) => {
  const shown = () => n.widgets.filter((w) => n.isWidgetVisible(w)).map((w) => w.name);
  const button = n.widgets.find((w) => w.name === "likeness_advanced");
  const folded = shown(), low = n.size[1], label = button?.label ?? null;
  button?.callback?.();
  const unfolded = shown(), high = n.size[1];
  button?.callback?.();
  return { type: n.type, folded, unfolded, all: n.widgets.map((w) => w.name), label, grew: high > low,
           advanced: n.widgets.filter((w) => w.options?.advanced).map((w) => w.name) };
})"""
#: what a first-time user sees on each trainer: what must be set, the chart and the fold button
FIRST_RUN = {TI: ["name", "steps", "prompt"],
             "LikenessTrainDreamBoothLoRA": ["name", "instance_prompt", "class_prompt", "steps"],
             "LikenessTrainDreamBoothFull": ["name", "instance_prompt", "class_prompt", "steps"],
             "LikenessTrainPivotal": ["name", "instance_prompt", "class_prompt", "steps", "token"]}


def _check_folding(nodes: list[dict], where: str) -> None:
    for n in nodes:
        if not n["advanced"]:
            assert n["label"] is None, (where, n)
            continue
        assert n["label"] == f"show {len(n['advanced'])} advanced settings" and n["grew"], (where, n)
        assert not set(n["advanced"]) & set(n["folded"]) and n["unfolded"] == n["all"], (where, n)
        if n["type"] in FIRST_RUN:
            expected = [w for w in n["all"] if w in FIRST_RUN[n["type"]]] + ["likeness_loss_chart", "likeness_advanced"]
            assert n["folded"] == expected, (where, n)


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
    folders = {"likeness_example": {"captions": True}, "likeness_seedselect": {"n": 3, "seed": 7}}
    with started_server(comfy_checkout, tmp_path_factory.mktemp("comfy_base_browser"), ckpt, folders) as srv:
        srv.request("POST", "/settings/Comfy.TutorialCompleted", True)  # no first-visit Templates dialog
        yield srv


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """Where the screenshots go: ``LIKENESS_BROWSER_ARTIFACTS`` (made if missing) or a pytest temp folder."""
    chosen = os.environ.get("LIKENESS_BROWSER_ARTIFACTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("browser_screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def _page(server):
    """A headless Chromium page on the server's front end, and the list its console errors go to."""
    errors: list[str] = []
    with _playwright()() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            _open(page, server)
            yield page, errors
        finally:
            browser.close()


def _ours(errors: list[str]) -> list[str]:
    """The console errors that come from this package (its extension, its routes, its nodes)."""
    return [e for e in errors if "likeness" in e.lower()]


def _wait_for_run(server, before: set, timeout: float = 1500) -> dict:
    """The history entry of the first prompt not in ``before`` once it has finished (or failed)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for key, h in server.get("/history").items():
            status = h.get("status", {})
            if key not in before and (status.get("completed") or status.get("status_str") == "error"):
                return h
        time.sleep(1)
    raise TimeoutError(f"the run queued from the page did not finish:\n{server.log_tail()}")


def _open(page, server) -> None:
    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)


def _run_from_page(page, server) -> dict:
    """Press the front end's Run button; the finished run's history entry."""
    before = set(server.get("/history"))
    page.get_by_role("button", name="Run", exact=True).first.click()
    return _wait_for_run(server, before)


def _shoot(page, node_type: str, path: Path) -> None:
    page.evaluate(FOCUS, node_type)
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))


def _example(name: str) -> dict:
    return json.loads((REPO / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))


@pytest.mark.browser
@pytest.mark.comfyui
def test_the_example_shows_a_live_chart_that_survives_a_reload(server, artifacts):
    with _page(server) as (page, errors):
        page.evaluate(LOAD_SMALL, [_example("textual_inversion"), small_settings(STEPS)])
        charts = page.evaluate(CHARTS, TI)
        assert charts and all("likeness_loss_chart" in c["widgets"] for c in charts), charts
        before = set(server.get("/history"))
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        entry = _wait_for_run(server, before)
        assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
        page.wait_for_function(f"() => ({CHARTS})('{TI}')[0].steps?.length === {STEPS}", timeout=30_000)
        assert page.evaluate(CHARTS, TI)[0]["steps"] == list(range(1, STEPS + 1))

        page.reload(wait_until="domcontentloaded")  # the front end restores the graph; the chart asks the server
        _open(page, server)
        page.wait_for_function(f"() => ({CHARTS})('{TI}')[0]?.steps?.length === {STEPS}", timeout=60_000)
        _shoot(page, TI, artifacts / "textual_inversion_after_reload.png")
    print(f"\nscreenshots: {artifacts}")
    assert not _ours(errors), _ours(errors)


EXAMPLES = ("textual_inversion", "dreambooth_lora", "dreambooth_full", "pivotal_tuning", "seedselect")


@pytest.mark.browser
@pytest.mark.comfyui
@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_runs_from_the_page_with_its_chart_and_preview(server, artifacts, name):
    """The template loaded as Templates loads it, made CPU-sized by its widgets, queued with the Run
    button: every charted node has the chart and holds exactly the points the run reported (the
    trainers: one per step), shows its preview image, and the run succeeds without a console error
    from the extension.  The screenshot of each is kept (printed folder)."""
    with _page(server) as (page, errors):
        page.evaluate(LOAD_SMALL, [_example(name), small_settings(STEPS)])
        types = sorted({c["type"] for c in page.evaluate(CHARTED)})
        assert types, f"{name}: no node with the live chart"
        entry = _run_from_page(page, server)
        assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
        recorded = server.get("/likeness/progress")["nodes"]
        page.wait_for_function(f"() => ({RUN_STATE})({json.dumps(types)}).every((n) => n.images > 0 && "
                               "n.steps.length > 0 && n.steps[n.steps.length - 1] === n.total)", timeout=60_000)
        state = page.evaluate(RUN_STATE, types)
        _shoot(page, types[0], artifacts / f"{name}.png")
    print(f"\nscreenshot: {artifacts / (name + '.png')}")
    for node in state:
        assert "likeness_loss_chart" in node["widgets"], node
        assert node["steps"] == recorded[node["id"]]["steps"] and node["total"] == recorded[node["id"]]["total"]
        if node["type"] != "LikenessSeedSelect":
            assert node["steps"] == list(range(1, STEPS + 1)), node
    assert not _ours(errors), _ours(errors)


CANCEL_NAME = "likeness_cancelled"


@pytest.mark.browser
@pytest.mark.comfyui
def test_cancel_in_the_page_keeps_the_last_good_file(server, artifacts):
    """A long Textual Inversion run, interrupted with the front end's Cancel button after a few
    saves: the run ends as interrupted, the embedding written last is on disk, whole (no temp
    file left) and ComfyUI loads it in a prompt without a warning."""
    total = 400
    small = small_settings(total, preview_every=0, save_every=2, name=CANCEL_NAME)
    with _page(server) as (page, errors):
        page.evaluate(LOAD_SMALL, [_example("textual_inversion"), small])
        before = set(server.get("/history"))
        page.get_by_role("button", name="Run", exact=True).first.click()
        page.wait_for_function(f"() => ({CHARTS})('{TI}')[0].steps?.length >= 5", timeout=1_200_000)
        page.get_by_role("button", name="Cancel current run").first.click()
        entry = _wait_for_run(server, before)
        _shoot(page, TI, artifacts / "textual_inversion_cancelled.png")
    assert entry["status"]["status_str"] == "error", entry["status"]
    kinds = [name for name, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    folder = server.base / "models" / "embeddings"
    ours = sorted(p.name for p in folder.iterdir() if p.name.startswith(CANCEL_NAME))
    states = [n for n in ours if n.endswith(".likeness-state")]  # for resume: the last keep_states (2)
    assert [n for n in ours if n not in states] == [f"{CANCEL_NAME}.pt", f"{CANCEL_NAME}.safetensors"], ours
    assert 1 <= len(states) <= 2, ours  # no temp file, no lock: the run is over
    vectors, meta = load_embedding(folder / f"{CANCEL_NAME}.safetensors", "sd1")
    assert 4 <= int(meta["likeness.step"]) < total, meta  # at least the save at step 4
    assert all(bool(v.isfinite().all()) for v in vectors.values())
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoints.CHECKPOINTS["sd15"]}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"text": f"a photo of embedding:{CANCEL_NAME}",
                                                                "clip": ["1", 1]}},
              "3": {"class_type": "LikenessTestCondProbe", "inputs": {"conditioning": ["2", 0]}}}
    _, _, log, _ = run_prompt(server, prompt)
    assert not matching_lines(log, EMBEDDING_WARNING), log
    assert not _ours(errors), _ours(errors)


@pytest.mark.browser
@pytest.mark.comfyui
def test_every_example_shows_the_chart_and_folds_the_advanced_settings(server, artifacts):
    """Each template, loaded as Templates loads it: every node the server flags for the live chart
    (the trainers and SeedSelect) has the chart widget, without a run; a trainer shows only what a
    first run needs, the rest folds behind a button that shows it all."""
    seen = set()
    with _page(server) as (page, _):
        for path in sorted((REPO / "example_workflows").glob("*.json")):
            page.evaluate("(wf) => window.app.loadGraphData(wf)", json.loads(path.read_text(encoding="utf-8")))
            charted = page.evaluate(CHARTED)
            assert charted and all("likeness_loss_chart" in c["widgets"] for c in charted), (path.name, charted)
            # no other node draws a chart (not even one with the id the last run's node had)
            assert {c["type"] for c in charted} <= CHART_TYPES, (path.name, charted)
            seen |= {c["type"] for c in charted}
            _check_folding(page.evaluate(FOLD), path.name)
            if path.stem == "dreambooth_lora":
                _shoot(page, "LikenessTrainDreamBoothLoRA", artifacts / "dreambooth_lora_folded.png")
    assert seen == CHART_TYPES

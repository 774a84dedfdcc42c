"""The example workflow through a real ComfyUI server: ``python main.py --cpu`` on loopback, our
repository linked into a temporary ``custom_nodes/``, the graph posted to ``/prompt`` and
``/history`` polled, exactly as the browser would drive it.

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest tests/test_comfy_workflow.py -q

The server gets its own base directory (``--base-directory``: models, input, output, temp, user)
with the tiny SD1 checkpoint linked in as the only checkpoint and four 64x64 training images, so
nothing is written into the ComfyUI checkout.  The example workflow is converted from the UI
format the template browser loads to the API format ``/prompt`` takes with the server's own
``/object_info``; a test-only output node (``LikenessTestCondProbe`` of tests/support/server_nodes.py)
reports a digest of the positive CLIPTextEncode's conditioning so the tests can see whether it
changed.

The JavaScript test at the end needs only ``node`` (no ComfyUI).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from support import tiny_checkpoints
from support.comfy_runtime import REPO
from support.comfy_server import EMBEDDING_WARNING, cached_nodes, matching_lines, run_prompt, started_server
from support.workflows import add_trigger_probes, find_node, ui_to_api

EXAMPLE = REPO / "example_workflows" / "textual_inversion.json"
FOLDER = "likeness_example"  # the example's image folder and embedding name
TI = "LikenessTrainTextualInversion"
STEPS = 2  # training steps of the first run; the third run uses STEPS + 1


@pytest.fixture(scope="module")
def server(comfy_checkout, tmp_path_factory):
    ckpt = tiny_checkpoints.ensure_tiny_checkpoint("sd15")
    with started_server(comfy_checkout, tmp_path_factory.mktemp("comfy_base"), ckpt,
                        {FOLDER: {"captions": True}}) as srv:
        yield srv


def example_prompt(server, steps: int) -> tuple[dict, dict]:
    """The example workflow in API format, made tiny: the tiny SD1 checkpoint, 64 px images, a few
    training steps, one 1-step preview, a 1-step 64x64 sample; plus probes on the positive
    conditioning and on the same prompt encoded without the new word.  Returns (prompt, ids)."""
    wf = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    p = ui_to_api(wf, server.object_info)
    ids = {
        "ckpt": find_node(p, "CheckpointLoaderSimple"),
        "folder": find_node(p, "LikenessLoadImageFolder"),
        "ti": find_node(p, TI),
        "replace": find_node(p, "StringReplace"),
        "positive": find_node(p, "CLIPTextEncode", lambda n: isinstance(n["inputs"]["text"], list)),
        "latent": find_node(p, "EmptyLatentImage"),
        "sampler": find_node(p, "KSampler"),
        "save": find_node(p, "SaveImage"),
        "loss_graph": find_node(p, "LossGraphNode"),
    }
    assert p[ids["ckpt"]]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    assert p[ids["folder"]]["inputs"]["folder"] == FOLDER
    assert p[ids["ti"]]["inputs"]["captions"] == [ids["folder"], 1]  # captions wired from the folder node
    assert p[ids["replace"]]["inputs"]["replace"] == [ids["ti"], 1]  # the trigger wired into the prompt
    assert p[ids["positive"]]["inputs"]["text"] == [ids["replace"], 0]
    assert p[ids["sampler"]]["inputs"]["positive"] == [ids["positive"], 0]
    assert p[ids["loss_graph"]]["inputs"]["loss"] == [ids["ti"], 3]

    p[ids["ckpt"]]["inputs"]["ckpt_name"] = tiny_checkpoints.CHECKPOINTS["sd15"]
    p[ids["folder"]]["inputs"]["resolution"] = 64
    p[ids["ti"]]["inputs"].update(steps=steps, batch_size=1, preview_every=steps, preview_steps=1)
    p[ids["latent"]]["inputs"].update(width=64, height=64)
    p[ids["sampler"]]["inputs"]["steps"] = 1
    ids["probe"], ids["probe_plain"] = add_trigger_probes(p, ids["replace"], ids["positive"], [ids["ckpt"], 1])
    return p, ids


def run(server, prompt: dict) -> tuple[dict, list[dict], float]:
    """Queue and wait: (history entry, likeness.progress events, seconds)."""
    entry, events, _, seconds = run_prompt(server, prompt, ("likeness.progress",))
    return entry, events, seconds


def _step_of(pt: Path) -> int:
    import torch

    return int(torch.load(pt, weights_only=True)["step"])


def _embedding_warnings(server) -> list[str]:
    return matching_lines(server.log_text(), EMBEDDING_WARNING)


@pytest.mark.comfyui
def test_web_extension_and_template_are_served(server):
    listed = server.get("/extensions")
    ours = [u for u in listed if u.endswith("/likeness.js")]
    assert ours == ["/extensions/likeness/likeness.js"], listed
    status, body = server.request("GET", ours[0])
    assert status == 200 and b"likeness.progress" in body and b"registerExtension" in body
    assert sorted(server.get("/workflow_templates").get("likeness")) == sorted(
        p.stem for p in (REPO / "example_workflows").glob("*.json"))
    status, body = server.request("GET", "/api/workflow_templates/likeness/textual_inversion.json")
    assert status == 200 and json.loads(body) == json.loads(EXAMPLE.read_text(encoding="utf-8"))
    info = server.object_info
    assert info["LikenessLoadImageFolder"]["display_name"] == "Load Training Images (Likeness)"
    assert info[TI]["input"]["required"]["seed"][1]["control_after_generate"] == "fixed"


@pytest.mark.comfyui
def test_example_workflow_trains_and_samples(server):
    import safetensors.torch

    # a first run: another test of this module may have run the same prompt on this server, and
    # ComfyUI would answer from its cache (no node outputs); /free empties it (the idle worker wakes
    # on the flag at once)
    assert server.request("POST", "/free", {"free_memory": True})[0] == 200
    time.sleep(3)
    prompt, ids = example_prompt(server, STEPS)
    entry, events, seconds = run(server, prompt)
    print(f"\nexample workflow, first run ({STEPS} training steps): {seconds:.1f} s "
          f"(server start-up {server.startup_seconds:.1f} s)")
    emb = server.base / "models" / "embeddings"
    st, pt = emb / f"{FOLDER}.safetensors", emb / f"{FOLDER}.pt"
    assert st.is_file() and pt.is_file(), sorted(os.listdir(emb))
    vec = safetensors.torch.load_file(str(st))["emb_params"]
    assert tuple(vec.shape) == (2, 768) and bool(vec.isfinite().all())  # the example trains 2 vectors
    assert _step_of(pt) == STEPS

    out = entry["outputs"]
    assert "4 images" in out[ids["folder"]]["text"][0] and "captions: 4 of 4" in out[ids["folder"]]["text"][0]
    assert f"embedding:{FOLDER}" in out[ids["ti"]]["text"][0]
    saved = out[ids["save"]]["images"][0]
    assert (server.base / "output" / saved["subfolder"] / saved["filename"]).is_file()
    assert out[ids["loss_graph"]]["images"]
    # the trigger changes the conditioning the sampler gets, and ComfyUI found the file
    assert out[ids["probe"]]["digest"] != out[ids["probe_plain"]]["digest"]
    assert not _embedding_warnings(server), _embedding_warnings(server)
    # live progress for the loss chart: one event per step, from the training node
    assert [e["step"] for e in events] == list(range(1, STEPS + 1)), events
    assert all(e["node"] == ids["ti"] and e["total"] == STEPS and math.isfinite(e["loss"]) for e in events)
    server.first_run = (prompt, ids, entry)


@pytest.mark.comfyui
def test_requeue_is_cached_and_new_settings_retrain(server):
    if not hasattr(server, "first_run"):
        pytest.skip("needs test_example_workflow_trains_and_samples to have run first")
    prompt, ids, first = server.first_run
    pt = server.base / "models" / "embeddings" / f"{FOLDER}.pt"
    mtime = pt.stat().st_mtime_ns

    # the same graph again: nothing runs, the embedding is not retrained or rewritten
    entry, events, seconds = run(server, prompt)
    print(f"\nidentical re-queue: {seconds:.2f} s")
    assert cached_nodes(entry) >= set(prompt), sorted(set(prompt) - cached_nodes(entry))
    assert events == [] and pt.stat().st_mtime_ns == mtime
    assert entry["outputs"][ids["probe"]]["digest"] == first["outputs"][ids["probe"]]["digest"]

    # one more training step: the trainer re-runs, and so does everything downstream of it, so the
    # CLIPTextEncode that uses the word gets the new embedding instead of a stale cached result
    prompt3, ids3 = example_prompt(server, STEPS + 1)
    entry, events, seconds = run(server, prompt3)
    print(f"re-queue with {STEPS + 1} training steps: {seconds:.1f} s")
    cached = cached_nodes(entry)
    assert ids3["ti"] not in cached and ids3["positive"] not in cached and ids3["probe"] not in cached
    assert ids3["ckpt"] in cached and ids3["folder"] in cached and "901" in cached  # unrelated nodes reused
    assert [e["step"] for e in events] == list(range(1, STEPS + 2))
    assert _step_of(pt) == STEPS + 1
    assert entry["outputs"][ids3["probe"]]["digest"] != first["outputs"][ids["probe"]]["digest"]
    assert entry["outputs"][ids3["probe"]]["digest"] != entry["outputs"][ids3["probe_plain"]]["digest"]
    assert not _embedding_warnings(server), _embedding_warnings(server)


@pytest.mark.comfyui
def test_progress_route_returns_the_runs_points_for_a_reloaded_page(server):
    """A page reloaded during or after a run asks GET /likeness/progress for the chart's points: the
    route returns every step of the latest prompt's training node, as the events carried them."""
    prompt, ids = example_prompt(server, 6)
    entry, events, _ = run(server, prompt)
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5, 6], events
    assert all(e["prompt_id"] == events[0]["prompt_id"] and e["prompt_id"] and e["type"] == TI for e in events)
    assert [e["elapsed"] for e in events] == sorted(e["elapsed"] for e in events)  # the ETA's clock

    got = server.get("/likeness/progress")
    assert got["prompt_id"] == events[0]["prompt_id"] == entry["prompt"][1]
    assert sorted(got["chart_nodes"]) == ["LikenessSeedSelect", "LikenessTrainDreamBoothFull",
                                          "LikenessTrainDreamBoothLoRA", "LikenessTrainPivotal", TI]
    run_ = got["nodes"][ids["ti"]]
    assert run_["type"] == TI and run_["total"] == 6 and run_["steps"] == [1, 2, 3, 4, 5, 6]
    assert run_["losses"] == [e["loss"] for e in events] and run_["elapsed"] == [e["elapsed"] for e in events]
    assert server.get(f"/api/likeness/progress/{ids['ti']}")["steps"] == [1, 2, 3, 4, 5, 6]  # the front end's prefix
    status, body = server.request("GET", "/likeness/progress/no-such-node")
    assert status == 404 and b"no progress recorded" in body


# ---- the front-end extension, in node with stub ComfyUI modules (no browser, no server) ----------

JS_HARNESS = r"""
globalThis.window = globalThis;
const registered = [], listeners = {}, nodes = {};
globalThis.__app = { registerExtension: (e) => registered.push(e),
                     graph: { getNodeById: (id) => nodes[id] ?? null } };
const routes = [];
const saved = { chart_nodes: ["LikenessSeedSelect", "LikenessTrainTextualInversion"], prompt_id: "p0",
                nodes: { "9": { type: "LikenessSeedSelect", total: 4, steps: [1, 2], losses: [0.8, null],
                                elapsed: [1.5, 3.0] },
                         "8": { type: "LikenessTrainPivotal", total: 4, steps: [1], losses: [0.8], elapsed: [1] } } };
globalThis.__api = { addEventListener: (t, f) => (listeners[t] ||= []).push(f),
                     fetchApi: async (r) => { routes.push(r); return { ok: true, json: async () => saved }; } };
await import("./extensions/likeness/likeness.js");
await import("./extensions/likeness/likeness.js?second-copy");  // served twice: registers once
const out = { registered: registered.length, names: registered.map((e) => e.name) };
const ext = registered[0];
for (const name of ["LikenessTrainTextualInversion", "KSampler", "LikenessSeedSelect"]) {
  await ext.beforeRegisterNodeDef({}, { name });
}
function makeNode(id, cls) {
  return { id, comfyClass: cls, size: [300, 400], widgets: [],
           addCustomWidget(w) { this.widgets.push(w); return w; },
           computeSize() { return [300, 400 + this.widgets.length * 94]; },
           setSize(s) { this.size = s; }, setDirtyCanvas() { this.dirty = (this.dirty || 0) + 1; } };
}
const ti = makeNode(7, "LikenessTrainTextualInversion"), other = makeNode(8, "KSampler");
const inner = makeNode(3, "LikenessTrainTextualInversion");
nodes[7] = ti; nodes[8] = other; nodes[5] = { id: 5, subgraph: { getNodeById: (id) => (id === 3 ? inner : null) } };
const seeds = makeNode(9, "LikenessSeedSelect");
nodes[9] = seeds;
ext.nodeCreated(ti); ext.nodeCreated(ti); ext.nodeCreated(other); ext.nodeCreated(seeds);
await ext.setup();  // after the graph is loaded: listens, and restores the server's points (page reload)
out.listeners = Object.keys(listeners);
out.routes = routes;
out.restored = JSON.parse(JSON.stringify(seeds.likenessLoss));
out.seedWidgets = seeds.widgets.map((w) => w.name);
out.widgets = ti.widgets.map((w) => [w.name, w.serialize]);
out.otherWidgets = other.widgets.length;
out.size = ti.size;
function ctx() {
  const calls = [];
  return new Proxy({ calls }, { get: (t, k) => (k in t ? t[k] : (...a) => calls.push([k, ...a])),
                                set: (t, k, v) => { t[k] = v; return true; } });
}
const w = ti.widgets[0];
out.height = w.computeSize(300)[1];
let c = ctx(); w.draw(c, ti, 300, 100);
out.emptyText = c.calls.filter((x) => x[0] === "fillText").map((x) => x[1]);
const send = (d) => listeners["likeness.progress"].forEach((f) => f({ detail: d }));
[0.9, 0.7, null, 0.5, 0.4].forEach((loss, i) => send({ node: "7", step: i + 1, total: 5, loss, elapsed: 2 * (i + 1),
                                                       prompt_id: "p1" }));
send({ node: "99", step: 1, total: 5, loss: 1.0 });   // a node that is not in the graph
send({ node: "8", type: "LikenessTrainPivotal", step: 1, total: 5, loss: 1.0 });  // same id, another workflow's node
out.otherAfterEvents = other.widgets.length;
send({ node: "5:3", step: 1, total: 2, loss: 0.3 });  // a node inside a subgraph
out.state = ti.likenessLoss;
out.inner = inner.likenessLoss;
c = ctx(); w.draw(c, ti, 300, 100);
out.lines = c.calls.filter((x) => x[0] === "lineTo").length;
out.text = c.calls.filter((x) => x[0] === "fillText").map((x) => x[1]);
c = ctx(); send({ node: "7", step: 4, total: 5, loss: 0.3, prompt_id: "p2" });  // a new prompt starts over
out.newPrompt = ti.likenessLoss.step;
send({ node: "7", step: 1, total: 3, loss: 2.0 });    // a new run starts a new chart
out.restarted = ti.likenessLoss;
const plain = makeNode(11, "SomeOtherLikenessNode");    // an event is enough to give a node the chart
nodes[11] = plain;
send({ node: "11", step: 1, total: 2, loss: 0.5 });
out.byEvent = plain.widgets.map((w) => w.name);
seeds.likenessLoss.step.push(3); seeds.likenessLoss.loss.push(0.4); seeds.likenessLoss.elapsed.push(4.5);
c = ctx(); seeds.widgets[0].draw(c, seeds, 300, 100);
out.seedText = c.calls.filter((x) => x[0] === "fillText").map((x) => x[1]);
out.dirty = ti.dirty;
console.log(JSON.stringify(out));
"""


def test_web_extension_draws_the_loss_chart(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node (Node.js) not installed: the front-end extension is not exercised")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text("export const app = globalThis.__app;\n")
    (tmp_path / "scripts" / "api.js").write_text("export const api = globalThis.__api;\n")
    (tmp_path / "extensions" / "likeness").mkdir(parents=True)
    shutil.copy(REPO / "web" / "likeness.js", tmp_path / "extensions" / "likeness" / "likeness.js")
    (tmp_path / "harness.mjs").write_text(JS_HARNESS)
    res = subprocess.run([node, "harness.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["registered"] == 1 and out["listeners"] == ["likeness.progress"]
    assert out["routes"] == ["/likeness/progress", "/likeness/progress"]  # the type list once, then the points
    assert out["widgets"] == [["likeness_loss_chart", False]] and out["otherWidgets"] == 0
    assert out["otherAfterEvents"] == 0  # points for node 8 of another graph (a Pivotal node) are not drawn on it
    assert out["seedWidgets"] == ["likeness_loss_chart"]  # every type the server lists gets the chart
    assert out["restored"]["step"] == [1, 2] and out["restored"]["total"] == 4 and out["restored"]["loss"][1] is None
    # the chart's text line: step/total, loss, its moving average and the time left (3 s for the last step)
    assert any(t.startswith("step 3/4  loss 0.4000  (avg") and t.endswith("ETA 2s") for t in out["seedText"]), \
        out["seedText"]
    assert out["size"][1] >= 494 and out["height"] > 0
    assert any("appears during a run" in t for t in out["emptyText"])
    st = out["state"]
    assert st["step"] == [1, 2, 3, 4, 5] and st["total"] == 5
    assert st["loss"][:2] == [0.9, 0.7] and st["loss"][2] is None  # NaN for the skipped step
    assert out["inner"]["step"] == [1]
    assert out["lines"] >= 4 and any("step 5/5" in t for t in out["text"])
    assert out["newPrompt"] == [4]
    assert out["restarted"]["step"] == [1] and out["restarted"]["loss"] == [2.0]
    assert out["byEvent"] == ["likeness_loss_chart"]
    assert out["dirty"] >= 6

"""nodes/ without ComfyUI: every node's schema, the helpers the nodes share (nodes/common.py) and the
Load Training Images folder rules, on the ComfyUI stand-in of tests/support/comfy_stub.py (or on
the real modules, where ComfyUI is importable).  What the nodes do inside a running ComfyUI is
tests/test_comfy_nodes.py's (marker ``comfyui``)."""
from __future__ import annotations

import importlib
import inspect
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from likeness.trainers import data as D
from likeness.trainers import diff_sampling as DS
from likeness.trainers.dreambooth import MODE_DEFAULTS
from likeness.trainers.lora import PRESETS
from likeness.trainers.seedselect import STARTS
from support import comfy_stub

#: each node's output types, in order (what a graph connects to)
OUTPUT_TYPES = {
    "LikenessLoadImageFolder": ["IMAGE", "STRING", "STRING"],
    "LikenessTrainTextualInversion": ["CONDITIONING", "STRING", "IMAGE", "LOSS_MAP", "IMAGE"],
    "LikenessTrainDreamBoothLoRA": ["MODEL", "CLIP", "STRING", "IMAGE", "LOSS_MAP", "IMAGE"],
    "LikenessTrainDreamBoothFull": ["MODEL", "CLIP", "STRING", "IMAGE", "LOSS_MAP", "IMAGE"],
    "LikenessTrainPivotal": ["MODEL", "CLIP", "STRING", "STRING", "IMAGE", "LOSS_MAP", "IMAGE"],
    "LikenessSeedSelect": ["NOISE", "LATENT", "LATENT", "IMAGE", "LOSS_MAP"],
    "LikenessLoadSeed": ["NOISE", "SIGMAS", "STRING"],
    "LikenessNoiseFromLatent": ["NOISE"],
    "LikenessEvaluate": ["STRING", "IMAGE"],
}
DREAMBOOTH_NODES = {"LikenessTrainDreamBoothLoRA": "lora", "LikenessTrainDreamBoothFull": "full",
                    "LikenessTrainPivotal": "pivotal"}


@pytest.fixture
def comfy(tmp_path):
    """The nodes package imported against the stand-in (installed for this test only; removed with
    every module imported meanwhile), its folders under ``tmp_path``."""
    with comfy_stub.installed(tmp_path):
        nodes = importlib.import_module("likeness.nodes")
        yield types.SimpleNamespace(
            nodes=nodes, common=importlib.import_module("likeness.nodes.common"),
            image_folder=importlib.import_module("likeness.nodes.image_folder"),
            folder_paths=sys.modules["folder_paths"], classes={c.define_schema().node_id: c for c in nodes.node_list()})


def _schemas(comfy):
    return {node_id: cls.define_schema() for node_id, cls in comfy.classes.items()}


# ---- the stand-in itself ---------------------------------------------------------------------


def test_the_stand_in_leaves_nothing_behind(tmp_path):
    if comfy_stub.comfy_loaded():
        pytest.skip("the real ComfyUI is loaded in this process: the stand-in is not used")
    with comfy_stub.installed(tmp_path) as used:
        importlib.import_module("likeness.nodes").node_list()  # imports every node module
        assert used and "folder_paths" in sys.modules and "likeness.nodes.common" in sys.modules
    assert not [m for m in sys.modules if m.split(".")[0] in comfy_stub.TOP_LEVEL]
    assert not [m for m in sys.modules if m.startswith("likeness.nodes") or m.startswith("likeness.hosts.comfy")]
    import likeness
    assert not hasattr(likeness, "nodes")
    with pytest.raises(ImportError):
        importlib.import_module("likeness.nodes")


# ---- schemas ---------------------------------------------------------------------------------


def test_every_node_is_listed_once_with_its_output_types(comfy):
    assert sorted(comfy.classes) == sorted(OUTPUT_TYPES)
    assert len(comfy.nodes.node_list()) == len(OUTPUT_TYPES)
    for node_id, schema in _schemas(comfy).items():
        assert [o.io_type for o in schema.outputs] == OUTPUT_TYPES[node_id], node_id


def test_every_input_and_output_says_what_it_is(comfy):
    for node_id, schema in _schemas(comfy).items():
        assert schema.display_name.endswith("(Likeness)") and len(schema.description) > 40, node_id
        assert schema.category in ("Likeness/training", "Likeness/seeds", "Likeness/evaluate"), node_id
        ids = [i.id for i in schema.inputs]
        assert len(ids) == len(set(ids)), node_id
        for i in schema.inputs:
            assert isinstance(i.tooltip, str) and len(i.tooltip) > 10, (node_id, i.id)
            if getattr(i, "options", None) is not None and i.default is not None:
                assert i.default in i.options, (node_id, i.id)
        for o in schema.outputs:
            assert o.display_name and isinstance(o.tooltip, str) and len(o.tooltip) > 10, (node_id, o.display_name)


#: what a first-time user must set on each trainer (besides its connections); the rest is advanced
FIRST_RUN_INPUTS = {
    "LikenessTrainTextualInversion": {"name", "steps", "prompt"},
    "LikenessTrainDreamBoothLoRA": {"name", "instance_prompt", "class_prompt", "steps"},
    "LikenessTrainDreamBoothFull": {"name", "instance_prompt", "class_prompt", "steps"},
    "LikenessTrainPivotal": {"name", "instance_prompt", "class_prompt", "steps", "token"},
}
_CONNECTIONS = ("MODEL", "CLIP", "VAE", "IMAGE", "CLIP_VISION")  # sockets, not widgets


def test_trainers_show_only_what_a_first_run_needs_and_say_why_the_rest_defaults_as_it_does(comfy):
    schemas = _schemas(comfy)
    for node_id, basic in FIRST_RUN_INPUTS.items():
        widgets = [i for i in schemas[node_id].inputs if i.io_type not in _CONNECTIONS]
        assert {i.id for i in widgets if not i.advanced} == basic, node_id
        for i in widgets:
            if i.advanced:
                assert "default" in i.tooltip.lower(), (node_id, i.id, i.tooltip)


def test_execute_takes_exactly_the_schemas_inputs(comfy):
    """A node whose execute() names its parameters must name the schema's inputs (ComfyUI passes
    them by keyword); the optional ones need a default there."""
    for node_id, cls in comfy.classes.items():
        params = inspect.signature(cls.execute).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        schema = cls.define_schema()
        assert list(params) == [i.id for i in schema.inputs], node_id
        for i in schema.inputs:
            assert (params[i.id].default is not inspect.Parameter.empty) == bool(i.optional), (node_id, i.id)


def test_choices_and_defaults_come_from_the_registries(comfy):
    inputs = {nid: {i.id: i for i in s.inputs} for nid, s in _schemas(comfy).items()}
    assert inputs["LikenessTrainTextualInversion"]["templates"].options == list(D.TEMPLATE_KINDS)
    assert inputs["LikenessSeedSelect"]["sampler"].options == list(DS.SAMPLERS)
    assert inputs["LikenessSeedSelect"]["scheduler"].options == list(DS.SCHEDULERS)
    assert inputs["LikenessSeedSelect"]["start"].options == list(STARTS)
    for node_id, mode in DREAMBOOTH_NODES.items():
        got, want = inputs[node_id], MODE_DEFAULTS[mode]
        if "targets" in got:
            assert got["targets"].options == list(PRESETS), node_id
        assert (got["steps"].default, got["learning_rate"].default, got["save_every"].default) == \
            (want.steps, want.learning_rate, want.save_every), node_id
        if "text_encoder_lr" in got:
            assert got["text_encoder_lr"].default == want.text_encoder_lr, node_id
    assert inputs["LikenessTrainDreamBoothFull"]["optimizer"].default == MODE_DEFAULTS["full"].optimizer


# ---- nodes/common.py -------------------------------------------------------------------------


def test_captions_text_parses_one_line_per_image(comfy):
    parse = comfy.common.parse_captions
    assert parse("a x\n\nc x", 3) == ["a x", None, "c x"]
    assert parse("a x\nb x\n\n\n", 2) == ["a x", "b x"]          # trailing blank lines are ignored
    assert parse("  a x  \n", 3) == ["a x", None, None]          # missing lines: images without one
    assert parse("\n\n", 3) is None and parse("", 2) is None and parse(None, 2) is None
    assert parse("a\nb\nc", 2) == ["a", "b", "c"]                # too many: images_from_batch refuses
    with pytest.raises(D.DatasetError, match="3 captions for 2 images"):
        D.images_from_batch(torch.zeros(2, 8, 8, 3), parse("a\nb\nc", 2))
    assert comfy.common.batch_captions(torch.zeros(2, 8, 8, 3), "a\n") == ["a", None]
    assert comfy.common.batch_captions(None, "") is None


def _fake_server(monkeypatch, sent):
    srv = types.SimpleNamespace(client_id="c1", routes=[],
                                send_sync=lambda event, data, sid: sent.append((event, data, sid)))
    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {"instance": srv})
    monkeypatch.setitem(sys.modules, "server", server)
    return srv


def test_progress_event_reaches_the_prompt_server(comfy, monkeypatch):
    sent = []
    comfy.common.send_progress("7", 1, 4, 0.5)                     # no server instance: nothing, no error
    _fake_server(monkeypatch, sent)
    comfy.common.send_progress(7, 2, 4, 0.25, 1.2345, "LikenessSeedSelect")
    comfy.common.send_progress(7, 3, 4, math.nan, 2.0)
    comfy.common.send_progress(None, 3, 4, 0.1)                   # no node id: nothing
    assert sent == [("likeness.progress", {"node": "7", "step": 2, "total": 4, "loss": 0.25, "elapsed": 1.234,
                                           "prompt_id": None, "type": "LikenessSeedSelect"}, "c1"),
                    ("likeness.progress", {"node": "7", "step": 3, "total": 4, "loss": None, "elapsed": 2.0,
                                           "prompt_id": None, "type": None}, "c1")]


def test_progress_is_kept_for_a_reloaded_page_and_restarts_with_a_new_run(comfy):
    live = importlib.import_module("likeness.nodes.progress")
    live.clear()
    for step, loss in ((1, 0.9), (2, None), (3, 0.7)):
        live.record("7", step, 6, loss, step * 0.5, "p1", "LikenessTrainPivotal")
    live.record("5:3", 1, 2, 0.3, 0.1, "p1")
    got = live.snapshot()
    assert got["prompt_id"] == "p1" and sorted(got["nodes"]) == ["5:3", "7"]
    assert got["nodes"]["7"] == {"type": "LikenessTrainPivotal", "total": 6, "steps": [1, 2, 3],
                                 "losses": [0.9, None, 0.7], "elapsed": [0.5, 1.0, 1.5]}
    assert live.snapshot("5:3")["nodes"] == {"5:3": {"type": None, "total": 2, "steps": [1], "losses": [0.3],
                                                     "elapsed": [0.1]}}
    live.record("7", 1, 4, 2.0, 0.2, "p1")                         # the same node run again: its chart restarts
    assert live.snapshot("7")["nodes"]["7"]["steps"] == [1] and "5:3" in live.snapshot()["nodes"]
    live.record("8", 1, 4, 1.0, 0.2, "p2")                         # a new prompt: the old runs are gone
    assert live.snapshot() == {"prompt_id": "p2", "nodes": {"8": {"type": None, "total": 4, "steps": [1],
                                                                  "losses": [1.0], "elapsed": [0.2]}}}
    live.clear()


def test_evaluations_travel_with_the_next_progress_event_and_are_kept_for_a_reload(comfy, monkeypatch):
    """Best step: the live chart's second panel gets each evaluation with the step's event, and a
    reloaded page gets them back from the route's memory."""
    from likeness.trainers.best_step import Point

    live = importlib.import_module("likeness.nodes.progress")
    live.clear()
    sent = []
    _fake_server(monkeypatch, sent)
    monkeypatch.setattr(comfy.common.comfy.utils, "ProgressBar", lambda *a, **k: types.SimpleNamespace(
        update_absolute=lambda *a, **k: None))
    progress = comfy.common.progress_reporter("4", 3, "LikenessTrainDreamBoothLoRA")
    progress(1, 3, 0.5, None)
    progress.on_point(Point(2, 0.7, None, None, 0.3, 0.46, 1.5))
    progress(2, 3, 0.4, None)
    progress(3, 3, 0.3, None)
    metrics = [event[1].get("metrics") for event in sent]
    assert metrics[0] is None and metrics[2] is None
    assert metrics[1] == [{"step": 2, "CLIP-I": 0.7, "DINO": None, "CLIP-T": None, "CLIP-T margin": None,
                           "diversity": 0.3, "combined": 0.46, "seconds": 1.5}]
    assert live.snapshot("4")["nodes"]["4"]["metrics"] == metrics[1]
    live.clear()


def test_every_long_running_node_is_flagged_for_the_chart(comfy):
    live = importlib.import_module("likeness.nodes.progress")
    assert live.chart_node_types(comfy.nodes.node_list()) == [
        "LikenessSeedSelect", "LikenessTrainDreamBoothFull", "LikenessTrainDreamBoothLoRA", "LikenessTrainPivotal",
        "LikenessTrainTextualInversion"]


def test_progress_route_returns_the_run_so_far(comfy, monkeypatch):
    import asyncio

    pytest.importorskip("aiohttp")
    live = importlib.import_module("likeness.nodes.progress")
    live.clear()
    assert live.register_routes(comfy.nodes.node_list()) is False   # no server: nothing to register
    srv = _fake_server(monkeypatch, [])

    class Routes(list):
        def get(self, path):
            return lambda handler: self.append(types.SimpleNamespace(path=path, handler=handler))

    srv.routes = Routes()
    assert live.register_routes(comfy.nodes.node_list()) is True
    assert live.register_routes(comfy.nodes.node_list()) is True    # loaded twice: registered once
    assert [r.path for r in srv.routes] == ["/likeness/progress", "/likeness/progress/{node_id}"]
    comfy.common.send_progress("7", 1, 6, 0.5, 0.25)
    comfy.common.send_progress("7", 2, 6, 0.4, 0.5)

    def call(route, **match):
        res = asyncio.run(route.handler(types.SimpleNamespace(match_info=match)))
        return res.status, json.loads(res.body)

    status, body = call(srv.routes[0])
    assert status == 200 and "LikenessTrainDreamBoothLoRA" in body["chart_nodes"]
    assert body["nodes"]["7"]["steps"] == [1, 2] and body["nodes"]["7"]["losses"] == [0.5, 0.4]
    assert call(srv.routes[1], node_id="7")[1]["elapsed"] == [0.25, 0.5]
    status, body = call(srv.routes[1], node_id="99")
    assert status == 404 and "no progress recorded for node 99" in body["error"]
    live.clear()


def test_progress_reporter_moves_the_bar_with_a_preview_and_honours_cancel(comfy, monkeypatch):
    common = comfy.common
    bars, events = [], []

    class Bar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id, self.updates = total, node_id, []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, total, preview))

    cancel = {"now": False}

    class Cancelled(Exception):
        pass

    def check():
        if cancel["now"]:
            raise Cancelled()

    monkeypatch.setattr(common.comfy.utils, "ProgressBar", Bar)
    monkeypatch.setattr(common.comfy.model_management, "throw_exception_if_processing_interrupted", check)
    monkeypatch.setattr(common, "send_progress", lambda *a: events.append(a))
    progress = common.progress_reporter("n1", 10)
    progress(1, 10, 0.5, None)
    progress(2, 10, 0.4, torch.full((16, 24, 3), 0.5))
    bar = bars[0]
    assert (bar.total, bar.node_id) == (10, "n1") and bar.updates[0] == (1, 10, None)
    fmt, image, size = bar.updates[1][2]
    assert fmt == "JPEG" and image.size == (24, 16) and size == common.PREVIEW_SIZE
    assert [e[:4] for e in events] == [("n1", 1, 10, 0.5), ("n1", 2, 10, 0.4)]
    assert events[0][5] is None
    assert 0 <= events[0][4] <= events[1][4] < 60  # seconds since the run started: the chart's ETA
    cancel["now"] = True
    with pytest.raises(Cancelled):
        progress(3, 10, 0.3, None)
    assert len(bar.updates) == 2 and len(events) == 2             # Cancel comes before any report
    counting = common.count_reporter("n1")
    cancel["now"] = False
    counting(3, 5)
    assert bars[-1].total == 5 and bars[-1].updates == [(3, 5, None)]


def test_preview_image_conversion(comfy):
    img = torch.tensor([[[0.0, 0.5, 1.0], [2.0, -1.0, 0.2]]])      # [H=1, W=2, 3], out of range clamped
    pil = comfy.common.to_pil(img)
    assert pil.size == (2, 1) and pil.mode == "RGB"
    assert list(pil.getpixel((0, 0))) == [0, 128, 255] and list(pil.getpixel((1, 0))) == [255, 0, 51]


def test_training_report_text_preview_and_loss(comfy, monkeypatch, tmp_path):
    shown = []
    monkeypatch.setattr(comfy.common.ui, "PreviewImage", lambda image, cls=None: types.SimpleNamespace(
        as_dict=lambda: shown.append(tuple(image.shape)) or {"images": ["x"]}))
    res = types.SimpleNamespace(preview=None, losses=[0.5, 0.25], steps_done=2, seconds=3.2, skipped_steps=0,
                                files=[tmp_path / "a.safetensors"], data_summary="2 images")
    preview, loss, ui = comfy.common.training_report(object, res, "LoRA a.safetensors", ("4 class images",))
    assert preview.shape == (1, 64, 64, 3) and not preview.any() and loss == {"loss": [0.5, 0.25]}
    assert ui["text"][0] == (f"LoRA a.safetensors - 2 steps in 3 s, last loss 0.2500, 4 class images\n"
                             f"{tmp_path / 'a.safetensors'}\n2 images")
    assert "images" not in ui and not shown
    res.preview, res.skipped_steps, res.losses = torch.rand(8, 8, 3), 1, []
    preview, _, ui = comfy.common.training_report(object, res, "embedding:w")
    assert preview.shape == (1, 8, 8, 3) and shown == [(1, 8, 8, 3)] and ui["images"] == ["x"]
    assert ui["text"][0].startswith("embedding:w - 2 steps in 3 s, last loss n/a, 1 non-finite steps skipped\n")


def test_files_go_to_the_first_folder_comfyui_searches(comfy, monkeypatch, tmp_path):
    fp = comfy.folder_paths
    monkeypatch.setitem(fp.folder_names_and_paths, "embeddings", ([str(tmp_path / "e1"), str(tmp_path / "e2")], set()))
    monkeypatch.setitem(fp.folder_names_and_paths, "loras", ([str(tmp_path / "l")], set()))
    assert comfy.common.embeddings_dir() == str(tmp_path / "e1")
    assert comfy.common.model_folder("loras") == str(tmp_path / "l")


def test_a_file_to_continue_is_found_in_its_folder_or_taken_as_a_path(comfy, monkeypatch, tmp_path):
    """``init_lora`` / ``init_embedding``: a name in models/loras (or embeddings) is that file; any
    other text is a path, which the trainer refuses by name when it does not exist."""
    fp = comfy.folder_paths
    monkeypatch.setitem(fp.folder_names_and_paths, "loras", ([str(tmp_path / "l1"), str(tmp_path / "l2")], set()))
    (tmp_path / "l2").mkdir()
    (tmp_path / "l2" / "mine.safetensors").write_bytes(b"x")
    assert comfy.common.typed_file("loras", " mine.safetensors ") == str(tmp_path / "l2" / "mine.safetensors")
    assert comfy.common.typed_file("loras", "other.safetensors") == "other.safetensors"
    assert comfy.common.typed_file("loras", str(tmp_path / "abs.safetensors")) == str(tmp_path / "abs.safetensors")
    assert comfy.common.typed_file("loras", "") == ""
    inputs = {node: {i.id for i in s.inputs} for node, s in _schemas(comfy).items()}
    assert "init_lora" in inputs["LikenessTrainDreamBoothLoRA"] and "init_lora" not in inputs["LikenessTrainDreamBoothFull"]
    assert {"init_lora", "init_embedding"} <= inputs["LikenessTrainPivotal"]
    assert {"resume", "keep_states"} <= inputs["LikenessSeedSelect"]


# ---- Load Training Images: folder names ------------------------------------------------------


@pytest.fixture
def input_dir(comfy, monkeypatch, tmp_path):
    d = tmp_path / "input"
    (d / "cat" / "sub").mkdir(parents=True)
    monkeypatch.setattr(comfy.folder_paths, "input_directory", str(d))
    return d


@pytest.mark.parametrize("name", ["../outside", "cat/../../outside", "cat/../cat", "..", "./../x",
                                  "cat/sub/../../.."])
def test_folder_names_cannot_leave_the_input_directory(comfy, input_dir, name):
    with pytest.raises(D.DatasetError, match="leaves ComfyUI's input directory"):
        comfy.image_folder.resolve_folder(name)
    node = comfy.classes["LikenessLoadImageFolder"]
    kind, message = node.fingerprint_inputs(folder=name, resolution=0)
    assert kind == "invalid" and "leaves" in message                # ComfyUI's cache key, no crash


def test_folder_names_inside_the_input_directory_and_absolute_paths(comfy, input_dir, tmp_path):
    resolve = comfy.image_folder.resolve_folder
    assert resolve("cat") == input_dir / "cat"
    assert resolve(" 'cat/sub' ") == input_dir / "cat" / "sub"
    assert resolve(f'"{tmp_path / "elsewhere" / "x" / ".."}"') == tmp_path / "elsewhere"   # absolute: as given
    for empty in ("", "   ", "''"):
        with pytest.raises(D.DatasetError, match="no folder given"):
            resolve(empty)
    node = comfy.classes["LikenessLoadImageFolder"]
    assert node.fingerprint_inputs(folder=["linked"], resolution=64) == ("linked", 64)
    first = node.fingerprint_inputs(folder="cat", resolution=0)
    (input_dir / "cat" / "a.txt").write_text("a caption")
    assert node.fingerprint_inputs(folder="cat", resolution=0) != first    # an edit re-runs the node


def test_first_run_without_images_says_which_folder_to_make_and_what_to_put_in_it(comfy, input_dir):
    """A template's folder does not exist on a user's first run: the error names the full path and
    what goes in it, instead of only saying that the folder is missing."""
    node = comfy.classes["LikenessLoadImageFolder"]
    with pytest.raises(D.DatasetError) as err:
        node.execute(folder="likeness_example", resolution=64)
    msg = str(err.value)
    assert f"{input_dir / 'likeness_example'} does not exist yet" in msg
    assert "create it" in msg and "png" in msg and "same-named .txt" in msg and "press Run again" in msg
    (input_dir / "likeness_example").mkdir()
    (input_dir / "likeness_example" / "notes.md").write_text("not an image")
    with pytest.raises(D.DatasetError, match=r"no images in .*likeness_example: put in it the training images"):
        node.execute(folder="likeness_example", resolution=64)


def test_the_folder_dropdown_lists_the_input_folders_and_wins_over_the_typed_one(comfy, input_dir):
    from support.images import write_disc_images

    (input_dir / "Dog").mkdir()
    (input_dir / ".hidden").mkdir()
    (input_dir / "photo.png").write_bytes(b"")                     # a file, not a folder: not listed
    write_disc_images(input_dir / "cat", n=3)
    node = comfy.classes["LikenessLoadImageFolder"]
    spec = {i.id: i for i in node.define_schema().inputs}["input_folder"]
    typed = comfy.image_folder.TYPED
    assert spec.options == [typed, "cat", "Dog"] and spec.default == typed and spec.optional
    images, _, summary = node.execute(folder="missing", resolution=32, input_folder="cat").result
    assert images.shape == (3, 32, 32, 3) and summary.startswith(f"3 images from {input_dir / 'cat'}")
    images, *_ = node.execute(folder="cat", resolution=32, input_folder=typed).result   # the typed folder
    assert images.shape[0] == 3
    assert node.fingerprint_inputs(folder="missing", resolution=32, input_folder="cat") == \
        node.fingerprint_inputs(folder="cat", resolution=32)
    (input_dir / "new").mkdir()                                    # listed afresh each time ComfyUI asks
    assert "new" in {i.id: i for i in node.define_schema().inputs}["input_folder"].options


def test_nodes_import_nothing_of_the_testbed_and_no_private_names():
    """The shipped nodes stand on hosts/ and trainers/ only (world/, demo.py and bench/ are the
    testbed), and no node module borrows another one's private helpers."""
    import ast

    for path in sorted((Path(__file__).resolve().parents[1] / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                assert not {"world", "demo", "bench"} & set(parts), (path.name, node.module)
                assert not [a.name for a in node.names if a.name.startswith("_")], (path.name, node.module)


# ---- Evaluate (Likeness) -----------------------------------------------------------------------


class _TableVision:
    """Stands in for ``hosts.comfy.ComfyClipVision``: embeds an image as its mean colour, and keeps
    the CLIP_VISION kind check (what the node relies on to refuse a wrong model)."""

    def __init__(self, clip_vision, use, kinds):
        if clip_vision.model_type not in kinds:
            raise ValueError(f"This CLIP_VISION is a {clip_vision.model_type}; " + use.format(kinds))
        self.tower = f"fake:{clip_vision.model_type}"

    def embed(self, images):
        return images.mean(dim=(1, 2))


def _solid(*colours):
    return torch.tensor(colours, dtype=torch.float32)[:, None, None, :].expand(-1, 8, 8, 3).clone()


def test_evaluate_node_outputs_the_table_as_text_and_image(comfy, monkeypatch):
    module = importlib.import_module("likeness.nodes.evaluate")
    monkeypatch.setattr(module, "ComfyClipVision", _TableVision)
    node = comfy.classes["LikenessEvaluate"]
    cv, dino = types.SimpleNamespace(model_type="clip_vision_model"), types.SimpleNamespace(model_type="dinov2")
    refs, gen = _solid([1, 0, 0]), _solid([1, 0, 0], [0, 1, 0])
    out = node.execute(refs, gen, cv, "a photo of sks dog", "sks", "dog", dino=dino)
    text, picture = out.args
    rows = [ln.split() for ln in text.splitlines()]
    assert rows[0] == ["image", "CLIP-I", "DINO", "CLIP-T", "diversity", "combined"]
    assert rows[1][:4] == ["1", "1.0000", "1.0000", "n/a"] and rows[2][:4] == ["2", "0.0000", "0.0000", "n/a"]
    assert rows[3] == ["all", "0.5000", "0.5000", "n/a", "1.0000", f"{math.sqrt(0.5):.4f}"]
    assert "CLIP-T: no text tower" in text and out.ui["text"] == (text,)
    assert picture.ndim == 4 and picture.shape[0] == 1 and picture.shape[-1] == 3 and picture.min() < 0.5
    with pytest.raises(ValueError, match="one prompt per image"):
        node.execute(refs, gen, cv, "a\nb\nc", "", "")
    with pytest.raises(ValueError, match="is a dinov2"):
        node.execute(refs, gen, dino, "", "", "")


def test_evaluate_node_refuses_a_clip_vision_of_the_wrong_kind_with_the_real_adapter(comfy):
    node = comfy.classes["LikenessEvaluate"]
    img = _solid([1, 0, 0])
    with pytest.raises(ValueError, match="is a dinov2; Evaluate Likeness needs a CLIP vision model"):
        node.execute(img, img, types.SimpleNamespace(model=None, model_type="dinov2"), "", "", "")
    with pytest.raises(ValueError, match="needs a CLIP vision model .* Connect one"):
        node.execute(img, img, None, "", "", "")

"""The package as ComfyUI loads it (``nodes.load_custom_node`` on the repository root, V3
``comfy_entrypoint``), and its nodes run the way ComfyUI's executor runs them: a class clone with
hidden inputs, ``EXECUTE_NORMALIZED`` under ``torch.inference_mode()``, a global progress hook.

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest tests/test_comfy_nodes.py -q
"""
from __future__ import annotations

import copy
import logging
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from support import comfy_runtime

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfy_root")]

NAME = "lkxqz_node"


@pytest.fixture(scope="module")
def node_classes(likeness_nodes):
    return likeness_nodes


@pytest.fixture(scope="module")
def live_embeddings(comfy_root, tmp_path_factory):
    """ComfyUI's embeddings folder for this module, set *before* the checkpoints load: their
    tokenizers look for ``embedding:NAME`` there, as in a real ComfyUI where the node writes into
    the folder the tokenizer reads."""
    import folder_paths

    path = tmp_path_factory.mktemp("embeddings")
    mp = pytest.MonkeyPatch()
    exts = folder_paths.folder_names_and_paths["embeddings"][1]
    mp.setitem(folder_paths.folder_names_and_paths, "embeddings", ([str(path)], exts))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def sd1(comfy_root, live_embeddings):
    return comfy_runtime.load_tiny("sd15")


@pytest.fixture(scope="module")
def sdxl(comfy_root, live_embeddings):
    return comfy_runtime.load_tiny("sdxl")


@pytest.fixture
def embeddings(tmp_path, monkeypatch):
    """Point ComfyUI's embeddings folder at a temp dir (the node writes into the first one)."""
    import folder_paths

    exts = folder_paths.folder_names_and_paths["embeddings"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "embeddings", ([str(tmp_path)], exts))
    return tmp_path


@pytest.fixture
def progress_calls(monkeypatch):
    import comfy.utils

    calls = []
    def hook(value, total, preview, node_id=None):
        calls.append((value, total, preview, node_id))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    return calls


def _run(node_cls, **inputs):
    """As execution.py does: a class clone with hidden inputs, then execute under inference mode."""
    clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": {"UNIQUE_ID": "7"}})
    with torch.inference_mode():
        return clone.EXECUTE_NORMALIZED(**inputs)


def _inputs(sd1, **kw):
    model, clip, vae = sd1
    base = dict(model=model, clip=clip, vae=vae,
                images=torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0)),
                name=NAME, init_text="", templates="auto", num_vectors=2, steps=2, learning_rate=5e-2,
                batch_size=2, resolution=0, flip=True, random_crop=False, seed=0, prompt="a photo of {}",
                preview_every=2, preview_steps=2, save_every=0, overwrite=False)
    base.update(kw)
    return base


def test_package_loads_as_a_v3_custom_node(node_classes):
    assert set(node_classes) == {"LikenessTrainTextualInversion", "LikenessLoadImageFolder",
                                 "LikenessTrainDreamBoothLoRA", "LikenessTrainDreamBoothFull", "LikenessTrainPivotal",
                                 "LikenessSeedSelect", "LikenessLoadSeed", "LikenessNoiseFromLatent",
                                 "LikenessEvaluate"}
    for node_id, cls in node_classes.items():
        cls.VALIDATE_CLASS()
        schema = cls.GET_SCHEMA()
        info = cls.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["display_name"] and info["description"] and info["category"].startswith("Likeness")
        missing = [i.id for i in schema.inputs if not (i.tooltip or "").strip()]
        assert not missing, f"{node_id}: inputs without a tooltip: {missing}"
        assert all((o.tooltip or "").strip() for o in schema.outputs)


def test_train_node_end_to_end(node_classes, sd1, embeddings, progress_calls):
    import nodes

    node = node_classes["LikenessTrainTextualInversion"]
    out = _run(node, **_inputs(sd1))
    conditioning, text, preview, loss, curves = out.result
    assert curves.ndim == 4 and curves.shape[-1] == 3  # an IMAGE even with evaluation off
    assert text == f"embedding:{NAME}"
    assert (embeddings / f"{NAME}.safetensors").is_file() and (embeddings / f"{NAME}.pt").is_file()
    assert len(loss["loss"]) == 2 and all(math.isfinite(x) for x in loss["loss"])
    assert preview.shape == (1, 64, 64, 3) and not preview.is_inference()
    assert [c[0] for c in progress_calls] == [1, 2] and progress_calls[-1][2] is not None  # preview sent
    assert progress_calls[0][3] == "7"
    assert "text" in out.ui and "images" in out.ui
    # the CONDITIONING output is what ComfyUI's CLIPTextEncode makes of the prompt with the file
    clip = sd1[1]
    c2 = clip.clone()
    c2.tokenizer = copy.copy(clip.tokenizer)
    c2.tokenizer.clip_l = copy.copy(clip.tokenizer.clip_l)
    c2.tokenizer.clip_l.embedding_directory = [str(embeddings)]
    with torch.inference_mode():
        (ref,) = nodes.CLIPTextEncode().encode(c2, f"a photo of embedding:{NAME}")
    assert torch.allclose(conditioning[0][0], ref[0][0], atol=1e-5)
    assert torch.allclose(conditioning[0][1]["pooled_output"], ref[0][1]["pooled_output"], atol=1e-5)
    # and it drives ComfyUI's sampler
    with torch.inference_mode():
        (lat,) = nodes.KSampler().sample(sd1[0], 0, 2, 5.0, "euler", "normal", conditioning, ref,
                                         {"samples": torch.zeros(1, 4, 8, 8)})
    assert bool(torch.isfinite(lat["samples"]).all())


def test_train_node_refuses_bad_input_before_work(node_classes, sd1, embeddings, progress_calls):
    node = node_classes["LikenessTrainTextualInversion"]
    with pytest.raises(ValueError, match="already a word"):
        _run(node, **_inputs(sd1, name="cat"))
    (embeddings / f"{NAME}.safetensors").write_bytes(b"")
    with pytest.raises(Exception, match="overwrite|exists"):
        _run(node, **_inputs(sd1))
    with pytest.raises(ValueError, match="captions"):
        _run(node, **_inputs(sd1, name="lkxqz_other", captions="a photo of lkxqz_other\n"))
    assert progress_calls == [] and sorted(p.name for p in embeddings.iterdir()) == [f"{NAME}.safetensors"]


def test_cancel_keeps_the_last_good_state(node_classes, sd1, embeddings, monkeypatch):
    import comfy.model_management
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        if value >= 2:
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    node = node_classes["LikenessTrainTextualInversion"]
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(node, **_inputs(sd1, steps=5, preview_every=0))
    pt = torch.load(embeddings / f"{NAME}.pt", weights_only=True)
    assert pt["step"] == 2


# ---- the trigger in a stock CLIPTextEncode, SD1 and SDXL -----------------------------------------

class _FakePromptServer:
    """Stands in for ``server.PromptServer`` (the node sends its live loss events through it)."""

    def __init__(self):
        self.client_id = "client-1"
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


@pytest.fixture
def prompt_server(monkeypatch):
    fake = _FakePromptServer()
    module = types.ModuleType("server")
    module.PromptServer = type("PromptServer", (), {"instance": fake})
    monkeypatch.setitem(sys.modules, "server", module)
    return fake


def _embedding_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "embedding" in r.getMessage().lower()]


@pytest.mark.parametrize("arch", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_trigger_changes_clip_text_encode(request, arch, node_classes, live_embeddings, prompt_server, caplog):
    """Train through the node; then ComfyUI's own CLIPTextEncode, on the CLIP as the checkpoint loader
    made it, finds the file: the prompt with ``embedding:NAME`` differs from the same prompt without
    it, equals the node's CONDITIONING output, and ComfyUI logs no embedding warning."""
    import nodes

    objs = request.getfixturevalue(arch)
    name = f"lkxqz_trig_{arch}"
    node = node_classes["LikenessTrainTextualInversion"]
    caplog.set_level(logging.WARNING)
    try:
        out = _run(node, **_inputs(objs, name=name, steps=2, batch_size=1, preview_every=0, flip=False))
        conditioning, trigger = out.result[0], out.result[1]
        assert trigger == f"embedding:{name}"
        files = sorted(p.name for p in live_embeddings.iterdir())
        assert f"{name}.safetensors" in files
        clip = objs[1]
        with torch.inference_mode():
            (with_word,) = nodes.CLIPTextEncode().encode(clip, f"a photo of {trigger}")
            (without,) = nodes.CLIPTextEncode().encode(clip, "a photo of")
        a, b = with_word[0][0], without[0][0]
        assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-4)
        assert torch.allclose(conditioning[0][0], a, atol=1e-4)
        assert torch.allclose(conditioning[0][1]["pooled_output"], with_word[0][1]["pooled_output"], atol=1e-4)
        assert not _embedding_warnings(caplog), _embedding_warnings(caplog)
        # the live loss chart's events: one per step, from this node, to the client that queued it
        events = [(d, sid) for e, d, sid in prompt_server.sent if e == "likeness.progress"]
        assert [d["step"] for d, _ in events] == [1, 2] and all(d["node"] == "7" and d["total"] == 2 for d, _ in events)
        assert all(math.isfinite(d["loss"]) and sid == "client-1" for d, sid in events)
    finally:
        for p in live_embeddings.glob(f"{name}.*"):
            p.unlink()


# ---- Load Training Images (Likeness) ------------------------------------------------------------

def _png(path, size=(64, 64), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


@pytest.fixture
def input_dir(tmp_path, monkeypatch):
    import folder_paths

    d = tmp_path / "input"
    d.mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(d))
    return d


def test_image_folder_node_outputs_images_captions_summary(node_classes, input_dir):
    folder = input_dir / "cat"
    folder.mkdir()
    _png(folder / "a.png", (80, 64), seed=1)
    _png(folder / "b.jpg", (64, 96), seed=2)
    _png(folder / "c.png", (64, 64), seed=3)
    (folder / "a.txt").write_text("a photo of [name]\non grass\n")
    (folder / "c.caption").write_text("[name] asleep")
    (folder / "notes.md").write_text("ignored")
    node = node_classes["LikenessLoadImageFolder"]
    out = _run(node, folder="cat", resolution=64)
    images, captions, summary = out.result
    assert images.shape == (3, 64, 64, 3) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert captions.split("\n") == ["a photo of [name] on grass", "", "[name] asleep"]
    assert "3 images" in summary and "captions: 2 of 3" in summary and "without a caption: b.jpg" in summary
    assert "80x64" in summary and "64x96" in summary
    shown = out.ui.as_dict() if hasattr(out.ui, "as_dict") else out.ui
    assert summary in shown["text"][0]
    # the same image resized the way trainers.data does it: short side, bicubic antialias, centre crop
    ref = torch.from_numpy(np.asarray(Image.open(folder / "b.jpg").convert("RGB"), dtype=np.float32) / 255)
    assert torch.allclose(images[1], ref[16:80], atol=1e-6)  # 64x96 -> already 64 short side: crop only
    # an absolute path works too
    out2 = _run(node, folder=str(folder), resolution=32)
    assert out2.result[0].shape == (3, 32, 32, 3)


def test_image_folder_captions_feed_the_training_node(node_classes, input_dir):
    ti_module = sys.modules[node_classes["LikenessTrainTextualInversion"].__module__]  # as ComfyUI loaded it
    common = sys.modules[ti_module.__name__.rpartition(".")[0] + ".common"]
    _captions, D = common.parse_captions, ti_module.D

    folder = input_dir / "set"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"{i}.png", seed=i)
    (folder / "0.txt").write_text("a [name] on a table")
    (folder / "2.txt").write_text("a [name] in the snow")
    images, captions, _ = _run(node_classes["LikenessLoadImageFolder"], folder="set", resolution=0).result
    parsed = _captions(captions, images.shape[0])
    assert parsed == ["a [name] on a table", None, "a [name] in the snow"]
    data = D.images_from_batch(images, parsed)
    with pytest.raises(D.DatasetError, match="only some images have captions.*image 1"):
        D.resolve_prompts(data, "lkxqz", "auto")
    (folder / "1.txt").write_text("a [name] on a chair")
    images, captions, _ = _run(node_classes["LikenessLoadImageFolder"], folder="set", resolution=0).result
    kind, caps = D.resolve_prompts(D.images_from_batch(images, _captions(captions, 3)), "lkxqz", "auto")
    assert kind == "captions" and caps == ["a lkxqz on a table", "a lkxqz on a chair", "a lkxqz in the snow"]
    # no caption files: an all-empty captions text means "use the templates"
    for p in folder.glob("*.txt"):
        p.unlink()
    _, captions, summary = _run(node_classes["LikenessLoadImageFolder"], folder="set", resolution=0).result
    assert captions == "\n\n" and _captions(captions, 3) is None and "captions: none" in summary
    # typed captions: trailing blank lines are ignored, too many lines are an error
    assert _captions("a x\nb x\n\n\n", 2) == ["a x", "b x"]
    with pytest.raises(D.DatasetError, match="3 captions for 2 images"):
        D.images_from_batch(images[:2], _captions("a\nb\nc", 2))


def test_image_folder_refuses_bad_input(node_classes, input_dir, tmp_path):
    node = node_classes["LikenessLoadImageFolder"]
    with pytest.raises(ValueError, match="leaves ComfyUI's input directory"):
        _run(node, folder="../outside", resolution=0)
    with pytest.raises(ValueError, match="no folder given"):
        _run(node, folder="  ", resolution=0)
    with pytest.raises(ValueError, match="does not exist"):
        _run(node, folder="missing", resolution=0)
    mixed = input_dir / "mixed"
    mixed.mkdir()
    _png(mixed / "a.png", (64, 64))
    _png(mixed / "b.png", (72, 64))
    with pytest.raises(ValueError, match=r"different sizes.*a\.png 64x64.*b\.png 72x64.*set a resolution"):
        _run(node, folder="mixed", resolution=0)
    assert _run(node, folder="mixed", resolution=64).result[0].shape == (2, 64, 64, 3)
    bad = input_dir / "bad"
    bad.mkdir()
    _png(bad / "ok.png")
    _png(bad / "gray.png", mode="L")
    _png(bad / "alpha.png", mode="RGBA")
    deep = np.zeros((64, 64), dtype=np.uint16)
    Image.fromarray(deep).save(bad / "deep.png")  # 16-bit grayscale PNG
    with pytest.raises(ValueError) as err:
        _run(node, folder="bad", resolution=0)
    msg = str(err.value)
    assert "gray.png" in msg and "alpha.png" in msg and "deep.png" in msg and "ok.png" not in msg


def test_image_folder_reruns_when_files_change(node_classes, input_dir):
    node = node_classes["LikenessLoadImageFolder"]
    folder = input_dir / "grow"
    folder.mkdir()
    _png(folder / "a.png")
    f1 = node.fingerprint_inputs(folder="grow", resolution=0)
    assert node.fingerprint_inputs(folder="grow", resolution=0) == f1  # unchanged: ComfyUI reuses the result
    assert node.fingerprint_inputs(folder="grow", resolution=64) != f1
    _png(folder / "b.png", seed=1)
    f2 = node.fingerprint_inputs(folder="grow", resolution=0)
    assert f2 != f1
    (folder / "b.txt").write_text("a [name]")
    f3 = node.fingerprint_inputs(folder="grow", resolution=0)
    assert f3 != f2
    st = os.stat(folder / "a.png")
    os.utime(folder / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # edited in place
    assert node.fingerprint_inputs(folder="grow", resolution=0) != f3
    assert node.fingerprint_inputs(folder="../x", resolution=0)[0] == "invalid"  # no exception
    assert node.fingerprint_inputs(folder=None, resolution=0) == ("linked", 0)

"""Embedding files: every UI we target loads what ``trainers/formats/embedding.py`` writes, and the
writer is safe (names, overwrites, atomic writes, no unpickling).

The UI loaders are re-implemented from their source in ``tests/oracles``, so the tests run
without ComfyUI or AUTOMATIC1111 installed; ``test_comfyui_mirror_matches_real_load_embed`` checks
the ComfyUI mirror against the real function when a ComfyUI checkout is available.
"""
from __future__ import annotations

import io
import os
from datetime import datetime
from pathlib import Path

import pytest
import safetensors.torch
import torch

from likeness.trainers.families import FAMILIES
from likeness.trainers.formats import files
from likeness.trainers.formats.embedding import check_can_write, embedding_paths, load_embedding, save_embedding
from likeness.trainers.formats.files import atomic_path, atomic_write_bytes, safe_path, validate_name
from likeness.trainers.seam import ModelInfo

from oracles.a1111_embedding import A1111_EXPECTED_SHAPE, a1111_load_dir, a1111_load_from_file
from oracles.comfy_embedding import COMFY_TOKENIZERS, comfy_apply, comfy_load_embed, real_load_embed
from oracles.comfy_source import comfy_checkout

WIDTHS = {e.key: e.width for f in FAMILIES.values() for e in f.encoders}
FAMILY_KEYS = {name: list(f.encoder_keys) for name, f in FAMILIES.items()}
PREDICTION = {"sd1": "eps", "sd2": "v", "sdxl": "eps"}


def make_vectors(family: str, n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, WIDTHS[k], generator=g) for k in FAMILY_KEYS[family]}


def make_info(family: str) -> ModelInfo:
    return ModelInfo(family=family, prediction=PREDICTION[family],
                     name=f"base-{family}.safetensors", hash="abc123def0")


def save(folder, family, name="my_cat", n=3, seed=0, step=150, **kw):
    vectors = make_vectors(family, n, seed)
    kw.setdefault("metadata", {"lr": "0.005", "init_text": "cat"})
    paths = save_embedding(folder, name, vectors, make_info(family), step=step, **kw)
    return vectors, paths


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# 1. ComfyUI
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_comfyui_loads_our_files(tmp_path, family):
    vectors, _ = save(tmp_path, family, n=3)
    for key, width in COMFY_TOKENIZERS[family]:
        raw = comfy_load_embed("my_cat", [str(tmp_path)], width, key)
        applied = comfy_apply(raw, width)
        assert applied is not None and applied.shape == (3, width), (key, raw.shape)
        torch.testing.assert_close(applied, vectors[key], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_comfyui_loads_our_pt_when_named_explicitly(tmp_path, family):
    vectors, _ = save(tmp_path, family, n=2)
    (key, width), = COMFY_TOKENIZERS[family]
    applied = comfy_apply(comfy_load_embed("my_cat.pt", [str(tmp_path)], width, key), width)
    torch.testing.assert_close(applied, vectors[key], rtol=0, atol=0)


def test_comfyui_prefers_safetensors_over_pt(tmp_path):
    # Both files exist for SD1; ComfyUI must pick .safetensors (no pickle at all).
    save(tmp_path, "sd1")
    (tmp_path / "my_cat.pt").write_bytes(b"not a torch file")
    assert comfy_load_embed("my_cat", [str(tmp_path)], 768, "clip_l").shape == (3, 768)


@pytest.mark.parametrize("family,tokenizer", [("sd1", ("clip_g", 1280)),
                                              ("sd2", ("clip_l", 768)),
                                              ("sdxl", ("clip_h", 1024)),
                                              ("sd1", ("clip_h", 1024))])
def test_comfyui_shape_check_rejects_wrong_family(tmp_path, family, tokenizer):
    save(tmp_path, family)
    key, width = tokenizer
    raw = comfy_load_embed("my_cat", [str(tmp_path)], width, key)
    assert raw is not None  # found and read ...
    assert comfy_apply(raw, width) is None  # ... but ignored by the width check, as ComfyUI does


@pytest.mark.skipif(comfy_checkout("comfy/sd1_clip.py") is None, reason="no ComfyUI checkout (set COMFYUI_PATH)")
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_comfyui_mirror_matches_real_load_embed(tmp_path, family):
    real = real_load_embed(comfy_checkout("comfy/sd1_clip.py"))
    save(tmp_path, family)
    for name in ("my_cat", "my_cat.pt"):
        if family == "sdxl" and name.endswith(".pt"):
            continue
        for key, width in [("clip_l", 768), ("clip_h", 1024), ("clip_g", 1280)]:
            ours = comfy_load_embed(name, [str(tmp_path)], width, key)
            theirs = real(name, [str(tmp_path)], width, key)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# 2. AUTOMATIC1111
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_a1111_loads_sd1_sd2(tmp_path, family, ext):
    vectors, _ = save(tmp_path, family, n=4, step=321)
    emb = a1111_load_from_file(str(tmp_path / f"my_cat{ext}"), f"my_cat{ext}")
    key = FAMILY_KEYS[family][0]
    assert emb["name"] == "my_cat"  # the trigger is the file stem
    assert (emb["shape"], emb["vectors"]) == (WIDTHS[key], 4)
    torch.testing.assert_close(emb["vec"], vectors[key], rtol=0, atol=0)
    if ext == ".pt":
        assert emb["step"] == 321
        assert emb["sd_checkpoint"] == "abc123def0"
        assert emb["sd_checkpoint_name"] == f"base-{family}.safetensors"
    else:  # A1111 reads step only from the .pt dict; a tensor file has none
        assert emb["step"] is None


def test_a1111_loads_sdxl(tmp_path):
    vectors, _ = save(tmp_path, "sdxl", n=2)
    emb = a1111_load_from_file(str(tmp_path / "my_cat.safetensors"), "my_cat.safetensors")
    assert emb["name"] == "my_cat"
    assert (emb["shape"], emb["vectors"]) == (2048, 2)
    assert set(emb["vec"]) == {"clip_l", "clip_g"}
    for k in ("clip_l", "clip_g"):
        torch.testing.assert_close(emb["vec"][k], vectors[k], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a1111_folder_registers_one_trigger_for_the_right_model(tmp_path, family):
    save(tmp_path, family)
    for model_family, expected in A1111_EXPECTED_SHAPE.items():
        registered, skipped = a1111_load_dir(tmp_path, expected)
        if model_family == family:
            # .pt and .safetensors share the stem: one trigger, not two
            assert list(registered) == ["my_cat"] and not skipped
        else:
            assert not registered and list(skipped) == ["my_cat"]


# --------------------------------------------------------------------------------------------
# 3. diffusers load_textual_inversion
# --------------------------------------------------------------------------------------------

def test_pt_has_what_diffusers_reads(tmp_path):
    vectors, _ = save(tmp_path, "sd1", n=2)
    data = torch.load(tmp_path / "my_cat.pt", weights_only=True, map_location="cpu")
    # diffusers' _retrieve_tokens_and_embeddings, A1111 branch (taken when the dict has more than
    # one key): token = state_dict["name"], embedding = state_dict["string_to_param"]["*"]
    assert len(data) != 1 and "string_to_param" in data
    assert data["name"] == "my_cat"
    torch.testing.assert_close(data["string_to_param"]["*"], vectors["clip_l"], rtol=0, atol=0)


class _StubTokenizer:
    """What diffusers' token helpers ask of a tokenizer: an empty vocabulary."""
    added_tokens_encoder: dict = {}

    def get_vocab(self):
        return {}


@pytest.mark.parametrize("filename,token", [("my_cat.pt", "my_cat"),
                                            ("my_cat.safetensors", "emb_params")])
def test_real_diffusers_reads_our_sd1_files(tmp_path, filename, token):
    ti = pytest.importorskip("diffusers.loaders.textual_inversion")
    vectors, _ = save(tmp_path, "sd1", n=2)
    (state_dict,) = ti.load_textual_inversion_state_dicts([str(tmp_path / filename)],
                                                          weight_name=filename)
    mixin = ti.TextualInversionLoaderMixin
    tokens, embeds = mixin._retrieve_tokens_and_embeddings([None], [state_dict], _StubTokenizer())
    assert tokens == [token]
    tokens, embeds = mixin._extend_tokens_and_embeddings(tokens, embeds, _StubTokenizer())
    assert tokens == [token, f"{token}_1"]
    torch.testing.assert_close(torch.stack(embeds), vectors["clip_l"], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# 4. Round trip and metadata
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_round_trip_and_metadata(tmp_path, family):
    vectors, paths = save(tmp_path, family, n=3, step=77)
    exts = [".safetensors"] if family == "sdxl" else [".safetensors", ".pt"]
    assert paths == [(tmp_path / f"my_cat{e}").resolve() for e in exts]
    assert listing(tmp_path) == sorted(f"my_cat{e}" for e in exts)  # and no temp files
    loaded, meta = load_embedding(paths[0], family=family)
    assert set(loaded) == set(vectors)
    for k in vectors:
        assert loaded[k].dtype == torch.float32
        torch.testing.assert_close(loaded[k], vectors[k], rtol=0, atol=0)
    assert meta["format"] == "pt"
    assert meta["likeness.base_model"] == f"base-{family}.safetensors"
    assert meta["likeness.family"] == family
    assert meta["likeness.prediction"] == PREDICTION[family]
    assert (meta["likeness.vectors"], meta["likeness.step"]) == ("3", "77")
    assert meta["likeness.lr"] == "0.005" and meta["likeness.init_text"] == "cat"
    assert datetime.fromisoformat(meta["likeness.date"]).utcoffset().total_seconds() == 0
    assert meta["modelspec.architecture"].endswith("/textual-inversion")
    assert not any(k.startswith("ss_") for k in meta)
    raw = safetensors.torch.load_file(paths[0])
    assert set(raw) == ({"emb_params"} if family != "sdxl" else {"clip_l", "clip_g"})


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_pt_loads_weights_only_and_round_trips(tmp_path, family):
    vectors, _ = save(tmp_path, family, n=2, step=9)
    data = torch.load(tmp_path / "my_cat.pt", weights_only=True, map_location="cpu")
    assert data["string_to_token"] == {"*": 265}
    assert (data["name"], data["step"]) == ("my_cat", 9)
    assert (data["sd_checkpoint"], data["sd_checkpoint_name"]) == ("abc123def0",
                                                                   f"base-{family}.safetensors")
    loaded, meta = load_embedding(tmp_path / "my_cat.pt", family=family)
    key = FAMILY_KEYS[family][0]
    torch.testing.assert_close(loaded[key], vectors[key], rtol=0, atol=0)
    assert meta["step"] == "9" and meta["name"] == "my_cat"


def test_load_with_wrong_family_is_refused(tmp_path):
    save(tmp_path, "sd1")
    with pytest.raises(ValueError, match="sdxl model needs"):
        load_embedding(tmp_path / "my_cat.safetensors", family="sdxl")


def test_saves_inference_noncontiguous_half_tensors_as_fp32(tmp_path):
    with torch.inference_mode():
        base = torch.randn(768, 2)
        vec = base.t().half()  # non-contiguous, fp16, an inference tensor
        save_embedding(tmp_path, "inf", {"clip_l": vec}, make_info("sd1"), step=1)
    loaded, _ = load_embedding(tmp_path / "inf.safetensors")
    assert loaded["clip_l"].dtype == torch.float32
    torch.testing.assert_close(loaded["clip_l"], vec.float(), rtol=0, atol=0)


def test_loads_third_party_layouts(tmp_path):
    one = torch.randn(768)
    safetensors.torch.save_file({"<cat-toy>": one}, tmp_path / "diff.safetensors")
    torch.save({"<cat-toy>": one}, tmp_path / "learned_embeds.bin")
    safetensors.torch.save_file({"emb_params": torch.randn(2, 1024)}, tmp_path / "k2.safetensors")
    safetensors.torch.save_file({"clip_g": torch.randn(2, 1280)}, tmp_path / "g.safetensors")
    for f in ("diff.safetensors", "learned_embeds.bin"):
        vecs, _ = load_embedding(tmp_path / f)
        assert list(vecs) == ["clip_l"] and vecs["clip_l"].shape == (1, 768)  # 1-D unsqueezed
        torch.testing.assert_close(vecs["clip_l"][0], one, rtol=0, atol=0)
    assert load_embedding(tmp_path / "k2.safetensors", family="sd2")[0]["clip_h"].shape == (2, 1024)
    assert list(load_embedding(tmp_path / "g.safetensors")[0]) == ["clip_g"]


@pytest.mark.parametrize("tensors,match", [
    ({"a": torch.randn(1, 768), "b": torch.randn(1, 768)}, "unknown embedding layout"),
    ({"emb_params": torch.randn(2, 999)}, "width of 999"),
    ({"clip_l": torch.randn(2, 1024)}, "width of 1024 under 'clip_l'"),
    ({"w": torch.randn(2, 3, 768)}, "not a \\[n, width\\] tensor"),
    ({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)}, "SDXL embedding needs"),
    ({"clip_l": torch.randn(2, 1280), "clip_g": torch.randn(2, 768)}, "SDXL embedding needs"),
])
def test_unknown_layouts_refused(tmp_path, tensors, match):
    safetensors.torch.save_file(tensors, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=match):
        load_embedding(tmp_path / "x.safetensors")


@pytest.mark.parametrize("filename", ["junk.safetensors", "junk.pt", "junk.bin", "junk.ckpt"])
def test_unreadable_files_give_a_clear_error(tmp_path, filename):
    (tmp_path / filename).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="junk"):
        load_embedding(tmp_path / filename)


class _Evil:
    """Unpickling this would create ``marker``: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_load_never_unpickles_objects(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}, "x": _Evil(str(marker))}, buf)
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_embedding(tmp_path / "evil.pt")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# 5. Safety
# --------------------------------------------------------------------------------------------

BAD_NAMES = {
    "": "empty", "   ": "empty", "a/b": "separator", "a\\b": "separator", "..": "'\\.\\.'",
    "../evil": "separator", "a..b": "'\\.\\.'", ".hidden": "starts with", "trailing.": "ends with",
    "name.pt": "Drop the extension", "name.safetensors": "Drop the extension",
    "NAME.SafeTensors": "Drop the extension", "x.bin": "Drop the extension",
    "m.ckpt": "Drop the extension", "x" * 81: "at most 80", "C:evil": "':'",
    "two words": "space", "tab\there": "control", "nul\x00": "control", "bell\x07": "control",
    "semi;colon": "';'", "(weighted)": "'\\('", "con": "reserved", "LPT1.x": "reserved",
    "zero\u200bwidth": "control",
}


@pytest.mark.parametrize("name", list(BAD_NAMES))
def test_bad_names_rejected_and_nothing_written(tmp_path, name):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    with pytest.raises(ValueError, match=BAD_NAMES[name]):
        validate_name(name)
    with pytest.raises(ValueError):
        check_can_write(folder, name, "sd1", overwrite=True)
    with pytest.raises(ValueError):
        save_embedding(folder, name, make_vectors("sd1"), make_info("sd1"), step=1, overwrite=True)
    assert listing(folder) == [] and listing(tmp_path) == ["embeddings"]


@pytest.mark.parametrize("name,expected", [("my_cat", "my_cat"), ("  Katze-2 ", "Katze-2"),
                                           ("猫", "猫"), ("v1.5_style", "v1.5_style"),
                                           ("x" * 80, "x" * 80)])
def test_good_names_accepted(tmp_path, name, expected):
    assert validate_name(name) == expected
    paths = save_embedding(tmp_path, name, make_vectors("sd1"), make_info("sd1"), step=1)
    assert [p.name for p in paths] == [f"{expected}.safetensors", f"{expected}.pt"]


def test_embedding_paths_per_family(tmp_path):
    assert [p.name for p in embedding_paths(tmp_path, "a", "sd2")] == ["a.safetensors", "a.pt"]
    assert [p.name for p in embedding_paths(tmp_path, "a", "sdxl")] == ["a.safetensors"]
    with pytest.raises(ValueError, match="(?i)unknown model family"):
        embedding_paths(tmp_path, "a", "flux")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_existing_file_not_overwritten_unless_asked(tmp_path, family):
    save(tmp_path, family, seed=0)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError,
                       match="my_cat.safetensors.*choose another name or set overwrite"):
        check_can_write(tmp_path, "my_cat", family, overwrite=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        save(tmp_path, family, seed=1)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    new, _ = save(tmp_path, family, seed=1, overwrite=True)
    loaded, _ = load_embedding(tmp_path / "my_cat.safetensors")
    torch.testing.assert_close(loaded["clip_l"], new["clip_l"], rtol=0, atol=0)
    assert not [n for n in listing(tmp_path) if n.endswith(".tmp")]


def test_sd1_pt_alone_blocks_a_new_save(tmp_path):
    (tmp_path / "my_cat.pt").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="my_cat.pt"):
        save(tmp_path, "sd1")
    assert listing(tmp_path) == ["my_cat.pt"]
    assert (tmp_path / "my_cat.pt").read_bytes() == b"someone else's"


def test_check_can_write_folder_problems(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        check_can_write(tmp_path / "file", "a", "sd1")
    (tmp_path / "a.safetensors").mkdir()
    with pytest.raises(FileExistsError, match="not a file"):
        check_can_write(tmp_path, "a", "sd1", overwrite=True)
    # A missing folder is fine: it is created on save.
    missing = tmp_path / "new" / "embeddings"
    assert check_can_write(missing, "b", "sd1") == embedding_paths(missing, "b", "sd1")
    assert not missing.exists()  # the check wrote nothing
    save(missing, "sd1", name="b")
    assert listing(missing) == ["b.pt", "b.safetensors"]

    def deny(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "_open_temp", deny)
    with pytest.raises(PermissionError, match="choose a folder you can write to"):
        check_can_write(tmp_path, "c", "sd1")


@pytest.mark.parametrize("bad,match", [
    ({"clip_g": torch.randn(2, 1280)}, "needs vectors for \\['clip_l'\\]"),
    ({"clip_l": torch.randn(2, 1024)}, "shape \\[n, 768\\]"),
    ({"clip_l": torch.randn(768)}, "shape \\[n, 768\\]"),
    ({"clip_l": torch.full((1, 768), float("nan"))}, "NaN"),
])
def test_bad_vectors_rejected_nothing_written(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        save_embedding(tmp_path, "a", bad, make_info("sd1"), step=1)
    assert listing(tmp_path) == []


def test_sdxl_vector_counts_must_agree(tmp_path):
    bad = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)}
    with pytest.raises(ValueError, match="same number of vectors"):
        save_embedding(tmp_path, "a", bad, make_info("sdxl"), step=1)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_failed_write_leaves_no_temp_and_no_partial_files(tmp_path, monkeypatch, exc, fail_at):
    # fsync runs after a temp file's bytes are written; failing the 2nd one means the
    # .safetensors temp is complete but the .pt is not: neither may appear.
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == fail_at:
            raise exc

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(type(exc)):
        save(tmp_path, "sd1")
    assert len(calls) == fail_at  # the failure really happened mid-write
    assert listing(tmp_path) == []


def test_failed_overwrite_keeps_old_files(tmp_path, monkeypatch):
    save(tmp_path, "sd1", seed=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_torch_save(*a, **k):
        raise KeyboardInterrupt  # ComfyUI's Cancel is a BaseException too

    monkeypatch.setattr(torch, "save", broken_torch_save)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, "sd1", seed=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_atomic_write_bytes_and_atomic_path(tmp_path, monkeypatch):
    target = tmp_path / "t.bin"
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"one" and listing(tmp_path) == ["t.bin"]
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"two")
    assert target.read_bytes() == b"two" and listing(tmp_path) == ["t.bin"]


def test_new_files_are_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "t.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "t.bin").stat().st_mode & 0o777 == 0o644  # readable by a UI's own user


def test_safe_path_refuses_escapes(tmp_path):
    folder = tmp_path / "embeddings"
    outside = tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    assert safe_path(folder, "a.pt") == (folder / "a.pt").resolve()
    assert safe_path(folder, "sub/a.pt") == (folder / "sub" / "a.pt").resolve()
    for bad in ("../a.pt", "sub/../../a.pt", str(outside / "a.pt"), ".", ""):
        with pytest.raises(ValueError, match="outside the folder"):
            safe_path(folder, bad)
    (folder / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the folder"):
        safe_path(folder, "link/a.pt")


def test_symlinked_target_escaping_folder_is_refused(tmp_path):
    folder, outside = tmp_path / "embeddings", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep me")
    (folder / "evil.safetensors").symlink_to(outside / "victim")
    with pytest.raises(ValueError, match="outside the folder"):
        save(folder, "sd1", name="evil", overwrite=True)
    assert (outside / "victim").read_bytes() == b"keep me"
    assert listing(folder) == ["evil.safetensors"]

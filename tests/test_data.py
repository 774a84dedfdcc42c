"""Training images: what a user's folder may contain, and what we refuse with a clear message."""
import random
import struct
import zlib

import pytest
import torch
from PIL import Image

from likeness.trainers import data as D


def _save(path, mode="RGB", size=(64, 64), color=None):
    color = color if color is not None else {"RGB": (200, 30, 30), "RGBA": (1, 2, 3, 128), "L": 100, "LA": (5, 5)}.get(mode, 1)
    Image.new(mode, size, color).save(path)


def _png16(path, w=64, h=64):
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    raw = b"".join(b"\x00" + b"\x12\x34" * 3 * w for _ in range(h))
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_folder_reads_images_and_same_named_captions(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.jpg")
    (tmp_path / "a.txt").write_text("a photo of  sksdog\n on grass")
    (tmp_path / "b.caption").write_text("sksdog asleep")
    (tmp_path / "notes.md").write_text("ignored")
    ds = D.load_image_folder(tmp_path)
    assert ds.sources == ["a.png", "b.jpg"]
    assert ds.captions == ["a photo of sksdog on grass", "sksdog asleep"]
    assert ds.images[0].shape == (64, 64, 3)
    assert abs(float(ds.images[0][0, 0, 0]) - 200 / 255) < 1e-6
    assert "2 with captions" in ds.summary()


@pytest.mark.parametrize("mode,needle", [("L", "grayscale"), ("RGBA", "alpha"), ("LA", "alpha"), ("I;16", "16")])
def test_non_rgb_images_are_refused_by_name(tmp_path, mode, needle):
    _save(tmp_path / "good.png")
    _save(tmp_path / "bad.png", mode=mode)
    with pytest.raises(D.DatasetError) as err:
        D.load_image_folder(tmp_path)
    assert "bad.png" in str(err.value) and needle in str(err.value)
    assert "good.png" not in str(err.value)


def test_16_bit_rgb_png_is_refused(tmp_path):
    _png16(tmp_path / "deep.png")
    with pytest.raises(D.DatasetError, match="deep.png is 16 bits"):
        D.load_image_folder(tmp_path)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(D.DatasetError, match="no images"):
        D.load_image_folder(tmp_path)
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.load_image_folder(tmp_path / "nope")


def test_mixed_sizes_need_a_resolution(tmp_path):
    _save(tmp_path / "a.png", size=(64, 64))
    _save(tmp_path / "b.png", size=(96, 64))
    ds = D.load_image_folder(tmp_path)
    with pytest.raises(D.DatasetError, match="different sizes.*set a resolution"):
        D.plan_geometry(ds, None, 8)
    planned = D.plan_geometry(ds, 64, 8)
    assert [tuple(p.shape[:2]) for p in planned] == [(64, 64), (64, 96)]


def test_batch_channels_are_checked():
    with pytest.raises(D.DatasetError, match="RGBA"):
        D.images_from_batch(torch.rand(2, 64, 64, 4))
    with pytest.raises(D.DatasetError, match="no training images"):
        D.images_from_batch(torch.rand(0, 64, 64, 3))
    with pytest.raises(D.DatasetError, match="2 captions for 3 images"):
        D.images_from_batch(torch.rand(3, 64, 64, 3), ["x", "y"])


def test_captions_are_used_or_the_user_is_told():
    ds = D.images_from_batch(torch.rand(2, 64, 64, 3), ["a photo of [name]", "sks on a table"])
    kind, caps = D.resolve_prompts(ds, "sks", "auto")
    assert kind == "captions" and caps == ["a photo of sks", "sks on a table"]
    # explicit templates: captions not used, and the summary says so
    kind, caps = D.resolve_prompts(ds, "sks", "object")
    assert caps == [None, None] and "captions not used" in ds.summary()
    partial = D.images_from_batch(torch.rand(2, 64, 64, 3), ["sks here", None])
    with pytest.raises(D.DatasetError, match="only some images have captions"):
        D.resolve_prompts(partial, "sks", "auto")
    lacking = D.images_from_batch(torch.rand(1, 64, 64, 3), ["a dog"])
    with pytest.raises(D.DatasetError, match="must contain the placeholder 'sks'"):
        D.resolve_prompts(lacking, "sks", "captions")


def test_templates_contain_the_name():
    rng = random.Random(0)
    assert all("sks" in D.prompt_for("object", "sks", None, rng) for _ in range(20))
    assert "style of sks" in D.prompt_for("style", "sks", None, rng)


class _IdentityHost:
    """Latents = average-pooled pixels, enough to check crop/flip bookkeeping."""
    latent_scale = 8
    device = torch.device("cpu")

    def encode_images(self, images):
        x = images.permute(0, 3, 1, 2)
        return torch.nn.functional.avg_pool2d(x, 8)


def test_latent_cache_crops_and_flips():
    img = torch.zeros(64, 128, 3)
    img[:, :64] = 1.0  # left half white
    cache = D.LatentCache(_IdentityHost(), [img], crop_hw=(64, 64), flip=True, random_crop=True)
    assert len(cache.latents[0]) == 2  # the image and its mirror, each encoded once
    seen = set()
    rng = random.Random(0)
    for _ in range(50):
        x, idx, meta = cache.sample(1, rng)
        assert x.shape == (1, 3, 8, 8) and idx == [0]
        seen.add(round(float(x.mean()), 3))
        assert meta[0].crop_top_left[0] == 0 and meta[0].crop_top_left[1] % 8 == 0
    assert {1.0, 0.0} <= seen  # random crops reach both halves
    centre = D.LatentCache(_IdentityHost(), [img], crop_hw=(64, 64), flip=False, random_crop=False)
    x, _, meta = centre.sample(1, rng)
    assert meta[0].crop_top_left == (0, 32) and abs(float(x.mean()) - 0.5) < 1e-6

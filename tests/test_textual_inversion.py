"""Textual Inversion on tiny diffusers models shaped like SD1, SD2 (v-prediction) and SDXL."""
import pytest
import torch
from safetensors.torch import load_file

from likeness.trainers import data as D
from likeness.trainers.textual_inversion import TIConfig, train_textual_inversion
from likeness.trainers.word_vectors import initial_vectors

HOSTS = ["tiny_sd1_host", "tiny_sd2_host", "tiny_sdxl_host"]
WIDTHS = {"tiny_sd1_host": {"clip_l"}, "tiny_sd2_host": {"clip_h"}, "tiny_sdxl_host": {"clip_l", "clip_g"}}


def _images(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return D.images_from_batch(torch.rand(n, size, size, 3, generator=g))


def _cfg(tmp_path, **kw):
    base = dict(name="sks-thing", output_dir=tmp_path / "embeddings", steps=4, learning_rate=1e-2, batch_size=2,
                save_every=2, preview_every=0)
    base.update(kw)
    return TIConfig(**base)


@pytest.mark.parametrize("host_name", HOSTS)
def test_trains_and_writes_files_for_each_family(host_name, request, tmp_path):
    host = request.getfixturevalue(host_name)
    before = {k: v.detach().clone() for k, v in host.frozen_parameters().items()}
    res = train_textual_inversion(host, _images(), _cfg(tmp_path, num_vectors=2))
    assert res.steps_done == 4 and len(res.losses) == 4 and all(torch.isfinite(torch.tensor(res.losses)))
    assert set(res.vectors) == WIDTHS[host_name]
    widths = {e.key: e.width for e in host.text_encoders()}
    for key, vec in res.vectors.items():
        assert vec.shape == (2, widths[key]) and vec.dtype == torch.float32
    st = load_file(str(tmp_path / "embeddings" / "sks-thing.safetensors"))
    if host.info.family == "sdxl":
        assert set(st) == {"clip_l", "clip_g"}
        assert not (tmp_path / "embeddings" / "sks-thing.pt").exists()
    else:
        assert set(st) == {"emb_params"}
        assert torch.equal(st["emb_params"], next(iter(res.vectors.values())))
        pt = torch.load(tmp_path / "embeddings" / "sks-thing.pt", weights_only=True)
        assert torch.equal(pt["string_to_param"]["*"], st["emb_params"]) and pt["step"] == 4
    # the model is frozen: every weight bit-identical, no weight gradients computed
    after = host.frozen_parameters()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in after.values())


def test_vectors_move_and_start_from_the_init_text(tiny_sd1_host, tmp_path):
    host = tiny_sd1_host
    init = initial_vectors(host, "red apple", 4)["clip_l"]
    toks = host.token_embeddings("red apple")["clip_l"]
    # A1111's spread: vector i copies token i*k//n
    assert torch.equal(init[0], toks[0]) and torch.equal(init[1], toks[0])
    assert torch.equal(init[2], toks[1]) and torch.equal(init[3], toks[1])
    res = train_textual_inversion(host, _images(), _cfg(tmp_path, init_text="red apple", num_vectors=4, steps=3))
    assert not torch.allclose(res.vectors["clip_l"], init)


def test_captions_drive_the_prompts(tiny_sd1_host, tmp_path):
    seen = []
    host = tiny_sd1_host
    real = host.encode_text

    class Spy:
        def __getattr__(self, k):
            return getattr(host, k)

        def encode_text(self, prompts, *a, **kw):
            if torch.is_grad_enabled():  # training prompts (the finite-state check encodes without grad)
                seen.extend(prompts)
            return real(prompts, *a, **kw)

    imgs = D.images_from_batch(torch.rand(2, 64, 64, 3), ["sks-thing on a beach", "[name] in snow"])
    train_textual_inversion(Spy(), imgs, _cfg(tmp_path, steps=3, save_every=0))
    assert set(seen) <= {"sks-thing on a beach", "sks-thing in snow"} and seen


@pytest.mark.parametrize("bad,match", [
    (dict(name="../evil"), "separator|\\.\\."),
    (dict(name="a/b"), "separator"),
    (dict(name="cat"), "vocabulary|word"),
    (dict(name=""), "empty"),
    (dict(num_vectors=0), "vectors"),
    (dict(steps=0), "steps"),
    (dict(learning_rate=0), "learning rate"),
])
def test_bad_settings_fail_before_work_and_write_nothing(tiny_sd1_host, tmp_path, bad, match):
    calls = []
    host = tiny_sd1_host

    class Watch:
        def __getattr__(self, k):
            return getattr(host, k)

        def encode_images(self, x):
            calls.append("encode")
            return host.encode_images(x)

    with pytest.raises(ValueError, match=match):
        train_textual_inversion(Watch(), _images(), _cfg(tmp_path, **bad))
    assert calls == []
    out = tmp_path / "embeddings"
    assert not out.exists() or list(out.iterdir()) == []


def test_existing_embedding_is_not_overwritten_unasked(tiny_sd1_host, tmp_path):
    out = tmp_path / "embeddings"
    out.mkdir()
    (out / "sks-thing.pt").write_bytes(b"user's own file")
    with pytest.raises(FileExistsError, match="sks-thing"):
        train_textual_inversion(tiny_sd1_host, _images(), _cfg(tmp_path))
    assert (out / "sks-thing.pt").read_bytes() == b"user's own file"
    assert not (out / "sks-thing.safetensors").exists()
    res = train_textual_inversion(tiny_sd1_host, _images(), _cfg(tmp_path, overwrite=True, steps=1))
    assert (out / "sks-thing.pt").read_bytes() != b"user's own file" and res.steps_done == 1


class Interrupt(BaseException):
    pass


def test_cancel_keeps_the_last_good_embedding(tiny_sd1_host, tmp_path):
    def progress(step, total, loss, img):
        if step == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):
        train_textual_inversion(tiny_sd1_host, _images(), _cfg(tmp_path, steps=50, save_every=100),
                                progress=progress)
    st = load_file(str(tmp_path / "embeddings" / "sks-thing.safetensors"))
    pt = torch.load(tmp_path / "embeddings" / "sks-thing.pt", weights_only=True)
    assert pt["step"] == 3 and torch.isfinite(st["emb_params"]).all()
    assert not list((tmp_path / "embeddings").glob("*.tmp*"))


def test_non_finite_loss_keeps_last_good_vectors(tiny_sd1_host, tmp_path):
    host = tiny_sd1_host
    calls = {"n": 0}

    class Flaky:
        def __getattr__(self, k):
            return getattr(host, k)

        def denoise(self, x, sigma, cond):
            calls["n"] += 1
            out = host.denoise(x, sigma, cond)
            return out * float("nan") if calls["n"] in (2, 3) else out

    res = train_textual_inversion(Flaky(), _images(), _cfg(tmp_path, steps=5, save_every=0))
    assert res.skipped_steps == 2 and len(res.losses) == 3
    assert torch.isfinite(res.vectors["clip_l"]).all()


def test_preview_is_an_image_of_the_training_size(tiny_sd1_host, tmp_path):
    previews = []
    res = train_textual_inversion(tiny_sd1_host, _images(size=64), _cfg(tmp_path, steps=2, preview_every=2,
                                  preview_steps=3), progress=lambda s, t, l, img: previews.append(img))
    imgs = [p for p in previews if p is not None]
    assert len(imgs) == 1 and imgs[0].shape == (64, 64, 3)
    assert 0 <= float(imgs[0].min()) and float(imgs[0].max()) <= 1
    assert res.preview is not None

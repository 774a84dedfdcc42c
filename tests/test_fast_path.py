"""The diffusers host's training step does no per-step work it could do once: no weight-sized
tensor is allocated after the first step, each prompt is tokenized once per run, SDXL's size ids
are built once per conditioning - and all of it computes what it computed before.

(ComfyUI's fast path against its low-memory path: tests/test_comfy_fast_path.py, ``-m comfyui``.)
"""
from __future__ import annotations

import pytest
import torch

from support.allocations import WeightSized

from likeness.hosts.diffusers.text import tokenize
from likeness.trainers import objective
from likeness.trainers.seam import ImageMeta

PH = "lkxqz"
PROMPTS = [f"a photo of {PH}", f"{PH} on a beach, painting"]


@pytest.fixture(params=["tiny_sd1_host", "tiny_sd2_host", "tiny_sdxl_host"])
def host(request):
    return request.getfixturevalue(request.param)


def _step(host, vectors, patch_fns=None):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(PROMPTS), host.latent_channels, 8, 8, generator=g)
    sigma = host.training_sigmas()[torch.tensor([40, 600])]
    x = x0 + torch.randn(x0.shape, generator=g) * sigma.view(-1, 1, 1, 1)
    meta = [ImageMeta((64, 64)), ImageMeta((80, 72), (8, 4))]
    cond = host.encode_text(PROMPTS, PH, vectors, meta)
    loss = objective.native_error(host, host.denoise(x, sigma, cond), x0, sigma).mean()
    loss.backward()
    return loss.detach()


def test_no_weight_sized_tensor_is_allocated_per_step(host):
    shapes = {tuple(t.shape) for part in ("unet", *(e.key for e in host.text_encoders()))
              for t in host.tunable_parameters(part).values() if t.ndim >= 2 and t.numel() >= 256}
    with host.training():
        vec = {k: v.requires_grad_(True) for k, v in host.token_embeddings("red apple").items()}
        first = _step(host, vec)
        with WeightSized(shapes) as counter:
            again = [_step(host, vec) for _ in range(2)]
    assert counter.hits == []
    assert all(torch.equal(a, first) for a in again)  # the same step, the same loss


def test_each_prompt_is_tokenized_once_and_as_before(tiny_sd1_host):
    tok = tiny_sd1_host.tokenizers[0]
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *a, **k):
            calls.append(a[0])
            return tok(*a, **k)

    cache: dict = {}
    prompts = PROMPTS + [PROMPTS[0], f"{PH} and {PH}"]
    first = tokenize(Counting(), prompts, PH, 2, torch.device("cpu"), cache)
    n = len(calls)
    again = tokenize(Counting(), prompts, PH, 2, torch.device("cpu"), cache)
    fresh = tokenize(tok, prompts, PH, 2, torch.device("cpu"))
    assert len(calls) == n  # the second batch is served from the cache
    for t in (again, first):
        assert torch.equal(t.ids, fresh.ids) and torch.equal(t.slot, fresh.slot)
    assert int((fresh.slot[3] >= 0).sum()) == 4  # two occurrences, two vectors each
    other = tokenize(tok, prompts, PH, 3, torch.device("cpu"), cache)  # another vector count
    assert int((other.slot[3] >= 0).sum()) == 6


def test_size_ids_are_built_once_per_conditioning(tiny_sdxl_host):
    host = tiny_sdxl_host
    meta = [ImageMeta((80, 72), (8, 4), (64, 64)), ImageMeta((64, 64))]
    with torch.no_grad():
        cond = host.encode_text(["a cat", "a dog"], meta=meta)
    ids = cond.time_ids((64, 64))
    assert cond.time_ids((64, 64)) is ids  # reused, not rebuilt
    assert ids.tolist() == [[80, 72, 8, 4, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert cond.time_ids((32, 48)).tolist()[1] == [64, 64, 0, 0, 32, 48]  # another size: its own target

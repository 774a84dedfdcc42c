"""What more than one host does the same way, whatever program loaded the model: checking a
placeholder's vectors against the text encoders, prompts and images, broadcasting a batch's noise
levels and context, recomputing an LDM ``UNetModel``'s blocks in
backward (ComfyUI and both WebUIs keep that layout: ``input_blocks``, ``middle_block``,
``output_blocks``), and putting a saved checkpoint's untrained tensors back as the source file had
them.  Torch and safetensors only."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint as ckpt


def check_vectors(encoders: Sequence, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vectors`` as ``{key: [n, width]}`` for every encoder (``seam.TextEncoderInfo``); a 1-D
    vector is one token.  Raises ``ValueError`` naming what is missing or mis-shaped."""
    out = {}
    for enc in encoders:
        v = vectors.get(enc.key)
        if v is None:
            raise ValueError(f"vectors for the {enc.key} text encoder are missing (have {sorted(vectors)})")
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[-1] != enc.width or v.shape[0] < 1:
            raise ValueError(f"vectors[{enc.key!r}] must be [n, {enc.width}], got {tuple(v.shape)}")
        out[enc.key] = v
    return out


def check_prompts(prompts, meta=None) -> list[str]:
    """``prompts`` as a non-empty list (one string is one prompt), with ``meta`` (one
    ``seam.ImageMeta`` per prompt) when given; ``ValueError`` otherwise."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode_text needs at least one prompt")
    if meta is not None and len(meta) != len(prompts):
        raise ValueError(f"{len(meta)} size entries for {len(prompts)} prompts")
    return prompts


def check_images(images: torch.Tensor, factor: int) -> None:
    """``images`` must be ``[B, H, W, 3+]`` with sides a multiple of the VAE's ``factor``."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be [B, H, W, 3], got {tuple(images.shape)}")
    if images.shape[1] % factor or images.shape[2] % factor:
        raise ValueError(f"image size {images.shape[2]}x{images.shape[1]} is not a multiple of {factor}")


def per_sample(x: torch.Tensor, sigma, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma [B] float32, context [B, T, C])`` for a batch ``x``: a scalar sigma and a one-row
    context are broadcast to every sample (the seam lets callers pass either)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
    sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
    if context.shape[0] != x.shape[0]:
        context = context.expand(x.shape[0], -1, -1)
    return sigma, context


def keep_source_tensors(written: Path, source: Path | None, metadata: dict | None = None) -> int:
    """Rewrite ``written`` - a checkpoint the host's program saved from its loaded, possibly cast,
    copy of ``source`` - so that every tensor still equal to the source's as cast is the source's
    own tensor, bits and dtype: a weight nobody trained goes back exactly as it was in the user's
    file (an fp32 file loaded in fp16 would otherwise come back rounded).  Trained tensors stay as
    written.  Only safetensors sources (read without unpickling) with the same key names.
    ``metadata``: the file's header to write instead of the program's (one rewrite for both).
    Returns how many tensors came from the source."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    usable = source is not None and Path(source).suffix == ".safetensors" and Path(source).is_file()
    if not usable and metadata is None:
        return 0
    out, taken = {}, 0
    with safe_open(str(written), "pt") as w, contextlib.ExitStack() as stack:
        s = stack.enter_context(safe_open(str(source), "pt")) if usable else None
        known = set(s.keys()) if s is not None else set()
        for k in w.keys():
            t = w.get_tensor(k)
            if k in known:
                src = s.get_tensor(k)
                if src.shape == t.shape and torch.equal(src.to(t.dtype), t):
                    t, taken = src, taken + 1
            out[k] = t
        header = w.metadata() if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    if taken or metadata is not None:
        tmp = Path(written).with_name(Path(written).name + ".src")
        save_file(out, str(tmp), metadata=header)
        os.replace(tmp, written)
    return taken


def unet_blocks(unet) -> list[torch.nn.Module]:
    blocks = list(getattr(unet, "input_blocks", [])) + [getattr(unet, "middle_block", None)] \
        + list(getattr(unet, "output_blocks", []))
    return [b for b in blocks if b is not None]


@contextlib.contextmanager
def checkpointed_forwards(blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """While active, each block recomputes its activations in backward (when grad is on); the
    blocks, which other users of the model share, get their own ``forward`` back in ``finally``."""
    for b in blocks:
        def fwd(*args, _f=b.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _f(*args, **kwargs)
            return ckpt.checkpoint(_f, *args, use_reentrant=False, **kwargs)

        b.forward = fwd
    try:
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


__all__ = ["check_vectors", "check_prompts", "check_images", "per_sample", "unet_blocks", "checkpointed_forwards"]

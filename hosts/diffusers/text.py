"""Prompts to conditioning on the diffusers host: CLIP tokens with slots for a placeholder's
vectors, the encoder run that splices them in, and the conditioning the denoiser consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...trainers.seam import ImageMeta
from .folder import MAX_TOKENS


@dataclass
class DiffusersCond:
    """What ``encode_text`` returns and ``denoise`` consumes (opaque to the trainers).

    ``context``: cross-attention states ``[B, 77, D]``; ``pooled``: SDXL's pooled text embedding
    ``[B, P]`` (None otherwise); ``meta``: SDXL size conditioning per prompt (None = use the image
    size), turned into ``time_ids`` only in ``denoise`` because that is where the size is known.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    meta: tuple[ImageMeta | None, ...] | None = None
    #: ``time_ids`` per image size, built on first use (a conditioning reused across steps, e.g.
    #: DreamBooth's frozen text, builds them once)
    time_ids_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return self.context.shape[0]

    def time_ids(self, pixel_hw: tuple[int, int]) -> torch.Tensor:
        """SDXL's six size numbers per prompt: original (h, w), crop (top, left), target (h, w)."""
        key = tuple(pixel_hw)
        if key not in self.time_ids_cache:
            self.time_ids_cache[key] = self._time_ids(key)
        return self.time_ids_cache[key]

    def _time_ids(self, pixel_hw: tuple[int, int]) -> torch.Tensor:
        metas = self.meta or (None,) * len(self)
        rows = []
        for m in metas:
            if m is None:
                rows.append((*pixel_hw, 0, 0, *pixel_hw))
            else:
                rows.append((*m.original_hw, *m.crop_top_left, *(m.target_hw or pixel_hw)))
        # fp32 whatever the compute dtype: bf16 cannot hold e.g. 1343 (the UNet embeds them in fp32)
        return torch.tensor(rows, dtype=torch.float32, device=self.context.device)


@dataclass
class Tokens:
    """One encoder's token ids for a batch, and where the placeholder's vectors go."""

    ids: torch.Tensor  # [B, 77] long
    slot: torch.Tensor  # [B, 77] long: row of the placeholder's vectors, -1 elsewhere


#: prompts whose token rows a host keeps (a run's templates x captions stay far below this)
ROW_CACHE_SIZE = 4096


def _row(tok, prompt: str, placeholder: str | None, n: int) -> tuple[list[int], list[int]]:
    row, slot = [], []
    for k, piece in enumerate(prompt.split(placeholder) if placeholder else [prompt]):
        if k:  # a placeholder occurrence between pieces; the id is overwritten by the hook
            row += [0] * n
            slot += list(range(n))
        piece_ids = tok(piece, add_special_tokens=False).input_ids if piece else []
        row += piece_ids
        slot += [-1] * len(piece_ids)
    row, slot = row[: MAX_TOKENS - 2], slot[: MAX_TOKENS - 2]
    pad = MAX_TOKENS - 2 - len(row)
    return [tok.bos_token_id, *row, tok.eos_token_id] + [tok.pad_token_id] * pad, [-1, *slot, -1] + [-1] * pad


def tokenize(tok, prompts: list[str], placeholder: str | None, n: int, device: torch.device,
             cache: dict | None = None) -> Tokens:
    """BOS + text with ``n`` slots per placeholder occurrence + EOS, cut to 77, padded with the
    tokenizer's own pad token (SD1: EOS 49407; OpenCLIP encoders: "!" = 0).  ``cache`` (the
    caller's, one per tokenizer) keeps each prompt's rows: a training run tokenizes a prompt once."""
    cache = {} if cache is None else cache
    rows = []
    for prompt in prompts:
        key = (prompt, placeholder, n)
        if key not in cache:
            if len(cache) >= ROW_CACHE_SIZE:
                cache.clear()
            cache[key] = _row(tok, prompt, placeholder, n)
        rows.append(cache[key])
    return Tokens(ids=torch.tensor([r[0] for r in rows], device=device),
                  slot=torch.tensor([r[1] for r in rows], device=device))


def run_encoder(te, tokens: Tokens, vec: torch.Tensor | None, hidden_states: bool):
    """Run one text encoder; a forward hook on its token-embedding table swaps the placeholder
    slots for ``vec`` (works on transformers 4 and 5, whatever the module nesting).  The swap is
    a ``torch.where``: no in-place write, so autograd reaches ``vec`` (cast at the splice:
    trainable vectors stay fp32, the encoder computes in its own dtype)."""
    handle = None
    if vec is not None and bool((tokens.slot >= 0).any()):
        mask = (tokens.slot >= 0).unsqueeze(-1)
        rows = tokens.slot.clamp(min=0)

        def splice(_module, _inputs, out):
            return torch.where(mask, vec.to(out.device, out.dtype)[rows], out)

        handle = te.get_input_embeddings().register_forward_hook(splice)
    try:
        return te(input_ids=tokens.ids, output_hidden_states=hidden_states)
    finally:
        if handle is not None:
            handle.remove()


__all__ = ["DiffusersCond", "Tokens", "tokenize", "run_encoder"]

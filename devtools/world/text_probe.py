"""Attribute probes on the text encoder: an auxiliary loss that keeps every stated word readable.

Stable Diffusion's text encoder comes pretrained (CLIP) and frozen, so every word of a prompt
already means something when the denoiser starts learning.  Ours is trained from scratch together
with the UNet, and that joint training has a trap: a word the UNet does not use yet gets no
gradient that keeps it apart, so the encoder lets it fade, and a faded word gives the UNet nothing
to learn from.  Position words fell into it (TRAINING.md, "Position": "top left" and
"bottom right" ended 0.07 apart in the encoder's output, a colour word 1.6).

One linear head per attribute reads, from the encoder's states, the value the caption states
(the end-of-text state and the mean over the caption's tokens — what a cross-attention layer
can draw on).  Their cross-entropy, added to the denoising loss, stands in for CLIP's
pretraining: the encoder must keep each stated attribute distinguishable.
"""
from __future__ import annotations

import torch
from torch import nn

from likeness.world.render import ATTRIBUTES, parse_caption


class AttributeProbe(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(2 * hidden_size, len(v)) for k, v in ATTRIBUTES.items()})

    @staticmethod
    def features(states: torch.Tensor, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
        """(B, 2H): the end-of-text state and the mean of the states up to it (padding excluded)."""
        eos = (input_ids == eos_token_id).int().argmax(-1)          # the first end-of-text token
        upto = torch.arange(input_ids.shape[1], device=input_ids.device)[None] <= eos[:, None]
        mask = upto.to(states.dtype)[..., None]
        mean = (states * mask).sum(1) / mask.sum(1)
        return torch.cat([states[torch.arange(len(states)), eos], mean], -1)

    def loss(self, states: torch.Tensor, input_ids: torch.Tensor, captions: list[str],
             eos_token_id: int) -> torch.Tensor:
        """Mean cross-entropy over every attribute each caption states (empty captions — the
        unconditional ones — state none).  Zero, with a graph, when no caption states anything."""
        feats = self.features(states, input_ids, eos_token_id)
        rows: dict[str, list[int]] = {k: [] for k in ATTRIBUTES}
        labels: dict[str, list[int]] = {k: [] for k in ATTRIBUTES}
        for i, c in enumerate(captions):
            if not c:
                continue
            for k, v in parse_caption(c).items():
                rows[k].append(i)
                labels[k].append(ATTRIBUTES[k].index(v))
        total, n = feats.sum() * 0.0, 0
        for k, r in rows.items():
            if r:
                logits = self.heads[k](feats[r])
                target = torch.tensor(labels[k], device=feats.device)
                total = total + nn.functional.cross_entropy(logits, target, reduction="sum")
                n += len(r)
        return total / max(n, 1)

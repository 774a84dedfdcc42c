"""The starting point of a new word's vectors, shared by Textual Inversion and pivotal tuning."""
from __future__ import annotations

import torch

from .seam import Host


def initial_vectors(host: Host, init_text: str, n: int) -> dict[str, torch.Tensor]:
    """Vector i copies the embedding of init token i*k//n (A1111's rule), so a phrase of k tokens
    spreads over n vectors and a single word is repeated."""
    embs = host.token_embeddings(init_text)
    out = {}
    for key, e in embs.items():
        k = e.shape[0]
        if k == 0:
            raise ValueError(f"init text {init_text!r} has no tokens; use a word such as 'object' or 'painting'")
        out[key] = torch.stack([e[i * k // n] for i in range(n)]).float().clone()
    return out


__all__ = ["initial_vectors"]

"""The papers' numbers for "did it learn the subject, and does it still follow the prompt":
CLIP-I and DINO (subject fidelity, DreamBooth), CLIP-T (prompt fidelity, DreamBooth), diversity,
and one combined score.

No host code: image encoders are ``seam.ImageEncoder`` (ComfyUI's CLIP_VISION, a transformers
folder, the world classifier), text encoders anything with ``embed_text``.  Every number is a
cosine on raw embeddings, so the functions below also run on fixed embeddings in the tests.

* **CLIP-I** / **DINO**: mean cosine similarity between every generated image and every reference
  (CLIP vision resp. DINOv2 embeddings).  Higher = more like the subject; DINO is the sharper one
  for identity because it was not trained to ignore what a caption would not mention.
* **CLIP-T**: mean cosine similarity between each generated image and its prompt, the new word
  replaced by the class noun (``with_class_noun``: "a photo of sks dog on the beach" is scored as
  "a photo of dog on the beach", since CLIP does not know "sks").  A CLIP text embedding and a CLIP
  image embedding are comparable only when both towers come from the same CLIP model, so each
  encoder carries a ``tower`` tag (e.g. "openclip-vit-bigg-14") and mismatched or unknown towers
  are refused with an error; without a text tower CLIP-T is reported unavailable with the reason.
* **CLIP-T margin** (prompt specificity): per image, its CLIP-T to its own prompt minus its mean
  CLIP-T to the other evaluation prompts (needs two different prompts).  Raw CLIP-T has a large
  part that does not depend on the prompt at all (an unrelated image and caption of a CLIP still
  have a clearly positive cosine, images of one model share their look), so a model that draws the training photo whatever
  the prompt keeps most of its CLIP-T; the margin removes that part (it is the contrast CLIP is
  trained on: the right caption against the others) and falls to 0 for such a model.
* **diversity**: mean pairwise cosine distance (1 - cosine) between the generated images' embeddings
  (DINO where given, else CLIP).  An overfitted model draws the training photo whatever the prompt,
  and diversity collapses.
* **combined** = sqrt(subject x prompt), the geometric mean of
  subject = geometric mean of the available CLIP-I and DINO, and
  prompt = the CLIP-T margin (two or more different prompts), else CLIP-T (one prompt), else -
  where CLIP-T is unavailable - diversity as its stand-in (varied prompts should give varied
  images).  Each factor is clamped at 0.  A geometric mean weighs a relative
  change of either factor the same, so the factors' different ranges (CLIP-T ~0.3, CLIP-I ~0.8)
  do not decide the ranking, and a model that wins one by losing the other does not score well.
  ``Combined.formula`` says which prompt factor was used; only compare scores with the same formula.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from .seam import ImageEncoder


class TextEncoder(Protocol):
    """The text tower of a CLIP model: ``tower`` names the CLIP model it belongs to (the same tag its
    image tower carries), ``embed_text`` gives one projected embedding ``[B, D]`` per prompt."""

    tower: str

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class Value:
    """A metric, or why it could not be computed (``value`` None, ``reason`` says why)."""

    value: float | None
    reason: str = ""

    def text(self, digits: int = 4) -> str:
        return "n/a" if self.value is None else f"{self.value:.{digits}f}"


@dataclass(frozen=True)
class Combined:
    value: float | None
    formula: str
    reason: str = ""


def tower_of(encoder) -> str | None:
    """The CLIP model an encoder belongs to, or None when it does not say."""
    tag = getattr(encoder, "tower", None)
    return str(tag) if tag else None


def check_same_tower(image_encoder, text_encoder) -> None:
    """Refuse a text tower that is not provably the image tower's partner: their embedding spaces
    are unrelated, and the cosine would be a number that means nothing."""
    img, txt = tower_of(image_encoder), tower_of(text_encoder)
    if img is None or txt is None:
        raise ValueError("CLIP-T needs the text and image towers of the same CLIP model, but "
                         f"{'the image encoder' if img is None else 'the text encoder'} does not say which CLIP "
                         "model it is; refusing to compare unrelated embedding spaces.")
    if img != txt:
        raise ValueError(f"CLIP-T needs the text and image towers of the same CLIP model, but the image encoder "
                         f"is {img!r} and the text encoder is {txt!r}. Load the text encoder of {img!r} (or the "
                         "vision model matching the text encoder).")


def with_class_noun(prompt: str, word: str, class_noun: str) -> str:
    """``prompt`` with the new word replaced by the class noun; where the class noun already follows
    the word ("sks dog") the word is just dropped.  Whole words only, case-insensitive."""
    word, noun = (word or "").strip(), (class_noun or "").strip()
    if not word:
        return prompt
    w = rf"(?<!\w){re.escape(word)}(?!\w)"
    if noun:
        prompt = re.sub(w + rf"\s+(?={re.escape(noun)}(?!\w))", "", prompt, flags=re.IGNORECASE)
    out = re.sub(w, lambda _m: noun, prompt, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", out).strip()


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A, D]`` x ``[B, D]`` -> ``[A, B]`` cosine similarities (fp32)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embeddings of different widths ({a.shape[-1]} vs {b.shape[-1]}) come from different "
                         "encoders and cannot be compared")
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def subject_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """CLIP-I / DINO per generated image: its mean cosine to the references (``[G]``); the metric
    is the mean of these, i.e. the mean over all generated-reference pairs."""
    return cosine_matrix(generated, references).mean(1)


def text_similarity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """CLIP-T per image: the cosine of image i to text i (``[G]``)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} prompts")
    return (F.normalize(images.float(), dim=-1) * F.normalize(texts.float(), dim=-1)).sum(-1)


def diversity(generated: torch.Tensor) -> Value:
    """Mean pairwise cosine distance (1 - cosine) over the distinct pairs of generated images."""
    n = len(generated)
    if n < 2:
        return Value(None, "diversity needs at least 2 generated images")
    sim = cosine_matrix(generated, generated)
    i, j = torch.triu_indices(n, n, offset=1)
    return Value(float((1.0 - sim[i, j]).mean()))


def clip_t_margin(similarity: torch.Tensor, prompts: Sequence[str]) -> Value:
    """The CLIP-T margin from ``similarity`` ``[G, P]`` (image i's cosine to each distinct prompt)
    and ``prompts`` (image i's own prompt, one of the distinct ones, in their first-seen order)."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        return Value(None, "the CLIP-T margin needs at least two different prompts")
    own = torch.tensor([distinct.index(p) for p in prompts])
    mine = similarity[torch.arange(len(own)), own]
    others = (similarity.sum(1) - mine) / (len(distinct) - 1)
    return Value(float((mine - others).mean()))


def combined_score(clip_i: Value, dino: Value, clip_t: Value, div: Value, margin: Value | None = None) -> Combined:
    """sqrt(subject x prompt): see the module docstring for the factors and why."""
    subject = [v.value for v in (clip_i, dino) if v.value is not None]
    names = [n for n, v in (("CLIP-I", clip_i), ("DINO", dino)) if v.value is not None]
    prompt, pname = (clip_t.value, "CLIP-T") if clip_t.value is not None else (div.value, "diversity")
    if margin is not None and margin.value is not None:
        prompt, pname = margin.value, "CLIP-T margin"
    formula = f"sqrt(subject x {pname}), subject = geomean({', '.join(names) or 'none'})"
    if not subject:
        return Combined(None, formula, "no subject metric (CLIP-I or DINO)")
    if prompt is None:
        return Combined(None, formula, f"no prompt metric: CLIP-T: {clip_t.reason}; diversity: {div.reason}")
    s = math.prod(max(0.0, v) for v in subject) ** (1.0 / len(subject))
    return Combined(math.sqrt(s * max(0.0, prompt)), formula)


@dataclass
class Report:
    """Per generated image (``per_image[metric]``, None where unavailable) and overall."""

    clip_i: Value
    dino: Value
    clip_t: Value
    diversity: Value
    combined: Combined
    per_image: dict[str, list[float] | None] = field(default_factory=dict)
    prompts: list[str] | None = None
    clip_t_margin: Value = Value(None, "no CLIP-T")

    def rows(self) -> list[list[str]]:
        """The table: a header, one row per image, the overall row."""
        names = ["CLIP-I", "DINO", "CLIP-T"]
        rows = [["image", *names, "diversity", "combined"]]
        count = max((len(v) for v in self.per_image.values() if v), default=0)
        for k in range(count):
            cells = [f"{self.per_image[n][k]:.4f}" if self.per_image.get(n) else "n/a" for n in names]
            rows.append([str(k + 1), *cells, "", ""])
        total = "n/a" if self.combined.value is None else f"{self.combined.value:.4f}"
        rows.append(["all", self.clip_i.text(), self.dino.text(), self.clip_t.text(), self.diversity.text(), total])
        return rows

    def notes(self) -> list[str]:
        out = [f"combined = {self.combined.formula}"]
        if self.clip_t_margin.value is not None:
            out.append(f"CLIP-T margin (own prompt minus the others): {self.clip_t_margin.text()}")
        out += [f"{n}: {v.reason}" for n, v in (("CLIP-I", self.clip_i), ("DINO", self.dino),
                                               ("CLIP-T", self.clip_t), ("diversity", self.diversity),
                                               ("combined", self.combined)) if v.reason]
        return out

    def table(self) -> str:
        rows = self.rows()
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines + [""] + self.notes())


def embed_all(encoder: ImageEncoder, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Embeddings of ``images`` ``[B, H, W, 3]`` in batches, without gradients (``[B, D]`` fp32)."""
    with torch.no_grad():
        return torch.cat([encoder.embed(images[i:i + batch]).float().cpu() for i in range(0, len(images), batch)])


def prompt_list(prompts: Sequence[str] | None, count: int) -> list[str] | None:
    """One prompt per image, or one for all; None when there are none."""
    ps = [p.strip() for p in (prompts or []) if p and p.strip()]
    if not ps:
        return None
    if len(ps) == 1:
        return ps * count
    if len(ps) != count:
        raise ValueError(f"{len(ps)} prompts for {count} generated images: give one prompt per image, or one for all.")
    return ps


def _clip_t(clip: ImageEncoder, text: TextEncoder | None, gen: torch.Tensor, prompts, word, class_noun):
    """(CLIP-T, its CLIP-T margin, per image, the prompts as scored)."""
    if text is None:
        why = "no text tower of the CLIP vision model is at hand"
        return Value(None, why), Value(None, why), None, None
    check_same_tower(clip, text)  # before any work on the text side
    if prompts is None:
        return Value(None, "no prompts given"), Value(None, "no prompts given"), None, None
    scored = [with_class_noun(p, word, class_noun) for p in prompts]
    distinct = list(dict.fromkeys(scored))
    with torch.no_grad():
        sim = cosine_matrix(gen, text.embed_text(distinct).float().cpu())
    per = sim[torch.arange(len(scored)), torch.tensor([distinct.index(p) for p in scored])]
    return Value(float(per.mean())), clip_t_margin(sim, scored), per.tolist(), scored


def evaluate(references: torch.Tensor | None, generated: torch.Tensor, clip: ImageEncoder,
             dino: ImageEncoder | None = None, text: TextEncoder | None = None, prompts: Sequence[str] | None = None,
             word: str = "", class_noun: str = "", *, refs: tuple | None = None) -> Report:
    """Every metric of ``generated`` (IMAGE ``[G, H, W, 3]``) against ``references``; the checks
    (prompt count, tower match) run before any image is embedded.  ``refs`` = (CLIP, DINO or None)
    embeddings of the references computed once (an evaluation every N steps of a training run)
    instead of ``references``."""
    have_refs = refs is not None or (references is not None and len(references) > 0)
    if not have_refs or generated is None or len(generated) == 0:
        raise ValueError("Evaluation needs at least one reference image and one generated image.")
    prompts = prompt_list(prompts, len(generated))
    if text is not None:
        check_same_tower(clip, text)
    if refs is None:
        refs = (embed_all(clip, references), embed_all(dino, references) if dino is not None else None)
    gen_c, (ref_c, ref_d) = embed_all(clip, generated), refs
    per_i = subject_similarity(gen_c, ref_c)
    per_d, dino_v, div_emb = None, Value(None, "no DINO model given"), gen_c
    if dino is not None:
        gen_d = embed_all(dino, generated)
        per_d = subject_similarity(gen_d, ref_d)
        dino_v, div_emb = Value(float(per_d.mean())), gen_d
    clip_t, margin, per_t, scored = _clip_t(clip, text, gen_c, prompts, word, class_noun)
    clip_i, div = Value(float(per_i.mean())), diversity(div_emb)
    return Report(clip_i=clip_i, dino=dino_v, clip_t=clip_t, diversity=div,
                  combined=combined_score(clip_i, dino_v, clip_t, div, margin),
                  per_image={"CLIP-I": per_i.tolist(), "DINO": per_d.tolist() if per_d is not None else None,
                             "CLIP-T": per_t},
                  prompts=scored, clip_t_margin=margin)


__all__ = ["TextEncoder", "Value", "Combined", "Report", "tower_of", "check_same_tower", "with_class_noun",
           "cosine_matrix", "subject_similarity", "text_similarity", "diversity", "clip_t_margin", "combined_score", "embed_all",
           "prompt_list", "evaluate"]

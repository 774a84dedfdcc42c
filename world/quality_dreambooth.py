"""DreamBooth rows of the quality benchmark (``world/quality.py``): LoRA, full fine-tune and pivotal
tuning learn a new concept of the shapes world from the same four references as Textual Inversion.

Each method trains on the references' captions with the concept's word replaced by the learned
word (``sks-moon``), exactly the data TI gets; the world has no separate "class" images, so these
rows run without prior preservation (its effect is measured in tests/test_dreambooth_recovery.py).
Sampling runs with the result patched into the host (``host.parameter_patches``): the same
noise, prompts and sampler as every other row.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from .quality import CONCEPTS, Learned, References, register, sample_prompts


def _train(host, refs: References, concept: str, out_dir: Path, opts: dict, mode: str, **kw):
    from ..trainers import data as D
    from ..trainers.dreambooth import DreamBoothConfig, train_dreambooth

    word = CONCEPTS[concept]["word"]
    data = D.images_from_batch(refs.images_model, refs.captions(word))
    cfg = DreamBoothConfig(
        name=f"{word}-{mode}", output_dir=out_dir, instance_prompt=refs.captions(word)[0], mode=mode,
        prompts="captions", batch_size=opts.get("db_batch", 4), seed=opts.get("seed", 0), flip=False,
        save_every=0, preview_every=0, overwrite=True, embedding_dir=out_dir, **kw)
    return word, cfg, train_dreambooth(host, data, cfg)


def _sampler(host, patches: dict, steps: int, word: str | None = None, vectors: dict | None = None):
    def sample(prompts, seed):
        ctx = host.parameter_patches(patches) if patches else contextlib.nullcontext()
        with ctx:
            return sample_prompts(host, prompts, seed, placeholder=word if vectors else None, vectors=vectors,
                                  steps=steps)
    return sample


def _lora_patches(layers: dict) -> dict:
    """Patches computing ``W + (alpha/r) up @ down`` for result layers ``{module: (down, up, alpha)}``."""
    from ..trainers.formats.kohya_lora import weight_delta

    out = {}
    for name, (down, up, alpha) in layers.items():
        delta = weight_delta(down, up, alpha)
        out[f"{name}.weight"] = lambda w, _d=delta: w + _d.to(w.device, w.dtype)
    return out


@register("dreambooth-lora", "DreamBooth LoRA rank 8 on the transformer layers, captions, no prior")
def lora_method(host, refs: References, concept: str, out_dir: Path, opts: dict) -> Learned:
    word, cfg, res = _train(host, refs, concept, out_dir, opts, "lora", rank=8, targets="transformer",
                            steps=opts.get("db_steps", 300), learning_rate=opts.get("db_lr", 1e-3))
    return Learned(word=word, seconds=res.seconds, steps=res.steps_done, files=res.files,
                   note=f"rank 8, lr {cfg.learning_rate}, batch {cfg.batch_size}",
                   sample=_sampler(host, _lora_patches(res.lora_layers), opts.get("sample_steps", 25)))


@register("dreambooth-full", "full DreamBooth of the UNet (Adafactor), captions, no prior")
def full_method(host, refs: References, concept: str, out_dir: Path, opts: dict) -> Learned:
    word, cfg, res = _train(host, refs, concept, out_dir, opts, "full", optimizer="adafactor",
                            steps=opts.get("db_steps", 300), learning_rate=opts.get("full_lr", 1e-4))
    patches = {n: (lambda w, _d=d: w + _d.to(w.device, w.dtype)) for n, d in res.deltas.items()}
    return Learned(word=word, seconds=res.seconds, steps=res.steps_done, files=res.files,
                   note=f"adafactor, lr {cfg.learning_rate}, batch {cfg.batch_size}",
                   sample=_sampler(host, patches, opts.get("sample_steps", 25)))


@register("pivotal", "pivotal tuning: 1 vector (init word) for the first half, LoRA rank 8 throughout")
def pivotal_method(host, refs: References, concept: str, out_dir: Path, opts: dict) -> Learned:
    init = CONCEPTS[concept]["init"]
    word, cfg, res = _train(host, refs, concept, out_dir, opts, "pivotal", token=CONCEPTS[concept]["word"],
                            init_text=init, num_vectors=1, ti_learning_rate=opts.get("ti_lr", 2e-2), rank=8,
                            targets="transformer", steps=opts.get("db_steps", 300),
                            learning_rate=opts.get("db_lr", 1e-3))
    return Learned(word=word, seconds=res.seconds, steps=res.steps_done, files=res.files,
                   note=f"init '{init}', rank 8, lr {cfg.learning_rate} / TI {cfg.ti_learning_rate}",
                   sample=_sampler(host, _lora_patches(res.lora_layers), opts.get("sample_steps", 25), word,
                                   res.vectors))

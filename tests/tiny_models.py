"""Tiny diffusers models shaped like SD1, SD2 and SDXL, for the tests (a helper: no tests here).

Two kinds, for two kinds of test:

* **Random weights** (``build_tiny`` / ``tiny_host``; fixtures ``tiny_sd1_host``, ``tiny_sd2_host``,
  ``tiny_sdxl_host``): for *contract* tests - shapes, dtypes, gradients, frozen weights, files.
  Their output barely depends on the prompt, so they cannot show that anything was *learned*.
* **Briefly trained** (``pretrain_tiny_sd1``; fixture ``pretrained_tiny_sd1``): an SD1-shaped model
  taught a few synthetic classes named by real words ("a photo of a zebra").  Recovery tests (TI
  finds a known embedding, LoRA a known delta, SeedSelect a known seed) must use this one:
  measured on a random tiny model, its loss does not even prefer the true embedding.

Every model uses the real shipped CLIP tokenizer (49408 tokens), so placeholder checks and token
ids are those of the real models; the token tables are then 49408 x width, which is still small.
Shapes: SD1 text width 32 (OpenAI-CLIP-like quick_gelu), SD2 48 (OpenCLIP-like gelu, pads with "!",
v-prediction), SDXL 32 + 64 (the second a ``CLIPTextModelWithProjection``; cross-attention 96,
``text_time`` size conditioning).  The VAE keeps the real 8x downscale (four levels), so 64x64
images give 8x8 latents.  Nothing is written to disk except where a test passes a ``tmp_path``.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from likeness.hosts.diffusers import DiffusersHost, clip_tokenizer
from likeness.trainers.families import FAMILIES
from likeness.hosts.ldm_export import to_ldm_state_dict  # noqa: F401  (tests import it from here)

IMAGE_SIZE = 64  # pixels; latents are 8x8
SDXL_TIME_DIM = 8  # addition_time_embed_dim: 6 size numbers x 8 = 48 inputs next to the pooled 64


# ----------------------------------------------------------------------------------------------
# random-weight builders


def tiny_text_encoder(width: int, act: str, projection: bool = False, layers: int = 2):
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                         hidden_act=act, projection_dim=width, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_unet(family: str) -> UNet2DConditionModel:
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), attention_head_dim=2, norm_num_groups=8)
    if family == "sd1":
        return UNet2DConditionModel(**common, cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if family == "sd2":
        return UNet2DConditionModel(**common, cross_attention_dim=48, use_linear_projection=True,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    # SDXL: attention only deeper down, linear projections, pooled text + six size numbers as extra input
    return UNet2DConditionModel(**common, cross_attention_dim=96, use_linear_projection=True,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
                                projection_class_embeddings_input_dim=64 + 6 * SDXL_TIME_DIM)


def tiny_vae(scaling_factor: float = 1.0) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=IMAGE_SIZE, scaling_factor=scaling_factor)


def tiny_scheduler(prediction: str = "epsilon") -> DDPMScheduler:
    # SD's training schedule
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type=prediction, clip_sample=False)


def build_tiny(family: str, seed: int = 0) -> dict:
    """Keyword arguments for ``DiffusersHost.from_components``: random weights, seeded, fp32.
    Torch's global RNG is left as it was."""
    if family not in FAMILIES:
        raise ValueError(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd1":
            tes, toks = [tiny_text_encoder(32, "quick_gelu")], [clip_tokenizer("<|endoftext|>")]
        elif family == "sd2":
            tes, toks = [tiny_text_encoder(48, "gelu")], [clip_tokenizer("!")]
        else:
            tes = [tiny_text_encoder(32, "quick_gelu"), tiny_text_encoder(64, "gelu", projection=True)]
            toks = [clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")]
        return dict(unet=tiny_unet(family), vae=tiny_vae(), tokenizers=toks, text_encoders=tes,
                    scheduler=tiny_scheduler("v_prediction" if family == "sd2" else "epsilon"),
                    family=family, name=f"tiny-{family}")


def tiny_host(family: str, seed: int = 0, **kw) -> DiffusersHost:
    return DiffusersHost.from_components(**build_tiny(family, seed), **kw)


def host_parts(host: DiffusersHost) -> dict:
    """The modules of a tiny host, in ``build_tiny``'s layout: to save it (``save_diffusers_folder``)
    or export it as one checkpoint file (``to_ldm_state_dict``), e.g. the pretrained model."""
    kind = "v_prediction" if host.prediction == "v" else "epsilon"
    return dict(unet=host.unet, vae=host.vae, tokenizers=host.tokenizers,
                text_encoders=host.text_encoder_modules, family=host.family, name=host.info.name,
                scheduler=DDPMScheduler.from_config(tiny_scheduler().config, prediction_type=kind))


# ----------------------------------------------------------------------------------------------
# files: a diffusers folder, and the single-file (LDM/SGM) layout


def save_diffusers_folder(parts: dict, folder: Path) -> Path:
    """Write ``parts`` (``build_tiny``'s layout) as a diffusers folder with ``model_index.json``."""
    folder = Path(folder)
    parts["unet"].save_pretrained(folder / "unet")
    parts["vae"].save_pretrained(folder / "vae")
    parts["scheduler"].save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}
    for i, (te, tok) in enumerate(zip(parts["text_encoders"], parts["tokenizers"])):
        suffix = "" if i == 0 else f"_{i + 1}"
        te.save_pretrained(folder / f"text_encoder{suffix}")
        tok.save_pretrained(folder / f"tokenizer{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", type(te).__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    if len(parts["text_encoders"]) == 2:
        index["_class_name"] = "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


# ----------------------------------------------------------------------------------------------
# the briefly trained SD1 model


CLASS_WORDS = ("apple", "zebra", "violin", "tulip")


@dataclass
class PretrainedTiny:
    """An SD1-shaped tiny host that learned ``len(words)`` synthetic classes.

    Class ``word`` is a family of 64x64 images: a fixed smooth colour pattern (``prototypes[k]``)
    plus a little pixel noise.  The model was trained on ``prompt(word)`` = "a photo of a <word>"
    (each word a single CLIP token), so ``host.token_embeddings(word)`` is the embedding a textual
    inversion of that class's images should recover.  ``images`` / ``latents`` draw fresh samples
    from the same distribution the model was trained on (latents = ``host.encode_images(images)``).
    """

    host: DiffusersHost
    words: tuple[str, ...]
    prototypes: torch.Tensor  # [K, 64, 64, 3] in [0, 1]
    pixel_noise: float
    seconds: float  # how long pretraining took
    losses: list[float] = field(default_factory=list)  # training loss, averaged per 100 steps

    def prompt(self, word: str) -> str:
        return f"a photo of a {word}"

    def images(self, word: str, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` images of class ``word``, [n, 64, 64, 3] in [0, 1] (ComfyUI IMAGE layout)."""
        g = torch.Generator().manual_seed(seed)
        proto = self.prototypes[self.words.index(word)]
        return (proto + self.pixel_noise * torch.randn(n, *proto.shape, generator=g)).clamp(0, 1)

    def latents(self, word: str, n: int, seed: int = 0) -> torch.Tensor:
        """The model-space latents of ``images(word, n, seed)``, [n, 4, 8, 8]."""
        return self.host.encode_images(self.images(word, n, seed))


def _prototypes(k: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random colour fields: 4x4 colours upsampled to 64x64."""
    small = torch.rand(k, 3, 4, 4, generator=g)
    big = torch.nn.functional.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                          align_corners=False)
    return big.permute(0, 2, 3, 1).contiguous()


def _single_token(tok, word: str) -> int:
    ids = tok(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"class word {word!r} is not a single CLIP token ({ids})")
    return ids[0]


def _trainable_word_rows(table: torch.nn.Embedding, ids: torch.Tensor, words, tok):
    """The class words' rows of the token table as one small trainable tensor, spliced in by a
    forward hook: Adam over the whole 49408-row table would cost more than the rest of a step, and
    every other row stays exactly as built."""
    table.requires_grad_(False)
    word_ids = torch.tensor([_single_token(tok, w) for w in words])
    rows = torch.nn.Parameter(table.weight[word_ids].clone())
    which = (ids[..., None] == word_ids).float()  # [P, 77, K]: which class word sits where

    def splice(_module, _inputs, out):
        hit = which.sum(-1, keepdim=True) > 0
        return torch.where(hit, which @ rows, out)

    return rows, table.register_forward_hook(splice)


@torch.no_grad()
def _calibrate_vae(vae: AutoencoderKL, imgs: torch.Tensor, k: int) -> torch.Tensor:
    """Make a random VAE's latents look like a trained one's to the denoiser: centred per channel and
    scaled so the classes sit about one unit apart.  A random encoder maps every image to much the
    same latent (mostly a per-channel offset), which would leave the class signal a small ripple;
    the offset is moved into the biases around the latent (``quant_conv`` out, ``post_quant_conv``
    in), so decode(encode(x)) is unchanged.  Returns the model-space latents of ``imgs``."""
    z = vae.encode(imgs.permute(0, 3, 1, 2).contiguous() * 2 - 1).latent_dist.mean
    offset = z.mean(dim=(0, 2, 3))
    vae.quant_conv.bias[: len(offset)] -= offset
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ offset
    z = z - offset.view(1, -1, 1, 1)
    class_means = z.reshape(k, -1, *z.shape[1:]).mean(1)
    vae.register_to_config(scaling_factor=float(1.0 / (class_means - class_means.mean(0)).std()))
    return z * vae.config.scaling_factor


@contextlib.contextmanager
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a shared machine the threads'
    spin-waiting costs more than the work (measured here: 10 min instead of 1.5 min of CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pretrain_text(te, rows: torch.nn.Parameter, ids: torch.Tensor, steps: int, lr: float) -> None:
    """Stage 1, CLIP-like: teach the text encoder that every position from the class word on (the
    word, EOS and the padding after it) tells which class the prompt names, as a trained CLIP's
    do.  A random encoder leaves the word's trace in 1 of 77 positions, and a UNet then needs
    thousands of steps to find it; with this stage (a linear probe, 4 prompts, ~2 s) it needs a few
    hundred."""
    first = int((ids[0] == ids[0, -1]).nonzero()[0]) - 1  # the class word: just before EOS
    head = torch.nn.Linear(te.config.hidden_size, len(ids))
    params = [p for p in te.parameters() if p.requires_grad] + [rows] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    labels = torch.arange(len(ids))[:, None].expand(-1, ids.shape[1] - first).reshape(-1)
    for _ in range(steps):
        h = te(input_ids=ids).last_hidden_state[:, first:]
        loss = torch.nn.functional.cross_entropy(head(h).reshape(len(labels), -1), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def pretrain_tiny_sd1(seed: int = 0, steps: int = 250, batch: int = 24, lr: float = 3e-3,
                      text_steps: int = 200, pool: int = 32, pixel_noise: float = 0.02,
                      words: tuple[str, ...] = CLASS_WORDS) -> PretrainedTiny:
    """Train the random SD1-shaped model on the classes, then freeze it in a host (~30-60 s on one
    free core): ``text_steps`` of text-encoder pretraining (``_pretrain_text``), then ``steps`` of
    the eps-MSE diffusers training uses, on UNet and text encoder together.

    Of the token-embedding table only the class words' rows are trained (``host.token_embeddings``
    returns them afterwards); every other row stays as built.  The VAE stays random but is
    calibrated (``_calibrate_vae``: centred, and scaled as SD's 0.18215 was chosen, from latent
    statistics) so the classes are as far apart, relative to the noise schedule, as SD's latents of
    distinct subjects are.
    """
    parts = build_tiny("sd1", seed)
    unet, vae, te, tok, sched = (parts["unet"], parts["vae"], parts["text_encoders"][0],
                                 parts["tokenizers"][0], parts["scheduler"])
    g = torch.Generator().manual_seed(seed + 1)
    protos = _prototypes(len(words), g)
    # a fixed pool of training images per class, encoded once (posterior mean, like the host)
    noise = pixel_noise * torch.randn(len(words) * pool, *protos.shape[1:], generator=g)
    imgs = (protos.repeat_interleave(pool, 0) + noise).clamp(0, 1)
    z = _calibrate_vae(vae, imgs, len(words))
    labels = torch.arange(len(words)).repeat_interleave(pool)
    ids = tok([f"a photo of a {w}" for w in words], padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    table = te.get_input_embeddings()
    rows, hook = _trainable_word_rows(table, ids, words, tok)
    t0, losses, run = time.perf_counter(), [], 0.0
    unet.train(), te.train()
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(seed + 2)
        _pretrain_text(te, rows, ids, text_steps, lr=1e-2)
        params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad] + [rows]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for step in range(steps):
            pick = torch.randint(0, len(labels), (batch,))
            x0, cls = z[pick], labels[pick]
            context = te(input_ids=ids).last_hidden_state[cls]  # 4 prompts, then indexed per sample
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
            eps = torch.randn_like(x0)
            pred = unet(sched.add_noise(x0, eps, t), t, encoder_hidden_states=context).sample
            loss = torch.nn.functional.mse_loss(pred, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run += loss.item()
            if (step + 1) % 100 == 0:
                losses.append(run / 100)
                run = 0.0
    seconds = time.perf_counter() - t0
    hook.remove()
    with torch.no_grad():
        table.weight[[_single_token(tok, w) for w in words]] = rows.detach()
    host = DiffusersHost.from_components(**parts)
    host._info.name = "tiny-sd1-pretrained"
    return PretrainedTiny(host=host, words=tuple(words), prototypes=protos, pixel_noise=pixel_noise,
                          seconds=seconds, losses=losses)

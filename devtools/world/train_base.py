"""Train the shapes-world base model (reproducible; every number of the recipe is printed).

    python -m devtools.world.train_base --stage vae  --out /tmp/world_run      # stage 1
    python -m devtools.world.train_base --stage unet --out /tmp/world_run      # stage 2
    python -m devtools.world.train_base --stage position --out /tmp/world_run  # stage 2c
    python -m devtools.world.train_base --stage save --out /tmp/world_run --dest world/base_model
    python -m devtools.world.train_base --stage all  --out /tmp/world_run --full   # the long recipe

Stage 1 trains the AutoencoderKL on renders of every concept (split "all": like SD's autoencoder,
it is concept-agnostic, so methods that cannot touch the VAE can still learn the new concepts).
Stage 2 caches the VAE latents of split "train" scenes (new concepts never seen, the rare one at
0.5 %) and trains the CLIP text encoder and the UNet jointly with the epsilon loss of the SD
schedule; 10 % of captions are replaced by the empty prompt (for classifier-free guidance), and
each optional attribute is left out of a caption with probability 0.2; the loss is weighted
toward high noise (``timestep_weights``).  Stage 2c (``position``, ``train_position``) then
teaches the position words stage 2 leaves unused, with attribute probes on the text encoder.
Stage 1b (``dec``) fine-tunes the decoder alone.
The default (quick) recipe replays the run behind the shipped weights: world/base_model/TRAINING.md.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from likeness.world.render import render, sample_scene, sample_caption

from . import architecture as M

# Stage 2c's phases, "loss:steps:lr" (train_position): high noise only with the x0 loss, then back
# to stage 2's weighted loss at two learning rates, then the plain epsilon loss, which weights the
# low-noise steps that draw fine patterns most.
POSITION_PHASES = "high:800:1e-3,weighted:800:5e-4,weighted:800:2.5e-4,plain:800:2.5e-4"

# QUICK replays the run that produced the shipped weights (world/base_model/TRAINING.md); a full
# `--stage all` takes about 3 CPU-hours on one thread.
QUICK = dict(vae_images=8000, vae_steps=5000, vae_batch=16, vae_lr=2e-3, kl_weight=1e-6,
             vae2_steps=0, vae2_lr=1e-3, vae_fg=10.0,
             unet_images=30000, unet_steps=7735, unet_batch=32, unet_lr=1e-3, te_lr=5e-4,
             p_uncond=0.1, p_drop=0.2, ema=0.999, unet_minutes=0.0, hi_t_weight=20.0, batch_seed=0,
             dec_steps=11595, dec_lr=1e-3, dec_minutes=0.0, resume=0,
             pos_phases=POSITION_PHASES, pos_t_min=800, probe_weight=1.0)
FULL = dict(vae_images=50000, vae_steps=20000, vae_batch=32, vae_lr=1e-3, kl_weight=1e-6,
            vae2_steps=0, vae2_lr=1e-3, vae_fg=10.0,
            unet_images=200000, unet_steps=60000, unet_batch=128, unet_lr=5e-4, te_lr=2.5e-4,
            p_uncond=0.1, p_drop=0.2, ema=0.9995, unet_minutes=0.0, hi_t_weight=20.0, batch_seed=0,
            dec_steps=0, dec_lr=5e-4, dec_minutes=0.0, resume=0,
            pos_phases=POSITION_PHASES, pos_t_min=800, probe_weight=1.0)


def log(out: Path, msg: str):
    print(msg, flush=True)
    with open(out / "train.log", "a") as f:
        f.write(msg + "\n")


def to_tensor(images) -> torch.Tensor:
    a = np.stack([np.asarray(im, np.uint8) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()        # uint8 NCHW


def to_model(x_u8: torch.Tensor) -> torch.Tensor:
    """64 px uint8 renders → the model's resolution (box filter), scaled to [-1, 1]."""
    x = x_u8.float()
    k = x.shape[-1] // M.RESOLUTION
    if k > 1:
        x = torch.nn.functional.avg_pool2d(x, k)
    return x / 127.5 - 1


def render_set(n: int, seed: int, split: str):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split) for _ in range(n)]
    return scenes, to_tensor([render(s) for s in scenes])


def cosine_lr(step, total, base, warmup=50):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------------ stage 1
def train_vae(out: Path, R: dict, seed: int, phase: int = 1):
    """Phase 1: plain L1+MSE from scratch.  Phase 2 (``--stage vae2``): continue from out/vae with
    the reconstruction loss weighted ``1 + vae_fg`` on foreground pixels (the shapes are a small
    fraction of the image, and an unweighted loss first learns only the background)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed + 10 * (phase - 1))
    t0 = time.time()
    _, x_all = render_set(R["vae_images"], seed + 1, "all")
    log(out, f"[vae{phase}] rendered {len(x_all)} images (split all, seed {seed + 1}) in {time.time() - t0:.0f}s")
    if phase == 1:
        vae = M.build_vae()
        steps, lr, fgw = R["vae_steps"], R["vae_lr"], R["vae_fg"] if R.get("vae2_steps", 0) == 0 else 0.0
    else:
        vae = AutoencoderKL.from_pretrained(out / "vae")
        steps, lr, fgw = R["vae2_steps"], R["vae2_lr"], R["vae_fg"]
    vae.train()
    log(out, f"[vae{phase}] params {M.n_params(vae) / 1e6:.2f}M steps {steps} lr {lr} fg weight {fgw} "
             f"config {json.dumps(M.VAE_CONFIG)}")
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 2 + 10 * (phase - 1))
    t0 = time.time()
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, steps, lr)
        idx = torch.randint(0, len(x_all), (R["vae_batch"],), generator=g)
        x = to_model(x_all[idx])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        # foreground = differs from the corner pixel (always background in this world)
        fg = ((x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.05).float()
        w = 1 + fgw * fg
        w = w / w.mean()
        l1 = ((rec - x).abs() * w).mean()
        mse = ((rec - x).pow(2) * w).mean()
        kl = post.kl().mean()
        loss = l1 + mse + R["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == R["vae_steps"] - 1:
            log(out, f"[vae{phase}] step {step} l1 {l1.item():.4f} mse {mse.item():.5f} kl {kl.item():.1f} "
                     f"({time.time() - t0:.0f}s)")
    # scaling factor: 1/std of the latents (SD's 0.18215 was found the same way)
    vae.eval()
    with torch.no_grad():
        x = to_model(x_all[:512])
        z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)])
        rec = torch.cat([vae.decode(z[i:i + 64]).sample for i in range(0, len(z), 64)])
        sf = float(1.0 / z.std())
        log(out, f"[vae{phase}] eval mse {(rec - x).pow(2).mean().item():.5f} latent std {z.std().item():.4f} "
                 f"→ scaling_factor {sf:.5f}; time {time.time() - t0:.0f}s")
    vae.register_to_config(scaling_factor=sf)
    vae.save_pretrained(out / "vae")
    return vae


def finetune_decoder(out: Path, R: dict, seed: int):
    """Stage 1b: train only the decoder (post_quant_conv + decoder) on the frozen encoder's latents.
    The latent space — and so the UNet trained on it — is unchanged (SD's ft-MSE decoders were made
    the same way), so this can run alongside stage 2."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed + 20)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    _, x_all = render_set(R["vae_images"], seed + 1, "all")
    for p_ in vae.parameters():
        p_.requires_grad_(False)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p_ in params:
        p_.requires_grad_(True)
    vae.encoder.eval()
    opt = torch.optim.AdamW(params, lr=R["dec_lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 21)
    total, step, t0 = R["dec_steps"], 0, time.time()
    log(out, f"[dec] decoder fine-tune: steps {total} (budget {R.get('dec_minutes', 0)} min) lr {R['dec_lr']}")
    while step < total:
        if step == 30 and R.get("dec_minutes", 0) > 0:
            total = max(100, min(total, int(R["dec_minutes"] * 60 / ((time.time() - t0) / 30))))
            log(out, f"[dec] time budget {R['dec_minutes']} min → dec_steps={total}")
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, total, R["dec_lr"])
        idx = torch.randint(0, len(x_all), (R["vae_batch"],), generator=g)
        x = to_model(x_all[idx])
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        fg = ((x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.05).float()
        w = 1 + R["vae_fg"] * fg
        w = w / w.mean()
        l1 = ((rec - x).abs() * w).mean()
        mse = ((rec - x).pow(2) * w).mean()
        loss = l1 + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == total - 1:
            log(out, f"[dec] step {step} l1 {l1.item():.4f} mse {mse.item():.5f} ({time.time() - t0:.0f}s)")
        if (step + 1) % 200 == 0 or step == total - 1:
            vae.save_pretrained(out / "vae_dec")
        step += 1
    log(out, f"[dec] done: {total} steps, time {time.time() - t0:.0f}s")


# ------------------------------------------------------------------------------------------ stage 2
def encode_latents(vae, x_u8, batch=128):
    vae.eval()
    zs = []
    with torch.no_grad():
        for i in range(0, len(x_u8), batch):
            x = to_model(x_u8[i:i + batch])
            zs.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(zs)


def train_unet(out: Path, R: dict, seed: int):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    cache = out / "latents.pt"
    t0 = time.time()
    if cache.exists():
        d = torch.load(cache, weights_only=False)
        scenes, lat = d["scenes"], d["latents"]
    else:
        imgs = out / "train_images.pt"       # renders do not depend on the VAE: cached separately
        if imgs.exists():
            d = torch.load(imgs, weights_only=False)
            scenes, x = d["scenes"], d["images"]
        else:
            scenes, x = render_set(R["unet_images"], seed + 3, "train")
            torch.save({"scenes": scenes, "images": x}, imgs)
        lat = encode_latents(vae, x)
        torch.save({"scenes": scenes, "latents": lat}, cache)
    log(out, f"[unet] {len(lat)} cached latents (split train, seed {seed + 3}) in {time.time() - t0:.0f}s; "
             f"latent std {lat.std().item():.3f}")
    for stale in ("unet_pos", "text_encoder_pos"):    # stage 2c's output of an earlier stage 2
        shutil.rmtree(out / stale, ignore_errors=True)
    tok = M.load_tokenizer()
    te, unet, sched = M.build_text_encoder(), M.build_unet(**R.get("unet_config", {})), M.build_scheduler()
    if R.get("resume", 0):
        # stage 2b: continue from the raw (non-EMA) weights of an earlier stage-2 run in --out,
        # with a fresh optimizer and a new warm-up + cosine schedule
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel
        unet = UNet2DConditionModel.from_pretrained(out / "unet_raw")
        te.load_state_dict(CLIPTextModel.from_pretrained(out / "text_encoder_raw").state_dict())
        log(out, "[unet] resumed from unet_raw/ and text_encoder_raw/")
    log(out, f"[unet] text encoder {M.n_params(te) / 1e6:.2f}M unet {M.n_params(unet) / 1e6:.2f}M")
    log(out, f"[unet] unet config {json.dumps(dict(unet.config))}")
    log(out, f"[unet] text config {json.dumps(M.TEXT_CONFIG)}")
    opt = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": R["unet_lr"], "base": R["unet_lr"]},
        {"params": te.parameters(), "lr": R["te_lr"], "base": R["te_lr"]},
    ], weight_decay=0.01, fused=True)
    ema = {k: v.detach().clone() for k, v in list(unet.state_dict().items()) + [("te." + k, v) for k, v in te.state_dict().items()]}
    ema_keys_unet = list(unet.state_dict().keys())
    acp = sched.alphas_cumprod
    # batch_seed offsets the caption / batch / noise streams, so a resumed stage does not replay
    # the batches of the one before it
    rng = np.random.default_rng(seed + 4 + 1000 * R.get("batch_seed", 0))
    g = torch.Generator().manual_seed(seed + 5 + 1000 * R.get("batch_seed", 0))
    w_t = timestep_weights(acp, R.get("hi_t_weight", 0.0))
    tok_cache: dict = {}
    t0 = time.time()
    run = 0.0
    total = R["unet_steps"]
    step = 0
    while step < total:
        if step == 30 and R.get("unet_minutes", 0) > 0:
            # Fit the run to a wall-clock budget: the first 30 steps (warm-up, which does not depend
            # on the total) time the machine; the cosine schedule then spans the steps that fit.
            # `--set unet_steps=<logged N>` replays the identical run without a budget.
            fit = int(R["unet_minutes"] * 60 / ((time.time() - t0) / 30))
            total = max(200, min(total, fit))
            log(out, f"[unet] time budget {R['unet_minutes']} min → unet_steps={total}")
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, total, pg["base"], warmup=100)
        caps, ids, zt, noise, t = _noised_batch(rng, g, scenes, lat, R, acp, tok, tok_cache)
        cond = te(ids).last_hidden_state
        pred = unet(zt, t, cond).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        (per * w_t[t]).mean().backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(R["ema"], (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - d)
            for k, v in te.state_dict().items():
                ema["te." + k].lerp_(v, 1 - d)
        run = loss.item() if step == 0 else 0.98 * run + 0.02 * loss.item()
        if step % 50 == 0 or step == total - 1:
            log(out, f"[unet] step {step} loss {loss.item():.4f} avg {run:.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % 500 == 0 or step == total - 1:
            _save_stage2(out, unet, te, ema, ema_keys_unet)
        step += 1
    log(out, f"[unet] done: {total} steps, final avg loss {run:.4f}, time {time.time() - t0:.0f}s")


def _noised_batch(rng, g, scenes, lat, R, acp, tok, tok_cache, t_min=0):
    """One training batch: captions (empty with p_uncond, optional words dropped with p_drop), their
    token ids, the latents noised to uniform t in [t_min, 1000), the noise and t."""
    idx = rng.integers(0, len(lat), R["unet_batch"])
    caps = ["" if rng.random() < R["p_uncond"] else sample_caption(scenes[i], rng, R["p_drop"]) for i in idx]
    ids = torch.stack([_ids(tok, c, tok_cache) for c in caps])
    z0 = lat[torch.from_numpy(idx)]
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(t_min, 1000, (len(idx),), generator=g)
    a = acp[t].view(-1, 1, 1, 1)
    return caps, ids, a.sqrt() * z0 + (1 - a).sqrt() * noise, noise, t


def parse_phases(spec: str) -> list[tuple[str, int, float]]:
    """ "high:800:1e-3,plain:400:2.5e-4" → [("high", 800, 0.001), ("plain", 400, 0.00025)]."""
    phases = []
    for part in spec.split(","):
        loss, steps, lr = part.split(":")
        if loss not in ("high", "weighted", "plain"):
            raise ValueError(f"pos_phases: loss {loss!r} is not one of high, weighted, plain")
        phases.append((loss, int(steps), float(lr)))
    return phases


def train_position(out: Path, R: dict, seed: int):
    """Stage 2c: teach the stage-2 model its position words (TRAINING.md, "Position").

    Stage 2 leaves them unused: where the shape goes is decided at high noise, where the epsilon
    loss hardly pays for it, and the jointly trained text encoder lets words the UNet ignores fade.
    Phases (``pos_phases``): "high" trains on t >= ``pos_t_min`` only, with the x0 error as the
    loss — that places shapes but bends the rest of the model; "weighted" is stage 2's loss over all
    timesteps, "plain" the unweighted epsilon loss (most weight on the low-noise steps that draw
    fine patterns): they bring back what "high" bent.  In every phase the attribute probes
    (``devtools.world.text_probe``) keep each stated word apart in the text encoder.  No EMA: the weights
    saved are the last.  Reads ``unet/`` and ``text_encoder/`` in ``out``; writes ``unet_pos/`` and
    ``text_encoder_pos/``, which ``save_pipeline`` prefers."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    from .text_probe import AttributeProbe
    phases = parse_phases(R["pos_phases"])
    torch.manual_seed(seed + 6)
    d = torch.load(out / "latents.pt", weights_only=False)        # our own stage-2 cache
    scenes, lat = d["scenes"], d["latents"]
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    te = CLIPTextModel.from_pretrained(out / "text_encoder")
    probe = AttributeProbe(te.config.hidden_size)
    tok, acp = M.load_tokenizer(), M.build_scheduler().alphas_cumprod
    w_t = timestep_weights(acp, R.get("hi_t_weight", 0.0))
    rng, g = np.random.default_rng(seed + 7), torch.Generator().manual_seed(seed + 8)
    tok_cache: dict = {}
    clipped = list(unet.parameters()) + list(te.parameters())
    t0 = time.time()
    for phase, (kind, steps, lr) in enumerate(phases, 1):
        opt = torch.optim.AdamW(clipped + list(probe.parameters()), lr=lr, weight_decay=0.01)
        t_min = R["pos_t_min"] if kind == "high" else 0
        for step in range(steps):
            caps, ids, zt, noise, t = _noised_batch(rng, g, scenes, lat, R, acp, tok, tok_cache, t_min)
            states = te(ids).last_hidden_state
            pred = unet(zt, t, states).sample
            per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
            w = {"high": (1 - acp[t]) / acp[t],          # the x0 error: epsilon error / SNR
                 "weighted": w_t[t], "plain": torch.ones_like(per)}[kind]
            loss = (per * w).mean()
            aux = probe.loss(states, ids, caps, te.config.eos_token_id)
            opt.zero_grad(set_to_none=True)
            (loss + R["probe_weight"] * aux).backward()
            torch.nn.utils.clip_grad_norm_(clipped, 1.0)
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                log(out, f"[position] phase {phase} ({kind}, lr {lr:g}) step {step} loss {loss.item():.4f} "
                         f"probe {aux.item():.3f} ({time.time() - t0:.0f}s)")
    unet.save_pretrained(out / "unet_pos")
    te.save_pretrained(out / "text_encoder_pos")
    log(out, f"[position] done: {sum(p[1] for p in phases)} steps in {len(phases)} phases, {time.time() - t0:.0f}s")


def timestep_weights(acp: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-timestep weights of the epsilon loss.  ``cap`` 0: uniform (plain SD training).  Else
    ``min(1 / alpha_bar_t, cap)``, normalised to mean 1 over t: the epsilon error of a sample at
    high noise is its x0 error scaled by sqrt(SNR), so the plain loss hardly rewards deciding the
    layout there, where the noisy latent does not show it yet;
    weighting by 1 / alpha_bar (the v-prediction loss's weighting, capped) restores that pressure.
    Used for the shipped weights; alone it did not make position words work: stage 2c
    (``train_position``) does (TRAINING.md, "Position")."""
    if cap <= 0:
        return torch.ones_like(acp)
    w = torch.clamp(1.0 / acp, max=cap)
    return w / w.mean()


def _ids(tok, text, cache):
    if text not in cache:
        cache[text] = tok(text, padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids[0]
    return cache[text]


def _save_stage2(out, unet, te, ema, ema_keys_unet):
    from diffusers import UNet2DConditionModel
    unet.save_pretrained(out / "unet_raw")
    te.save_pretrained(out / "text_encoder_raw")
    u = UNet2DConditionModel.from_config(unet.config)     # the trained architecture, overrides included
    u.load_state_dict({k: ema[k] for k in ema_keys_unet})
    u.save_pretrained(out / "unet")
    t = M.build_text_encoder()
    t.load_state_dict({k[3:]: v for k, v in ema.items() if k.startswith("te.")})
    t.save_pretrained(out / "text_encoder")


# ------------------------------------------------------------------------------------------ save
def save_pipeline(out: Path, dest: Path, fp16: bool = True):
    from diffusers import AutoencoderKL, UNet2DConditionModel, StableDiffusionPipeline
    from transformers import CLIPTextModel
    vae = AutoencoderKL.from_pretrained(out / ("vae_dec" if (out / "vae_dec").exists() else "vae"))
    pos = (out / "unet_pos").exists()       # stage 2c's weights when it ran
    unet = UNet2DConditionModel.from_pretrained(out / ("unet_pos" if pos else "unet"))
    te = CLIPTextModel.from_pretrained(out / ("text_encoder_pos" if pos else "text_encoder"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=M.load_tokenizer(), unet=unet,
                                   scheduler=M.build_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(dest, safe_serialization=True)
    M.write_tokenizer(Path(dest) / "tokenizer")      # its config only: the BPE files are the shipped ones
    # transformers 5 loads a model in its config's dtype: say float32, so a plain from_pretrained
    # upcasts the fp16 file and the pipeline is fp32 throughout (diffusers already upcasts)
    cfg = Path(dest) / "text_encoder" / "config.json"
    d = json.loads(cfg.read_text())
    for k in ("dtype", "torch_dtype"):
        if k in d:
            d[k] = "float32"
    cfg.write_text(json.dumps(d, indent=2) + "\n")
    for f in Path(dest).rglob("*.safetensors"):
        f.chmod(0o644)
    return dest


def sample(pipe_dir, prompts, seed=0, steps=30, guidance=5.0):
    from diffusers import DDIMScheduler
    pipe = M.load_pipeline(pipe_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return pipe(prompts, height=M.RESOLUTION, width=M.RESOLUTION, num_inference_steps=steps, guidance_scale=guidance,
                generator=g).images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "vae2", "dec", "unet", "position", "save", "all"], default="all")
    p.add_argument("--out", type=Path, default=Path("world_run"))
    p.add_argument("--dest", type=Path, default=M.BASE_MODEL_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true", help="the long recipe (GPU or many CPU hours)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="override recipe entries, e.g. unet_steps=3000")
    p.add_argument("--unet-config", default="{}",
                   help="JSON entries replacing devtools.world.architecture.UNET_CONFIG's")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    R = dict(FULL if a.full else QUICK)
    for kv in a.set:
        k, v = kv.split("=")
        R[k] = type(R[k])(v)
    R["unet_config"] = json.loads(a.unet_config)
    a.out.mkdir(parents=True, exist_ok=True)
    log(a.out, f"recipe {'full' if a.full else 'quick'} seed {a.seed}: {json.dumps(R)}")
    log(a.out, f"torch {torch.__version__} threads {torch.get_num_threads()}")
    if a.stage in ("vae", "all"):
        train_vae(a.out, R, a.seed, phase=1)
    if a.stage in ("vae2", "all") and R["vae2_steps"] > 0:
        train_vae(a.out, R, a.seed, phase=2)
    if a.stage in ("dec", "all") and R["dec_steps"] > 0:
        finetune_decoder(a.out, R, a.seed)
    if a.stage in ("unet", "all"):
        train_unet(a.out, R, a.seed)
    if a.stage in ("position", "all") and R["pos_phases"]:
        train_position(a.out, R, a.seed)
    if a.stage in ("save", "all"):
        save_pipeline(a.out, a.dest)
        log(a.out, f"saved pipeline to {a.dest}")


if __name__ == "__main__":
    main()

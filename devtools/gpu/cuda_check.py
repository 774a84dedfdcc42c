"""CUDA correctness of every node inside ComfyUI: a few steps of each, in fp16 and in bf16, on
random-weight full-size SD1.5 and SDXL (and a random ViT-H CLIP vision for SeedSelect).

Per case it checks what a user relies on: the loss is finite (and whether it falls), the files written reload
(safetensors, ComfyUI's LoRA loader, its checkpoint loader), the outputs change a KSampler result,
and SeedSelect's NOISE reproduces its latent through SamplerCustomAdvanced.  One PASS/FAIL line per
case, appended to ``<out>/cuda_check.txt`` (and ``.jsonl``) as each case ends, so a run cut short
keeps its lines.  A time budget stops starting new cases; the order puts SD1.5 fp16 first.

    python devtools/gpu/cuda_check.py --comfy DIR [--out DIR] [--budget 200]
    python devtools/gpu/cuda_check.py --comfy DIR --cpu-smoke      # tiny models on the CPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import comfy_env  # noqa: E402

PROMPT = "a photo of sks_lk dog"


class CaseFailed(Exception):
    pass


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise CaseFailed(what)


def falling(losses: list[float]) -> str:
    """'loss a->b' (first and last thirds' means).  Non-finite fails the case; a loss that does not
    fall is reported in the line but does not: over a few steps at random noise levels the loss is
    noise-dominated (the CPU rehearsal's TI rose 1.14 -> 1.19 over 6 steps of a working run)."""
    expect(bool(losses) and all(math.isfinite(x) for x in losses), f"non-finite or no loss: {losses}")
    k = max(1, len(losses) // 3)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    trend = "" if last < first else f" NOT falling over {len(losses)} steps"
    return f"loss {first:.4f}->{last:.4f}{trend}"


# ------------------------------------------------------------------------------------- ComfyUI


def run_node(cls, **given):
    """Execute a V3 node as ComfyUI does (class clone, inference mode), the schema's defaults for
    every input not given; returns its outputs."""
    import torch

    inputs = {}
    for inp in cls.define_schema().inputs:
        if inp.id in given:
            inputs[inp.id] = given[inp.id]
        elif getattr(inp, "default", None) is not None:
            inputs[inp.id] = inp.default
    clone = cls.PREPARE_CLASS_CLONE({"hidden_inputs": {"UNIQUE_ID": "7"}})
    with torch.inference_mode():
        return clone.EXECUTE_NORMALIZED(**inputs).result


def ksample(model, positive, negative, size: int, seed: int = 3):
    import torch
    import nodes

    with torch.inference_mode():
        (latent,) = nodes.EmptyLatentImage().generate(size, size, 1)
        (out,) = nodes.KSampler().sample(model, seed, 3, 5.0, "euler", "normal", positive, negative, latent)
    return out["samples"].float().clone()


def changed(env, b, what: str) -> str:
    """The KSampler result ``b`` differs from the input model's (``env.base``).  Where the model's
    sampler ignores even another prompt (the CPU rehearsal's one-block UNet), that is said instead."""
    import torch

    expect(bool(torch.isfinite(b).all()), f"{what}: the KSampler result is not finite")
    d = float((env.base - b).abs().max())
    if d == 0 and not env.prompt_matters:
        return f"{what} unchecked (this model's KSampler ignores the prompt)"
    expect(d > 0, f"{what}: the KSampler result did not change")
    return f"{what} Δ{d:.3g}"


def new_files(folder: str, since: float, suffix: str = ".safetensors") -> list[Path]:
    files = [p for p in Path(folder).rglob(f"*{suffix}") if p.stat().st_mtime >= since - 1]
    expect(bool(files), f"no {suffix} file written in {folder}")
    return files


def reload_safetensors(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(path))
    expect(bool(sd) and all(bool(torch.isfinite(v.float()).all()) for v in sd.values()),
           f"{path.name}: empty or non-finite after reload")
    return sd


# ----------------------------------------------------------------------------------------- cases


class Env:
    """One (arch, dtype): the models, the prompt's conditioning, the sample size, the step count."""

    def __init__(self, arch: str, dtype_name: str, tiny: bool):
        import torch

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype_name)  # "default": ComfyUI's
        self.arch, self.dtype_name, self.tiny = arch, dtype_name, tiny
        self.model, self.clip, self.vae = comfy_env.load_models(arch, tiny, dtype)
        self.res = 64 if tiny else (1024 if arch == "sdxl" and not tiny else 512)
        self.sample_size = 64 if tiny else 256
        self.steps = 6 if tiny else 8
        self.images = comfy_env.random_images(3, self.res)
        self.pos = comfy_env.conditioning(self.clip, PROMPT)
        self.neg = comfy_env.conditioning(self.clip, "")
        self.base = ksample(self.model, self.pos, self.neg, self.sample_size)
        other = ksample(self.model, self.neg, self.pos, self.sample_size)
        self.prompt_matters = bool((self.base - other).abs().max() > 0)


def _common(env: Env, name: str) -> dict:
    return dict(model=env.model, clip=env.clip, vae=env.vae, images=env.images, name=name, steps=env.steps,
                instance_prompt=PROMPT, preview_every=0, save_every=0, overwrite=True)


def case_ti(env: Env) -> str:
    import folder_paths
    from likeness.nodes.textual_inversion import TrainTextualInversion

    t0 = time.time()
    cond, word, _, loss = run_node(TrainTextualInversion, **_common(env, "sks_lk"), learning_rate=2e-2,
                                   prompt=PROMPT.replace("sks_lk", "{}"), init_text="dog")[:4]
    notes = [falling(loss["loss"])]
    for f in new_files(folder_paths.get_folder_paths("embeddings")[0], t0):
        reload_safetensors(f)
    notes.append(changed(env, ksample(env.model, cond, env.neg, env.sample_size), "conditioning"))
    return ", ".join(notes)


def _lora_checks(env: Env, model, clip, since: float) -> list[str]:
    import comfy.sd
    import comfy.utils
    import folder_paths

    notes = [changed(env, ksample(model, env.pos, env.neg, env.sample_size), "MODEL")]
    (path,) = [p for p in new_files(folder_paths.get_folder_paths("loras")[0], since)][:1]
    reload_safetensors(path)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    m2, c2 = comfy.sd.load_lora_for_models(env.model, env.clip, lora, 1.0, 1.0)
    notes.append(changed(env, ksample(m2, env.pos, env.neg, env.sample_size), "LoraLoader"))
    return notes


def case_lora(env: Env) -> str:
    from likeness.nodes.dreambooth import TrainDreamBoothLoRA

    t0 = time.time()
    model, clip, _, _, loss = run_node(TrainDreamBoothLoRA, **_common(env, "bench_lora"), learning_rate=1e-3,
                                       rank=4)[:5]
    return ", ".join([falling(loss["loss"]), *_lora_checks(env, model, clip, t0)])


def case_pivotal(env: Env) -> str:
    from likeness.nodes.dreambooth import TrainPivotal

    t0 = time.time()
    model, clip, _, _, _, loss = run_node(TrainPivotal, **_common(env, "bench_pivotal"), learning_rate=1e-3,
                                          token="sks_lk", rank=4)[:6]
    return ", ".join([falling(loss["loss"]), *_lora_checks(env, model, clip, t0)])


def case_full(env: Env) -> str:
    import comfy.sd
    import folder_paths
    from likeness.nodes.dreambooth import TrainDreamBoothFull

    t0 = time.time()
    model, clip, _, _, loss = run_node(TrainDreamBoothFull, **_common(env, "bench_full"), learning_rate=1e-4)[:5]
    notes = [falling(loss["loss"]), changed(env, ksample(model, env.pos, env.neg, env.sample_size), "MODEL")]
    (path,) = new_files(folder_paths.get_folder_paths("checkpoints")[0], t0)[:1]
    loaded = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
    expect(loaded[0] is not None, f"{path.name}: ComfyUI's checkpoint loader found no model")
    notes.append(changed(env, ksample(loaded[0], env.pos, env.neg, env.sample_size), "reloaded checkpoint"))
    return ", ".join(notes)


def case_seedselect(env: Env) -> str:
    import torch
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as NCS
    from likeness.nodes.seedselect import SeedSelect

    size, steps, cfg = (64, 4, 3.0) if env.tiny else (512, 20, 7.5)
    cv = comfy_env.random_clip_vision(env.tiny)
    noise, _, samples, _, loss = run_node(
        SeedSelect, model=env.model, positive=env.pos, negative=env.neg, vae=env.vae, clip_vision=cv,
        references=comfy_env.random_images(3, size), width=size, height=size, sampler="ddim",
        scheduler="ddim_uniform", steps=steps, cfg=cfg, iterations=4, save_as="", overwrite=False)[:5]
    expect(all(math.isfinite(x) for x in loss["loss"]), f"non-finite loss {loss['loss']}")
    note = f"loss {loss['loss'][0]:.4f}->{min(loss['loss']):.4f}"
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(env.model.get_model_object("model_sampling"), "ddim_uniform", steps)
        latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
        guider = NCS.CFGGuider.execute(env.model, env.pos, env.neg, cfg).result[0]
        sampler = NCS.KSamplerSelect.execute("ddim").result[0]
        again = NCS.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas.cpu(), latent).result[0]["samples"]
    a, b = samples["samples"].float().cpu(), again.float().cpu()
    rel = float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-8))
    expect(rel < 0.05, f"SamplerCustomAdvanced gave another latent from the NOISE (mean rel. diff {rel:.3g})")
    return f"{note}, NOISE reproduces (rel. diff {rel:.2g})"


def case_load_images(env: Env) -> str:
    import folder_paths
    from PIL import Image

    from likeness.nodes.image_folder import LoadTrainingImages

    folder = Path(folder_paths.get_input_directory()) / "cuda_check_images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(comfy_env.random_images(3, 96)):
        Image.fromarray((img.numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    (folder / "1.txt").write_text("a photo of sks_lk dog", encoding="utf-8")
    images, captions, summary = run_node(LoadTrainingImages, folder="cuda_check_images", resolution=64)[:3]
    expect(tuple(images.shape) == (3, 64, 64, 3), f"images {tuple(images.shape)}, not (3, 64, 64, 3)")
    expect(captions.splitlines()[1:2] == ["a photo of sks_lk dog"], f"captions {captions!r}")
    return summary.splitlines()[0]


#: (case name, function, architectures it runs on); Full on SDXL would write a 7 GB checkpoint
CASES = [("ti", case_ti, ("sd15", "sdxl")), ("lora", case_lora, ("sd15", "sdxl")),
         ("full", case_full, ("sd15",)), ("pivotal", case_pivotal, ("sd15", "sdxl")),
         ("seedselect", case_seedselect, ("sd15",))]


# ----------------------------------------------------------------------------------------- driver


class Log:
    """PASS/FAIL lines on stdout and appended to the result files at once."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.txt, self.jsonl = out / "cuda_check.txt", out / "cuda_check.jsonl"
        self.failed = 0

    def __call__(self, case: str, arch: str, dtype: str, ok: bool | None, detail: str, seconds: float) -> None:
        word = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
        self.failed += ok is False
        line = f"{word} {case} {arch} {dtype}: {detail} ({seconds:.1f} s)"
        print(line, flush=True)
        with open(self.txt, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(case=case, arch=arch, dtype=dtype, result=word, detail=detail,
                                     seconds=round(seconds, 1))) + "\n")


def run_case(log: Log, env: Env, name: str, fn) -> None:
    import torch

    t0 = time.perf_counter()
    try:
        detail = fn(env)
        ok = True
    except CaseFailed as exc:
        detail, ok = str(exc), False
    except Exception as exc:  # noqa: BLE001 - a crash is this case's FAIL; the next case still runs
        detail, ok = f"{type(exc).__name__}: {exc}".splitlines()[0][:300], False
        traceback.print_exc()
    if torch.cuda.is_available():
        detail += f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GB"
        torch.cuda.reset_peak_memory_stats()
    log(name, env.arch, env.dtype_name, ok, detail, time.perf_counter() - t0)


def run_all(args) -> int:
    import torch

    log = Log(Path(args.out))
    deadline = time.monotonic() + args.budget
    print(f"cuda_check on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
          f"torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    log("load_training_images", "-", "-", *_timed(case_load_images, None))
    archs = ["sd15"] if args.cpu_smoke else ["sd15", "sdxl"]
    for arch in archs:
        for dtype in (["default"] if args.cpu_smoke else ["fp16", "bf16"]):
            if time.monotonic() > deadline - 30:
                log("all", arch, dtype, None, "budget spent", 0.0)
                continue
            env = Env(arch, dtype, args.cpu_smoke)
            for name, fn, on in CASES:
                if arch not in on or (args.only and name not in args.only):
                    continue
                if time.monotonic() > deadline - 10:
                    log(name, arch, dtype, None, "budget spent", 0.0)
                    continue
                run_case(log, env, name, fn)
            del env
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(f"cuda_check: {log.failed} failed, {time.perf_counter() - t0:.0f} s; lines in {log.txt}", flush=True)
    return 1 if log.failed else 0


def _timed(fn, env):
    t0 = time.perf_counter()
    try:
        return True, fn(env), time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - reported as this case's FAIL
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300], time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (v0.20.1)")
    ap.add_argument("--out", default="cuda-check-out", help="folder for cuda_check.txt / .jsonl")
    ap.add_argument("--budget", type=float, default=200, help="seconds; no case starts after it")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny SD1.5 on the CPU, ComfyUI's dtype")
    ap.add_argument("--only", nargs="*", default=None, help="case names (ti lora full pivotal seedselect)")
    args = ap.parse_args(argv)
    if not args.comfy:
        ap.error("give --comfy DIR (or set COMFYUI_PATH)")
    args.out = os.path.abspath(args.out)
    comfy_env.import_comfy(args.comfy)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())

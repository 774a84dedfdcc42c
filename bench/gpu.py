"""One-command GPU benchmark: the project's training steps inside ComfyUI beside the anchors of the
shared bench, all in one run on one card (``bench/gpu.sh`` is the entry point; see bench/README.md).

Every workload runs in its own child process (its peak memory is its own, a crash or a timeout
loses only that line), on random-weight full-size models built in memory (``comfy_env``).  Each
result is printed as a ``RESULT`` line and written into ``<out>/gpu_bench.json`` at once (temp file,
then rename), so a run cut short keeps what it measured.  A time budget decides how far the list
gets; what did not fit is recorded as skipped, most telling measurements first.

    python bench/gpu.py --comfy DIR [--out DIR] [--budget 330] [--only ti_sd15_512_b4 ...]
    python bench/gpu.py --comfy DIR --cpu-smoke      # the same code on tiny models, CPU, ~2 min
    python bench/gpu.py --host diffusers --cpu-smoke # the CLI's host, no ComfyUI needed (CI)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import comfy_env  # noqa: E402

#: what each workload trains: method, architecture, resolution, images per step, prior preservation
WORKLOADS = {
    "ti_sd15_512_b4": dict(method="ti", arch="sd15", res=512, batch=4),
    "lora_sd15_512_b1_prior": dict(method="lora", arch="sd15", res=512, batch=1, prior=True),
    "full_sd15_512_b1_prior": dict(method="full", arch="sd15", res=512, batch=1, prior=True),
    "ti_sdxl_1024_b1": dict(method="ti", arch="sdxl", res=1024, batch=1),
    "lora_sdxl_1024_b1": dict(method="lora", arch="sdxl", res=1024, batch=1),
    "seedselect_sd15_512_20steps_cfg": dict(method="seedselect", arch="sd15", res=512, batch=1),
}

#: (kind, name, compile or anchor arguments), most telling first: the TI step beside the CUDA-graph
#: floor, the LoRA step beside ComfyUI's trainer, then the memory goals, then the rest
PLAN = [
    ("ours", "ti_sd15_512_b4", "off"), ("ours", "ti_sd15_512_b4", "max"),
    ("anchor", "comfy_unet_compile.py", "sd15 4 512"),
    ("ours", "lora_sd15_512_b1_prior", "off"), ("anchor", "comfy_anchor.py", "sd15 1 512 20"),
    ("ours", "lora_sd15_512_b1_prior", "max"),
    ("ours", "ti_sd15_512_b4", "low_memory"), ("ours", "lora_sd15_512_b1_prior", "low_memory"),
    ("ours", "full_sd15_512_b1_prior", "off"), ("ours", "lora_sdxl_1024_b1", "off"),
    ("ours", "seedselect_sd15_512_20steps_cfg", "off"), ("ours", "ti_sdxl_1024_b1", "off"),
    ("anchor", "comfy_anchor.py", "sd15 4 512 20"), ("anchor", "comfy_anchor.py", "sdxl 1 1024 20"),
    ("anchor", "seedselect_anchor.py", "3 bf16"), ("anchor", "comfy_unet_compile.py", "sd15 1 512"),
    ("ours", "full_sd15_512_b1_prior", "max"), ("ours", "seedselect_sd15_512_20steps_cfg", "default"),
    ("ours", "ti_sdxl_1024_b1", "default"), ("ours", "lora_sdxl_1024_b1", "default"),
]
#: the CPU rehearsal: every workload eagerly, the compiled path once, the low-memory path once
SMOKE_PLAN = [("ours", name, "off") for name in WORKLOADS] + [("ours", "ti_sd15_512_b4", "default"),
                                                              ("ours", "ti_sd15_512_b4", "low_memory")]
#: "low_memory" in a plan: ComfyHost's fallback path (eager); the other values are compile modes
PATHS = {"low_memory": "low_memory"}
#: the longest one item may run on a GPU (seconds), before the budget's remainder cuts it shorter
CAP = {"off": 150, "default": 300, "max": 300, "low_memory": 150, "anchor": 200}


# ------------------------------------------------------------------------------------------ child


class _Clock:
    """The progress callback: a timestamp per step (after the GPU finished it) and the losses."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.t0, self.stamps, self.losses = time.perf_counter(), [], []

    def __call__(self, step, total, loss, img):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        if loss is not None:
            self.losses.append(float(loss))

    def figures(self, warmup: int) -> dict:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])][max(0, warmup - 1):]
        return {"s_per_step": statistics.median(gaps) if gaps else None,
                "warmup_s": self.stamps[warmup - 1] - self.t0 if len(self.stamps) >= warmup else None,
                "steps": len(self.stamps), "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None}


def _train_ti(w, host, steps, out, clock, compile_mode):
    from likeness.trainers import data as D
    from likeness.trainers.compile import compiled_step
    from likeness.trainers.textual_inversion import TIConfig, train_textual_inversion

    images = D.images_from_batch(comfy_env.random_images(4, w["res"]))
    cfg = TIConfig(name="bench-ti", output_dir=out, steps=steps, batch_size=w["batch"], save_every=0,
                   preview_every=0, overwrite=True)
    with host.training(), compiled_step(host, compile_mode) as state:
        train_textual_inversion(host, images, cfg, progress=clock)
    return state


def _train_dreambooth(w, host, steps, out, clock, compile_mode):
    from likeness.trainers import data as D
    from likeness.trainers.compile import compiled_step
    from likeness.trainers.dreambooth import DreamBoothConfig, train_dreambooth

    images = D.images_from_batch(comfy_env.random_images(4, w["res"], seed=0))
    prior = w.get("prior", False)
    cls_images = D.images_from_batch(comfy_env.random_images(4, w["res"], seed=1)) if prior else None
    full = w["method"] == "full"
    cfg = DreamBoothConfig(
        name=f"bench-{w['method']}", output_dir=out, instance_prompt="a photo of sks_lk dog", mode=w["method"],
        class_prompt="a photo of a dog" if prior else "", token="sks_lk", embedding_dir=out, rank=4,
        steps=steps, learning_rate=5e-6 if full else 1e-4, save_every=0, preview_every=0,
        optimizer="adafactor" if full else "adamw", gradient_checkpointing=full, overwrite=True)
    with host.training(), compiled_step(host, compile_mode) as state:
        train_dreambooth(host, images, cfg, class_images=cls_images, progress=clock)
    return state


#: SeedSelect's prompt and sampling steps (tiny: fewer, the code not the load)
SEED_PROMPT = "a photo of a tiger cat"


def _seedselect_parts(w, models, tiny: bool):
    """(SeedModel, image encoder, sigmas or None) of the workload on its host: ComfyUI's own
    objects (its model, conditioning, CLIP_VISION, scheduler) or the CLI's (diffusers host, a
    transformers CLIP vision model, the config's scheduler)."""
    if models[0] == "diffusers":
        import diffusers_env
        from likeness.trainers.seedselect import SeamSeedModel

        host = models[1]
        return SeamSeedModel(host, SEED_PROMPT, ""), diffusers_env.random_clip_vision(tiny, host.device.type), None
    import comfy.samplers

    from likeness.hosts.comfy import ComfyClipVision, ComfySeedModel

    model, clip, vae = models
    seed_model = ComfySeedModel(model, comfy_env.conditioning(clip, SEED_PROMPT), comfy_env.conditioning(clip, ""), vae)
    n = 4 if tiny else 20
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", n)
    return seed_model, ComfyClipVision(comfy_env.random_clip_vision(tiny)), sigmas.cpu().clone()


def _train_seedselect(w, models, steps, out, clock, compile_mode, tiny):
    import torch

    from likeness.trainers.compile import compiled_step
    from likeness.trainers.seedselect import SeedSelectConfig, train_seedselect

    with torch.inference_mode(False), torch.enable_grad():
        seed_model, vision, sigmas = _seedselect_parts(w, models, tiny)
        conf = SeedSelectConfig(width=w["res"], height=w["res"], steps=4 if tiny else 20, sigmas=sigmas, cfg=7.5,
                                iterations=steps)
        refs = comfy_env.random_images(4, w["res"]).clone()
        with compiled_step(seed_model, compile_mode) as state:
            train_seedselect(seed_model, vision, refs, conf, clock)
    return state


def _load(w, host_kind: str, tiny: bool, comfy_dir: str | None):
    """The workload's model on ``host_kind``: ComfyUI's (MODEL, CLIP, VAE) as its loader gives them,
    or ("diffusers", DiffusersHost)."""
    import torch

    if host_kind == "diffusers":
        import diffusers_env

        comfy_env.import_likeness()
        return "diffusers", diffusers_env.load_host(w["arch"], tiny)
    comfy_env.import_comfy(comfy_dir)
    with torch.inference_mode():  # as ComfyUI runs every node
        return comfy_env.load_models(w["arch"], tiny)


def _training_host(w, models, path: str):
    if models[0] == "diffusers":
        return models[1]  # one path only
    from likeness.hosts.comfy import ComfyHost

    return ComfyHost(*models, name=f"random-{w['arch']}", path=path)


def run_one(name: str, compile_mode: str, tiny: bool, steps: int, warmup: int, comfy_dir: str | None,
            host_kind: str = "comfy") -> dict:
    """Train workload ``name`` for ``warmup + steps`` steps on ``host_kind``; its figures as a dict."""
    import tempfile

    import torch

    w = dict(WORKLOADS[name], **({"res": 64, "batch": 1} if tiny else {}))  # tiny: the code, not the load
    cuda = torch.cuda.is_available()
    models = _load(w, host_kind, tiny, comfy_dir)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = _Clock()
    path = PATHS.get(compile_mode, "fast")
    compile_mode = "off" if compile_mode in PATHS else compile_mode
    with tempfile.TemporaryDirectory(prefix="likeness-bench-") as out:
        if w["method"] == "seedselect":
            state = _train_seedselect(w, models, warmup + steps, Path(out), clock, compile_mode, tiny)
        else:
            train = _train_ti if w["method"] == "ti" else _train_dreambooth
            state = train(w, _training_host(w, models, path), warmup + steps, Path(out), clock, compile_mode)
    res = {"workload": name, "host": host_kind, "path": path, "compile": compile_mode, "compile_ran": state.active,
           "compile_note": state.summary(), "compile_warmup_s": state.warmup_seconds, **clock.figures(warmup)}
    res["peak_GB"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return res


# ----------------------------------------------------------------------------------------- parent


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _result_line(r: dict) -> str:
    def f(key, fmt):
        return "n/a" if r.get(key) is None else format(r[key], fmt)

    path = "" if r.get("path", "fast") == "fast" else f" path={r['path']}"
    return (f"RESULT {r['workload']}{path} compile={r['compile']} ran={r.get('compile_ran', '?')} "
            f"s_per_step={f('s_per_step', '.4f')} warmup_s={f('warmup_s', '.1f')} peak_GB={f('peak_GB', '.2f')} "
            f"loss={f('loss_first', '.4f')}->{f('loss_last', '.4f')} status={r['status']}")


def _run_child(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                       for x in (exc.stdout, exc.stderr))
    return rc, text, time.perf_counter() - t0


def _ours(name: str, mode: str, args, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--compile", mode, "--host", args.host,
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--tiny"] if args.cpu_smoke else [])
    cmd += ["--comfy", args.comfy] if args.comfy else []
    rc, text, secs = _run_child(cmd, timeout)
    found = [ln for ln in text.splitlines() if ln.startswith("RESULT-JSON ")]
    if found:
        r = json.loads(found[-1][len("RESULT-JSON "):])
        r["status"] = "ok"
    else:
        r = {"workload": name, "compile": mode, "status": "timeout" if rc == 124 else f"failed rc={rc}",
             "tail": text[-1500:]}
    r["seconds"] = round(secs, 1)
    return r


def _anchor(script: str, argv: str, args, timeout: float) -> dict:
    path = Path(args.shared_bench) / script
    pre = [args.comfy] if script.startswith("comfy_") else []
    rc, text, secs = _run_child([sys.executable, str(path), *pre, *argv.split()], timeout)
    keep = [ln for ln in text.splitlines() if ln.startswith(("ANCHOR", "COMPILE", "RESULT", "FLOOR", "loaded"))
            or "s/iteration" in ln or "iteration" in ln.lower()[:20]]
    return {"anchor": script, "args": argv, "rc": rc, "seconds": round(secs, 1), "lines": keep,
            "tail": "" if rc == 0 else text[-1500:]}


def _header(args) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "torch": torch.__version__, "commit": commit or os.environ.get("LIKENESS_COMMIT"),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "host": args.host, "results": [], "anchors": [],
            "skipped": []}


def run_plan(args) -> dict:
    """Every item of the plan that fits the budget, each result printed and saved as it comes."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_bench.json"
    doc = _header(args)
    plan = SMOKE_PLAN if args.cpu_smoke else PLAN
    if args.only:
        plan = [p for p in plan if p[1] in args.only]
    if args.host != "comfy":  # the anchors are ComfyUI's own steps, the low-memory path its patchers'
        plan = [p for p in plan if p[0] == "ours" and p[2] not in PATHS]
    deadline = time.monotonic() + args.budget
    for kind, name, what in plan:
        left = deadline - time.monotonic()
        if left < 20:
            doc["skipped"].append(f"{name} {what}: budget spent")
            _write_json(path, doc)
            continue
        cap = left if args.cpu_smoke else CAP["anchor" if kind == "anchor" else what]
        if kind == "ours":
            r = _ours(name, what, args, min(cap, left))
            doc["results"].append(r)
            print(_result_line(r), flush=True)
        else:
            a = _anchor(name, what, args, min(cap, left))
            doc["anchors"].append(a)
            for line in a["lines"] or [f"ANCHOR-FAILED {name} {what} rc={a['rc']}"]:
                print(line, flush=True)
        _write_json(path, doc)
    if not doc["skipped"]:
        _write_json(path, doc)
    print(f"wrote {path}", flush=True)
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (v0.20.1)")
    ap.add_argument("--host", choices=["comfy", "diffusers"], default=None,
                    help="where the steps run: inside ComfyUI (default when a ComfyUI folder is given) or on "
                         "the CLI's diffusers host (no anchors)")
    ap.add_argument("--out", default="bench-out", help="folder for gpu_bench.json")
    ap.add_argument("--budget", type=float, default=330, help="seconds for the whole plan")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per workload (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of s/step (compilation, caches)")
    ap.add_argument("--only", nargs="*", default=None, help="workload or anchor-script names to run")
    ap.add_argument("--shared-bench", default=os.environ.get("LIKENESS_SHARED_BENCH",
                                                            str(HERE.parents[1] / "shared" / "bench")))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU: the same code in ~2 min")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile", default="off", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.host = args.host or ("comfy" if args.comfy else "diffusers")
    if args.host == "comfy" and not args.comfy:
        ap.error("give --comfy DIR (or set COMFYUI_PATH): a ComfyUI v0.20.1 folder, or --host diffusers")
    args.comfy = os.path.abspath(args.comfy) if args.comfy else None
    args.steps = args.steps or (1 if args.cpu_smoke or args.tiny else 10)
    args.warmup = args.warmup or (1 if args.cpu_smoke or args.tiny else 3)
    if args.one:
        steps, warmup = args.steps, args.warmup
        if WORKLOADS[args.one]["method"] == "seedselect" and not args.tiny:
            steps, warmup = 3, 1  # iterations of 20 sampling steps each: seconds, not milliseconds
        res = run_one(args.one, args.compile, args.tiny, steps, warmup, args.comfy, args.host)
        print("RESULT-JSON " + json.dumps(res), flush=True)
        return 0
    doc = run_plan(args)
    failed = [r for r in doc["results"] if r["status"] != "ok"]
    return 1 if args.cpu_smoke and (failed or doc["skipped"]) else 0


if __name__ == "__main__":
    sys.exit(main())

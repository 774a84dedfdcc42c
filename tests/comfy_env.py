"""Helpers for tests that run inside a real ComfyUI checkout (``pytest -m comfyui``).

ComfyUI is not a pip package: the tests find its source through ``COMFYUI_PATH`` and skip without
it (CI has none).  This module does what ComfyUI's ``main.py`` would have done before our nodes
run - path, working directory, CPU device on machines without CUDA - and builds tiny random-weight
checkpoints that ComfyUI's own loader detects as SD1.x, SD2.x and SDXL.

Checkpoints are created once under ``$COMFYUI_PATH/models/checkpoints`` and reused:

* ``tiny_sd15.safetensors`` (420 MiB) and ``tiny_sdxl.safetensors`` (2 GiB) with
  ``shared/comfyui/make_tiny_ckpt.py`` (``LIKENESS_TINY_CKPT_SCRIPT`` overrides its path);
* ``tiny_sd2.safetensors`` (~0.9 GiB: the OpenCLIP-H text encoder is full size) with
  :func:`make_tiny_sd2` below, built the same way from ComfyUI's own module definitions.

Run ``python tests/comfy_env.py sd15 sdxl sd2`` to create them ahead of a test run.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCRIPT = REPO.parent / "shared" / "comfyui" / "make_tiny_ckpt.py"
CHECKPOINTS = {"sd15": "tiny_sd15.safetensors", "sdxl": "tiny_sdxl.safetensors", "sd2": "tiny_sd2.safetensors"}

#: how long each checkpoint took to create in this process (seconds), for reports
CREATION_SECONDS: dict[str, float] = {}


def comfy_path() -> Path | None:
    """The ComfyUI checkout named by ``COMFYUI_PATH``, or None when unset."""
    p = os.environ.get("COMFYUI_PATH")
    if not p:
        return None
    path = Path(p).expanduser().resolve()
    if not (path / "comfy" / "model_management.py").is_file():
        raise RuntimeError(f"COMFYUI_PATH={p} is not a ComfyUI checkout (no comfy/model_management.py)")
    return path


def setup_comfy(path: Path):
    """Make ``import comfy`` work in-process the way ComfyUI's main.py would; idempotent.

    Returns ``comfy.model_management``.  The device is chosen when that module is first imported,
    so ``args.cpu`` must be set before, on machines without CUDA (argv is not parsed).
    """
    import torch

    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    os.chdir(path)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management

    return comfy.model_management


def _script() -> Path:
    p = Path(os.environ.get("LIKENESS_TINY_CKPT_SCRIPT", DEFAULT_SCRIPT))
    if not p.is_file():
        raise FileNotFoundError(f"make_tiny_ckpt.py not found at {p}; set LIKENESS_TINY_CKPT_SCRIPT")
    return p


def ensure_tiny_checkpoint(arch: str, path: Path | None = None) -> Path:
    """Path of the tiny ``arch`` checkpoint ("sd15", "sdxl", "sd2"), created if missing."""
    path = path or comfy_path()
    if path is None:
        raise RuntimeError("COMFYUI_PATH not set")
    out = path / "models" / "checkpoints" / CHECKPOINTS[arch]
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.safetensors")
    t0 = time.perf_counter()
    if arch == "sd2":
        setup_comfy(path)
        make_tiny_sd2(tmp)
    else:
        cmd = [sys.executable, str(_script()), "--comfy", str(path), "--arch", arch, "--out", str(tmp)]
        subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.replace(tmp, out)
    CREATION_SECONDS[arch] = time.perf_counter() - t0
    log.warning("created %s in %.1f s (%.0f MiB)", out, CREATION_SECONDS[arch], out.stat().st_size / 2**20)
    return out


def make_tiny_sd2(out: Path, seed: int = 0, std: float = 0.02) -> None:
    """A random SD2.x checkpoint ComfyUI detects as ``supported_models.SD20``.

    Detection needs model_channels 320, context_dim 1024 and linear transformer projections; the
    depth is free, so the UNet is one level with one res block and one transformer block.  The
    text encoder (OpenCLIP ViT-H, 24 layers) and the KL-VAE are fixed-size in ComfyUI.  SD20
    infers v-prediction from a block this UNet does not have, so it loads as EPS; tests that need
    v-prediction patch ``model_sampling`` the way ComfyUI's ModelSamplingDiscrete node does.
    """
    import torch
    import comfy.ops
    import comfy.supported_models
    import safetensors.torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    spec = importlib.util.spec_from_file_location("_make_tiny_ckpt", _script())
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)  # reuse its fill(): same initialisation as the SD1/SDXL files

    unet_config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": 320, "adm_in_channels": None,
        "use_temporal_resblock": False, "use_temporal_attention": False,
        "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [0, 0],
        "transformer_depth_middle": -2, "use_linear_in_transformer": True, "context_dim": 1024,
    }
    model_config = comfy.supported_models.SD20(unet_config)
    unet = UNetModel(**dict(model_config.unet_config), device="meta", operations=comfy.ops.disable_weight_init)
    unet_shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    clip = model_config.clip_target().clip(device="meta", dtype=torch.float16, model_options={})
    clip_shapes = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    vae_shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    sd.update(model_config.process_unet_state_dict_for_saving(mt.fill(unet_shapes, gen, std, torch.float16)))
    sd.update(model_config.process_clip_state_dict_for_saving(mt.fill(clip_shapes, gen, std, torch.float16)))
    sd.update(model_config.process_vae_state_dict_for_saving(mt.fill(vae_shapes, gen, std, torch.float16)))
    sd = {k: v.contiguous() for k, v in sd.items()}
    safetensors.torch.save_file(sd, str(out), metadata={"format": "pt", "tiny_ckpt": "sd2"})
    n = sum(math.prod(v.shape) for v in sd.values())
    log.info("tiny sd2: %d keys, %.1f M params", len(sd), n / 1e6)


def load_checkpoint(name: str):
    """``(MODEL, CLIP, VAE)`` through ComfyUI's own CheckpointLoaderSimple node, under
    ``torch.inference_mode()`` as ComfyUI's executor runs every node."""
    import torch
    import nodes  # ComfyUI's nodes.py

    with torch.inference_mode():
        return nodes.CheckpointLoaderSimple().load_checkpoint(name)


def v_prediction(model):
    """A clone of ``model`` that samples as v-prediction, as ComfyUI's ModelSamplingDiscrete node
    ("v_prediction") makes it: an object patch of ``model_sampling``."""
    import torch
    import comfy.model_sampling

    class ModelSamplingV(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    with torch.inference_mode():
        m = model.clone()
        ms = ModelSamplingV(model.model.model_config)
        m.add_object_patch("model_sampling", ms)
    return m


# ---- a real ComfyUI server on loopback (tests/test_comfy_workflow.py) -----------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu`` from ``root`` on 127.0.0.1, with everything it writes under ``base``.

    ``--base-directory base`` gives it its own ``custom_nodes``, ``models``, ``input``, ``output``,
    ``temp`` and ``user`` folders; link what it should see into them before :meth:`start`.  The
    database is in memory, so a second server never touches the checkout's ``user/comfyui.db``.
    The log (stdout and stderr) goes to ``base/server.log``.  Always :meth:`stop` it (a fixture
    teardown or ``finally``); it is stopped by its own pid only.
    """

    def __init__(self, root: Path, base: Path, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.root, self.base = Path(root), Path(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = 0.0

    def start(self, timeout: float = 300.0) -> "ComfyServer":
        for sub in ("custom_nodes", "models/checkpoints", "models/embeddings", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab")
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)
        finally:
            log.close()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=5)
                self.startup_seconds = time.perf_counter() - t0
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def request(self, method: str, path: str, payload=None, timeout: float = 60.0) -> tuple[int, bytes]:
        """``(status, body)``; HTTP errors are returned, not raised (connection errors are)."""
        import json
        import urllib.error
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str, timeout: float = 60.0):
        import json

        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {body[:500]!r}")
        return json.loads(body.decode() or "null")

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST an API-format graph to /prompt; returns its prompt id (validation errors raise)."""
        import json

        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id or "likeness-tests"})
        if status != 200:
            raise RuntimeError(f"/prompt refused the graph ({status}): {body.decode(errors='replace')[:3000]}")
        return json.loads(body)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict:
        """Poll /history/<id> until the prompt has finished; returns its history entry."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")


class EventListener:
    """Collects the server's websocket events of the given types for ``client_id`` (what the
    frontend receives), in a background thread; use as a context manager around a queue."""

    def __init__(self, server: ComfyServer, client_id: str, types: tuple[str, ...]):
        import threading

        self.url = f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}"
        self.types = set(types)
        self.events: list[dict] = []
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        import asyncio

        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__/__exit__
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        import asyncio
        import json

        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data.get("type") in self.types:
                            self.events.append(data)
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                        break

    def __enter__(self) -> "EventListener":
        self._thread.start()
        self._ready.wait(30)
        if self.error is not None:
            raise RuntimeError(f"cannot listen on {self.url}: {self.error!r}")
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.5)  # let the last events of a finished prompt arrive
        self._stop.set()
        self._thread.join(10)


def history_messages(entry: dict, kind: str) -> list[dict]:
    """The ``kind`` messages ("execution_cached", "execution_error", ...) of a /history entry."""
    return [data for name, data in entry.get("status", {}).get("messages", []) if name == kind]


def cached_nodes(entry: dict) -> set[str]:
    return {str(n) for m in history_messages(entry, "execution_cached") for n in m.get("nodes", [])}


# ---- UI-format workflow -> API-format prompt --------------------------------------------------

_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(kind, list) or kind in _WIDGET_TYPES


def _has_control_widget(name: str, spec) -> bool:
    """Whether the frontend adds a "control after generate" widget (fixed/increment/randomize)
    after this one, whose value then sits in widgets_values too (frontend rule: INT inputs named
    seed/noise_seed get one unless the input says otherwise; others only when asked)."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    cag = opts.get("control_after_generate")
    if kind == "INT" and cag is None:
        return name in ("seed", "noise_seed")
    return bool(cag)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt (what POST /prompt takes) for a UI-format workflow (what the editor
    saves and the template browser loads), the way the frontend converts it: every widget takes the
    next entry of ``widgets_values`` in the node's input order (plus one for a control-after-generate
    widget), and a widget input that is linked takes the link instead.  Frontend-only nodes (notes)
    and muted/bypassed nodes are left out.  Every ``widgets_values`` entry must be used up, except
    trailing nulls (widgets the frontend adds itself, e.g. PreviewAny's preview).
    """
    links = {l[0]: l for l in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind not in object_info:
            if kind in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
                continue
            raise KeyError(f"node {node['id']}: type {kind!r} is not known to the server")
        if node.get("mode", 0) in (2, 4):
            continue
        info = object_info[kind]
        order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, *_ = links[inp["link"]]
                linked[inp["name"]] = [str(src), slot]
        values = list(node.get("widgets_values") or [])
        inputs, i = {}, 0
        for name in [*order.get("required", []), *order.get("optional", [])]:
            spec = specs[name]
            if _is_widget(spec):
                if i >= len(values):
                    raise ValueError(f"node {node['id']} ({kind}): no widgets_values entry for {name!r}")
                inputs[name] = values[i]
                i += 1 + _has_control_widget(name, spec)
            if name in linked:
                inputs[name] = linked[name]
        if i > len(values) or any(v is not None for v in values[i:]):  # the frontend's own widgets
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widgets_values for {i} widget slots")
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    root = comfy_path()
    if root is None:
        sys.exit("set COMFYUI_PATH")
    for a in sys.argv[1:] or ["sd15", "sdxl", "sd2"]:
        t = time.perf_counter()
        p = ensure_tiny_checkpoint(a, root)
        print(f"{a}: {p} ({p.stat().st_size / 2**20:.0f} MiB) {time.perf_counter() - t:.1f} s", flush=True)


def require_comfy():
    """The ComfyUI checkout, set up for in-process use; skips the calling module where there is
    none (CI).  Test modules register it as their autouse ``comfy_root`` fixture."""
    import pytest

    root = comfy_path()
    if root is None:
        pytest.skip("COMFYUI_PATH not set: these tests run inside a ComfyUI checkout "
                    "(e.g. COMFYUI_PATH=~/.cache/likeness/ComfyUI)", allow_module_level=True)
    setup_comfy(root)
    return root


# ---- files for server tests (tests/test_comfy_workflow*.py) --------------------------------------

def write_disc_images(folder: Path, n: int = 4, *, captions: bool = False, seed: int = 0) -> None:
    """``n`` 64 px images of a coloured disc on a noisy background, moving a little per image;
    with ``captions`` a ``view<i>.txt`` caption each ("a photo of [name], view i")."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(n):
        img = rng.integers(0, 80, (64, 64, 3)).astype(np.uint8)
        disc = (yy - 32 - 3 * i) ** 2 + (xx - 28 - 2 * i) ** 2 < 15 ** 2
        img[disc] = (200, 60 + 20 * i, 40)
        Image.fromarray(img, "RGB").save(folder / f"view{i}.png")
        if captions:
            (folder / f"view{i}.txt").write_text(f"a photo of [name], view {i}\n", encoding="utf-8")


def link(src: Path, dst: Path) -> None:
    """Symlink ``src`` to ``dst``; a copy where symlinks are not allowed (Windows without privilege)."""
    import shutil

    try:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", ".ci", "__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)


#: ComfyUI's messages when a prompt's embedding:NAME is missing or unusable (comfy/sd1_clip.py)
EMBEDDING_WARNING = re.compile(r"(?i)embedding:\S+ does not exist|shape mismatch when trying to apply embedding"
                               r"|error loading embedding|warning.*embedding")

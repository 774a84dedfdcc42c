"""A real Stable Diffusion WebUI Forge on loopback, on the CPU, with this repository installed as an
extension: ``python launch.py --skip-prepare-environment --always-cpu --api`` from ``FORGE_PATH``
with its own ``--data-dir`` (a temporary folder holding ``models/Stable-diffusion``,
``models/Lora``, ``embeddings`` and ``extensions/likeness`` -> this checkout), so everything it
writes lies below that folder.  The log goes to ``data/server.log``; it is stopped by its own pid."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .comfy_runtime import REPO
from .comfy_server import free_port, link


class ForgeServer:
    def __init__(self, root: Path, data: Path, checkpoint: Path, port: int | None = None, others=()):
        """``checkpoint`` is loaded at start; ``others`` sit beside it in the checkpoint list."""
        self.root, self.data, self.checkpoint = Path(root), Path(data), Path(checkpoint)
        self.others = [Path(p) for p in others]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data / "server.log"
        self.proc: subprocess.Popen | None = None

    def _layout(self) -> None:
        for sub in ("models/Stable-diffusion", "models/Lora", "embeddings", "extensions"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        for ckpt in (self.checkpoint, *self.others):
            link(ckpt, self.data / "models" / "Stable-diffusion" / ckpt.name)
        link(REPO, self.data / "extensions" / "likeness")

    def command(self) -> list[str]:
        return [sys.executable, "launch.py", "--skip-prepare-environment", "--skip-install", "--always-cpu",
                "--api", "--port", str(self.port), "--data-dir", str(self.data), "--no-download-sd-model",
                "--skip-version-check", "--ckpt", str(self.data / "models" / "Stable-diffusion" / self.checkpoint.name)]

    def start(self, timeout: float = 900) -> "ForgeServer":
        self._layout()
        log = open(self.log_path, "w")
        # no bytecode written into the checkouts (this one is linked as the extension)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen(self.command(), cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{type(self).__name__} exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            if self._ready():
                # Live previews of an SDXL generation fetch a preview decoder on first use; this
                # machine is offline, and the previews are not what the tests look at
                self.post("/sdapi/v1/options", {"live_previews_enable": False})
                return self
            time.sleep(2)
        raise RuntimeError(f"{type(self).__name__} did not answer in {timeout} s:\n{self.log()[-4000:]}")

    def _ready(self) -> bool:
        """The extension's routes answer (they are added after the server starts listening)."""
        try:
            self.get("/likeness/v1/runs/latest")
        except urllib.error.HTTPError as e:
            return e.code == 404 and b"no run yet" in e.read()
        except OSError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=600) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=900) as r:
            return json.loads(r.read())

    def use_checkpoint(self, checkpoint: Path) -> None:
        """Select another checkpoint as a user does in the WebUI's list (Forge loads it for the
        next generation or run)."""
        self.post("/sdapi/v1/options", {"sd_model_checkpoint": Path(checkpoint).name})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

"""A real AUTOMATIC1111 Stable Diffusion WebUI on loopback, on the CPU in fp32, with this repository
installed as an extension: ``python launch.py --skip-prepare-environment --use-cpu all --no-half
--api`` from ``WEBUI_PATH`` with its own ``--data-dir`` (a temporary folder holding
``models/Stable-diffusion`` (the checkpoint and the yaml that tells A1111 its architecture),
``models/Lora``, ``embeddings`` and ``extensions/likeness`` -> this checkout), so everything it
writes lies below that folder.  The log goes to ``data/server.log``; it is stopped by its own pid."""
from __future__ import annotations

import sys

from .a1111_runtime import ARGS
from .comfy_server import link
from .forge_server import ForgeServer


class A1111Server(ForgeServer):
    def _layout(self) -> None:
        super()._layout()
        config = self.checkpoint.with_suffix(".yaml")
        link(config, self.data / "models" / "Stable-diffusion" / config.name)

    def command(self) -> list[str]:
        return [sys.executable, "launch.py", "--skip-prepare-environment", "--skip-install", *ARGS, "--api",
                "--loglevel", "DEBUG", "--port", str(self.port), "--data-dir", str(self.data),
                "--ckpt", str(self.data / "models" / "Stable-diffusion" / self.checkpoint.name)]

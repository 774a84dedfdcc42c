"""A real ComfyUI server on loopback, driven the way the browser drives it: ``python main.py
--cpu`` from the checkout with its own base directory, graphs posted to ``/prompt``, ``/history``
polled, websocket events collected.  Everything it writes lies below that base directory."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .comfy_runtime import REPO
from .images import write_disc_images

TESTS = Path(__file__).resolve().parents[1]

#: ComfyUI's messages when a prompt's embedding:NAME is missing or unusable (comfy/sd1_clip.py)
EMBEDDING_WARNING = re.compile(r"(?i)embedding:\S+ does not exist|shape mismatch when trying to apply embedding"
                               r"|error loading embedding|warning.*embedding")
#: ComfyUI's message for a LoRA key it could not apply
LORA_WARNING = re.compile(r"(?i)lora key not loaded")

_BASE_FOLDERS = ("custom_nodes", "models/checkpoints", "models/embeddings", "input", "output", "temp", "user")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link(src: Path, dst: Path) -> None:
    """Symlink ``src`` to ``dst``; a copy where symlinks are not allowed (Windows without privilege)."""
    try:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", ".ci", "__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)


class ComfyServer:
    """``python main.py --cpu`` from ``root`` on 127.0.0.1, with everything it writes under ``base``.

    ``--base-directory base`` gives it its own ``custom_nodes``, ``models``, ``input``, ``output``,
    ``temp`` and ``user`` folders; link what it should see into them before :meth:`start`.  The
    database is in memory, so a second server never touches the checkout's ``user/comfyui.db``.
    The tests folder is on its Python path, so test-only custom nodes import :mod:`support`.
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
        self.object_info: dict = {}

    def _launch(self) -> None:
        for sub in _BASE_FOLDERS:
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", *self.extra_args]
        path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 300.0) -> "ComfyServer":
        """Launch and wait until it answers; then read its ``/object_info``."""
        t0 = time.perf_counter()
        self._launch()
        while time.perf_counter() - t0 < timeout:
            self._check_alive("while starting")
            try:
                self.get("/system_stats", timeout=5)
            except OSError:
                time.sleep(0.5)
                continue
            self.startup_seconds = time.perf_counter() - t0
            self.object_info = self.get("/object_info")
            return self
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def _check_alive(self, when: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} {when}:\n{self.log_tail()}")

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
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str, timeout: float = 60.0):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {body[:500]!r}")
        return json.loads(body.decode() or "null")

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST an API-format graph to /prompt; returns its prompt id (validation errors raise)."""
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id or "likeness-tests"})
        if status != 200:
            raise RuntimeError(f"/prompt refused the graph ({status}): {body.decode(errors='replace')[:3000]}")
        return json.loads(body)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict:
        """Poll /history/<id> until the prompt has finished; returns its history entry."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            self._check_alive("while running a prompt")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status", {})
            if status.get("completed") is not None and (status["completed"] or status.get("status_str") == "error"):
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
        except BaseException as exc:  # reported by __enter__
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url) as ws:
                self._ready.set()
                while not self._stop.is_set() and await self._receive_one(ws):
                    pass

    async def _receive_one(self, ws) -> bool:
        """Take one message (or time out after 0.2 s so a stop is noticed); False once closed."""
        import asyncio

        import aiohttp

        try:
            msg = await ws.receive(timeout=0.2)
        except asyncio.TimeoutError:
            return True
        if msg.type == aiohttp.WSMsgType.TEXT:
            data = json.loads(msg.data)
            if data.get("type") in self.types:
                self.events.append(data)
            return True
        return msg.type not in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR)

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


def matching_lines(text: str, pattern: re.Pattern) -> list[str]:
    """The lines of a server log that ``pattern`` finds something in (warnings a test forbids)."""
    return [ln for ln in text.splitlines() if pattern.search(ln)]


@contextlib.contextmanager
def started_server(root: Path, base: Path, checkpoint: Path, image_folders: dict[str, dict]):
    """A started server for the workflow tests: the repository as the ``likeness`` custom node,
    :mod:`support.server_nodes` beside it, ``checkpoint`` as its one checkpoint, and for each
    ``image_folders`` entry ``name: kwargs`` an input folder of
    :func:`~support.images.write_disc_images` ``(**kwargs)``.  Stopped on exit."""
    srv = ComfyServer(root, base)
    for sub in _BASE_FOLDERS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    link(REPO, base / "custom_nodes" / "likeness")
    link(Path(__file__).with_name("server_nodes.py"), base / "custom_nodes" / "likeness_test_nodes.py")
    link(checkpoint, base / "models" / "checkpoints" / checkpoint.name)
    for name, kwargs in image_folders.items():
        write_disc_images(base / "input" / name, **kwargs)
    try:
        yield srv.start()
    finally:
        srv.stop()


def run_prompt(server: ComfyServer, prompt: dict, events: tuple[str, ...] = (), timeout: float = 1200):
    """Queue ``prompt``, wait, and insist it succeeded.  Returns ``(history entry, the data of the
    websocket events of the given types, what the server logged meanwhile, seconds)``."""
    client = f"likeness-test-{uuid.uuid4().hex[:8]}"
    start = len(server.log_text())
    t0 = time.perf_counter()
    with EventListener(server, client, events) as listener:
        entry = server.wait(server.queue(prompt, client), timeout=timeout)
    seconds = time.perf_counter() - t0
    errors = history_messages(entry, "execution_error")
    assert entry["status"]["status_str"] == "success", f"{errors}\n{server.log_tail()}"
    return entry, [e["data"] for e in listener.events], server.log_text()[start:], seconds

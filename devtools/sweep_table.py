"""The hostile-input sweep as a table for the note (issue 15).

Every option case of ``tests/test_hostile_inputs.py`` (``OPTION_CASES``) and the image, name, model
and fault cases of the issue, each run through the ``likeness`` command in a child process with its
own temp folders, reported as one markdown row:

    case | message (first line) | exit code | what was on disk after

"What was on disk" lists the files in the run's output folder ("nothing" when it is empty or was
never made) and, where the case starts from a file of the user's, whether that file is unchanged
(its sha256 before and after).  Not installed; run from a checkout whose parent is on PYTHONPATH:

    PYTHONPATH=/path/to/parent python devtools/sweep_table.py [--only WORD] > sweep.md
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tiny_models and the test module's cases


@dataclass
class Ctx:
    root: Path
    model: Path  # a tiny SD1 diffusers folder
    clip: Path  # a tiny CLIP vision folder
    imgs: Path  # three good 64x64 images


@dataclass
class Case:
    name: str
    argv: Callable[[Ctx, Path], list[str]]  # (context, output folder) -> the command's arguments
    setup: Callable[[Ctx, Path], Path | None] | None = None  # may return a user's file to watch
    stop: tuple[int, str] | None = None  # (signal, stdout prefix that triggers it)
    check: Callable[[Ctx, Path], str] | None = None  # an extra note about what is on disk
    env: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------- the runs


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _files(out: Path) -> str:
    if not out.exists():
        return "nothing"
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.is_symlink())
    return ", ".join(f"`{n}`" for n in names) if names else "nothing"


def _first_line(rc: int, out: str, err: str) -> str:
    """The message's first line (with the next one when it only announces a list)."""
    if rc < 0:
        return f"(killed by {signal.Signals(-rc).name}: a killed process says nothing)"
    errs = err.splitlines()
    at = next((i for i, ln in enumerate(errs) if ln.startswith("likeness:")), None)
    if at is not None:
        line = errs[at].strip()
        return line + " " + errs[at + 1].strip() if line.endswith(":") and at + 1 < len(errs) else line
    done = [ln for ln in out.splitlines() if ln.startswith(("done:", "wrote"))]
    other = [ln for ln in errs if ln.strip() and "Warning" not in ln]
    return (done[:1] or other[-1:] or ["(no message)"])[0].strip()


def _run(argv: list[str], stop: tuple[int, str] | None, env: dict, timeout: float = 600) -> tuple[int, str, str]:
    cmd = [sys.executable, "-u", "-m", "likeness.cli", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    if stop is None:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(stop[1]):
            break
    proc.send_signal(stop[0])
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(seen) + out, err


def run_case(ctx: Ctx, case: Case, index: int) -> tuple[str, str, str, str]:
    work = ctx.root / f"case{index:03d}"
    work.mkdir()
    out = work / "out"
    watched = case.setup(ctx, out) if case.setup else None
    before = _sha(watched) if watched is not None else None
    try:
        rc, stdout, stderr = _run(case.argv(ctx, out), case.stop, case.env)
    except subprocess.TimeoutExpired:
        return case.name, "(timed out)", "-", _files(out)
    disk = _files(out)
    if watched is not None:
        now = _sha(watched) if watched.exists() else "gone"
        disk += f"; the user's `{watched.name}` {'unchanged' if now == before else 'CHANGED'} (sha256 {before}…)"
    if case.check is not None:
        disk += "; " + case.check(ctx, out)
    return case.name, _first_line(rc, stdout, stderr), str(rc), disk


# -------------------------------------------------------------------------------- the cases


def _ti(ctx: Ctx, out: Path, *extra: str, imgs: Path | None = None, name: str = "sks-hostile",
        model: Path | None = None) -> list[str]:
    return ["ti", "--model", str(model or ctx.model), "--images", str(imgs or ctx.imgs), "--out", str(out),
            "--device", "cpu", "--name", name, "--preview-every", "0", "--steps", "2", *extra]


def _base(command: str, model: Path, imgs: Path, out: Path) -> list[str]:
    import test_hostile_inputs as T

    return T._base(command, model, imgs, out)


def option_cases() -> list[Case]:
    import test_hostile_inputs as T

    def argv(command, args):
        return lambda ctx, out: _base(command, ctx.root / "no-such-model", ctx.imgs, out) + list(args)

    return [Case(f"{command} {' '.join(args)}", argv(command, args)) for command, args, _ in T.OPTION_CASES]


def _folder_with(make: Callable[[Path], None]) -> Callable[[Ctx, Path], list[str]]:
    """A TI run on a fresh image folder that ``make`` fills."""
    def argv(ctx: Ctx, out: Path) -> list[str]:
        folder = out.parent / "imgs"
        folder.mkdir(exist_ok=True)
        make(folder)
        return _ti(ctx, out, imgs=folder)
    return argv


def _png(folder: Path, name: str, size=(64, 64), color=(200, 30, 30)) -> Path:
    from PIL import Image

    Image.new("RGB", size, color).save(folder / name)
    return folder / name


def _good(folder: Path) -> None:
    for i in range(3):
        _png(folder, f"good{i}.png", color=(60 * i, 90, 200))


def image_cases() -> list[Case]:
    def truncated(f):
        _good(f)
        data = _png(f, "broken.png").read_bytes()
        (f / "broken.png").write_bytes(data[: len(data) // 2])

    def loop(f):
        _good(f)
        os.symlink(f / "b.png", f / "a.png")
        os.symlink(f / "a.png", f / "b.png")

    def unreadable(f):
        _good(f)
        _png(f, "locked.png").chmod(0)

    def huge(f):
        _good(f)
        _png(f, "huge.png", size=(8000, 8000))

    return [
        Case("images: empty folder", _folder_with(lambda f: None)),
        Case("images: only non-images", _folder_with(lambda f: (f / "notes.txt").write_text("hello"))),
        Case("images: a truncated PNG", _folder_with(truncated)),
        Case("images: a 1x1 image", _folder_with(lambda f: (_good(f), _png(f, "dot.png", size=(1, 1))))),
        Case("images: an 8000x8000 image", _folder_with(huge)),
        Case("images: an 8000x8000 image, --resolution 64", lambda ctx, out: _folder_with(huge)(ctx, out)
             + ["--resolution", "64"]),
        Case("images: a symlink loop", _folder_with(loop)),
        Case("images: an unreadable file (chmod 000)" + (" - run as root, so it is readable" if os.geteuid() == 0
                                                          else ""), _folder_with(unreadable)),
        Case("images: names with spaces and unicode (must work)",
             _folder_with(lambda f: [_png(f, n, color=(i * 70, 20, 90)) for i, n in
                                     enumerate(["a photo 1.png", "ñandú 2.png", "写真 3.png"])])),
    ]


def _user_file(name: str) -> Callable[[Ctx, Path], Path]:
    def setup(ctx: Ctx, out: Path) -> Path:
        out.mkdir(parents=True)
        (out / name).write_bytes(b"the user's own file")
        return out / name
    return setup


def name_cases() -> list[Case]:
    def ti_named(name):
        return lambda ctx, out: _ti(ctx, out, name=name)

    return [
        Case("name: `../x`", ti_named("../x")),
        Case("name: an absolute path", ti_named("/tmp/likeness-sweep-abs")),
        Case("name: empty", ti_named("")),
        Case("name: 300 characters", ti_named("x" * 300)),
        Case("name: an existing vocabulary word (`dog`)", ti_named("dog")),
        Case("name: an existing file, no --overwrite", ti_named("sks-hostile"),
             setup=_user_file("sks-hostile.safetensors")),
        Case("name: unicode (`ñandú`, must work)", ti_named("ñandú")),
    ]


class _Payload:
    """A pickle that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def model_cases() -> list[Case]:
    def model_file(make: Callable[[Path, Ctx], None], suffix: str):
        def argv(ctx: Ctx, out: Path) -> list[str]:
            path = out.parent / f"model{suffix}"
            make(path, ctx)
            return _ti(ctx, out, model=path)
        return argv

    def truncated(path, ctx):
        data = next(ctx.model.rglob("*.safetensors")).read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def pickled(path, ctx):
        path.write_bytes(pickle.dumps({"state_dict": _Payload(path.parent / "PAYLOAD-RAN")}))

    def unsupported(path, ctx):
        import torch
        from safetensors.torch import save_file

        save_file({"model.layers.0.weight": torch.zeros(4, 4)}, str(path))

    def payload_check(ctx: Ctx, out: Path) -> str:
        ran = (out.parent / "PAYLOAD-RAN").exists()
        return "the pickle's payload RAN" if ran else "the pickle's payload was not executed"

    return [
        Case("model: missing path", lambda ctx, out: _ti(ctx, out, model=ctx.root / "missing.safetensors")),
        Case("model: random bytes named .safetensors",
             model_file(lambda p, c: p.write_bytes(os.urandom(4096)), ".safetensors")),
        Case("model: a truncated .safetensors", model_file(truncated, ".safetensors")),
        Case("model: a .ckpt holding a pickle payload", model_file(pickled, ".ckpt"), check=payload_check),
        Case("model: an unsupported architecture", model_file(unsupported, ".safetensors")),
    ]


def _loads(name: str) -> Callable[[Ctx, Path], str]:
    def check(ctx: Ctx, out: Path) -> str:
        import torch

        path = out / f"{name}.pt"
        if not path.exists():
            return f"no `{name}.pt`"
        try:
            step = torch.load(path, weights_only=True)["step"]
        except Exception as e:  # noqa: BLE001 - the note reports any failure to load
            return f"`{name}.pt` does NOT load ({e})"
        return f"`{name}.pt` loads (step {step})"
    return check


def fault_cases() -> list[Case]:
    long = ("--steps", "5000", "--save-every", "0")
    return [
        Case("fault: SIGINT mid-run", lambda ctx, out: _ti(ctx, out, *long), stop=(signal.SIGINT, "step "),
             check=_loads("sks-hostile")),
        Case("fault: SIGTERM mid-run", lambda ctx, out: _ti(ctx, out, *long), stop=(signal.SIGTERM, "step "),
             check=_loads("sks-hostile")),
        Case("fault: SIGHUP mid-run", lambda ctx, out: _ti(ctx, out, *long), stop=(signal.SIGHUP, "step "),
             check=_loads("sks-hostile")),
        Case("fault: SIGKILL while saving every step", lambda ctx, out: _ti(ctx, out, "--steps", "5000",
                                                                              "--save-every", "1"),
             stop=(signal.SIGKILL, "step "), check=_loads("sks-hostile")),
        Case("fault: SeedSelect Ctrl-C mid-run", _seedselect_long, stop=(signal.SIGINT, "step ")),
        Case("fault: resume a stopped run (`--resume`)", _resumed, check=_loads("sks-hostile")),
    ]


def _seedselect_long(ctx: Ctx, out: Path) -> list[str]:
    return ["seedselect", "--model", str(ctx.model), "--references", str(ctx.imgs), "--prompt", "a cat",
            "--clip-vision", str(ctx.clip), "--width", "64", "--height", "64", "--steps", "2", "--iterations",
            "500", "--state-every", "2", "--device", "cpu", "--out", str(out), "--name", "cat"]


def _resumed(ctx: Ctx, out: Path) -> list[str]:
    """Stop a run, then the same command with ``--resume`` (what the row reports)."""
    args = _ti(ctx, out, "--steps", "400", "--save-every", "0")
    _run(args, (signal.SIGINT, "step "), {})
    return args + ["--resume"]


def concurrent_row(ctx: Ctx, index: int) -> tuple[str, str, str, str]:
    """Two runs writing the same name at once: the second refuses; the first is stopped after."""
    work = ctx.root / f"case{index:03d}"
    out = work / "out"
    work.mkdir()
    first = subprocess.Popen([sys.executable, "-u", "-m", "likeness.cli", *_ti(ctx, out, "--steps", "5000")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in first.stdout:
        if line.startswith("step "):
            break
    rc, stdout, stderr = _run(_ti(ctx, out, "--steps", "5000", "--overwrite"), None, {})
    first.send_signal(signal.SIGINT)
    _, err1 = first.communicate(timeout=300)
    note = f"; the first run then stopped: {_first_line(first.returncode, '', err1)}"
    return ("fault: two runs of the same name at once (second, with --overwrite)", _first_line(rc, stdout, stderr),
            str(rc), _files(out) + note + "; " + _loads("sks-hostile")(ctx, out))


def full_disk_row(ctx: Ctx, index: int) -> tuple[str, str, str, str]:
    """A 300 KB tmpfs as --out: a clear error, the previous file intact (needs mount rights)."""
    work = ctx.root / f"case{index:03d}"
    out = work / "out"
    out.mkdir(parents=True)
    name = "fault: a full disk (300 KB tmpfs as --out)"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(out)], capture_output=True).returncode:
        return name, "(not run: this machine does not let us mount a tmpfs)", "-", "-"
    try:
        (out / "keep.bin").write_bytes(os.urandom(200_000))  # the user's file fills most of it
        before = _sha(out / "keep.bin")
        rc, stdout, stderr = _run(_ti(ctx, out, "--steps", "3", "--save-every", "1", "--vectors", "75"), None, {})
        disk = _files(out) + f"; the user's `keep.bin` {'unchanged' if _sha(out / 'keep.bin') == before else 'CHANGED'}"
        disk += "; " + _loads("sks-hostile")(ctx, out)
        return name, _first_line(rc, stdout, stderr), str(rc), disk
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)


# ------------------------------------------------------------------------------------- main


def _context(root: Path) -> Ctx:
    import torch
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    import tiny_models

    model = tiny_models.save_diffusers_folder(tiny_models.host_parts(tiny_models.tiny_host("sd1", seed=0)),
                                              root / "tiny-sd1")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(root / "clip")
    imgs = root / "imgs"
    imgs.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()).save(imgs / f"{i}.png")
    return Ctx(root, model, root / "clip", imgs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = p.parse_args(argv)
    cases = option_cases() + image_cases() + name_cases() + model_cases() + fault_cases()
    with tempfile.TemporaryDirectory(prefix="likeness-sweep-") as tmp:
        ctx = _context(Path(tmp))
        rows = []
        t0 = time.time()
        for i, case in enumerate(cases):
            if args.only in case.name:
                rows.append(run_case(ctx, case, i))
                print(f"{len(rows)} cases, {time.time() - t0:.0f} s: {rows[-1][0]}", file=sys.stderr, flush=True)
        if not args.only or args.only in "fault: two runs":
            rows.append(concurrent_row(ctx, len(cases)))
        if not args.only or args.only in "fault: a full disk":
            rows.append(full_disk_row(ctx, len(cases) + 1))
    print("| case | message (first line) | exit code | on disk after |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

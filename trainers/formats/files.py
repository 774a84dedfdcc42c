"""File safety rules every writer in the package follows.

A name a user typed is one plain word that cannot escape its folder; a file is written to a temp
file beside its target and renamed (a crash or Cancel never leaves a half-written file, and a set
of files appears all together or not at all); nothing is overwritten unless asked; files are read
without unpickling anything.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
import unicodedata
from pathlib import Path
from typing import Iterator, Mapping

import safetensors

#: Extensions a user might type into a name; the writer adds its own.
KNOWN_EXTENSIONS = (".pt", ".safetensors", ".bin", ".ckpt")

MAX_NAME_LENGTH = 80

# Windows refuses these as file names whatever the extension; a name that works on one OS
# should work on the others, since embeddings are shared.
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}


# --------------------------------------------------------------------------------------------
# Names and paths
# --------------------------------------------------------------------------------------------

def validate_name(name: str) -> str:
    """Check an embedding/file name a user typed and return it stripped of outer whitespace.

    The name becomes both a file stem and the prompt trigger (A1111 uses the stem, ComfyUI's
    ``embedding:NAME`` syntax splits on whitespace and ``:``), so it must be one plain word.
    Raises ``ValueError`` saying what to change.
    """
    if not isinstance(name, str):
        raise ValueError(f"The name must be text, got {type(name).__name__}.")
    name = name.strip()
    if not name:
        raise ValueError("The name is empty: type a short word such as 'my_cat'.")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"The name is {len(name)} characters long; use at most {MAX_NAME_LENGTH}.")
    lower = name.lower()
    for ext in KNOWN_EXTENSIONS:
        if lower.endswith(ext):
            raise ValueError(f"Drop the extension: use '{name[:-len(ext)]}' instead of '{name}'; "
                             "the file extensions are added automatically.")
    if "/" in name or "\\" in name:
        raise ValueError(f"The name '{name}' contains a path separator ('/' or '\\'); "
                         "use a plain name, files always go to the embeddings folder.")
    if ".." in name:
        raise ValueError(f"The name '{name}' contains '..'; remove it.")
    if name.startswith("."):
        raise ValueError(f"The name '{name}' starts with '.', which hides the file; "
                         "remove the dot.")
    if name.endswith("."):
        raise ValueError(f"The name '{name}' ends with '.'; remove the trailing dot.")
    if ":" in name:
        raise ValueError(f"The name '{name}' contains ':' (a drive letter or ComfyUI's "
                         "'embedding:' syntax); remove it.")
    for ch in name:
        _check_name_char(name, ch)
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise ValueError(f"'{name}' is a reserved file name on Windows; choose another name.")
    return name


def _check_name_char(name: str, ch: str) -> None:
    """Allow letters (any script), digits, '_', '-' and '.'; say which character is wrong."""
    if unicodedata.category(ch).startswith("C"):  # control, format, unassigned, private use
        raise ValueError(f"The name contains an invisible control character {ch!r}; retype it.")
    if ch.isspace():
        raise ValueError(f"The name '{name}' contains a space; use '_' or '-' instead "
                         "(a prompt would read it as two words).")
    if not (ch.isalnum() or ch in "_-."):
        raise ValueError(f"The name '{name}' contains {ch!r}; use only letters, digits, "
                         "'_', '-' and '.'.")


def safe_path(folder: str | os.PathLike, filename: str | os.PathLike) -> Path:
    """``folder/filename`` resolved, refusing anything that lands outside ``folder``.

    Both sides are resolved (symlinks followed), so ``..``, absolute names and a symlink inside
    the folder that points elsewhere are all caught.  Raises ``ValueError``.
    """
    root = Path(folder).resolve()
    target = (root / filename).resolve()
    if target == root or not target.is_relative_to(root):
        raise ValueError(f"'{filename}' would be written outside the folder {root}; "
                         "use a plain file name.")
    return target


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_paths_writable(folder: str | os.PathLike, paths: list[Path], overwrite: bool) -> list[Path]:
    """Fail early, before any training: refuse targets that exist (unless ``overwrite``) or a
    folder we cannot write to; shared by every file kind we write.

    A missing folder is fine if it can be created (the writers create it).  Writability is probed
    by creating and deleting a temp file: ``os.access`` says yes to root and ignores read-only
    mounts.  Returns ``paths``.
    """
    for p in paths:
        if p.exists() and not p.is_file():
            raise FileExistsError(f"{p} exists and is not a file; choose another name.")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} already exists; choose another name or set overwrite.")
    base = _nearest_existing(Path(folder).absolute())
    if not base.is_dir():
        raise NotADirectoryError(f"Cannot write to {folder}: {base} is not a folder.")
    try:
        fd, probe = _open_temp(base / ".likeness-write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"Cannot write to {folder} ({e.strerror}); "
                              "choose a folder you can write to.") from e
    return paths


def read_safetensors(path: Path, max_tensors: int | None = None, what: str = "file"):
    """``({name: tensor}, metadata)`` of a safetensors file, on the CPU; ``ValueError`` if it is
    unreadable or holds more than ``max_tensors`` tensors (a model where a small ``what`` was
    expected: do not read gigabytes)."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if max_tensors is not None and len(keys) > max_tensors:
                raise ValueError(f"{path.name} has {len(keys)} tensors; it is not {what}.")
            return {k: f.get_tensor(k) for k in keys}, dict(f.metadata() or {})
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path.name} is not a readable safetensors file: {e}") from e


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------

#: A temp file of ours untouched this long was left by a killed save (a live write keeps
#: touching it), so the next save of the same name removes it.
STALE_TEMP_SECONDS = 15 * 60


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete ``.<name>.<8 hex>.tmp`` files beside ``path`` older than ``STALE_TEMP_SECONDS``: the
    leftovers of a save that was killed (SIGKILL, power loss) before it could clean up.  Only our
    own pattern for this very name is touched, never another file."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and \
                    time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _open_temp(path: Path) -> tuple[int, Path]:
    """Create a new hidden temp file next to ``path``; mode 0o666 minus umask like a normal file
    (``mkstemp`` would make it 0o600, unreadable to a UI running as another user)."""
    remove_stale_temps(path)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                           0o666), tmp
        except FileExistsError:
            continue


def _write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh temp file beside ``path`` and return it; on any failure (Cancel
    is a ``BaseException``) the temp file is removed before the error propagates."""
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_files(files: Mapping[Path, bytes]) -> list[Path]:
    """Write several files so that none is replaced until all are fully written.

    Each goes to a temp file in its own folder, then all are renamed with ``os.replace`` (atomic
    on one filesystem): a failure or Cancel while writing leaves the old files (or none) and no
    temp files, never a half-written target or half of a set.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            staged.append((_write_temp(Path(path), data), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    return [path for _, path in staged]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file and a rename (see ``atomic_write_files``)."""
    return atomic_write_files({Path(path): data})[0]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that need a file name rather than bytes (large LoRAs, checkpoints)::

        with atomic_path(target) as tmp:
            safetensors.torch.save_file(sd, tmp)

    ``tmp`` becomes ``target`` when the block ends normally and is deleted if it raises.
    """
    path = Path(path)
    fd, tmp = _open_temp(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["KNOWN_EXTENSIONS", "MAX_NAME_LENGTH", "validate_name", "safe_path", "check_paths_writable",
           "read_safetensors", "atomic_write_files", "atomic_write_bytes", "atomic_path"]

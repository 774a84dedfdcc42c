"""Training images from a folder, as a ComfyUI node: an IMAGE batch, their captions and a summary.

The folder is read and checked by ``trainers.data.load_image_folder`` (the same checks the CLI
uses: grayscale, transparent and 16-bit images are refused with their file names), so a bad
dataset fails here, before any training node runs.  Captions come from same-named ``.txt`` /
``.caption`` files and leave as one line per image (an empty line where an image has none),
which is what the training node's ``captions`` input reads.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

import folder_paths
from comfy_api.latest import io, ui

from ..trainers import data as D
from .common import TRAINING_CATEGORY


#: the dropdown's first entry: use the typed ``folder`` (so a typed path, and a saved workflow, still work)
TYPED = "(the folder typed above)"


def input_subfolders() -> list[str]:
    """The folders directly inside ComfyUI's input directory, for the dropdown (listed afresh each
    time ComfyUI asks for the node's inputs, so a folder made meanwhile shows after a refresh)."""
    try:
        entries = os.scandir(folder_paths.get_input_directory())
    except OSError:
        return []
    with entries:
        return sorted((e.name for e in entries if e.is_dir() and not e.name.startswith(".")), key=str.lower)


def chosen_folder(folder: str, pick: str | None) -> str:
    """The dropdown's folder when one is picked, else the typed one."""
    return pick if pick and pick != TYPED else folder


def _what_goes_in() -> str:
    exts = ", ".join(e.lstrip(".") for e in D.IMAGE_EXTENSIONS)
    return (f"the training images (3-20 photos of the subject; {exts}; 8-bit RGB), and optionally a caption "
            "for an image in a same-named .txt or .caption file beside it (photo1.txt for photo1.png). "
            "Then press Run again")


def check_folder(path: Path) -> None:
    """Say what to do when the folder is missing or holds no images (the first run of a template)."""
    if not path.exists():
        raise D.DatasetError(f"the training-image folder {path} does not exist yet: create it and put in it "
                             + _what_goes_in())
    if not path.is_dir():
        raise D.DatasetError(f"{path} is a file, not a folder: give the folder that holds the training images")
    if not any(p.suffix.lower() in D.IMAGE_EXTENSIONS for p in path.iterdir() if p.is_file()):
        raise D.DatasetError(f"no images in {path}: put in it " + _what_goes_in())


def resolve_folder(folder: str) -> Path:
    """An absolute path as given, or a folder relative to ComfyUI's input directory.  A relative
    path may not leave the input directory (no ``..`` escapes)."""
    text = (folder or "").strip().strip('"').strip("'")
    if not text:
        raise D.DatasetError("no folder given: pick a folder of ComfyUI's input directory in the dropdown, or "
                             "type one (e.g. 'my_subject' for input/my_subject) or an absolute path")
    path = Path(os.path.expanduser(text))
    if path.is_absolute():
        return Path(os.path.normpath(path))
    base = Path(os.path.normpath(os.path.abspath(folder_paths.get_input_directory())))
    joined = Path(os.path.normpath(base / path))
    if ".." in path.parts or os.path.commonpath([base, joined]) != str(base):
        raise D.DatasetError(f"folder {text!r} leaves ComfyUI's input directory; give a folder inside "
                             f"{base} or an absolute path")
    return joined


def folder_fingerprint(path: Path) -> str:
    """Names, sizes and modification times of the images and captions in ``path``: changes when a
    file is added, removed, replaced or edited, so ComfyUI re-runs the node then (and only then)."""
    h = hashlib.sha256(str(path).encode())
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        return f"unreadable: {path}: {exc}"
    exts = D.IMAGE_EXTENSIONS + D.CAPTION_EXTENSIONS
    for e in entries:
        if e.name.lower().endswith(exts):
            try:
                st = e.stat()
            except OSError:
                continue
            h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _size(im: torch.Tensor) -> str:
    return f"{im.shape[1]}x{im.shape[0]}"


def load_training_images(folder: str, resolution: int) -> tuple[torch.Tensor, str, str]:
    """``(IMAGE batch [B, H, W, 3], captions text, summary text)`` for the node."""
    path = resolve_folder(folder)
    check_folder(path)
    data = D.load_image_folder(path)  # refuses unusable images, naming the files
    sizes = [_size(im) for im in data.images]
    if resolution < 0:
        raise D.DatasetError(f"resolution must be 0 (keep the size) or a number of pixels, got {resolution}")
    if resolution == 0:
        if len(set(sizes)) > 1:
            listing = ", ".join(f"{s} {z}" for s, z in zip(data.sources, sizes))
            raise D.DatasetError(f"the images in {path} have different sizes ({listing}); set a resolution to "
                                 "resize them all to one square size, or resize them yourself")
        images = data.images
    else:
        images = [D.resize_center_crop(im, resolution) for im in data.images]
    batch = torch.stack([im.float().clamp(0, 1) for im in images]).contiguous()

    captions = "\n".join(c or "" for c in data.captions)
    have = [s for s, c in zip(data.sources, data.captions) if c is not None]
    lack = [s for s, c in zip(data.sources, data.captions) if c is None]
    counts: dict[str, int] = {}
    for s in sizes:
        counts[s] = counts.get(s, 0) + 1
    size_text = ", ".join(f"{s} x{n}" for s, n in counts.items())
    out_size = f"{batch.shape[2]}x{batch.shape[1]}"
    lines = [f"{len(data)} images from {path}", f"sizes: {size_text}"
             + (f" -> {out_size} (short side resized, centre-cropped)" if resolution else "")]
    if not have:
        lines.append("captions: none (.txt/.caption beside an image); the trainer will use its templates")
    else:
        lines.append(f"captions: {len(have)} of {len(data)}")
        if lack:
            lines.append("without a caption: " + ", ".join(lack))
        lines += [f"  {s}: {c}" for s, c in zip(data.sources, data.captions) if c is not None]
    return batch, captions, "\n".join(lines)


class LoadTrainingImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessLoadImageFolder",
            display_name="Load Training Images (Likeness)",
            category=TRAINING_CATEGORY,
            description=(
                "Loads every image in a folder (png, jpg, webp, bmp; sorted by name) as one IMAGE batch for "
                "the Likeness trainers, with per-image captions from same-named .txt or .caption files. "
                "Grayscale, transparent and 16-bit images are refused by name: save them as 8-bit RGB."
            ),
            search_aliases=["image folder", "dataset", "training images", "load images", "likeness"],
            inputs=[
                io.String.Input("folder", default="", tooltip="A folder inside ComfyUI's input directory (e.g. "
                                "'my_subject' for input/my_subject) or an absolute path (or pick one below). Every image in it is "
                                "used; 'photo1.txt' or 'photo1.caption' beside 'photo1.png' is its caption."),
                io.Int.Input("resolution", default=512, min=0, max=4096, step=8, tooltip="Resize the short side "
                             "of every image to this many pixels (bicubic, antialiased) and centre-crop it to a "
                             "square. SD1.x: 512, SD2.x: 768, SDXL: 1024. 0: keep the images' own size (they "
                             "must then all be the same size)."),
                io.Combo.Input("input_folder", options=[TYPED, *input_subfolders()], default=TYPED, optional=True,
                               display_name="or pick from input/", tooltip="The folders in ComfyUI's input "
                               "directory (refresh the page, or press R, after making a new one). A folder picked "
                               "here is used instead of the typed one; leave it on the first entry to use the typed "
                               "folder."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The images as one IMAGE batch, in file-name "
                                "order."),
                io.String.Output(display_name="captions", tooltip="One line per image, in the same order (an "
                                 "empty line for an image without a caption file). Connect it to the training "
                                 "node's captions input."),
                io.String.Output(display_name="summary", tooltip="How many images, their sizes, how many have "
                                 "captions and which files lack one."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder=None, resolution=None, input_folder=None, **kwargs):
        folder = chosen_folder(folder, input_folder)
        if not isinstance(folder, str):  # the folder comes from a link: only its value can tell
            return ("linked", resolution)
        try:
            path = resolve_folder(folder)
        except ValueError as exc:
            return ("invalid", str(exc))
        return (folder_fingerprint(path), resolution)

    @classmethod
    def execute(cls, folder: str, resolution: int, input_folder: str | None = None) -> io.NodeOutput:
        batch, captions, summary = load_training_images(chosen_folder(folder, input_folder), resolution)
        return io.NodeOutput(batch, captions, summary, ui=ui.PreviewText(summary))


NODES = [LoadTrainingImages]

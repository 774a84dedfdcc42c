"""Stable Diffusion 1.x / 2.x / XL loaded with diffusers, behind the seam: the host
(``host.py``), its loaders (``folder.py``: diffusers folders, shipped configs, offline guard;
``single_file.py``: original-layout checkpoints), prompt encoding (``text.py``), the file formats
it reads and writes (``formats.py``) and a CLIP vision image encoder (``clip_vision.py``)."""
from .clip_vision import HFClipVision
from .clip_vision import load as load_clip_vision
from .folder import (ASSETS, CLIP_TOKENIZER_DIR, clip_tokenizer, config_folder, folder_scheduler, folder_tokenizer, infer_family,
                     offline, prediction_from_scheduler)
from .host import DiffusersHost, default_device, pick_compute_dtype
from .single_file import detect_family, read_checkpoint
from .text import DiffusersCond

__all__ = ["DiffusersHost", "DiffusersCond", "HFClipVision", "load_clip_vision", "ASSETS", "CLIP_TOKENIZER_DIR",
           "clip_tokenizer",
           "config_folder", "folder_scheduler", "folder_tokenizer", "infer_family", "offline",
           "prediction_from_scheduler", "detect_family", "read_checkpoint", "default_device",
           "pick_compute_dtype"]

"""Diffusers folders, offline: the modules of a ``model_index.json`` folder, the shipped configs and
tokenizer that describe the real architectures, and the guard that keeps the Hub out.

Also the two questions a set of loaded modules answers about itself (which family, which
prediction), since a folder says neither directly and ``from_components`` callers may not either.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

from ...trainers.families import family as family_spec

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"
MAX_TOKENS = 77  # CLIP's context: BOS + 75 tokens + EOS
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


def config_folder(family: str) -> Path:
    """The shipped diffusers-layout configs (no weights) of ``family``'s real architecture."""
    return ASSETS / family_spec(family).config_folder


def clip_tokenizer(pad_token: str = "<|endoftext|>", vocab_dir: Path | str = CLIP_TOKENIZER_DIR):
    """CLIP's BPE tokenizer from the shipped files; ``pad_token`` is the one thing models differ in
    (OpenAI CLIP pads with ``<|endoftext|>`` (49407), OpenCLIP with ``!`` (0))."""
    from transformers import CLIPTokenizer

    vocab, merges = str(Path(vocab_dir) / "vocab.json"), str(Path(vocab_dir) / "merges.txt")
    kw = dict(pad_token=pad_token, model_max_length=MAX_TOKENS)
    try:  # transformers 5: tokenizers-backed class, takes the files as vocab=/merges=
        return CLIPTokenizer(vocab=vocab, merges=merges, **kw)
    except TypeError:  # transformers 4: slow tokenizer, vocab_file=/merges_file=
        return CLIPTokenizer(vocab_file=vocab, merges_file=merges, **kw)


@contextlib.contextmanager
def offline():
    """Forbid the Hugging Face Hub while loading: the env var for libraries that read it late, the
    hub constant for those that read it at import.  Every call also passes local paths and
    ``local_files_only=True``; this is the belt to those braces."""
    import huggingface_hub.constants as hub_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


# ----------------------------------------------------------------------------------------------
# what loaded modules say about themselves


def infer_family(unet, text_encoders) -> str:
    """sdxl: two encoders (and a text_time UNet); sd2: OpenCLIP's gelu; sd1: OpenAI CLIP's quick_gelu."""
    text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if len(text_encoders) == 2 or text_time:
        if not (len(text_encoders) == 2 and text_time):
            raise ValueError("an SDXL model needs two text encoders and a UNet with "
                             "addition_embed_type='text_time'")
        return "sdxl"
    act = getattr(text_encoders[0].config, "hidden_act", "quick_gelu")
    return "sd2" if act == "gelu" else "sd1"


def prediction_from_scheduler(scheduler) -> str:
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {kind!r}: only 'epsilon' and 'v_prediction'")
    return PREDICTIONS[kind]


# ----------------------------------------------------------------------------------------------
# loading a folder


def load_folder(path: Path, family: str | None = None) -> dict:
    """Modules of a diffusers folder (``model_index.json``), from local files only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} is a folder but not a diffusers model (no model_index.json); "
                         "give a diffusers folder or a .safetensors/.ckpt checkpoint file")
    index = json.loads((path / "model_index.json").read_text())
    two = (index.get("text_encoder_2") or [None])[0] is not None
    parts = [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)]
    if two:
        parts.append(("text_encoder_2", CLIPTextModelWithProjection))
    # diffusers warns at length when asked for low-memory loading without accelerate: ask only with it
    low_mem = {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    loaded = {}
    for sub, cls in parts:
        try:
            kw = low_mem if sub in ("unet", "vae") else {}
            loaded[sub] = cls.from_pretrained(str(path / sub), local_files_only=True, **kw)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path.name}: cannot load its {sub} ({e})") from e
    tes = [loaded["text_encoder"]] + ([loaded["text_encoder_2"]] if two else [])
    toks = [folder_tokenizer(path / "tokenizer")] + ([folder_tokenizer(path / "tokenizer_2")] if two else [])
    scheduler = folder_scheduler(path / "scheduler")
    return dict(unet=loaded["unet"], vae=loaded["vae"], tokenizers=toks, text_encoders=tes,
                scheduler=scheduler, family=family or infer_family(loaded["unet"], tes),
                prediction=prediction_from_scheduler(scheduler))


def folder_tokenizer(folder: Path):
    """The folder's own tokenizer files if it has them, else the shipped BPE with the pad token its
    ``tokenizer_config.json`` names (the shipped config folders carry only that file)."""
    from transformers import CLIPTokenizer

    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        tok.model_max_length = MAX_TOKENS
        return tok
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder} has no tokenizer files")
    pad = json.loads((folder / "tokenizer_config.json").read_text()).get("pad_token", "<|endoftext|>")
    return clip_tokenizer(pad["content"] if isinstance(pad, dict) else pad)


def folder_scheduler(folder: Path):
    """Any SD scheduler config as a DDPMScheduler: the host needs only its training schedule
    (betas -> alphas_cumprod) and prediction_type, which every discrete SD scheduler shares."""
    from diffusers import DDPMScheduler

    try:
        config = DDPMScheduler.load_config(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the scheduler config in {folder} ({e})") from e
    return DDPMScheduler.from_config(config)


__all__ = ["ASSETS", "CLIP_TOKENIZER_DIR", "MAX_TOKENS", "config_folder", "clip_tokenizer", "offline",
           "infer_family", "prediction_from_scheduler", "load_folder", "folder_tokenizer", "folder_scheduler"]

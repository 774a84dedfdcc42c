"""AUTOMATIC1111's Stable Diffusion WebUI in a test process: what ``WEBUI_PATH`` points to (a checkout
laid out by ``tests/support/get_webui.sh a1111``), imported the way its ``webui.py`` starts (paths,
``ldm`` / ``sgm``, ``shared_init.initialize``) on the CPU in fp32, with its data folder in a temporary
directory, and the tiny checkpoints loaded by its own ``sd_models.load_model``.

A1111 picks a checkpoint's architecture from a ``<name>.yaml`` beside the file when there is one,
else from its keys with the full-size configs; a tiny model therefore travels with its yaml (the
WebUI's own ``v1-inference.yaml`` with a one-level UNet and the text encoder's tokenizer and config
read from a local folder instead of the Hub).  The blocks that the LDM UNet always has and ComfyUI's
tiny layout leaves out (the middle block, the output blocks' transformers) are added as identity
blocks (unit norms, zero weights), as ``forge_runtime.forge_checkpoint`` does for Forge.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "hosts" / "assets"
#: how A1111 runs in the tests: the CPU, fp32 weights, no network, nothing written in its checkout
ARGS = ["--use-cpu", "all", "--no-half", "--precision", "full", "--skip-torch-cuda-test", "--skip-version-check",
        "--no-download-sd-model", "--do-not-download-clip"]
#: the tiny UNet's one level (support.tiny_checkpoints: 320 channels, one res block + transformer)
TINY_UNET = {"num_res_blocks": 1, "channel_mult": [1], "attention_resolutions": [1]}


def webui_path() -> Path | None:
    """The AUTOMATIC1111 checkout named by ``WEBUI_PATH``, when it is one (``modules/sd_models.py``
    and the ``ldm`` repository it clones)."""
    p = os.environ.get("WEBUI_PATH")
    if p and (Path(p) / "modules" / "sd_models.py").is_file() \
            and (Path(p) / "repositories" / "stable-diffusion-stability-ai" / "ldm").is_dir():
        return Path(p)
    return None


def import_a1111(root: Path, data_dir: Path | None = None) -> None:
    """A1111's modules importable and initialised in this process, as ``webui.py`` does before it
    loads a model: ``sys.argv`` for its argument parser (parsed once, at import), its data folder in
    ``data_dir`` (a temporary one by default)."""
    if "modules.shared_init" in sys.modules:
        return
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="likeness-a1111-data-"))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    argv = sys.argv
    sys.argv = [argv[0], *ARGS, "--data-dir", str(data_dir)]
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from modules import paths  # noqa: F401  (puts the repositories on sys.path)
        import ldm.modules.encoders.modules  # noqa: F401
        import sgm.modules.encoders.modules  # noqa: F401
        from modules import shared_init

        shared_init.initialize()
        from modules import processing, sd_models  # noqa: F401  (in webui.py's order: circular imports)
    finally:
        sys.argv = argv


def in_this_process() -> Path:
    """The checkout ``WEBUI_PATH`` names, imported here (``import_a1111``); skips the calling test,
    saying why, without one, without A1111's requirements, or where Forge is loaded (both WebUIs
    name their package ``modules``: one per process)."""
    import pytest

    root = webui_path()
    if root is None:
        pytest.skip("WEBUI_PATH is not set to an AUTOMATIC1111 checkout (tests/support/get_webui.sh a1111)")
    pytest.importorskip("gradio", reason="AUTOMATIC1111's requirements (requirements_versions.txt) are not installed")
    if "backend" in sys.modules:
        pytest.skip("Forge is loaded in this process; run the AUTOMATIC1111 tests on their own (-k a1111)")
    import_a1111(root)
    return root


def clip_folder() -> Path:
    """CLIP ViT-L/14's tokenizer and text-model config as a local folder (what A1111 would fetch as
    ``openai/clip-vit-large-patch14``), from the files this repository ships."""
    from support.tiny_checkpoints import cache_dir

    out = cache_dir() / "a1111-clip-vit-large-patch14"
    if not (out / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
        for src in (ASSETS / "clip_tokenizer" / "vocab.json", ASSETS / "clip_tokenizer" / "merges.txt",
                    ASSETS / "sd15" / "tokenizer" / "tokenizer_config.json",
                    ASSETS / "sd15" / "text_encoder" / "config.json"):
            shutil.copy(src, tmp / src.name)
        try:
            os.replace(tmp, out)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_config(root: Path, arch: str) -> str:
    """The yaml A1111 reads beside the tiny ``arch`` checkpoint (SD1 only so far)."""
    from omegaconf import OmegaConf

    if arch != "sd15":
        raise ValueError(f"no tiny A1111 config for {arch!r} yet")
    cfg = OmegaConf.load(root / "configs" / "v1-inference.yaml")
    cfg.model.params.unet_config.params.update(TINY_UNET)
    cfg.model.params.cond_stage_config.params = {"version": str(clip_folder())}
    return OmegaConf.to_yaml(cfg)


def with_config(path: Path, root: Path, arch: str = "sd15") -> Path:
    """``path`` with its ``.yaml`` beside it (how A1111 is told a checkpoint's architecture)."""
    path.with_suffix(".yaml").write_text(tiny_config(root, arch))
    return path


def a1111_checkpoint(root: Path, arch: str = "sd15") -> Path:
    """The tiny ``arch`` checkpoint with the LDM UNet's blocks that ComfyUI's tiny layout lacks added
    as identity blocks, and its yaml; cached beside the original."""
    import safetensors.torch as sf
    from omegaconf import OmegaConf

    from support.tiny_checkpoints import ensure_tiny_checkpoint

    src = ensure_tiny_checkpoint(arch)
    out = src.with_name(f"a1111_{src.name}")
    if out.is_file() and out.with_suffix(".yaml").is_file():
        return out
    sd = sf.load_file(str(src))
    params = OmegaConf.to_container(OmegaConf.create(tiny_config(root, arch)).model.params.unet_config.params)
    ldm_repo = str(root / "repositories" / "stable-diffusion-stability-ai")
    if ldm_repo not in sys.path and "ldm" not in sys.modules:  # a test process that runs A1111 as a server
        sys.path.append(ldm_repo)
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**params)
    for k, v in unet.state_dict().items():
        key = f"model.diffusion_model.{k}"
        if key not in sd:
            norm = k.endswith(".weight") and v.ndim == 1
            sd[key] = torch.ones(v.shape, dtype=torch.float16) if norm else torch.zeros(v.shape, dtype=torch.float16)
    # A1111's "Original" emphasis rescales the text encoding by its mean; a final norm without bias
    # makes that mean 0 and the rescale 0/0 (real checkpoints have a bias)
    bias = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    sd[bias] = torch.full_like(sd[bias], 0.1)
    tmp = out.with_name(out.name + ".tmp")
    sf.save_file(sd, str(tmp))
    os.replace(tmp, out)
    return with_config(out, root, arch)


def load_model(path: Path):
    """A checkpoint loaded as A1111 loads the one selected in its UI: ``shared.sd_model`` (hijacked,
    embeddings database attached).  Earlier models stay as they are (A1111 would move the previous
    one to the meta device)."""
    from modules import sd_models

    sd_models.model_data.sd_model = None
    info = sd_models.CheckpointInfo(str(path))
    return sd_models.load_model(info)


def load_tiny(root: Path, arch: str = "sd15"):
    """The tiny ``arch`` checkpoint as A1111's ``shared.sd_model``."""
    return load_model(a1111_checkpoint(root, arch))

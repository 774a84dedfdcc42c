"""The seam: what every method needs from a model, whichever program loaded it.

A *host* (``hosts/comfy.py``, ``hosts/diffusers.py``) adapts a loaded model to this protocol; the
methods in ``trainers/`` see nothing else.  The noise convention is k-diffusion's (Karras et al.
2022): a clean latent ``x0`` is noised as ``x = x0 + sigma * noise`` and the denoiser returns its
estimate of ``x0``.  The host hides the network's own parameterisation (eps, v) behind
``denoise`` and tells the trainer, through ``output_scale``, how the network output enters the x0
estimate, so ``((x0_hat - x0) / output_scale(sigma))**2`` is exactly the MSE in the network's own
parameterisation (eps-MSE for eps models, v-MSE for v models) - the loss the model was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class TextEncoderInfo:
    """One text encoder whose input embeddings a placeholder's vectors are spliced into.

    ``key`` is the name used in files and in ``vectors`` dicts: ``"clip_l"`` (SD1.x, SDXL's first
    encoder), ``"clip_h"`` (SD2.x's OpenCLIP ViT-H), ``"clip_g"`` (SDXL's OpenCLIP bigG).
    """

    key: str
    width: int


@dataclass(frozen=True)
class ImageMeta:
    """Where a training crop came from; SDXL feeds it to the denoiser as size conditioning."""

    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)
    target_hw: tuple[int, int] | None = None


@dataclass
class ModelInfo:
    """What the files we write record about the base model."""

    family: str  # "sd1", "sd2", "sdxl"
    prediction: str  # "eps" or "v"
    name: str = "unknown"  # file or folder name of the checkpoint
    hash: str | None = None  # short content hash when cheaply known
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Host(Protocol):
    """A loaded text-to-image latent diffusion model, as the methods see it.

    Every tensor the host returns lives on ``device``.  Frozen weights stay in the host's own dtype
    and are never modified; the host never computes gradients for them (``requires_grad`` false or
    equivalent), but gradients flow *through* them to the inputs that need them (TI vectors).
    """

    info: ModelInfo
    device: torch.device
    #: dtype the denoiser and encoders compute in (bf16/fp16 on GPUs, fp32 on CPU).
    compute_dtype: torch.dtype
    #: latent channels and the pixel-to-latent downscale factor (4 and 8 for SD1/SD2/SDXL).
    latent_channels: int
    latent_scale: int

    def text_encoders(self) -> Sequence[TextEncoderInfo]:
        """The encoders a placeholder needs vectors for, in file order (SDXL: clip_l, clip_g)."""

    def check_placeholder(self, name: str) -> None:
        """Raise ``ValueError`` (with advice) if ``name`` cannot serve as a new word: empty, or
        already a single word of any encoder's vocabulary (it would hijack that word in WebUIs)."""

    def token_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        """Input embeddings of ``text``'s tokens (no BOS/EOS/padding), per encoder key:
        ``{key: [n_tokens, width]}`` fp32 on ``device``; used to initialise vectors."""

    def training_sigmas(self) -> torch.Tensor:
        """The model's discrete training noise levels, ascending, fp32 on ``device`` (SD: 1000)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, H, W, 3]`` in [0, 1] (ComfyUI IMAGE layout) -> model-space latents
        ``[B, C, H/f, W/f]`` fp32, already scaled as the denoiser expects.  No gradients."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> pixels ``[B, H, W, 3]`` in [0, 1], fp32 on CPU.  No gradients."""

    def encode_text(
        self,
        prompts: Sequence[str],
        placeholder: str | None = None,
        vectors: dict[str, torch.Tensor] | None = None,
        meta: Sequence[ImageMeta] | None = None,
    ) -> Any:
        """Conditioning for a batch of prompts, differentiable in ``vectors``.

        Every occurrence of ``placeholder`` in a prompt is replaced by the ``n`` vectors of
        ``vectors[key]`` (``[n, width]`` fp32) in encoder ``key``'s input embeddings.  The result is
        opaque to the trainer; it is only passed back to ``denoise`` (batch size = len(prompts)).
        ``meta`` gives per-prompt size conditioning for models that use it (SDXL).
        """

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """x0 estimate for noisy latents ``x`` [B, C, h, w] at noise levels ``sigma`` [B]."""

    def output_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """Coefficient ``B(sigma)`` [B] of the raw network output in the x0 estimate
        (eps: ``-sigma``; v: ``-sigma / sqrt(sigma^2 + 1)``)."""

    def frozen_parameters(self) -> dict[str, torch.Tensor]:
        """Read-only view of the host's weights, for tests that check nothing changed."""


@runtime_checkable
class Tunable(Protocol):
    """What weight-training methods (DreamBooth: LoRA, full, pivotal) need beyond ``Host``.

    Parameter names are the host's own state-dict names with a component prefix that
    ``trainers.lora_format.normalize_layer_name`` understands: ``unet.<diffusers path>`` /
    ``text_encoder[_2].<HF CLIP path>`` (diffusers host) or ``diffusion_model.<LDM path>`` /
    ``clip_l|clip_h|clip_g.transformer.<HF CLIP path>`` (ComfyUI host), ending in ``.weight`` or
    ``.bias``.  The host's tensors are never written: a method changes what the network *computes*
    by patching parameters on the fly, so the loaded model stays bit-identical.
    """

    def tunable_parameters(self, part: str) -> dict[str, torch.Tensor]:
        """Read-only parameters of ``part`` ("unet" or a text-encoder key) that can be patched:
        the weights and biases of its Linear, Conv and norm layers (not token/position tables)."""

    def parameter_patches(self, fns: dict[str, Any]) -> Any:
        """Context manager: while active, every forward that reads parameter ``name`` uses
        ``fns[name](p)`` instead (``p`` in the compute dtype; the result must keep its shape).
        Gradients flow through ``fns`` to whatever tensors they close over."""

    def unet_layout(self) -> Any:
        """The UNet's block layout (``trainers.lora_format.UNetLayout``), to name LoRA keys."""

    def gradient_checkpointing(self) -> Any:
        """Context manager: recompute the UNet's block activations in backward (less memory)."""

"""The seam: what every method needs from a model, whichever program loaded it.

A *host* (``hosts/comfy/``, ``hosts/diffusers/``) adapts a loaded model to this protocol; the
methods in ``trainers/`` see nothing else.  The noise convention is k-diffusion's (Karras et al.
2022): a clean latent ``x0`` is noised as ``x = x0 + sigma * noise`` and the denoiser returns its
estimate of ``x0``.  The host hides the network's own parameterisation (eps, v) behind
``denoise`` and tells the trainer, through ``output_scale``, how the network output enters the x0
estimate, so ``((x0_hat - x0) / output_scale(sigma))**2`` is exactly the MSE in the network's own
parameterisation (eps-MSE for eps models, v-MSE for v models) - the loss the model was trained with.

This file is the whole contract between the methods and the programs that load models:

* ``Host``: a loaded text-to-image latent diffusion model (every method);
* ``Tunable``: a host whose weights a method may patch (DreamBooth: LoRA, full, pivotal);
* ``Exportable``: a host that can hand back its own model objects with a result applied, and write
  a full checkpoint (what the nodes and the CLI give the user);
* ``SeedModel`` and ``ImageEncoder``: a prompt-conditioned denoiser and a differentiable image
  embedding (SeedSelect, metrics).

Nodes and the CLI call nothing on a host that is not declared here; ``tests/host_contract.py``
checks every promise for every host, and a new host is done when it passes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol, Sequence, TypeVar, runtime_checkable

import torch

from .families import FAMILIES


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


@dataclass(frozen=True)
class ParameterNaming:
    """How a ``Tunable`` host names the parameters it exposes, declared so the file formats can map
    them to LoRA keys and checkpoint keys without learning each host's spelling.

    A name is ``<prefix><path>``: ``unet_prefix`` + a UNet path in ``unet_scheme`` ("diffusers":
    ``down_blocks.1.attentions.0…``; "ldm": the original ``input_blocks.4.1…``), or
    ``encoder_prefixes[key]`` + a Hugging Face CLIP path (``text_model.encoder.layers.N…``, with or
    without ``text_model.``) for text encoder ``key``.
    """

    unet_prefix: str
    unet_scheme: str  # "diffusers" or "ldm"
    encoder_prefixes: dict[str, str]


#: the diffusers host's names: ``unet.<diffusers path>``, ``text_encoder[_2].<HF CLIP path>``
DIFFUSERS_NAMING = {
    f.name: ParameterNaming("unet.", "diffusers", {e.key: f"{e.component}." for e in f.encoders})
    for f in FAMILIES.values()
}


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
    #: a latent's sides must be multiples of this (2 ** the UNet's downsamplings).
    latent_multiple: int

    def training(self) -> ContextManager[Any]:
        """Context manager every training run happens in: leaves the host program's inference
        mode (ComfyUI runs nodes under ``torch.inference_mode()``) and enables grad.  Every tensor a
        trainer creates that autograd may save must be created inside.

        A host whose step can trade speed for memory says so with a ``path`` attribute
        (``"fast"``, the default, or ``"low_memory"``; set it before the block) and a
        ``fast_path_memory()`` estimate (ComfyUI); a host without them has one path."""

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

    def decode_latents(self, latents: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        """Model-space latents -> pixels ``[B, H, W, 3]`` in [0, 1], fp32.  By default on CPU and
        without gradients (previews); ``differentiable=True`` keeps the graph to ``latents`` and
        returns the pixels on ``device`` (SeedSelect's semantic loss)."""

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
class Tunable(Host, Protocol):
    """What weight-training methods (DreamBooth: LoRA, full, pivotal) need beyond ``Host``.

    Parameter names are the host's own, spelled as its ``naming`` declares (a prefix per part,
    then a UNet path in a known scheme or a Hugging Face CLIP path), ending in ``.weight`` or
    ``.bias``.  The host's tensors are never written: a method changes what the network *computes*
    by patching parameters on the fly, so the loaded model stays bit-identical.
    """

    naming: ParameterNaming

    def tunable_parameters(self, part: str) -> dict[str, torch.Tensor]:
        """Read-only parameters of ``part`` ("unet" or a text-encoder key) that can be patched:
        the weights and biases of its Linear, Conv and norm layers (not token/position tables)."""

    def parameter_patches(self, fns: dict[str, Any]) -> Any:
        """Context manager: while active, every forward that reads parameter ``name`` uses
        ``fns[name](p)`` instead (``p`` in the compute dtype, or the weight as loaded, in fp32, when
        the compute copy lost precision - the host then casts the result once; the result must keep
        its shape).
        Gradients flow through ``fns`` to whatever tensors they close over."""

    def unet_layout(self) -> Any:
        """The UNet's block layout (``UNetLayout`` of the formats' UNet naming), to name keys."""

    def gradient_checkpointing(self) -> Any:
        """Context manager: recompute the UNet's block activations in backward (less memory)."""


@runtime_checkable
class Branchable(Protocol):
    """A ``Tunable`` host that can also run a layer's output through a branch (LoRA's way to train;
    a separate protocol until every host implements it, so ``isinstance(h, Tunable)`` stays true)."""

    def module_branches(self, fns: dict[str, Any]) -> Any:
        """Context manager: while active, the layer owning weight ``name`` (a key of
        ``tunable_parameters``, ending in ``.weight``) returns ``fns[name](x, y)`` instead of its
        output ``y`` for input ``x`` (both in the compute dtype; the result must keep ``y``'s shape).

        This is how LoRA trains (``y + s * up(down(x))``): the adapter is a branch on the
        activations, so an update far below one rounding step of a bf16/fp16 weight still changes
        what the layer computes.  Gradients flow through ``fns`` to what they close over; the
        host's weights are never written."""


@runtime_checkable
class Exportable(Protocol):
    """What a host gives back to its user: its *own* model objects with a result applied (ComfyUI:
    ``(MODEL, CLIP)`` clones; diffusers: a new host over the changed weights), and a full checkpoint
    file.  The host's input objects are never modified."""

    def with_lora(self, lora_state_dict: dict[str, torch.Tensor], strength_model: float = 1.0,
                  strength_clip: float = 1.0) -> Any:
        """The model with a kohya LoRA state dict applied exactly as the host's own LoRA loader
        applies a file of it."""

    def with_deltas(self, deltas: dict[str, torch.Tensor]) -> Any:
        """The model with a full fine-tune's ``deltas`` (names as ``tunable_parameters``) added."""

    def save_checkpoint(self, path: Any, deltas: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Any:
        """The model with ``deltas`` added as one single-file checkpoint in the original layout,
        written to a temp file and renamed; returns the path."""


T = TypeVar("T")
#: the denoiser a ``SeedModel`` hands to ``run``'s function: (x [B, C, h, w], sigma [B]) -> x0
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class SeedModel(Protocol):
    """A prompt-conditioned denoiser with a differentiable decoder: what SeedSelect optimises a
    noise through.  ``trainers.seedselect.PromptSeedModel`` builds one over any ``Host``; ComfyUI
    builds one over MODEL + CONDITIONING + VAE, so it runs inside its own sampler machinery."""

    device: torch.device
    compute_dtype: torch.dtype
    latent_channels: int
    latent_scale: int  # pixels per latent cell (8)
    latent_multiple: int  # the latent's sides must be multiples of this (the UNet's downsamplings)

    def training_sigmas(self) -> torch.Tensor:
        """Ascending discrete training sigmas; the last is the largest (``sigma_max``)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` in [0, 1] -> model-space latents, no gradients."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> ``[B, H, W, 3]`` in [0, 1], *differentiable*, on ``device``."""

    def run(self, sigmas: torch.Tensor, cfg: float, fn: Callable[[Denoiser], T], shape=None) -> T:
        """Call ``fn`` with the prompt's denoiser (CFG ``cfg`` against the negative prompt; 1: none)
        for sampling latents of ``shape`` over ``sigmas``, and return what it returns."""


@runtime_checkable
class ImageEncoder(Protocol):
    """A differentiable image embedding (CLIP vision, DINOv2): SeedSelect's semantic loss and the
    metrics."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, H, W, 3]`` in [0, 1] (any size) -> embeddings ``[B, D]`` (not normalised),
        differentiable in the pixels.  fp32 out, on the images' device."""


__all__ = ["TextEncoderInfo", "ImageMeta", "ModelInfo", "ParameterNaming", "DIFFUSERS_NAMING", "Host",
           "Tunable", "Exportable", "SeedModel", "ImageEncoder", "Denoiser"]

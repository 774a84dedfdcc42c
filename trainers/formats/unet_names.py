"""The UNet's two naming schemes and how they map onto each other.

diffusers names a ``UNet2DConditionModel``'s modules by level (``down_blocks.1.attentions.0…``);
the original LDM/SGM code, the single-file checkpoints and ComfyUI number one flat list of blocks
(``input_blocks.4.1…``).  The mapping depends only on a :class:`UNetLayout`; LoRA keys, hosts'
parameter names and checkpoint export all convert through it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

#: ResnetBlock2D children (diffusers) and their names in LDM's ResBlock.
_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "conv_shortcut": "skip_connection"}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET_TO_LDM.items()}

#: Modules outside the down/mid/up blocks.
_BASIC_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                 "time_embedding.linear_2": "time_embed.2",
                 "add_embedding.linear_1": "label_emb.0.0",
                 "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
                 "conv_out": "out.2"}
_BASIC_TO_DIFFUSERS = {v: k for k, v in _BASIC_TO_LDM.items()}

#: Top-level LDM module names; no diffusers UNet module has one of them.
LDM_TOP = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")

_D_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")
_D_SAMPLER = re.compile(r"^(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv$")
_D_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")
_L_BLOCK = re.compile(r"^(input|output)_blocks\.(\d+)\.(\d+)(?:\.(.+))?$")
_L_MID = re.compile(r"^middle_block\.(\d+)(?:\.(.+))?$")


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _resnet_child(rest: str | None, table: Mapping[str, str], path: str) -> str | None:
    if rest is None:
        return None
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    raise ValueError(f"Unknown ResNet module '{rest}' in UNet path '{path}'.")


@dataclass(frozen=True)
class UNetLayout:
    """What the diffusers ↔ LDM block numbering depends on: res blocks per level (down blocks;
    up blocks have one more) and, per up block in diffusers order, whether it has attention
    (in LDM an up block's upsampler is ``output_blocks.N.2`` after an attention, else ``.N.1``).

    SD1/SD2: ``(2, 2, 2, 2)``, ``(False, True, True, True)``; SDXL: ``(2, 2, 2)``,
    ``(True, True, False)``.  ``down_attention`` (per down block; unknown if None) only
    sharpens the check of names.  :meth:`from_config` reads a diffusers UNet config.
    """

    layers_per_block: tuple[int, ...]
    up_attention: tuple[bool, ...]
    down_attention: tuple[bool, ...] | None = None

    def __post_init__(self):
        lpb, up = tuple(self.layers_per_block), tuple(self.up_attention)
        down = None if self.down_attention is None else tuple(self.down_attention)
        if (not lpb or any(int(n) < 1 for n in lpb) or len(up) != len(lpb)
                or (down is not None and len(down) != len(lpb))):
            raise ValueError(f"Bad UNet layout: layers_per_block={lpb}, up_attention={up}, "
                             f"down_attention={down}.")
        object.__setattr__(self, "layers_per_block", tuple(int(n) for n in lpb))
        object.__setattr__(self, "up_attention", tuple(bool(a) for a in up))
        if down is not None:
            object.__setattr__(self, "down_attention", tuple(bool(a) for a in down))

    def _down_attn(self, level: int) -> bool:
        return self.down_attention is None or self.down_attention[level]

    @classmethod
    def from_config(cls, config: Mapping) -> "UNetLayout":
        """From a diffusers ``UNet2DConditionModel`` config (``unet.config``)."""
        cfg = dict(config)
        levels = len(cfg["block_out_channels"])
        lpb = cfg.get("layers_per_block", 2)
        lpb = (lpb,) * levels if isinstance(lpb, int) else tuple(lpb)
        ups, downs = cfg.get("up_block_types") or (), cfg.get("down_block_types") or ()
        if len(ups) != levels or len(downs) != levels:
            raise ValueError(f"UNet config has {levels} levels but block types {downs}, {ups}.")
        return cls(lpb, tuple("CrossAttn" in t for t in ups),
                   tuple("CrossAttn" in t for t in downs))

    @property
    def _up_layers(self) -> tuple[int, ...]:
        return tuple(reversed(self.layers_per_block))

    def _input_start(self, level: int) -> int:
        return 1 + sum(n + 1 for n in self.layers_per_block[:level])

    def _output_start(self, level: int) -> int:
        return sum(n + 1 for n in self._up_layers[:level])

    def to_ldm(self, path: str) -> str:
        """A diffusers UNet module path as LDM/SGM names it (``down_blocks.1.attentions.0.proj_in``
        → ``input_blocks.4.1.proj_in`` for SDXL).  Raises ``ValueError`` for paths outside the
        layout or unknown to it."""
        levels = len(self.layers_per_block)
        if path in _BASIC_TO_LDM:
            return _BASIC_TO_LDM[path]
        if m := _D_BLOCK.match(path):
            side, kind, rest = m.group(1), m.group(3), m.group(5)
            b, j = int(m.group(2)), int(m.group(4))
            if b >= levels:
                raise ValueError(f"'{path}': the UNet has {levels} levels (see UNetLayout).")
            n_max = self.layers_per_block[b] if side == "down" else self._up_layers[b] + 1
            if j >= n_max:
                raise ValueError(f"'{path}': {side} block {b} has {n_max} {kind} (see UNetLayout).")
            has_attn = self.up_attention[b] if side == "up" else self._down_attn(b)
            if kind == "attentions" and not has_attn:
                raise ValueError(f"'{path}': {side} block {b} has no attention (see UNetLayout).")
            n = self._input_start(b) + j if side == "down" else self._output_start(b) + j
            block = f"{side.replace('down', 'input').replace('up', 'output')}_blocks.{n}"
            if kind == "attentions":
                return _join(block, "1", rest)
            return _join(block, "0", _resnet_child(rest, _RESNET_TO_LDM, path))
        if m := _D_SAMPLER.match(path):
            side, b = m.group(1), int(m.group(2))
            if b >= levels:
                raise ValueError(f"'{path}': the UNet has {levels} levels (see UNetLayout).")
            if side == "down":
                return f"input_blocks.{self._input_start(b) + self.layers_per_block[b]}.0.op"
            n = self._output_start(b) + self._up_layers[b]
            return f"output_blocks.{n}.{2 if self.up_attention[b] else 1}.conv"
        if m := _D_MID.match(path):
            kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "attentions" and i == 0:
                return _join("middle_block.1", rest)
            if kind == "resnets" and i in (0, 1):
                return _join(f"middle_block.{2 * i}", _resnet_child(rest, _RESNET_TO_LDM, path))
        raise ValueError(f"'{path}' is not a module of a diffusers UNet2DConditionModel with an "
                         "LDM name (expected down_blocks.*, mid_block.*, up_blocks.*, "
                         "conv_in, conv_out, time_embedding.*, add_embedding.*).")

    def key_to_ldm(self, key: str) -> str:
        """A state-dict key (module path + parameter name) in LDM names."""
        module, _, param = key.rpartition(".")
        return f"{self.to_ldm(module)}.{param}"

    def to_diffusers(self, path: str) -> str:
        """Inverse of :meth:`to_ldm`."""
        if path in _BASIC_TO_DIFFUSERS:
            return _BASIC_TO_DIFFUSERS[path]
        if m := _L_BLOCK.match(path):
            side, n, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            counts = (self.layers_per_block if side == "input"
                      else tuple(k + 1 for k in self._up_layers))
            start = self._input_start if side == "input" else self._output_start
            for b, count in enumerate(counts):
                j = n - start(b)
                if side == "input":
                    if not 0 <= j <= count:
                        continue
                    if j == count:  # the level's downsampler
                        if sub == 0 and rest == "op":
                            return f"down_blocks.{b}.downsamplers.0.conv"
                        break
                    if sub == 1 and self._down_attn(b):
                        return _join(f"down_blocks.{b}.attentions.{j}", rest)
                    if sub == 0:
                        return _join(f"down_blocks.{b}.resnets.{j}",
                                     _resnet_child(rest, _RESNET_TO_DIFFUSERS, path))
                    break
                if not 0 <= j < count:
                    continue
                attn = self.up_attention[b]
                if sub == 0:
                    return _join(f"up_blocks.{b}.resnets.{j}",
                                 _resnet_child(rest, _RESNET_TO_DIFFUSERS, path))
                if sub == 1 and attn:
                    return _join(f"up_blocks.{b}.attentions.{j}", rest)
                if sub == (2 if attn else 1) and j == count - 1 and rest == "conv":
                    return f"up_blocks.{b}.upsamplers.0.conv"
                break
        elif m := _L_MID.match(path):
            sub, rest = int(m.group(1)), m.group(2)
            if sub == 1:
                return _join("mid_block.attentions.0", rest)
            if sub in (0, 2):
                return _join(f"mid_block.resnets.{sub // 2}",
                             _resnet_child(rest, _RESNET_TO_DIFFUSERS, path))
        raise ValueError(f"'{path}' is not an LDM UNet module this layout has "
                         f"({self}); pass the model's UNetLayout.")


_SD = UNetLayout((2, 2, 2, 2), (False, True, True, True), (True, True, True, False))
#: The real models' layouts (checked against their shipped configs in the tests).
DEFAULT_LAYOUTS = {"sd1": _SD, "sd2": _SD,
                   "sdxl": UNetLayout((2, 2, 2), (True, True, False), (False, True, True))}


def is_ldm_path(path: str) -> bool:
    """Whether a UNet module path is in LDM names (the two schemes share no top-level name)."""
    return path.split(".", 1)[0] in LDM_TOP


def unet_layout_of(unet_config: dict) -> UNetLayout:
    """The block layout of an LDM ``UNetModel`` built from a ComfyUI-style ``unet_config`` (ComfyUI's
    own, and the one Forge's ``huggingface_guess`` estimates), as LoRA names need it."""
    nrb = unet_config["num_res_blocks"]
    levels = len(unet_config["channel_mult"])
    nrb = [nrb] * levels if isinstance(nrb, int) else list(nrb)
    # ComfyUI's UNetModel takes input depths from the front of the list and output depths from
    # the back (``transformer_depth_output.pop()``): output block 0 is the list's last entry
    down_depth = list(unet_config["transformer_depth"])
    up_depth = list(reversed(unet_config["transformer_depth_output"]))
    down, i = [], 0
    for n in nrb:
        down.append(any(d > 0 for d in down_depth[i:i + n]))
        i += n
    up, i = [], 0
    for n in reversed(nrb):  # output blocks run from the deepest level up; n + 1 per level
        up.append(any(d > 0 for d in up_depth[i:i + n + 1]))
        i += n + 1
    return UNetLayout(tuple(nrb), tuple(up), tuple(down))


__all__ = ["UNetLayout", "DEFAULT_LAYOUTS", "LDM_TOP", "is_ldm_path", "unet_layout_of"]

"""The shapes world: a seeded procedural renderer of 64×64 images with matching captions.

A scene is a handful of discrete attributes (shape, colour, fill pattern, background, position,
size, count).  ``render(scene)`` draws it deterministically (4× supersampled, box-filtered down, so
edges are antialiased); ``caption(scene)`` writes the matching English caption, e.g.
``"two small red striped stars on a blue background, top left"``; ``parse_caption`` reads one back.

Splits (``sample_scene(rng, split)``):

* ``"train"`` — what the base model is trained on.  Never uses the NEW concepts
  (shape ``"moon"``, pattern ``"checked"``); the RARE concept (shape ``"diamond"``) appears with
  probability ``RARE_P`` (0.5 %).
* ``"new"``  — every scene uses a new concept (``concept=`` picks which, else one at random).
* ``"rare"`` — every scene uses the rare concept.
* ``"all"``  — every value uniformly (what the classifier and the autoencoder are trained on).

Every concept word is a single CLIP BPE token ("triangles", the plural, is the one exception: two).
Patterns are laid out in absolute image coordinates with an 8-px period aligned to the latent grid
(a stripe/dot/check phase that does not move with the shape), so an autoencoder can reproduce them
from "this region is striped".
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, asdict

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64          # output resolution
SS = 4             # supersampling factor

SHAPES = ["circle", "square", "triangle", "star", "heart", "diamond", "moon"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
          "heart": "hearts", "diamond": "diamonds", "moon": "moons"}
COLOURS = {
    "red": (220, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 20),
    "pink": (245, 120, 190),
}
PATTERNS = ["solid", "striped", "dotted", "checked"]
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "blue": (40, 80, 225),
    "green": (40, 170, 60),
}
POSITIONS = ["top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right"]
SIZES = ["small", "large"]
COUNTS = ["one", "two"]

NEW_CONCEPTS = {"moon": "shape", "checked": "pattern"}   # never in the train split
RARE_CONCEPT = ("shape", "diamond")                       # < 1 % of the train split
RARE_P = 0.005

TRAIN_SHAPES = ["circle", "square", "triangle", "star", "heart"]
TRAIN_PATTERNS = ["solid", "striped", "dotted"]

ATTRIBUTES = {
    "shape": SHAPES,
    "colour": list(COLOURS),
    "pattern": PATTERNS,
    "background": list(BACKGROUNDS),
    "position": POSITIONS,
    "size": SIZES,
    "count": COUNTS,
}

_CELL = (16, 32, 48)           # 3×3 grid centres, in output pixels
_RADIUS = {"small": 7.0, "large": 13.0}
_PAIR_DX = 8.0                 # two (small) shapes sit ±8 px either side of the cell centre


@dataclass(frozen=True)
class Scene:
    shape: str = "circle"
    colour: str = "red"
    pattern: str = "solid"
    background: str = "white"
    position: str = "center"
    size: str = "large"
    count: str = "one"

    def __post_init__(self):
        for k, values in ATTRIBUTES.items():
            v = getattr(self, k)
            if v not in values:
                raise ValueError(f"Scene.{k}={v!r}: choose one of {values}")
        if self.count == "two" and self.size != "small":
            raise ValueError("Scene: count='two' needs size='small' (two large shapes do not fit a cell)")
        if self.colour == self.background:
            raise ValueError(f"Scene: colour and background are both {self.colour!r}; pick different ones")

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------- drawing
def _polygon(cx, cy, r, pts):
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _star_pts(n=5, inner=0.45):
    out = []
    for i in range(2 * n):
        a = -math.pi / 2 + i * math.pi / n
        rr = 1.0 if i % 2 == 0 else inner
        out.append((rr * math.cos(a), rr * math.sin(a)))
    return out


def _heart_pts(k=64):
    out = []
    for i in range(k):
        t = 2 * math.pi * i / k
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((x / 17.0, -y / 17.0 + 0.12))
    return out


_STAR = _star_pts()
_HEART = _heart_pts()
_TRI = [(0.0, -1.0), (0.95, 0.72), (-0.95, 0.72)]
_DIAMOND = [(0.0, -1.05), (0.8, 0.0), (0.0, 1.05), (-0.8, 0.0)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float):
    """Draw one filled shape (value 255) on a supersampled L-mode mask; coordinates already ×SS."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        s = r * 0.82
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, _TRI), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.08, _STAR), fill=255)
    elif shape == "heart":
        draw.polygon(_polygon(cx, cy, r * 1.05, _HEART), fill=255)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, _DIAMOND), fill=255)
    elif shape == "moon":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        o = 0.55 * r
        draw.ellipse([cx - r + o, cy - r - 0.1 * r, cx + r + o, cy + r - 0.1 * r], fill=0)
    else:  # pragma: no cover - Scene validates
        raise ValueError(shape)


def shape_centres(scene: Scene) -> list[tuple[float, float]]:
    """Centres (x, y) in output pixels of the shapes drawn for ``scene``."""
    i = POSITIONS.index(scene.position)
    cx, cy = _CELL[i % 3], _CELL[i // 3]
    if scene.count == "one":
        return [(float(cx), float(cy))]
    return [(cx - _PAIR_DX, float(cy)), (cx + _PAIR_DX, float(cy))]


def _pattern_mask(pattern: str) -> np.ndarray:
    """1 where the fill shows the shape colour, 0 where it shows the darker secondary; hi-res grid."""
    n = SIZE * SS
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / SS   # output-pixel coordinates
    if pattern == "solid":
        return np.ones((n, n), np.float32)
    # Every pattern repeats every 8 px in x and y, in phase with the autoencoder's 8-px latent
    # grid, so one latent cell holds the same texture wherever the shape sits.
    if pattern == "striped":     # diagonal stripes, period 8 px
        return (((xx + yy) % 8.0) < 4.0).astype(np.float32)
    if pattern == "dotted":      # dark dots of radius 2 px on an 8 px grid
        dx = (xx % 8.0) - 4.0
        dy = (yy % 8.0) - 4.0
        return (dx * dx + dy * dy > 2.0 ** 2).astype(np.float32)
    if pattern == "checked":     # 4 px checkerboard
        return (((np.floor(xx / 4) + np.floor(yy / 4)) % 2) == 0).astype(np.float32)
    raise ValueError(pattern)


_PATTERN_CACHE: dict[str, np.ndarray] = {}


def render(scene: Scene) -> Image.Image:
    """Render ``scene`` to a 64×64 RGB image.  Deterministic: the same scene gives the same pixels."""
    n = SIZE * SS
    mask_img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask_img)
    r = _RADIUS[scene.size] * SS
    for cx, cy in shape_centres(scene):
        _draw_shape(draw, scene.shape, (cx - 0.5) * SS + SS / 2, (cy - 0.5) * SS + SS / 2, r)
    mask = np.asarray(mask_img, np.float32) / 255.0
    pat = _PATTERN_CACHE.get(scene.pattern)
    if pat is None:
        pat = _PATTERN_CACHE[scene.pattern] = _pattern_mask(scene.pattern)
    # The box filter (antialiasing) is linear, so filter the coverage masks, then colour at 64 px.
    def down(a):
        return a.reshape(SIZE, SS, SIZE, SS).mean(axis=(1, 3))[..., None]
    m_main = down(mask * pat)
    m_all = down(mask)
    c = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    small = m_main * c + (m_all - m_main) * (c * 0.35) + (1 - m_all) * bg
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------- captions
def caption(scene: Scene, drop: frozenset | set | tuple = ()) -> str:
    """The caption of ``scene``; attributes named in ``drop`` (size, pattern, background, position)
    are left unsaid.  Shape, colour and count are always said; "solid" is never said."""
    noun = scene.shape if scene.count == "one" else PLURAL[scene.shape]
    words = ["a" if scene.count == "one" else "two"]
    if "size" not in drop:
        words.append(scene.size)
    words.append(scene.colour)
    if scene.pattern != "solid" and "pattern" not in drop:
        words.append(scene.pattern)
    words.append(noun)
    text = " ".join(words)
    if "background" not in drop:
        text += f" on a {scene.background} background"
    if "position" not in drop:
        text += f", {scene.position}"
    return text


_PLURAL_INV = {v: k for k, v in PLURAL.items()}


def parse_caption(text: str) -> dict:
    """Read the attributes a caption states back into a dict (unsaid ones are absent; no pattern
    word means "solid"; unknown words such as a placeholder token are ignored).  A caption written
    by ``caption`` without drops parses back to the full scene."""
    out: dict = {}
    m = re.match(r"^\s*(a|an|one|two)\s+(.*?)(?:\s+on an? (\w+) background)?(?:,\s*(.+?))?\s*$", text)
    if not m:
        raise ValueError(f"cannot parse caption {text!r}")
    out["count"] = "two" if m.group(1) == "two" else "one"
    words = m.group(2).split()
    for w in words:
        if w in SIZES:
            out["size"] = w
        elif w in COLOURS:
            out["colour"] = w
        elif w in PATTERNS:
            out["pattern"] = w
        elif w in SHAPES:
            out["shape"] = w
        elif w in _PLURAL_INV:
            out["shape"] = _PLURAL_INV[w]
    if "pattern" not in out:        # captions always name a non-solid pattern
        out["pattern"] = "solid"
    if m.group(3):
        out["background"] = m.group(3)
    if m.group(4):
        out["position"] = m.group(4)
    return out


# ---------------------------------------------------------------------------------------- sampling
def sample_scene(rng: np.random.Generator, split: str = "train", concept: str | None = None) -> Scene:
    """Draw one scene from ``split`` ("train", "new", "rare", "all") with numpy ``rng``."""
    if split not in ("train", "new", "rare", "all"):
        raise ValueError(f"split={split!r}: choose train, new, rare or all")
    if split == "train":
        shape = SHAPES[5] if rng.random() < RARE_P else TRAIN_SHAPES[rng.integers(len(TRAIN_SHAPES))]
        pattern = TRAIN_PATTERNS[rng.integers(len(TRAIN_PATTERNS))]
    elif split == "all":
        shape = SHAPES[rng.integers(len(SHAPES))]
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
    elif split == "rare":
        shape = RARE_CONCEPT[1]
        pattern = TRAIN_PATTERNS[rng.integers(len(TRAIN_PATTERNS))]
    else:
        if concept is None:
            concept = list(NEW_CONCEPTS)[rng.integers(len(NEW_CONCEPTS))]
        if concept not in NEW_CONCEPTS:
            raise ValueError(f"concept={concept!r}: choose one of {list(NEW_CONCEPTS)}")
        if NEW_CONCEPTS[concept] == "shape":
            shape, pattern = concept, TRAIN_PATTERNS[rng.integers(len(TRAIN_PATTERNS))]
        else:
            shape, pattern = TRAIN_SHAPES[rng.integers(len(TRAIN_SHAPES))], concept
    colours = list(COLOURS)
    colour = colours[rng.integers(len(colours))]
    bgs = [b for b in BACKGROUNDS if b != colour]
    background = bgs[rng.integers(len(bgs))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    count = COUNTS[rng.integers(2)]
    size = "small" if count == "two" else SIZES[rng.integers(2)]
    return Scene(shape, colour, pattern, background, position, size, count)


def sample_caption(scene: Scene, rng: np.random.Generator, p_drop: float = 0.3) -> str:
    """A training caption: size, background and position are each left unsaid with probability
    ``p_drop``.  The pattern word is always said, so a caption without one means "solid"."""
    drop = {k for k in ("size", "background", "position") if rng.random() < p_drop}
    return caption(scene, drop)


def grid(images: list[Image.Image], cols: int = 8) -> Image.Image:
    """Tile images into one sheet (for eyeballing samples)."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet

"""Small synthetic training images for tests that run a whole node or workflow."""
from __future__ import annotations

from pathlib import Path


def write_disc_images(folder: Path, n: int = 4, *, captions: bool = False, seed: int = 0) -> None:
    """``n`` 64 px images of a coloured disc on a noisy background, moving a little per image;
    with ``captions`` a ``view<i>.txt`` caption each ("a photo of [name], view i")."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(n):
        img = rng.integers(0, 80, (64, 64, 3)).astype(np.uint8)
        disc = (yy - 32 - 3 * i) ** 2 + (xx - 28 - 2 * i) ** 2 < 15 ** 2
        img[disc] = (200, 60 + 20 * i, 40)
        Image.fromarray(img, "RGB").save(folder / f"view{i}.png")
        if captions:
            (folder / f"view{i}.txt").write_text(f"a photo of [name], view {i}\n", encoding="utf-8")

"""The quality benchmark of issue 5 — the same as `likeness bench quality` (see world/quality.py):
for each new concept of the shapes world, every registered method (the base model as baseline,
Textual Inversion; DreamBooth and SeedSelect once registered) learns the concept from 4 reference
renders, and the world classifier scores held-out prompts.

    python bench/quality.py [--concepts moon checked] [--methods base ti] [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
    from likeness.world.quality import main

    sys.exit(main())

"""Source registry: a source name -> a function (root, image_size) -> ArraySource."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from bench.errors import unknown
from bench.sources.base import ArraySource

# name -> ("module:function", one-line description). The function takes (root: Path, image_size: int).
SOURCES: dict[str, tuple[str, str]] = {
    "synthetic": ("bench.sources.synthetic:load", "seeded toy patterns for tests (in memory)"),
    "glyphs": ("bench.sources.glyphs:load", "Unicode characters rendered with matplotlib's fonts (embedded default)"),
}


def get_source(name: str, root: Path, image_size: int) -> ArraySource:
    """Load the source `name` at `image_size` from (or into) the data folder `root`."""
    if name not in SOURCES:
        raise unknown("source", name, list(SOURCES))
    module, func = SOURCES[name][0].split(":")
    loader: Callable[[Path, int], ArraySource] = getattr(importlib.import_module(module), func)
    return loader(Path(root), image_size)

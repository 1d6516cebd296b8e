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
    "omniglot": ("bench.sources.omniglot:load_vinyals", "Omniglot, Vinyals split 1028/172/423 characters x 4 rotations"),
    "omniglot-md": ("bench.sources.omniglot:load_md", "Omniglot, Meta-Dataset alphabet split 25/5/20, no rotations"),
    "omniglot-small": ("bench.sources.omniglot:load_small", "the 2 real Omniglot subsets: 242 characters x 4 rotations, by alphabet"),
    "miniimagenet": ("bench.sources.miniimagenet:load", "miniImageNet 84x84, Ravi split 64/16/20 classes (prepare from your copy)"),
}
# Meta-Dataset: caches written by `metabench data prepare meta-dataset --records DIR` from the
# official TFRecords (bench/sources/meta_dataset.py): md-ilsvrc-2012, md-omniglot, md-aircraft, ...,
# and md-omniglot-small (the genuine small Omniglot records of the shared test data).
from bench.sources.meta_dataset import registry_entries as _md_entries  # noqa: E402

SOURCES.update(_md_entries())


def get_source(name: str, root: Path, image_size: int) -> ArraySource:
    """Load the source `name` at `image_size` from (or into) the data folder `root`."""
    if name not in SOURCES:
        raise unknown("source", name, list(SOURCES))
    module, func = SOURCES[name][0].split(":")
    loader: Callable[[Path, int], ArraySource] = getattr(importlib.import_module(module), func)
    return loader(Path(root), image_size)

"""Source registry: a source name -> a loader function (root, image_size) -> ArraySource.

Installed packages add sources through the entry-point group "metabench.sources"
(name = "pkg.module:load_function").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from bench.errors import MetabenchError
from bench.registry import Registry
from bench.sources.base import ArraySource

Loader = Callable[[Path, int], ArraySource]


def _check_loader(obj: Any, name: str) -> None:
    if not callable(obj):
        raise MetabenchError(f"source {name!r}: its target is not a loader function (root, image_size)")


SOURCES: Registry[Loader] = Registry("source", group="metabench.sources", check=_check_loader)
for _name, _target, _about in (
    ("synthetic", "bench.sources.synthetic:load", "seeded toy patterns for tests (in memory)"),
    ("glyphs", "bench.sources.glyphs:load", "Unicode characters rendered with matplotlib's fonts (embedded default)"),
    ("omniglot", "bench.sources.omniglot:load_vinyals", "Omniglot, Vinyals split 1028/172/423 characters x 4 rotations"),
    ("omniglot-md", "bench.sources.omniglot:load_md", "Omniglot, Meta-Dataset alphabet split 25/5/20, no rotations"),
    ("omniglot-small", "bench.sources.omniglot:load_small",
     "the 2 real Omniglot subsets: 242 characters x 4 rotations, by alphabet"),
    ("miniimagenet", "bench.sources.miniimagenet:load",
     "miniImageNet 84x84, Ravi split 64/16/20 classes (prepare from your copy)"),
):
    SOURCES.add(_name, _target, _about)
# Meta-Dataset: caches written by `metabench data prepare meta-dataset --records DIR` from the
# official TFRecords (bench/sources/meta_dataset.py): md-ilsvrc-2012, md-omniglot, md-aircraft, ...,
# and md-omniglot-small (the genuine small Omniglot records of the shared test data).
from bench.sources.meta_dataset import registry_entries as _md_entries  # noqa: E402

for _name, (_target, _about) in _md_entries().items():
    SOURCES.add(_name, _target, _about)
del _name, _target, _about


def get_source(name: str, root: Path, image_size: int) -> ArraySource:
    """Load the source `name` at `image_size` from (or into) the data folder `root`."""
    return SOURCES.get(name)(Path(root), image_size)

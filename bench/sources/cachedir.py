"""Building decoded caches atomically, and small helpers shared by the real-data sources.

A cache is a folder (images.npy + index.json, the layout of `bench.sources.base.save_cache`).
Builders write it into a temporary folder beside its final place and rename it at the end, so a
killed or failed build leaves nothing half-written where a loader looks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from bench.errors import DataError
from bench.sources.base import ArraySource, load_cache, save_cache, write_index  # noqa: F401 (write_index re-exported)


@contextlib.contextmanager
def building_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it becomes `final`.

    replace: when `final` exists at the end, swap it for the new folder (True) or keep the
    existing one and discard the new build (False: another process finished first).
    On an exception the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".building", dir=final.parent))
    try:
        yield tmp
        install_dir(tmp, final, replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def install_dir(tmp: Path, final: Path, replace: bool = True) -> bool:
    """Move the finished folder `tmp` to `final` (by renames); returns whether it was installed.

    When `final` exists: swap it for `tmp` (replace=True; the old folder is removed after the
    swap) or leave both as they are (replace=False: another process finished first).
    """
    if final.exists():
        if not replace:
            return False
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return True


def save_cache_dir(final: Path, source: ArraySource, replace: bool = True) -> None:
    """Write an in-memory `source` as the cache folder `final`, atomically as a whole."""
    with building_dir(final, replace=replace) as tmp:
        save_cache(tmp, source)


def open_images(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """Create `path/images.npy` as a writable uint8 memory map of `shape`."""
    return np.lib.format.open_memmap(path / "images.npy", mode="w+", dtype=np.uint8, shape=shape)


def try_load_cache(path: Path, expect_meta: dict) -> ArraySource | None:
    """The cache at `path` when it is complete and matches `expect_meta`; None when absent.

    Raises DataError (naming the file) when a cache is there but unusable: incomplete,
    another cache format or version, or unreadable.
    """
    if not (path / "index.json").exists():
        if (path / "images.npy").exists():
            raise DataError(f"{path}: cache without index.json (incomplete build); delete the folder and rebuild")
        return None
    return load_cache(path, expect_meta=expect_meta)


def file_digest(path: Path, algo: str = "md5", chunk: int = 1 << 20) -> str:
    """Hex digest of a file (md5 or sha256)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def progress(iterable=None, total: int | None = None, desc: str = "", enabled: bool = True, unit: str = "it"):
    """A tqdm progress bar on stderr (a no-op wrapper when disabled)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit=unit, leave=False,
                unit_scale=unit == "B", dynamic_ncols=True)

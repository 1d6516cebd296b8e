"""The Source protocol: a dataset that knows its class splits and gathers images by index.

Every source in metabench is an `ArraySource`: decoded uint8 images in one array (usually a
memory-mapped cache file), rows grouped by class. Sampling an episode is then an index gather,
never an image decode. A class may also name a rotation (Omniglot's rotated classes), so the
cache stores each character once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from bench.errors import DataError
from bench.paths import atomic_path, atomic_write_text

SPLITS = ("train", "val", "test")


@dataclass
class ArraySource:
    """A dataset of decoded images with class splits.

    Attributes:
        name: source name (e.g. "glyphs", "omniglot").
        images: uint8 array [n_images, H, W] (grey) or [n_images, H, W, C] (colour).
        class_start: int64 [n_classes]: first image row of each class.
        class_count: int64 [n_classes]: number of images of each class.
        class_names: one name per class (e.g. "Greek/character01/rot090").
        splits: split name -> int64 array of class ids (the classes of that split, in order).
        class_rot: optional int8 [n_classes]: quarter turns (0..3) applied when gathering.
        groups: optional class id -> group name (alphabet, script); used by samplers that
            draw all classes of an episode from one group.
        gather_size: when set, images are stored at another (their native) size and `gather`
            resizes them to gather_size x gather_size with TF's legacy bilinear resize
            (bench.sources.resize; Meta-Dataset's fixed-size sources), without rounding.
    """

    name: str
    images: np.ndarray
    class_start: np.ndarray
    class_count: np.ndarray
    class_names: list[str]
    splits: dict[str, np.ndarray]
    class_rot: np.ndarray | None = None
    groups: list[str] | None = None
    meta: dict = field(default_factory=dict)
    content: str | None = None  # sha256 fingerprint of a cache's images (None: in memory, see content_fingerprint)
    gather_size: int | None = None

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if len(self.class_start) != n or len(self.class_count) != n:
            raise DataError(f"source {self.name!r}: class tables disagree ({n} names, "
                            f"{len(self.class_start)} starts, {len(self.class_count)} counts)")
        for split, ids in self.splits.items():
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                raise DataError(f"source {self.name!r}: split {split!r} names class ids outside 0..{n - 1}")
            self.splits[split] = ids

    @property
    def n_classes(self) -> int:
        """Number of classes over all splits."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of a gathered image."""
        h, w = (self.gather_size, self.gather_size) if self.gather_size else self.images.shape[1:3]
        return (1 if self.images.ndim == 3 else int(self.images.shape[3]), int(h), int(w))

    def split_classes(self, split: str) -> np.ndarray:
        """Class ids of `split` (int64 [n_split_classes])."""
        if split not in self.splits:
            raise DataError(f"source {self.name!r} has no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split]

    def counts(self, classes: np.ndarray) -> np.ndarray:
        """Number of examples of each class id in `classes` (int64 [len(classes)])."""
        return self.class_count[np.asarray(classes, dtype=np.int64)]

    def gather(self, classes: Sequence[int], indices: Sequence[Sequence[int]]) -> torch.Tensor:
        """Images for example `indices[j]` of class `classes[j]`, as float32 in [0, 1].

        Returns: [sum_j len(indices[j]), C, H, W], classes in the given order.
        """
        rows, rots = [], []
        for c, idx in zip(classes, indices):
            idx = np.asarray(idx, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= self.class_count[c]):
                raise IndexError(f"source {self.name!r}: class {c} has {self.class_count[c]} examples, "
                                 f"asked for index {int(idx.max())}")
            rows.append(self.class_start[c] + idx)
            rots.append(np.full(idx.size, 0 if self.class_rot is None else int(self.class_rot[c])))
        row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        rot = np.concatenate(rots) if rots else np.zeros(0, dtype=np.int64)
        order = np.argsort(row, kind="stable")  # sorted reads are kinder to a memory map
        batch = np.empty((row.size,) + self.images.shape[1:], dtype=np.uint8)
        batch[order] = self.images[row[order]]
        if rot.any():
            for k in (1, 2, 3):
                sel = rot == k
                if sel.any():
                    batch[sel] = np.rot90(batch[sel], k=k, axes=(1, 2))
        if self.gather_size and batch.shape[1:3] != (self.gather_size, self.gather_size):
            from bench.sources.resize import resize_batch_tf

            x = torch.from_numpy(resize_batch_tf(batch, self.gather_size).astype(np.float32))
        else:
            x = torch.from_numpy(batch)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return x.to(torch.float32).div_(255.0).contiguous()

    def content_fingerprint(self) -> str:
        """The pixels' fingerprint: the cache's recorded one, else (in memory) a sha256 of the images (16 digits);
        with a gather_size, the hash of both (the same stored pixels gathered at two sizes differ)."""
        if self.content is None:
            self.content = hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()
        if self.gather_size:
            return hashlib.sha256(f"{self.content}@{self.gather_size}px".encode()).hexdigest()[:16]
        return self.content[:16]

    def fingerprint(self) -> str:
        """A short hash of the class table and splits (not the pixels): names a source layout."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.class_names, self.class_count.tolist(),
                             None if self.class_rot is None else self.class_rot.tolist(),
                             {k: v.tolist() for k, v in sorted(self.splits.items())}]).encode())
        return h.hexdigest()[:16]


CACHE_FORMAT = 2
"""2: the index records a content fingerprint of images.npy (`content_record`). Format-1 caches
(written before fingerprints) still open, without a check: rebuild them (--force) to record one."""
LEGACY_FORMATS = (1,)
BLOCK = 4 * 2**20
"""Bytes per fingerprinted block of images.npy."""
SAMPLED_BLOCKS = 4
"""Blocks re-hashed when an unmodified cache (same size and mtime) is opened."""


def _block_digests(path: Path, blocks: Sequence[int] | None = None) -> dict[int, str]:
    """sha256 (16 hex digits) of the BLOCK-sized blocks `blocks` of a file (all when None)."""
    size = path.stat().st_size
    wanted = range(max(1, -(-size // BLOCK))) if blocks is None else blocks
    out = {}
    with open(path, "rb") as f:
        for b in wanted:
            f.seek(b * BLOCK)
            out[b] = hashlib.sha256(f.read(BLOCK)).hexdigest()[:16]
    return out


def content_record(images: Path) -> dict:
    """The content fingerprint of a cache's images.npy: size, mtime, per-block digests and their hash."""
    st = images.stat()
    digests = _block_digests(images)
    blocks = [digests[b] for b in sorted(digests)]
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "block": BLOCK, "blocks": blocks,
            "sha256": hashlib.sha256("".join(blocks).encode()).hexdigest()}


def check_content(images: Path, record: Mapping) -> None:
    """Raise DataError when images.npy differs from its recorded fingerprint.

    An unmodified file (same size and mtime as recorded) costs SAMPLED_BLOCKS block reads (first,
    last and spread ones: ~16 MiB, milliseconds, whatever the cache's size); a file whose mtime
    changed is re-hashed in full (about 2 s per GB), so any write to the images is caught.
    """
    st = images.stat()
    blocks = list(record.get("blocks", []))
    if st.st_size != record.get("size") or record.get("block") != BLOCK or not blocks:
        raise DataError(f"{images}: {st.st_size} bytes, but the cache was built with {record.get('size')}: "
                        "modified since it was built; rebuild it (--force)")
    n = len(blocks)
    if st.st_mtime_ns == record.get("mtime_ns"):
        wanted = sorted({0, n - 1, *(int(i * (n - 1) / max(1, SAMPLED_BLOCKS - 1)) for i in range(SAMPLED_BLOCKS))})
    else:
        wanted = list(range(n))
    for b, digest in _block_digests(images, wanted).items():
        if digest != blocks[b]:
            raise DataError(f"{images}: bytes {b * BLOCK}..{min((b + 1) * BLOCK, st.st_size)} differ from the "
                            "cache's recorded fingerprint: modified since it was built; rebuild it (--force)")


def save_cache(path: Path, source: ArraySource) -> None:
    """Write `source` as a cache folder `path` (images.npy + index.json), atomically per file.

    The index is written last, so a cache with an index is a complete cache.
    """
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "images.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(source.images, dtype=np.uint8))
    write_index(path, source)


def write_index(path: Path, source: ArraySource) -> None:
    """Write index.json of a cache folder whose images.npy already holds `source.images`.

    `save_cache` calls it last; builders that fill images.npy as a memory map call it directly.
    """
    index = {
        "format": CACHE_FORMAT,
        "name": source.name,
        "class_start": source.class_start.tolist(),
        "class_count": source.class_count.tolist(),
        "class_names": list(source.class_names),
        "splits": {k: v.tolist() for k, v in source.splits.items()},
        "class_rot": None if source.class_rot is None else source.class_rot.tolist(),
        "groups": source.groups,
        "meta": source.meta,
        "shape": list(source.images.shape),
        "content": content_record(path / "images.npy"),
    }
    atomic_write_text(path / "index.json", json.dumps(index))


def load_cache(path: Path, expect_meta: Mapping | None = None) -> ArraySource:
    """Open a cache folder written by `save_cache`, images memory-mapped read-only.

    Raises DataError naming the file when the cache is incomplete, from another cache format,
    or its meta disagrees with `expect_meta` (e.g. another image size or generator version).
    """
    index_file = path / "index.json"
    if not index_file.exists():
        raise DataError(f"{index_file}: no cache index (cache missing or incomplete)")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{index_file}: unreadable cache index ({e})") from e
    if index.get("format") != CACHE_FORMAT and index.get("format") not in LEGACY_FORMATS:
        raise DataError(f"{index_file}: cache format {index.get('format')!r}, expected {CACHE_FORMAT}; rebuild it")
    for key, want in (expect_meta or {}).items():
        if index.get("meta", {}).get(key) != want:
            raise DataError(f"{index_file}: cache was built with {key}={index.get('meta', {}).get(key)!r}, "
                            f"expected {want!r}; rebuild it")
    try:
        if index.get("format") == CACHE_FORMAT:
            check_content(path / "images.npy", index.get("content") or {})
        images = np.load(path / "images.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path / 'images.npy'}: unreadable cache images ({e})") from e
    if list(images.shape) != index["shape"]:
        raise DataError(f"{path / 'images.npy'}: shape {list(images.shape)} does not match its index {index['shape']}")
    rot = index.get("class_rot")
    return ArraySource(
        name=index["name"], images=images,
        class_start=np.asarray(index["class_start"], dtype=np.int64),
        class_count=np.asarray(index["class_count"], dtype=np.int64),
        class_names=list(index["class_names"]),
        splits={k: np.asarray(v, dtype=np.int64) for k, v in index["splits"].items()},
        class_rot=None if rot is None else np.asarray(rot, dtype=np.int8),
        groups=index.get("groups"), meta=index.get("meta", {}), content=(index.get("content") or {}).get("sha256"),
    )

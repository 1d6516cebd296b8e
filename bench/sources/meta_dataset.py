"""Meta-Dataset (Triantafillou et al., ICLR 2020) from the official per-class TFRecords.

The user converts the datasets with the official code (google-research/meta-dataset,
dataset_conversion) into `<records>/<source>/<class_id>.tfrecords` plus
`<records>/<source>/dataset_spec.json`; then

    metabench data prepare meta-dataset --records <records> [--root DIR] [--image-size 84|126] [--workers N]

reads the spec of every source present (plain `DatasetSpecification`, bi-level
`BiLevelDatasetSpecification` for Omniglot, `HierarchicalDatasetSpecification` for ILSVRC),
reads each class's records with both TFRecord checksums verified (bench.sources.tfrecord, no
TensorFlow; the C crc32c when installed, and `prepare` says which), checks that every record's label
is its class and that each class has the number of images its spec says, decodes every image once
and writes one memory-mapped cache per source under ROOT/meta-dataset/<source>/ (images.npy +
index.json; the parsed spec is kept in the index). Sampling never decodes a JPEG at run time.

Scale: classes are decoded in `--workers` processes (default: every CPU; the cache does not depend
on the number), each into its own rows of a partial images.npy, flushed, then recorded as done
(atomically); a killed prepare continues where it stopped (`build_source`).

Storage (`native_shape`): the fixed-size greyscale sources (Omniglot 105 px, QuickDraw 28 px) are
stored once at their native size, one channel, in cache-native/, and resized when gathered, so one
cache serves every image size (QuickDraw: 784 bytes an image, ~37 GiB, instead of ~332 GiB at
84 px); the photo sources (variable sizes) are stored at the benchmark's size in cache-<size>px/.

Decoding, and how it relates to the official decoder (meta_dataset/data/decoder.py:
`tf.image.decode_image(channels=3)`, `tf.image.resize_images(..., BILINEAR, align_corners=True)`,
then 2 * (x / 255 - 0.5)):
- JPEG decoded to RGB by libjpeg-turbo with its fast integer IDCT and fancy upsampling (the
  `simplejpeg` package, the `meta-dataset` extra), as TF's decode_image: bit-identical
  (`JPEG_DECODER`; tests/test_tf_crosscheck.py); other formats (PNG) by Pillow;
- resized with `resize_bilinear_tf` (bench.sources.resize), a numpy re-implementation of TF's legacy
  bilinear resize with align_corners=True (no antialiasing; corner pixels map onto corner pixels),
  computed in float64;
- stored at the benchmark's size as uint8, i.e. TF's float result rounded to the nearest grey level
  (at most 0.5/255 off), or at the native size and resized when gathered (not rounded);
- greyscale sources (Omniglot, QuickDraw: their RGB JPEGs have R = G = B) are stored with one
  channel (a third of the disk) and expanded to three channels when gathered, so every source
  yields [3, size, size] images;
- pixel range: see `PIXEL_RANGE` below (the one place where it is decided).

Sources whose folder is named like an official source are checked against the official class
counts (`OFFICIAL`); any other folder (e.g. the genuine small Omniglot records in the shared test
data, `omniglot_small`) is prepared as a custom source of that name.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from bench.errors import DataError
from bench.sources.base import ArraySource
from bench.sources.cachedir import building_dir, install_dir, open_images, progress, try_load_cache, write_index
from bench.sources.resize import resize_bilinear_tf  # noqa: F401 (re-exported)
from bench.sources.tfrecord import parse_example, read_records

CACHE_VERSION = 2
"""2: JPEGs decoded with libjpeg-turbo's fast integer IDCT (`JPEG_DECODER`), as the official decoder;
the fixed-size greyscale sources stored at their native size (`native_shape`). 1: Pillow's accurate
IDCT, up to 4 grey levels from the official decode; refused when opened (rebuild with --force)."""
NATIVE = "native"
DEFAULT_SIZE = 84
OFFICIAL_SIZES = (84, 126)
SPEC_FILE = "dataset_spec.json"

PIXEL_RANGE = (0.0, 1.0)
"""Range of the float pixels that Meta-Dataset episodes hand to methods: [0, 1], as every other
benchmark of this suite (x / 255), not the official decoder's [-1, 1] (2 * (x / 255 - 0.5)).
The two differ by a fixed affine map per pixel; a network whose first layer is a convolution
followed by batch norm (Conv-4 here) absorbs it exactly (up to the batch-norm epsilon), so the
choice changes nothing for the foundation's methods. A method that needs the official range can
apply `to_official_range` to its inputs."""


def to_official_range(x):
    """Map pixels from PIXEL_RANGE [0, 1] to the official Meta-Dataset range [-1, 1]."""
    return x * 2.0 - 1.0


@dataclass(frozen=True)
class Official:
    """What the project knows of an official source (from the reference dataset specs)."""

    name: str  # official name, the records folder and spec name
    key: str  # kebab-case name used in source and benchmark names
    display: str
    kind: str  # "plain", "bilevel" or "hierarchical"
    classes: tuple[int, int, int]  # train/valid/test classes
    images: int  # total images over all classes
    grey: bool = False


OFFICIAL: dict[str, Official] = {o.name: o for o in (
    Official("ilsvrc_2012", "ilsvrc-2012", "ILSVRC", "hierarchical", (712, 158, 130), 1280764),
    Official("omniglot", "omniglot", "Omniglot", "bilevel", (883, 81, 659), 32460, grey=True),
    Official("aircraft", "aircraft", "Aircraft", "plain", (70, 15, 15), 10000),
    Official("cu_birds", "cu-birds", "Birds", "plain", (140, 30, 30), 11788),
    Official("dtd", "dtd", "Textures", "plain", (33, 7, 7), 5640),
    Official("quickdraw", "quickdraw", "QuickDraw", "plain", (241, 52, 52), 50426266, grey=True),
    Official("fungi", "fungi", "Fungi", "plain", (994, 200, 200), 89760),
    Official("vgg_flower", "vgg-flower", "VGG Flower", "plain", (71, 15, 16), 8189),
    Official("traffic_sign", "traffic-sign", "Traffic Signs", "plain", (0, 0, 43), 39209),
    Official("mscoco", "mscoco", "MSCOCO", "plain", (0, 40, 40), 860001),
)}
# The eight sources of the "all datasets" training regime (traffic_sign and mscoco are test only).
TRAIN_ALL = ("ilsvrc_2012", "aircraft", "cu_birds", "omniglot", "quickdraw", "vgg_flower", "dtd", "fungi")
GREY_SPEC_NAMES = {"omniglot", "quickdraw"}

SPLIT_KEYS = {"train": "TRAIN", "val": "VALID", "test": "TEST"}
KINDS = {"DatasetSpecification": "plain", "BiLevelDatasetSpecification": "bilevel",
         "HierarchicalDatasetSpecification": "hierarchical"}
MAX_SPANNING_LEAVES_ELIGIBLE = 392  # meta_dataset/data/sampling.py


# ---------------------------------------------------------------------------------------------
# dataset_spec.json
# ---------------------------------------------------------------------------------------------

@dataclass
class MDSpec:
    """A parsed dataset_spec.json (any of the three spec types).

    class_names[c] / images_per_class[c]: per class id c (ids contiguous: train, valid, test);
    splits: "train"/"val"/"test" -> class ids. Bi-level: superclass_names, and
    superclass_classes[k] = class ids of superclass k (contiguous, in superclass order),
    superclass_splits: split -> superclass ids. Hierarchical: graph[split] = {wn_id: children}
    (the split's sub-DAG) and wnid_to_class.
    """

    name: str
    kind: str
    class_names: list[str]
    images_per_class: np.ndarray
    splits: dict[str, np.ndarray]
    file_pattern: str = "{}.tfrecords"
    superclass_names: list[str] = field(default_factory=list)
    superclass_classes: list[np.ndarray] = field(default_factory=list)
    superclass_splits: dict[str, np.ndarray] = field(default_factory=dict)
    graph: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    wnid_to_class: dict[str, int] = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def class_groups(self, split: str) -> list[np.ndarray]:
        """Bi-level: the class ids of each superclass of `split`. Hierarchical: the leaves (class
        ids) spanned by each internal node of the split's DAG, nodes in wn_id order, leaves in
        wn_id order (all nodes; the sampler keeps those spanning 5..392 leaves). Plain: []."""
        if self.kind == "bilevel":
            return [self.superclass_classes[k] for k in self.superclass_splits[split]]
        if self.kind == "hierarchical":
            return [np.array([self.wnid_to_class[w] for w in leaves], dtype=np.int64)
                    for _, leaves in spanning_leaves(self.graph[split])]
        return []


def spanning_leaves(graph: Mapping[str, Sequence[str]]) -> list[tuple[str, list[str]]]:
    """(node, sorted leaves under it) for every internal node of a DAG {wn_id: children}, by wn_id."""
    memo: dict[str, frozenset[str]] = {}

    def leaves(n: str) -> frozenset[str]:
        if n not in memo:
            kids = graph.get(n, ())
            memo[n] = frozenset([n]) if not kids else frozenset().union(*(leaves(k) for k in kids))
        return memo[n]

    import sys

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    return [(n, sorted(leaves(n))) for n in sorted(graph) if graph[n]]


def _int_keys(d: Mapping, what: str, where: str) -> dict[int, object]:
    try:
        return {int(k): v for k, v in d.items()}
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: {what} has a key that is not a class id ({e})") from e


def parse_spec(d: Mapping, where: str = SPEC_FILE) -> MDSpec:
    """An MDSpec from the JSON object of a dataset_spec.json (the official `as_dataset_spec` rules).

    Raises DataError naming `where` for an unknown spec type, missing keys or inconsistent counts.
    """
    cls = d.get("__class__")
    if cls not in KINDS:
        raise DataError(f"{where}: unknown or missing __class__ {cls!r} (expected one of {sorted(KINDS)})")
    kind = KINDS[cls]
    try:
        name = str(d["name"])
        names = _int_keys(d["class_names"], "class_names", where)
        n = len(names)
        if sorted(names) != list(range(n)):
            raise DataError(f"{where}: class ids are not contiguous 0..{n - 1}")
        class_names = [str(names[i]) for i in range(n)]
        pattern = str(d.get("file_pattern", "{}.tfrecords"))
        if pattern != "{}.tfrecords":
            raise DataError(f"{where}: file_pattern {pattern!r} is not supported (only '{{}}.tfrecords': one "
                            "file per class, no example-level pools or shards)")
        spec = MDSpec(name, kind, class_names, np.zeros(n, dtype=np.int64), {}, pattern, raw=dict(d))
        if kind == "hierarchical":
            spec.wnid_to_class = {w: i for i, w in enumerate(class_names)}
            offset = 0
            for split, key in SPLIT_KEYS.items():
                nodes = d["split_subgraphs"][key]
                graph = {str(x["wn_id"]): [str(c) for c in x["children_ids"]] for x in nodes}
                spec.graph[split] = graph
                leaves = sorted(w for w, kids in graph.items() if not kids)
                ids = []
                for w in leaves:
                    if w not in spec.wnid_to_class:
                        raise DataError(f"{where}: leaf {w} of the {key} graph is not in class_names")
                    c = spec.wnid_to_class[w]
                    ids.append(c)
                    spec.images_per_class[c] = int(d["images_per_class"][key][w])
                ids = np.array(sorted(ids), dtype=np.int64)
                if len(ids) and not np.array_equal(ids, np.arange(offset, offset + len(ids))):
                    raise DataError(f"{where}: the {key} leaves are not the class ids {offset}..{offset + len(ids) - 1}")
                spec.splits[split] = ids
                offset += len(ids)
            if offset != n:
                raise DataError(f"{where}: the split graphs have {offset} leaves, class_names has {n} classes")
        else:
            ipc = _int_keys(d["images_per_class"], "images_per_class", where)
            missing = [c for c in range(n) if c not in ipc]
            if missing:
                raise DataError(f"{where}: images_per_class lacks classes {missing[:5]}")
            for c in range(n):
                if isinstance(ipc[c], Mapping):
                    raise DataError(f"{where}: example-level pools (images_per_class as a dict) are not supported")
                spec.images_per_class[c] = int(ipc[c])  # type: ignore[arg-type]
            if kind == "plain":
                per = [int(d["classes_per_split"][SPLIT_KEYS[s]]) for s in ("train", "val", "test")]
                bounds = np.cumsum([0] + per)
            else:
                sup = _int_keys(d["superclass_names"], "superclass_names", where)
                cps = _int_keys(d["classes_per_superclass"], "classes_per_superclass", where)
                n_sup = len(sup)
                spec.superclass_names = [str(sup[k]) for k in range(n_sup)]
                starts = np.cumsum([0] + [int(cps[k]) for k in range(n_sup)])  # type: ignore[arg-type]
                spec.superclass_classes = [np.arange(starts[k], starts[k + 1], dtype=np.int64) for k in range(n_sup)]
                per_sup = [int(d["superclasses_per_split"][SPLIT_KEYS[s]]) for s in ("train", "val", "test")]
                if sum(per_sup) != n_sup:
                    raise DataError(f"{where}: superclasses_per_split adds up to {sum(per_sup)}, "
                                    f"superclass_names has {n_sup}")
                sb = np.cumsum([0] + per_sup)
                spec.superclass_splits = {s: np.arange(sb[i], sb[i + 1], dtype=np.int64)
                                          for i, s in enumerate(("train", "val", "test"))}
                bounds = starts[sb]
            if bounds[-1] != n:
                raise DataError(f"{where}: the splits cover {int(bounds[-1])} classes, class_names has {n}")
            spec.splits = {s: np.arange(bounds[i], bounds[i + 1], dtype=np.int64)
                           for i, s in enumerate(("train", "val", "test"))}
    except KeyError as e:
        raise DataError(f"{where}: missing key {e} for a {cls}") from e
    except (TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{where}: malformed {cls} ({e})") from e
    return spec


def load_spec(path: Path | str) -> MDSpec:
    """Parse `path` (a dataset_spec.json, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILE
    if not path.is_file():
        raise DataError(f"{path}: no dataset spec (each source folder needs the {SPEC_FILE} written by the "
                        "official Meta-Dataset converter)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable dataset spec ({e})") from e
    return parse_spec(d, str(path))


def check_official(spec: MDSpec, folder_name: str, where: str) -> None:
    """A folder named like an official source must hold that source's official spec."""
    off = OFFICIAL.get(folder_name)
    if off is None:
        return
    got = tuple(len(spec.splits[s]) for s in ("train", "val", "test"))
    total = int(spec.images_per_class.sum())
    if spec.name != off.name or spec.kind != off.kind or got != off.classes or total != off.images:
        raise DataError(f"{where}: this is not the official Meta-Dataset {off.name!r} spec: got name "
                        f"{spec.name!r}, {spec.kind} spec, {got} train/valid/test classes and {total} images; "
                        f"expected {off.kind}, {off.classes} classes and {off.images} images. Re-run the official "
                        "converter, or put a custom source in a folder with another name")


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------

JPEG_DECODER = "libjpeg-turbo-ifast-fancy-upsampling"
"""Recorded in every cache's meta (and expected when a cache is opened): JPEGs decoded by
libjpeg-turbo with its fast integer IDCT (JDCT_IFAST) and fancy (smooth) chroma upsampling,
through the `simplejpeg` package: what `tf.image.decode_image` does in the official decoder
(TF's decode_jpeg defaults: dct_method "" = INTEGER_FAST, fancy_upscaling=True). Measured
bit-identical to TF 2.20's decode on all 4,840 genuine Omniglot records and on generated colour
JPEGs (4:2:0, 4:2:2, 4:4:4, progressive, greyscale); CMYK JPEGs (which the official converter
never writes: it re-encodes to RGB) differ by up to 2 grey levels. Other formats (PNG) go through
Pillow, whose PNG decode is exact."""

MISSING_DECODER = ("decoding Meta-Dataset JPEGs as the official pipeline does (libjpeg-turbo's fast integer IDCT, "
                   "like tf.image.decode_image) needs the `simplejpeg` package: pip install 'metabench[meta-dataset]' "
                   "(or pip install simplejpeg)")


def jpeg_decoder_version() -> str:
    """The installed simplejpeg's version; DataError (MISSING_DECODER) when it is not installed."""
    try:
        import simplejpeg
    except ImportError as e:
        raise DataError(MISSING_DECODER) from e
    return str(getattr(simplejpeg, "__version__", "?"))


def decode_rgb(data: bytes, where: str = "image") -> np.ndarray:
    """A JPEG (or PNG) byte string as uint8 RGB [H, W, 3] (3 channels, like decode_image(channels=3)).

    JPEGs: libjpeg-turbo, fast integer IDCT, fancy upsampling (`JPEG_DECODER`); others: Pillow."""
    if bytes(data[:2]) == b"\xff\xd8":
        jpeg_decoder_version()
        import simplejpeg

        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
        except (ValueError, RuntimeError) as e:
            raise DataError(f"{where}: cannot decode the JPEG ({e})") from e
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: cannot decode the image ({e})") from e


def decode_image(data: bytes, image_size: int | None, where: str = "image", grey: bool = False) -> np.ndarray:
    """Decode and resize one image as the cache stores it: uint8 [size, size, 3], or [size, size]
    with grey=True (one channel: the official greyscale sources have R = G = B exactly; an image
    whose channels differ would be stored as their rounded mean). image_size None: no resize (the
    decoded image at its native size)."""
    rgb = decode_rgb(data, where)
    if grey:
        r = rgb[..., 0]
        if np.array_equal(r, rgb[..., 1]) and np.array_equal(r, rgb[..., 2]):
            rgb = r
        else:
            rgb = np.rint(rgb.mean(axis=2)).astype(np.uint8)
    if image_size is None:
        return rgb
    return np.clip(np.rint(resize_bilinear_tf(rgb, image_size)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# preparing caches
# ---------------------------------------------------------------------------------------------

def md_dir(root: Path) -> Path:
    """ROOT/meta-dataset: one folder per prepared source."""
    return Path(root) / "meta-dataset"


def cache_dir(root: Path, source: str, image_size: int | None) -> Path:
    """ROOT/meta-dataset/<source>/cache-<size>px, or cache-native for image_size None (a source stored at
    its native size, resized when gathered: see `native_shape`)."""
    return md_dir(root) / source / ("cache-native" if image_size is None else f"cache-{image_size}px")


def cache_meta(source: str, image_size: int | None) -> dict:
    """What a cache of `source` must record to be opened (None: the native-size cache)."""
    return {"dataset": "meta-dataset", "source": source, "version": CACHE_VERSION, "decoder": JPEG_DECODER,
            "image_size": NATIVE if image_size is None else image_size}


def find_sources(records: Path) -> dict[str, Path]:
    """Source folder name -> folder, for `records` itself (when it holds a dataset_spec.json) or
    each of its subfolders that does. Raises DataError when there is none."""
    records = Path(records)
    if not records.is_dir():
        raise DataError(f"{records}: no such folder (--records must be the folder of the official converter's "
                        "output, <records>/<source>/dataset_spec.json)")
    if (records / SPEC_FILE).is_file():
        return {records.name: records}
    found = {p.name: p for p in sorted(records.iterdir()) if p.is_dir() and (p / SPEC_FILE).is_file()}
    if not found:
        raise DataError(f"{records}: no Meta-Dataset source found: expected <records>/<source>/{SPEC_FILE} for "
                        f"sources such as {', '.join(OFFICIAL)}")
    return found


def read_class_file(path: Path, c: int, name: str, want: int) -> list[bytes]:
    """The encoded images of the record file of class `c` (`name`), checked: checksums, labels equal
    to c, `want` records."""
    if not path.is_file():
        raise DataError(f"{path}: missing record file of class {c} ({name}); the spec and the records do not match")
    images = []
    for i, rec in enumerate(read_records(path)):
        ex = parse_example(rec, f"{path} record {i}")
        if "image" not in ex or "label" not in ex or len(ex["image"]) != 1 or len(ex["label"]) != 1:
            raise DataError(f"{path} record {i}: expected one 'image' (bytes) and one 'label' (int64) feature, "
                            f"got {sorted(ex)}")
        if ex["label"][0] != c:
            raise DataError(f"{path} record {i}: label {ex['label'][0]}, but the file is class {c}; the spec "
                            "and the records do not match")
        images.append(ex["image"][0])
    if len(images) != want:
        raise DataError(f"{path}: {len(images)} records, but the spec says class {c} ({name}) has "
                        f"{want} images; the spec and the records do not match")
    return images


def read_class(folder: Path, spec: MDSpec, c: int) -> list[bytes]:
    """The encoded images of class `c`, checked: checksums, labels equal to c, count per the spec."""
    return read_class_file(folder / spec.file_pattern.format(c), c, spec.class_names[c], int(spec.images_per_class[c]))


def spec_for_cache(spec: MDSpec, folder: Path) -> dict:
    """The spec as kept in the cache index: the original JSON with `path` set to the records folder."""
    return {**spec.raw, "path": str(folder)}


def native_shape(folder: Path, spec: MDSpec) -> tuple[int, int] | None:
    """(H, W) at which a source is stored when that keeps every pixel for no more disk than the
    official sizes need, else None (stored at each benchmark's size).

    The greyscale sources (GREY_SPEC_NAMES) are written by the official converter at one size
    (Omniglot 105 px, QuickDraw 28 px); their cache holds the decoded images as they are, one
    channel, and `gather` applies the official resize to whatever size a benchmark asks
    (`ArraySource.gather_size`): the same pixels as decoding and resizing each time, one cache
    for 84 and 126 px, and QuickDraw in 784 bytes an image instead of 7,056 at 84 px. The size is
    the first image's; every other image must have it (checked while decoding). Photo sources
    (variable sizes, mostly larger than 126 px) are stored at the benchmark's size: an intermediate
    size resized again at gather time would not be the official single resize.
    """
    if spec.name not in GREY_SPEC_NAMES or spec.n_classes == 0 or spec.images_per_class[0] == 0:
        return None
    first = read_class(folder, spec, 0)[0]
    h, w = decode_rgb(first, f"{folder / spec.file_pattern.format(0)} record 0").shape[:2]
    return (h, w) if h * w <= max(OFFICIAL_SIZES) ** 2 else None


@dataclass(frozen=True)
class ClassJob:
    """One unit of a prepare: decode class `c` (record file `path`) into rows start.. of `images`."""

    path: Path
    c: int
    name: str
    count: int
    start: int
    images: Path  # the build's images.npy
    size: int | None  # resize to size x size; None: keep the native size `native`
    native: tuple[int, int] | None
    grey: bool


def decode_class(job: ClassJob) -> int:
    """Read, verify and decode one class into its rows of the build's images.npy (flushed); returns job.c.

    Runs in a worker process; each class owns its rows, so workers never write the same bytes."""
    images = np.load(job.images, mmap_mode="r+")
    for i, data in enumerate(read_class_file(job.path, job.c, job.name, job.count)):
        where = f"{job.path} record {i}"
        img = decode_image(data, job.size, where, job.grey)
        if job.size is None and img.shape[:2] != job.native:
            raise DataError(f"{where}: {img.shape[0]}x{img.shape[1]} pixels, but this source's images are stored at "
                            f"their native size, its first image's {job.native[0]}x{job.native[1]}; the official "
                            "converter writes all of them at one size")
        images[job.start + i] = img
    images.flush()
    del images
    return job.c


def run_jobs(jobs: Sequence[ClassJob], workers: int, on_done: Callable[[ClassJob], None]) -> None:
    """decode_class every job, in `workers` processes (in this process when 1); on_done(job) after each,
    here, in completion order. The first failure cancels the jobs not started and is raised."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            decode_class(job)
            on_done(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    ex = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx)
    try:
        futures = {ex.submit(decode_class, job): job for job in jobs}
        for f in as_completed(futures):
            f.result()
            on_done(futures[f])
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class BuildOptions:
    """How to run a prepare: worker processes (None: os.cpu_count()), progress bar, messages."""

    workers: int | None = None
    show_progress: bool = True
    say: Callable[[str], None] = print

    def n_workers(self) -> int:
        import os

        n = (os.cpu_count() or 1) if self.workers is None else self.workers
        if n < 1:
            raise DataError(f"--workers must be at least 1 (got {n})")
        return n


QUIET = BuildOptions(show_progress=False, say=lambda _: None)


@dataclass
class SourcePlan:
    """A checked records folder and how it will be stored."""

    folder: Path
    spec: MDSpec
    native: tuple[int, int] | None
    image_size: int
    target: Path

    @property
    def grey(self) -> bool:
        return self.spec.name in GREY_SPEC_NAMES

    @property
    def shape(self) -> tuple[int, ...]:
        hw = self.native or (self.image_size, self.image_size)
        return (int(self.spec.images_per_class.sum()), *hw) + (() if self.grey else (3,))

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.spec.images_per_class)[:-1]]).astype(np.int64)

    def meta(self) -> dict:
        return cache_meta(self.folder.name, None if self.native else self.image_size)

    def identity(self) -> dict:
        """What a partial build must match to be continued: cache meta, spec and array shape."""
        import hashlib

        spec = hashlib.sha256(json.dumps(self.spec.raw, sort_keys=True).encode()).hexdigest()
        return {**self.meta(), "spec_sha256": spec, "shape": list(self.shape)}

    def jobs(self, images: Path, skip: set[int]) -> list[ClassJob]:
        spec, starts = self.spec, self.starts
        return [ClassJob(self.folder / spec.file_pattern.format(c), c, spec.class_names[c],
                         int(spec.images_per_class[c]), int(starts[c]), images,
                         None if self.native else self.image_size, self.native, self.grey)
                for c in range(spec.n_classes) if c not in skip]


def plan_source(folder: Path, root: Path, image_size: int = DEFAULT_SIZE) -> SourcePlan:
    """Check a records folder (spec, official counts, record files) and choose its storage."""
    folder = Path(folder)
    if image_size < 4:
        raise DataError(f"--image-size must be at least 4 (got {image_size})")
    jpeg_decoder_version()
    spec = load_spec(folder)
    check_official(spec, folder.name, str(folder / SPEC_FILE))
    files = {p.name for p in folder.glob("*.tfrecords")}
    expected = {spec.file_pattern.format(c) for c in range(spec.n_classes)}
    extra = sorted(files - expected)
    if extra:
        raise DataError(f"{folder}: record files {extra[:5]} are not classes of its {SPEC_FILE} "
                        f"({spec.n_classes} classes); the spec and the records do not match")
    native = native_shape(folder, spec)
    return SourcePlan(folder, spec, native, image_size, cache_dir(root, folder.name, None if native else image_size))


def partial_dir(target: Path) -> Path:
    """Where a resumable prepare of the cache `target` keeps its work until it is complete."""
    return target.parent / f".{target.name}.partial"


STATE_FILE = "state.json"


def _start_partial(plan: SourcePlan, force: bool) -> tuple[Path, set[int]]:
    """The partial build folder of `plan` and the classes already decoded in it (continued when it
    matches the plan; with `force`, or when there is none, started afresh)."""
    from bench.paths import atomic_write_text

    partial = partial_dir(plan.target)
    state_file = partial / STATE_FILE
    if partial.exists() and not force:
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{state_file}: unreadable state of an interrupted prepare ({e}); pass --force to "
                            "discard it and start again") from e
        if state.get("identity") != plan.identity():
            raise DataError(f"{partial}: an interrupted prepare with other settings or another spec "
                            f"({state.get('identity')} vs {plan.identity()}); pass --force to discard it and start again")
        return partial, set(state["done"])
    if partial.exists():
        import shutil

        shutil.rmtree(partial)  # --force: the user asked for a fresh build
    tmp = partial.with_name(partial.name + ".new")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)  # our own unfinished set-up of a partial folder, never a user's file
    tmp.mkdir(parents=True)
    open_images(tmp, plan.shape).flush()
    atomic_write_text(tmp / STATE_FILE, json.dumps({"identity": plan.identity(), "done": []}))
    tmp.rename(partial)
    return partial, set()


def _fill(plan: SourcePlan, build: Path, done: set[int], opts: BuildOptions) -> None:
    """Decode the classes of `plan` not in `done` into build/images.npy, recording each in build/state.json."""
    from bench.paths import atomic_write_text

    state = {"identity": plan.identity(), "done": sorted(done)}
    counts = plan.spec.images_per_class
    bar = progress(total=int(counts.sum()), desc=f"decoding {plan.folder.name}", enabled=opts.show_progress, unit="img")

    def on_done(job: ClassJob) -> None:
        done.add(job.c)
        state["done"] = sorted(done)
        atomic_write_text(build / STATE_FILE, json.dumps(state))
        bar.update(job.count)

    with bar:
        bar.update(int(sum(int(counts[c]) for c in done)))
        run_jobs(plan.jobs(build / "images.npy", done), opts.n_workers(), on_done)


def _finish(plan: SourcePlan, build: Path) -> None:
    """Write the index of a complete build (the last file: a cache with an index is complete)."""
    spec = plan.spec
    (build / STATE_FILE).unlink(missing_ok=True)
    groups = None
    if spec.kind == "bilevel":
        groups = [""] * spec.n_classes
        for k, ids in enumerate(spec.superclass_classes):
            for cid in ids:
                groups[int(cid)] = spec.superclass_names[k]
    images = np.load(build / "images.npy", mmap_mode="r")
    meta = {**plan.meta(), "spec_name": spec.name, "kind": spec.kind, "channels": 1 if plan.grey else 3,
            "stored_size": list(plan.shape[1:3]), "decoder_version": f"simplejpeg {jpeg_decoder_version()}",
            "resize": "tf-legacy-bilinear-align-corners" + (" (when gathered)" if plan.native else ""),
            "records": str(plan.folder), "spec": spec_for_cache(spec, plan.folder)}
    src = ArraySource(plan.folder.name, images, plan.starts, spec.images_per_class.copy(), list(spec.class_names),
                      {s: ids.copy() for s, ids in spec.splits.items()}, None, groups, meta)
    write_index(build, src)
    del images, src


def build_source(folder: Path, root: Path, image_size: int = DEFAULT_SIZE, opts: BuildOptions = BuildOptions(),
                 replace: bool = True, force: bool = False) -> Path:
    """Decode one source folder into its cache (in opts.workers processes); returns the cache folder.

    replace=True (the `prepare` command): resumable. Classes are decoded into a partial folder
    beside the cache (`partial_dir`), each class's rows flushed before it is recorded as done in
    its state.json (written atomically); a killed or failed prepare leaves that folder, and the
    next prepare continues it (`force` starts it afresh). The cache appears, complete, by a
    rename. replace=False (a loader building on first use, maybe in several processes at once):
    a private temporary folder, not resumable, and a cache another process finished first is kept.
    """
    plan = plan_source(folder, root, image_size)
    if not replace:
        with building_dir(plan.target, replace=False) as tmp:
            open_images(tmp, plan.shape).flush()
            _fill(plan, tmp, set(), opts)
            _finish(plan, tmp)
        return plan.target
    partial, done = _start_partial(plan, force)
    if done:
        opts.say(f"meta-dataset/{plan.folder.name}: continuing an interrupted prepare ({len(done)} of "
                 f"{plan.spec.n_classes} classes already decoded in {partial})")
    _fill(plan, partial, done, opts)
    _finish(plan, partial)
    install_dir(partial, plan.target, replace=True)
    return plan.target


def checksum_note() -> str:
    """Which crc32c verifies the records' checksums (said by `prepare`)."""
    from bench.sources import tfrecord

    if tfrecord._FAST is not None:
        return "record checksums: C crc32c (the crc32c / google-crc32c package)"
    return ("record checksums: pure-Python crc32c (~5 MB/s; `pip install 'metabench[tfrecords]'` installs the C "
            "crc32c, ~1000x faster)")


def prepare(records: Path | str, root: Path, image_size: int = DEFAULT_SIZE, force: bool = False,
            opts: BuildOptions = BuildOptions(), only: Sequence[str] = ()) -> dict[str, Path]:
    """Prepare every source found under `records` (or those named in `only`); returns name -> cache folder.

    A source whose cache is complete and current is skipped unless `force`; an interrupted one is
    continued (see `build_source`).
    """
    found = find_sources(Path(records))
    if only:
        lacking = [s for s in only if s not in found]
        if lacking:
            raise DataError(f"{records}: no records for {lacking} (found: {sorted(found)})")
        found = {s: found[s] for s in only}
    say = opts.say
    say(f"meta-dataset: {opts.n_workers()} worker process(es); {checksum_note()}; JPEG decoder: libjpeg-turbo fast "
        f"integer IDCT as tf.image.decode_image (simplejpeg {jpeg_decoder_version()})")
    out = {}
    for name, folder in found.items():
        if not force:
            current = [p for p in (cache_dir(root, name, None), cache_dir(root, name, image_size))
                       if _current(p, cache_meta(name, None if p.name == "cache-native" else image_size))]
            if current:
                say(f"meta-dataset/{name}: cache up to date at {current[0]} (--force rebuilds it)")
                out[name] = current[0]
                continue
        target = build_source(folder, root, image_size, opts, force=force)
        stored = "x".join(map(str, np.load(target / "images.npy", mmap_mode="r").shape[1:3]))
        say(f"meta-dataset/{name}: {int(load_spec(folder).images_per_class.sum())} images verified and "
            f"decoded, stored at {stored} px, cache written to {target} ({dir_size(target) / 2**20:.1f} MiB)")
        out[name] = target
    missing = [n for n in OFFICIAL if n not in found and not only]
    if missing and any(n in OFFICIAL for n in found):
        say(f"meta-dataset: not found under {records} (prepare them later): {', '.join(missing)}")
    return out


def _current(path: Path, meta: dict) -> bool:
    """Whether `path` holds a complete cache matching `meta` (a stale or broken one is not current)."""
    try:
        return try_load_cache(path, meta) is not None
    except DataError:
        return False


def dir_size(path: Path) -> int:
    """Total bytes of the files in a folder (allocated bytes: a sparse file counts what it holds)."""
    return sum(min(p.stat().st_size, p.stat().st_blocks * 512) for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def prepare_command(root: Path, image_size: int) -> str:
    size = "" if image_size == DEFAULT_SIZE else f" --image-size {image_size}"
    return f"metabench data prepare meta-dataset --records DIR --root {root}{size}"


def source_cache(root: Path, source: str, image_size: int) -> Path:
    """The cache folder that serves `source` at `image_size`: its native-size one when it has one."""
    native = cache_dir(root, source, None)
    return native if (native / "index.json").exists() else cache_dir(root, source, image_size)


def open_source(root: Path, source: str, image_size: int = DEFAULT_SIZE) -> ArraySource:
    """The prepared cache of Meta-Dataset source `source` (a records folder name, e.g. "aircraft") at
    `image_size`: its native-size cache (resized when gathered) when there is one, else its cache at that size."""
    native = cache_dir(root, source, None)
    path = source_cache(root, source, image_size)
    try:
        src = try_load_cache(path, cache_meta(source, None if path == native else image_size))
    except DataError as e:
        raise DataError(f"{e} (rebuild: `{prepare_command(root, image_size)} --force`)") from e
    if src is None:
        off = OFFICIAL.get(source)
        what = f"Meta-Dataset {off.display} ({source})" if off else f"Meta-Dataset source {source!r}"
        partial = [p for p in (partial_dir(native), partial_dir(path)) if p.exists()]
        if partial:
            raise DataError(f"{what}: its prepare was interrupted ({partial[0]}); run "
                            f"`{prepare_command(root, image_size)}` again to continue it")
        raise DataError(f"{what} is not prepared at {image_size}px in {root}: convert it with the official "
                        f"Meta-Dataset code (DIR/{source}/dataset_spec.json and DIR/{source}/<class>.tfrecords), then "
                        f"run `{prepare_command(root, image_size)}`")
    if path == native:
        src.gather_size = image_size
    return src


def spec_of(source: ArraySource) -> MDSpec:
    """The parsed dataset spec kept in a prepared source's index."""
    if "spec" not in source.meta:
        raise DataError(f"source {source.name!r} is not a prepared Meta-Dataset source (no spec in its index)")
    return parse_spec(source.meta["spec"], f"cache index of {source.name}")


def _loader(source: str) -> Callable[[Path, int], ArraySource]:
    def load(root: Path, image_size: int = DEFAULT_SIZE) -> ArraySource:
        return open_source(Path(root), source, image_size)

    load.__name__ = f"load_{source}"
    load.__doc__ = f"Registry loader of the prepared Meta-Dataset source {source!r}."
    return load


for _name in OFFICIAL:
    globals()[f"load_{_name}"] = _loader(_name)
del _name


def find_small_records() -> Path | None:
    """The genuine small Omniglot records: $METABENCH_SHARED_DATA/meta_dataset/omniglot_small, else
    ../shared/data/meta_dataset/omniglot_small beside the current folder or beside the repository."""
    import os

    bases = []
    if os.environ.get("METABENCH_SHARED_DATA"):
        bases.append(Path(os.environ["METABENCH_SHARED_DATA"]).expanduser())
    bases += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    for base in bases:
        folder = base / "meta_dataset" / "omniglot_small"
        if (folder / SPEC_FILE).is_file():
            return folder
    return None


def load_omniglot_small(root: Path, image_size: int = DEFAULT_SIZE) -> ArraySource:
    """Registry entry "md-omniglot-small": the genuine small Omniglot records (shared test data).

    Prepared like any source; when it is not, and the shared records are found
    (`find_small_records`), it is prepared from them first (a few seconds)."""
    root = Path(root)
    try:
        return open_source(root, "omniglot_small", image_size)
    except DataError:
        records = find_small_records()
        if records is None or any((cache_dir(root, "omniglot_small", s) / "index.json").exists()
                                  for s in (None, image_size)):
            raise
    build_source(records, root, image_size, BuildOptions(workers=1, show_progress=False), replace=False)
    return open_source(root, "omniglot_small", image_size)


def registry_entries() -> dict[str, tuple[str, str]]:
    """SOURCES entries (name -> ("module:function", description)) of the Meta-Dataset sources."""
    out = {source_key(n): (f"bench.sources.meta_dataset:load_{n}",
                           f"Meta-Dataset {o.display} from the official TFRecords ({'/'.join(map(str, o.classes))} "
                           f"classes; prepare from your records)") for n, o in OFFICIAL.items()}
    out["md-omniglot-small"] = ("bench.sources.meta_dataset:load_omniglot_small",
                                "genuine Meta-Dataset records of the small Omniglot subsets (136/17/89 classes)")
    return out


def source_key(name: str) -> str:
    """Registry source name of a records folder: "md-" + kebab-case (aircraft -> md-aircraft)."""
    off = OFFICIAL.get(name)
    return "md-" + (off.key if off else name.replace("_", "-"))


def status_rows(root: Path) -> list[dict]:
    """One row per Meta-Dataset source with a cache (or an interrupted prepare) under ROOT/meta-dataset,
    with the disk each takes (none when nothing is prepared)."""
    rows = []
    folders = sorted(p for p in md_dir(root).iterdir() if p.is_dir()) if md_dir(root).is_dir() else []
    for folder in folders:
        caches = sorted(p for p in folder.glob("cache-*") if (p / "index.json").is_file())
        partial = sorted(folder.glob(".cache-*.partial"))
        if not caches and not partial:
            continue
        cached = []
        for p in caches:
            label = p.name[6:]
            if label == NATIVE:
                shape = json.loads((p / "index.json").read_text(encoding="utf-8")).get("shape", [0, 0, 0])
                label = f"native {shape[1]}x{shape[2]} (any size)"
            cached.append(label)
        for p in partial:
            state = json.loads((p / STATE_FILE).read_text(encoding="utf-8")) if (p / STATE_FILE).is_file() else {}
            cached.append(f"{p.name[7:-8]} interrupted ({len(state.get('done', []))} classes done; prepare again "
                          "to continue)")
        disk = sum(dir_size(p) for p in caches + partial)
        rows.append({"dataset": f"meta-dataset/{folder.name}", "found": f"source {source_key(folder.name)}",
                     "verified": "record checksums, labels and counts (when cached)",
                     "cached": ", ".join(cached), "disk": human_bytes(disk), "where": str(folder)})
    return rows


def human_bytes(n: int) -> str:
    """Bytes as B / KiB / MiB / GiB / TiB with one decimal."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024:
            return f"{x:.0f} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"

"""Meta-Dataset (Triantafillou et al., ICLR 2020) from the official per-class TFRecords.

The user converts the datasets with the official code (google-research/meta-dataset,
dataset_conversion) into `<records>/<source>/<class_id>.tfrecords` plus
`<records>/<source>/dataset_spec.json`; then

    metabench data prepare meta-dataset --records <records> [--root DIR] [--image-size 84|126]

reads the spec of every source present (plain `DatasetSpecification`, bi-level
`BiLevelDatasetSpecification` for Omniglot, `HierarchicalDatasetSpecification` for ILSVRC),
reads each class's records with both TFRecord checksums verified (bench.sources.tfrecord, no
TensorFlow), checks that every record's label is its class and that each class has the number
of images its spec says, decodes every image once and writes one memory-mapped cache per source
to ROOT/meta-dataset/<source>/cache-<size>px/ (images.npy + index.json; the parsed spec is kept
in the index). Sampling never decodes a JPEG at run time.

Decoding, and how it relates to the official decoder (meta_dataset/data/decoder.py:
`tf.image.decode_image(channels=3)`, `tf.image.resize_images(..., BILINEAR, align_corners=True)`,
then 2 * (x / 255 - 0.5)):
- JPEG decoded by Pillow to RGB (libjpeg, like TF's decoder);
- resized with `resize_bilinear_tf`, a numpy re-implementation of TF's legacy bilinear resize with
  align_corners=True (no antialiasing; corner pixels map onto corner pixels); computed in float64;
- stored as uint8, i.e. TF's float result rounded to the nearest grey level (at most 0.5/255 off);
- greyscale sources (Omniglot, QuickDraw: their RGB JPEGs have R = G = B) are stored with one
  channel (a third of the disk) and expanded to three channels when gathered, so every source
  yields [3, size, size] images (QuickDraw's 50.4M images still need ~340 GiB at 84 px);
- pixel range: see `PIXEL_RANGE` below (the one place where it is decided).

Sources whose folder is named like an official source are checked against the official class
counts (`OFFICIAL`); any other folder (e.g. the genuine small Omniglot records in the shared test
data, `omniglot_small`) is prepared as a custom source of that name.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from bench.errors import DataError
from bench.sources.base import ArraySource
from bench.sources.cachedir import building_dir, open_images, progress, try_load_cache, write_index
from bench.sources.tfrecord import parse_example, read_records

CACHE_VERSION = 1
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

@functools.lru_cache(maxsize=64)
def _axis(n_in: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper source index and interpolation weight of each output index (align_corners)."""
    scale = (n_in - 1) / (size - 1) if size > 1 else 0.0
    pos = np.arange(size) * scale
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), pos - lo


def resize_bilinear_tf(img: np.ndarray, size: int) -> np.ndarray:
    """TF's legacy bilinear resize with align_corners=True: uint8 [H, W(, C)] -> float64 [size, size(, C)].

    Output pixel (i, j) samples the input at (i, j) * (in - 1) / (size - 1) and interpolates
    between its neighbours, x first: top = tl + (tr - tl) * dx, bottom = bl + (br - bl) * dx,
    out = top + (bottom - top) * dy (no antialiasing), as `tf.image.resize_images(...,
    BILINEAR, align_corners=True)` in the official decoder (TF computes in float32).
    """
    y0, y1, fy = _axis(img.shape[0], size)
    x0, x1, fx = _axis(img.shape[1], size)
    src = img.astype(np.float64)
    wx = fx[:, None] if src.ndim == 3 else fx
    left, right = src[:, x0], src[:, x1]
    rows = left + (right - left) * wx
    top, bottom = rows[y0], rows[y1]
    wy = fy.reshape((-1,) + (1,) * (src.ndim - 1))
    return top + (bottom - top) * wy


def decode_rgb(data: bytes, where: str = "image") -> np.ndarray:
    """A JPEG (or PNG) byte string as uint8 RGB [H, W, 3] (3 channels, like decode_image(channels=3))."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: cannot decode the image ({e})") from e


def decode_image(data: bytes, image_size: int, where: str = "image", grey: bool = False) -> np.ndarray:
    """Decode and resize one image as the cache stores it: uint8 [size, size, 3], or [size, size]
    with grey=True (one channel: the official greyscale sources have R = G = B exactly; an image
    whose channels differ would be stored as their rounded mean)."""
    rgb = decode_rgb(data, where)
    if grey:
        r = rgb[..., 0]
        if np.array_equal(r, rgb[..., 1]) and np.array_equal(r, rgb[..., 2]):
            rgb = r
        else:
            rgb = np.rint(rgb.mean(axis=2)).astype(np.uint8)
    return np.clip(np.rint(resize_bilinear_tf(rgb, image_size)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# preparing caches
# ---------------------------------------------------------------------------------------------

def md_dir(root: Path) -> Path:
    """ROOT/meta-dataset: one folder per prepared source."""
    return Path(root) / "meta-dataset"


def cache_dir(root: Path, source: str, image_size: int) -> Path:
    return md_dir(root) / source / f"cache-{image_size}px"


def cache_meta(source: str, image_size: int) -> dict:
    return {"dataset": "meta-dataset", "source": source, "version": CACHE_VERSION, "image_size": image_size}


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


def read_class(folder: Path, spec: MDSpec, c: int) -> list[bytes]:
    """The encoded images of class `c`, checked: checksums, labels equal to c, count per the spec."""
    path = folder / spec.file_pattern.format(c)
    if not path.is_file():
        raise DataError(f"{path}: missing record file of class {c} ({spec.class_names[c]}); the spec and the "
                        "records do not match")
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
    want = int(spec.images_per_class[c])
    if len(images) != want:
        raise DataError(f"{path}: {len(images)} records, but the spec says class {c} ({spec.class_names[c]}) has "
                        f"{want} images; the spec and the records do not match")
    return images


def spec_for_cache(spec: MDSpec, folder: Path) -> dict:
    """The spec as kept in the cache index: the original JSON with `path` set to the records folder."""
    return {**spec.raw, "path": str(folder)}


def build_source(folder: Path, root: Path, image_size: int = DEFAULT_SIZE, show_progress: bool = True,
                 replace: bool = True) -> Path:
    """Decode one source folder into its cache; returns the cache folder. Atomic: a failure leaves nothing."""
    folder = Path(folder)
    if image_size < 4:
        raise DataError(f"--image-size must be at least 4 (got {image_size})")
    spec = load_spec(folder)
    check_official(spec, folder.name, str(folder / SPEC_FILE))
    files = {p.name for p in folder.glob("*.tfrecords")}
    expected = {spec.file_pattern.format(c) for c in range(spec.n_classes)}
    extra = sorted(files - expected)
    if extra:
        raise DataError(f"{folder}: record files {extra[:5]} are not classes of its {SPEC_FILE} "
                        f"({spec.n_classes} classes); the spec and the records do not match")
    grey = spec.name in GREY_SPEC_NAMES
    total = int(spec.images_per_class.sum())
    shape = (total, image_size, image_size) if grey else (total, image_size, image_size, 3)
    starts = np.concatenate([[0], np.cumsum(spec.images_per_class)[:-1]]).astype(np.int64)
    target = cache_dir(root, folder.name, image_size)
    with building_dir(target, replace=replace) as tmp:
        images = open_images(tmp, shape)
        bar = progress(total=total, desc=f"decoding {folder.name}", enabled=show_progress, unit="img")
        with bar:
            for c in range(spec.n_classes):
                for i, data in enumerate(read_class(folder, spec, c)):
                    img = decode_image(data, image_size, f"{folder / spec.file_pattern.format(c)} record {i}", grey)
                    images[starts[c] + i] = img
                    bar.update(1)
        images.flush()
        groups = None
        if spec.kind == "bilevel":
            groups = [""] * spec.n_classes
            for k, ids in enumerate(spec.superclass_classes):
                for cid in ids:
                    groups[int(cid)] = spec.superclass_names[k]
        meta = {**cache_meta(folder.name, image_size), "spec_name": spec.name, "kind": spec.kind,
                "channels": 1 if grey else 3,
                "resize": "tf-legacy-bilinear-align-corners", "records": str(folder),
                "spec": spec_for_cache(spec, folder)}
        src = ArraySource(folder.name, images, starts, spec.images_per_class.copy(), list(spec.class_names),
                          {s: ids.copy() for s, ids in spec.splits.items()}, None, groups, meta)
        write_index(tmp, src)
        del images
    return target


def prepare(records: Path | str, root: Path, image_size: int = DEFAULT_SIZE, force: bool = False,
            show_progress: bool = True, say: Callable[[str], None] = print,
            only: Sequence[str] = ()) -> dict[str, Path]:
    """Prepare every source found under `records` (or those named in `only`); returns name -> cache folder.

    A source whose cache is complete and current is skipped unless `force`.
    """
    found = find_sources(Path(records))
    if only:
        lacking = [s for s in only if s not in found]
        if lacking:
            raise DataError(f"{records}: no records for {lacking} (found: {sorted(found)})")
        found = {s: found[s] for s in only}
    out = {}
    from bench.sources import tfrecord

    if tfrecord._FAST is None:
        size = sum(p.stat().st_size for folder in found.values() for p in folder.glob("*.tfrecords"))
        if size > 2**30:
            say(f"meta-dataset: {size / 2**30:.0f} GiB of records; checksums are verified in pure Python (~5 MB/s). "
                "`pip install crc32c` (the metabench[tfrecords] extra) makes this ~1000x faster")
    for name, folder in found.items():
        target = cache_dir(root, name, image_size)
        if not force:
            try:
                if try_load_cache(target, cache_meta(name, image_size)) is not None:
                    say(f"meta-dataset/{name}: cache up to date at {target} (--force rebuilds it)")
                    out[name] = target
                    continue
            except DataError:
                pass
        build_source(folder, root, image_size, show_progress)
        say(f"meta-dataset/{name}: {int(load_spec(folder).images_per_class.sum())} images verified and "
            f"decoded, cache written to {target} ({dir_size(target) / 2**20:.1f} MiB)")
        out[name] = target
    missing = [n for n in OFFICIAL if n not in found and not only]
    if missing and any(n in OFFICIAL for n in found):
        say(f"meta-dataset: not found under {records} (prepare them later): {', '.join(missing)}")
    return out


def dir_size(path: Path) -> int:
    """Total bytes of the files in a folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def prepare_command(root: Path, image_size: int) -> str:
    size = "" if image_size == DEFAULT_SIZE else f" --image-size {image_size}"
    return f"metabench data prepare meta-dataset --records DIR --root {root}{size}"


def open_source(root: Path, source: str, image_size: int = DEFAULT_SIZE) -> ArraySource:
    """The prepared cache of Meta-Dataset source `source` (a records folder name, e.g. "aircraft")."""
    path = cache_dir(root, source, image_size)
    try:
        src = try_load_cache(path, cache_meta(source, image_size))
    except DataError as e:
        raise DataError(f"{e} (rebuild: `{prepare_command(root, image_size)} --force`)") from e
    if src is None:
        off = OFFICIAL.get(source)
        what = f"Meta-Dataset {off.display} ({source})" if off else f"Meta-Dataset source {source!r}"
        raise DataError(f"{what} is not prepared at {image_size}px in {root}: convert it with the official "
                        f"Meta-Dataset code (DIR/{source}/dataset_spec.json and DIR/{source}/<class>.tfrecords), then "
                        f"run `{prepare_command(root, image_size)}`")
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
        if records is None or (cache_dir(root, "omniglot_small", image_size) / "index.json").exists():
            raise
    build_source(records, root, image_size, show_progress=False, replace=False)
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
    """One row per Meta-Dataset source with a cache under ROOT/meta-dataset (none when nothing is prepared)."""
    rows = []
    folders = sorted(p for p in md_dir(root).iterdir() if p.is_dir()) if md_dir(root).is_dir() else []
    for folder in folders:
        sizes = sorted(p.name[6:] for p in folder.glob("cache-*px") if (p / "index.json").is_file())
        if sizes:
            rows.append({"dataset": f"meta-dataset/{folder.name}", "found": f"source {source_key(folder.name)}",
                         "verified": "record checksums, labels and counts (when cached)",
                         "cached": ", ".join(sizes), "where": str(folder)})
    return rows

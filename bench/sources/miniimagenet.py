"""miniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) split: 100 ImageNet
classes, 600 images each, 84x84 RGB; 64 train / 16 val / 20 test classes.

The split is the project's own compact definition: the class lists (RAVI), the expected counts
and the sha256 of the official CSV files (twitter/meta-learning-lstm data/miniImagenet/*.csv,
identical copies in ProtoNets, TADAM, few-shot-ssl and mini-imagenet-tools).

metabench never downloads the images: ImageNet's terms allow non-commercial research and
education only and forbid redistribution (see OBTAIN). `prepare` reads what the user has, in
any of the formats in common use, detected automatically:

  jpeg      `images/` of JPEGs (flat, or one folder per wnid) + train.csv/val.csv/test.csv
            (`filename,label`); resized to 84x84 at load, never assumed to be already.
  pickle    mini-imagenet-cache-{train,val|validation,test}.pkl: {"image_data": uint8
            (N,84,84,3), "class_dict": {wnid: [rows]}}; Python 2 pickles included.
  hdf5      torchmeta: {train,val,test}_data.hdf5 (group "datasets", one (600,84,84,3) uint8
            dataset per wnid) + {split}_labels.json (needs h5py: pip install h5py).
  npz       TADAM: few-shot-{train,val,test}.npz, "features" uint8 (N,84,84,3) and "targets"
            (index into the sorted wnids of the split).
  category  MetaOptNet / Gidaris: miniImageNet_category_split_{train_phase_train,val,test}.pickle,
            {"data", "labels", "catname2label"} (Python 2 pickles). The train_phase_val/test
            files hold extra images of the train classes outside the 600 and are not used.

Every format is validated against the Ravi split (class sets per split, 600 images per class)
and decoded into one memory-mapped uint8 cache ROOT/miniimagenet/cache-84px (classes: the 64
train wnids sorted, then val, then test; images of a class in the order of the source). Images
of another size are resized with PIL's BILINEAR filter (antialiased when shrinking).

Pickle files can run code when loaded: only prepare files you trust.
"""

from __future__ import annotations

import csv
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench.errors import DataError
from bench.sources.base import SPLITS, ArraySource
from bench.sources.cachedir import building_dir, file_digest, open_images, progress, try_load_cache, write_index

RAVI: dict[str, tuple[str, ...]] = {
    "train": tuple("""
        n01532829 n01558993 n01704323 n01749939 n01770081 n01843383 n01910747 n02074367
        n02089867 n02091831 n02101006 n02105505 n02108089 n02108551 n02108915 n02111277
        n02113712 n02120079 n02165456 n02457408 n02606052 n02687172 n02747177 n02795169
        n02823428 n02966193 n03017168 n03047690 n03062245 n03207743 n03220513 n03337140
        n03347037 n03400231 n03476684 n03527444 n03676483 n03838899 n03854065 n03888605
        n03908618 n03924679 n03998194 n04067472 n04243546 n04251144 n04258138 n04275548
        n04296562 n04389033 n04435653 n04443257 n04509417 n04515003 n04596742 n04604644
        n04612504 n06794110 n07584110 n07697537 n07747607 n09246464 n13054560 n13133613
    """.split()),
    "val": tuple("""
        n01855672 n02091244 n02114548 n02138441 n02174001 n02950826 n02971356 n02981792
        n03075370 n03417042 n03535780 n03584254 n03770439 n03773504 n03980874 n09256479
    """.split()),
    "test": tuple("""
        n01930112 n01981276 n02099601 n02110063 n02110341 n02116738 n02129165 n02219486
        n02443484 n02871525 n03127925 n03146219 n03272010 n03544143 n03775546 n04146614
        n04149813 n04418357 n04522168 n07613480
    """.split()),
}
PER_CLASS = 600
# split -> (official file name, sha256, data rows)
RAVI_CSV: dict[str, tuple[str, str, int]] = {
    "train": ("train.csv", "498519cd8e49ce97ed26a4a3638966698ae41ab35e9c68538319fc9b46ba7d2f", 38400),
    "val": ("val.csv", "5658a59921ca027ee76af92949869c5d6f41d77592ff3b18db325a9d10c893b9", 9600),
    "test": ("test.csv", "2b7cfa78342995761a572a8158e539bc4e0a80f9bbd7d00c1e17a460fbbb93fa", 12000),
}
DEFAULT_SIZE = 84
CACHE_VERSION = 1
RESAMPLE = "bilinear"
FORMATS = ("pickle", "hdf5", "npz", "category", "jpeg")  # detection order when a folder has several

OBTAIN = (
    "metabench cannot download miniImageNet: it is derived from ImageNet, whose terms allow "
    "non-commercial research and education only and forbid redistribution. To obtain it: accept the "
    "ImageNet terms at https://image-net.org and download the ILSVRC-2012 training images, then cut "
    "miniImageNet out with the Ravi & Larochelle split CSVs (https://github.com/twitter/meta-learning-lstm, "
    "data/miniImagenet/{train,val,test}.csv), e.g. with github.com/yaoyao-liu/mini-imagenet-tools; or use a "
    "preprocessed copy you are entitled to (pickle caches, torchmeta HDF5, TADAM npz or MetaOptNet "
    "category-split pickles). Then run `metabench data prepare miniimagenet --from PATH`."
)


def wnid_split() -> dict[str, str]:
    """wnid -> its Ravi split."""
    return {w: s for s, ws in RAVI.items() for w in ws}


# ---------------------------------------------------------------------------------------------
# Readers: one per format; each gives, per split, the classes with their counts (cheap) and a
# function returning a class's images resized to image_size.
# ---------------------------------------------------------------------------------------------

@dataclass
class _Split:
    split: str
    file: str  # what to name in messages
    classes: dict[str, int]  # wnid -> number of images, in the order of the source
    get: Callable[[str, int], np.ndarray]  # (wnid, image_size) -> uint8 [n, s, s, 3]
    closers: list[Callable[[], None]] = field(default_factory=list)
    note: dict = field(default_factory=dict)

    def close(self) -> None:
        for c in self.closers:
            c()
        self.closers.clear()


def _resize(arr: np.ndarray, image_size: int, where: str) -> np.ndarray:
    """uint8 [n, H, W, 3] -> [n, s, s, 3] (PIL bilinear per image when H, W differ from s)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(f"{where}: images are {arr.dtype} {tuple(arr.shape)}, expected uint8 (N, H, W, 3) RGB")
    if arr.shape[1:3] == (image_size, image_size):
        return arr
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(a).resize((image_size, image_size), Image.Resampling.BILINEAR))
                     for a in arr]) if len(arr) else np.zeros((0, image_size, image_size, 3), np.uint8)


def decode_jpeg(path: Path, image_size: int) -> np.ndarray:
    """One image file -> uint8 [s, s, 3] RGB (PIL bilinear resize when not s x s)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from e
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _norm_keys(obj):
    """Decode bytes dict keys (Python 2 pickles loaded with encoding="bytes"), recursively."""
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): _norm_keys(v) for k, v in obj.items()}
    return obj


def load_pickle(path: Path):
    """Unpickle `path`: plain first, then as a Python 2 pickle (encoding latin1, then bytes)."""
    last: Exception | None = None
    for encoding in (None, "latin1", "bytes"):
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f) if encoding is None else pickle.load(f, encoding=encoding)
            return _norm_keys(obj)
        except UnicodeDecodeError as e:  # a Python 2 pickle: try the next encoding
            last = e
            continue
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
                IndexError, KeyError, MemoryError, OSError) as e:
            raise DataError(f"{path}: unreadable pickle (truncated or corrupt: {type(e).__name__}: {e})") from e
    raise DataError(f"{path}: unreadable pickle (not decodable as Python 3 or Python 2: {last})")


def _need(obj, keys: tuple[str, ...], path: Path, what: str) -> None:
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: not {what} (expected keys {list(keys)}, found {have})")


def _first(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def _missing(folder: Path, names: list[str], fmt: str) -> DataError:
    return DataError(f"{folder}: missing {' or '.join(names)} (the {fmt} format needs all three splits)")


def _read_pickle(folder: Path) -> dict[str, _Split]:
    out = {}
    for split in SPLITS:
        names = [f"mini-imagenet-cache-{s}.pkl" for s in ((split, "validation") if split == "val" else (split,))]
        path = _first(folder, names)
        if path is None:
            raise _missing(folder, names, "pickle-cache")
        obj = load_pickle(path)
        _need(obj, ("image_data", "class_dict"), path, "a miniImageNet pickle cache")
        class_dict = {str(k): np.asarray(v, dtype=np.int64).ravel() for k, v in obj["class_dict"].items()}
        n = len(obj["image_data"])
        for w, rows in class_dict.items():
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise DataError(f"{path}: class_dict[{w!r}] names rows outside 0..{n - 1}")

        def get(w, s, obj=obj, class_dict=class_dict, path=path):
            return _resize(np.asarray(obj["image_data"])[class_dict[w]], s, str(path))

        sp = _Split(split, str(path), {w: int(r.size) for w, r in class_dict.items()}, get)
        sp.closers.append(obj.clear)
        out[split] = sp
    return out


def _read_category(folder: Path) -> dict[str, _Split]:
    out = {}
    for split in SPLITS:
        names = [f"miniImageNet_category_split_{s}.pickle"
                 for s in (("train_phase_train", "train") if split == "train" else (split,))]
        path = _first(folder, names)
        if path is None:
            raise _missing(folder, names, "category-split pickle")
        obj = load_pickle(path)
        _need(obj, ("data", "labels", "catname2label"), path, "a miniImageNet category-split pickle")
        labels = np.asarray(obj["labels"], dtype=np.int64)
        if len(labels) != len(obj["data"]):
            raise DataError(f"{path}: {len(labels)} labels for {len(obj['data'])} images")
        label_of = {str(k): int(v) for k, v in obj["catname2label"].items()}
        present = set(np.unique(labels).tolist())
        unnamed = present - set(label_of.values())
        if unnamed:
            raise DataError(f"{path}: labels {sorted(unnamed)[:5]} have no class name in catname2label")
        classes = {w: int((labels == k).sum()) for w, k in sorted(label_of.items(), key=lambda x: x[1]) if k in present}

        def get(w, s, obj=obj, labels=labels, label_of=label_of, path=path):
            return _resize(np.asarray(obj["data"])[labels == label_of[w]], s, str(path))

        sp = _Split(split, str(path), classes, get)
        sp.closers.append(obj.clear)
        out[split] = sp
    return out


def _read_npz(folder: Path) -> dict[str, _Split]:
    out = {}
    for split in SPLITS:
        path = _first(folder, [f"few-shot-{split}.npz"])
        if path is None:
            raise _missing(folder, [f"few-shot-{split}.npz"], "npz")
        try:
            z = np.load(path, allow_pickle=False)
            if "features" not in z.files or "targets" not in z.files:
                raise DataError(f"{path}: not a TADAM npz (expected arrays features, targets; found {z.files})")
            targets = np.asarray(z["targets"]).astype(np.int64).ravel()
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{path}: unreadable npz (truncated or corrupt: {e})") from e
        wnids = sorted(RAVI[split])
        bad = targets[(targets < 0) | (targets >= len(wnids))]
        if bad.size:
            raise DataError(f"{path}: targets {sorted(set(bad.tolist()))[:5]} outside 0..{len(wnids) - 1} "
                            f"(the {len(wnids)} Ravi {split} classes)")
        classes = {wnids[k]: int(n) for k, n in zip(*np.unique(targets, return_counts=True))}
        cache: dict = {}

        def get(w, s, z=z, targets=targets, wnids=wnids, cache=cache, path=path):
            if "features" not in cache:
                try:
                    cache["features"] = z["features"]
                except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                    raise DataError(f"{path}: unreadable features (truncated or corrupt: {e})") from e
                if len(cache["features"]) != len(targets):
                    raise DataError(f"{path}: {len(targets)} targets for {len(cache['features'])} images")
            return _resize(cache["features"][targets == wnids.index(w)], s, str(path))

        sp = _Split(split, str(path), classes, get)
        sp.closers += [cache.clear, z.close]
        out[split] = sp
    return out


def _read_hdf5(folder: Path) -> dict[str, _Split]:
    try:
        import h5py
    except ImportError as e:
        raise DataError(f"{folder}: reading the torchmeta HDF5 files needs h5py: pip install h5py") from e
    out = {}
    try:
        for split in SPLITS:
            path, labels_path = folder / f"{split}_data.hdf5", folder / f"{split}_labels.json"
            for p in (path, labels_path):
                if not p.is_file():
                    raise _missing(folder, [p.name], "torchmeta HDF5")
            try:
                labels = json.loads(labels_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DataError(f"{labels_path}: unreadable labels ({e})") from e
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise DataError(f"{path}: unreadable HDF5 file (truncated or corrupt: {e})") from e
            sp = _Split(split, str(path), {}, lambda w, s: None, [f.close])
            out[split] = sp
            if "datasets" not in f:
                raise DataError(f"{path}: no group 'datasets' (not a torchmeta miniImageNet file)")
            group = f["datasets"]
            if sorted(group.keys()) != sorted(labels):
                raise DataError(f"{path}: its datasets {sorted(group.keys())[:3]}... do not match "
                                f"{labels_path.name} {sorted(labels)[:3]}...")
            sp.classes = {str(w): int(group[w].shape[0]) for w in labels}

            def get(w, s, group=group, path=path):
                try:
                    data = group[w][()]
                except (OSError, KeyError) as e:
                    raise DataError(f"{path}: cannot read dataset {w!r} ({e}); the file is corrupt") from e
                return _resize(data, s, f"{path}:{w}")

            sp.get = get
    except BaseException:
        for sp in out.values():
            sp.close()
        raise
    return out


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [[c.strip() for c in r] for r in csv.reader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable CSV ({e})") from e
    rows = [r for r in rows if any(r)]
    if not rows or len(rows[0]) < 2 or rows[0][0] != "filename":
        raise DataError(f"{path}: expected a header 'filename,label'")
    bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) < 2 or not r[0] or not r[1]]
    if bad:
        raise DataError(f"{path}: malformed rows (line {bad[0]})")
    return [(r[0], r[1]) for r in rows[1:]]


def _jpeg_layout(path: Path) -> tuple[Path, Path] | None:
    """(images folder, CSV folder) when `path` looks like the JPEG layout."""
    for images, csvs in ((path / "images", path), (path, path.parent)):
        if images.is_dir() and images.name == "images":
            for d in (csvs, csvs / "splits", csvs / "csv", csvs / "csv_files", csvs / "split"):
                if (d / "train.csv").is_file():
                    return images, d
    return None


def _read_jpeg(folder: Path) -> dict[str, _Split]:
    layout = _jpeg_layout(folder)
    if layout is None:
        raise DataError(f"{folder}: expected images/ and train.csv, val.csv, test.csv")
    images, csv_dir = layout
    out = {}
    for split in SPLITS:
        name, sha, _ = RAVI_CSV[split]
        path = csv_dir / name
        if not path.is_file():
            raise _missing(csv_dir, [name], "JPEG + CSV")
        rows = _csv_rows(path)
        files: dict[str, list[str]] = {}
        for fn, w in rows:
            files.setdefault(w, []).append(fn)

        def get(w, s, files=files, path=path):
            arr = np.empty((len(files[w]), s, s, 3), dtype=np.uint8)
            for i, fn in enumerate(files[w]):
                p = images / fn
                if not p.is_file() and (images / w / fn).is_file():
                    p = images / w / fn
                if not p.is_file():
                    raise DataError(f"{images / fn}: missing image (listed in {path})")
                arr[i] = decode_jpeg(p, s)
            return arr

        out[split] = _Split(split, str(path), {w: len(v) for w, v in files.items()}, get,
                            note={"csv_sha256_ok": file_digest(path, "sha256") == sha})
    return out


_READERS = {"pickle": _read_pickle, "hdf5": _read_hdf5, "npz": _read_npz, "category": _read_category,
            "jpeg": _read_jpeg}
_SIGNATURE = {
    "pickle": lambda d: (d / "mini-imagenet-cache-train.pkl").is_file(),
    "hdf5": lambda d: (d / "train_data.hdf5").is_file(),
    "npz": lambda d: (d / "few-shot-train.npz").is_file(),
    "category": lambda d: any((d / f"miniImageNet_category_split_{s}.pickle").is_file()
                              for s in ("train_phase_train", "train")),
    "jpeg": lambda d: _jpeg_layout(d) is not None,
}


def detect(path: Path | str) -> tuple[str, Path]:
    """Which format `path` holds: (format name, folder to read). A file names its folder and format."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        n = path.name
        fmt = ("pickle" if n.startswith("mini-imagenet-cache-") and n.endswith(".pkl") else
               "hdf5" if n.endswith("_data.hdf5") or n.endswith("_labels.json") else
               "npz" if n.startswith("few-shot-") and n.endswith(".npz") else
               "category" if n.startswith("miniImageNet_category_split_") else
               "jpeg" if n.endswith(".csv") else None)
        if fmt is None:
            raise DataError(f"{path}: not a miniImageNet file metabench knows (accepted: {', '.join(FORMATS)}; "
                            f"see bench/sources/miniimagenet.py)")
        return fmt, path.parent
    named = [path, path / "miniimagenet", path / "miniImagenet", path / "mini-imagenet"]

    def candidates():
        yield from named
        if _jpeg_layout(path) is None:  # do not stat 60,000 JPEGs of an images/ folder
            yield from sorted(d for d in path.iterdir() if d not in named and d.is_dir())

    for folder in candidates():
        if folder.is_dir():
            for fmt in FORMATS:
                if _SIGNATURE[fmt](folder):
                    return fmt, folder
    raise DataError(f"{path}: no miniImageNet data found (looked for mini-imagenet-cache-*.pkl, *_data.hdf5, "
                    f"few-shot-*.npz, miniImageNet_category_split_*.pickle, images/ + train.csv). {OBTAIN}")


def validate(sp: _Split, expected_per_class: int | None = PER_CLASS, require_all_classes: bool = True) -> None:
    """Check one split's classes and counts against the Ravi split (DataError naming the file)."""
    want = RAVI[sp.split]
    owner = wnid_split()
    foreign = [w for w in sp.classes if w not in want]
    if foreign:
        desc = ", ".join(f"{w} (a Ravi {owner[w]} class)" if w in owner else f"{w} (not a miniImageNet class)"
                         for w in foreign[:5])
        raise DataError(f"{sp.file}: split mismatch: {len(foreign)} of its classes are not Ravi {sp.split} "
                        f"classes: {desc}")
    missing = [w for w in want if w not in sp.classes]
    if require_all_classes and missing:
        raise DataError(f"{sp.file}: missing classes: {len(missing)} of the {len(want)} Ravi {sp.split} classes "
                        f"are absent ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    if not sp.classes:
        raise DataError(f"{sp.file}: no classes")
    if expected_per_class is not None:
        bad = [(w, n) for w, n in sp.classes.items() if n != expected_per_class]
        if bad:
            raise DataError(f"{sp.file}: wrong image counts: {len(bad)} classes do not have {expected_per_class} "
                            f"images (" + ", ".join(f"{w} has {n}" for w, n in bad[:5]) + ")")


# ---------------------------------------------------------------------------------------------
# Cache and loader
# ---------------------------------------------------------------------------------------------

def data_dir(root: Path) -> Path:
    return Path(root) / "miniimagenet"


def cache_dir(root: Path, image_size: int) -> Path:
    return data_dir(root) / f"cache-{image_size}px"


def cache_meta(image_size: int) -> dict:
    return {"dataset": "miniimagenet", "version": CACHE_VERSION, "image_size": image_size}


def _command(root: Path, image_size: int) -> str:
    size = f" --image-size {image_size}" if image_size != DEFAULT_SIZE else ""
    return f"metabench data prepare miniimagenet --from PATH --root {root}{size}"


def prepare(path: Path | str, root: Path, image_size: int = DEFAULT_SIZE,
            expected_per_class: int | None = PER_CLASS, require_all_classes: bool = True,
            show_progress: bool = False, replace: bool = True) -> Path:
    """Detect the format at `path`, validate it against the Ravi split, build the cache.

    expected_per_class / require_all_classes: the real dataset has all 100 classes with 600
    images each (the defaults); tests relax them for tiny fixtures, and the cache records it
    (the "miniimagenet" loader refuses a relaxed cache). Returns the cache folder.
    """
    fmt, folder = detect(path)
    splits = _READERS[fmt](folder)
    try:
        for split in SPLITS:
            validate(splits[split], expected_per_class, require_all_classes)
        plan = [(s, w, splits[s].classes[w]) for s in SPLITS for w in RAVI[s] if w in splits[s].classes]
        n_total = sum(n for _, _, n in plan)
        target = cache_dir(root, image_size)
        with building_dir(target, replace=replace) as tmp:
            images = open_images(tmp, (n_total, image_size, image_size, 3))
            row = 0
            for i, (split, w, n) in enumerate(progress(plan, desc=f"decoding miniImageNet ({fmt})",
                                                       enabled=show_progress, unit="class")):
                arr = splits[split].get(w, image_size)
                if len(arr) != n:
                    raise DataError(f"{splits[split].file}: class {w} yields {len(arr)} images, listed {n}")
                images[row: row + n] = arr
                row += n
                if i + 1 == len(plan) or plan[i + 1][0] != split:
                    splits[split].close()  # free a split's arrays once copied
            images.flush()
            counts = np.array([n for _, _, n in plan], dtype=np.int64)
            ids = np.arange(len(plan), dtype=np.int64)
            split_of = np.array([s for s, _, _ in plan])
            src = ArraySource(
                name="miniimagenet", images=images,
                class_start=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), class_count=counts,
                class_names=[w for _, w, _ in plan], splits={s: ids[split_of == s] for s in SPLITS},
                meta={**cache_meta(image_size), "split": "ravi", "format": fmt, "from": str(Path(path).resolve()),
                      "resample": RESAMPLE, "expected_per_class": expected_per_class,
                      "all_classes": require_all_classes,
                      "csv_sha256_ok": ({s: splits[s].note.get("csv_sha256_ok") for s in SPLITS}
                                        if fmt == "jpeg" else None)},
            )
            write_index(tmp, src)
            del images, src
    finally:
        for sp in splits.values():
            sp.close()
    return target


def open_cache(root: Path, image_size: int = DEFAULT_SIZE) -> ArraySource | None:
    """The cache at `image_size`, or None when not built (DataError when unusable)."""
    try:
        return try_load_cache(cache_dir(root, image_size), cache_meta(image_size))
    except DataError as e:
        raise DataError(f"{e} (rebuild: `{_command(root, image_size)}`)") from e


def is_complete(src: ArraySource) -> bool:
    """Whether a cache holds the full Ravi split (all classes, 600 each), not a relaxed fixture."""
    return (bool(src.meta.get("all_classes")) and src.meta.get("expected_per_class") == PER_CLASS
            and all(len(src.splits[s]) == len(RAVI[s]) for s in SPLITS))


def load(root: Path, image_size: int = DEFAULT_SIZE, strict: bool = True) -> ArraySource:
    """Registry entry "miniimagenet": the Ravi split from the cache under ROOT/miniimagenet.

    strict: refuse a cache built with relaxed validation (tests pass False).
    """
    root = Path(root)
    src = open_cache(root, image_size)
    if src is None:
        raise DataError(f"miniImageNet is not prepared in {root} (no {cache_dir(root, image_size)}): run "
                        f"`{_command(root, image_size)}` with PATH your copy of it. {OBTAIN}")
    if strict and not is_complete(src):
        raise DataError(f"{cache_dir(root, image_size) / 'index.json'}: built from a partial copy "
                        f"({sum(len(v) for v in src.splits.values())} classes, relaxed validation); "
                        f"rebuild from the full dataset: `{_command(root, image_size)}`")
    return src

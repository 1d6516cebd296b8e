"""Tiny fixtures in the real on-disk formats (Omniglot archives, miniImageNet formats).

Shared by tests/test_omniglot.py, tests/test_miniimagenet.py and tests/test_data.py.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

# ../shared/data beside the repository (real files; tests skip when it is absent)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------------------------
# Omniglot
# ---------------------------------------------------------------------------------------------

def omniglot_png(seed: int, size: int = 105) -> bytes:
    """A 1-bit PNG like Omniglot's: white background (1), black strokes (0)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(im)
    for _ in range(2):
        pts = [tuple(int(v) for v in rng.integers(10, size - 10, size=2)) for _ in range(3)]
        draw.line(pts, fill=0, width=3)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def omniglot_members(top: str, alphabets: dict[str, int], images_per_char: int = 20,
                     seed: int = 0, size: int = 105) -> dict[str, bytes]:
    """{member path: PNG bytes} in the official layout under `top/` (deterministic per character)."""
    out = {}
    for a, n in alphabets.items():
        for c in range(1, n + 1):
            char_seed = zlib.crc32(f"{a}/{c}".encode()) % 10**6 + seed * 10**7
            for d in range(1, images_per_char + 1):
                out[f"{top}/{a}/character{c:02d}/{1000 + c:04d}_{d:02d}.png"] = omniglot_png(char_seed * 100 + d, size)
    return out


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        dirs = sorted({m.rsplit("/", i)[0] + "/" for m in members for i in (1, 2, 3)})
        for d in dirs:
            z.writestr(d, b"")
        for name, data in members.items():
            z.writestr(name, data)
    return path


def write_folder(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def full_omniglot_zips(folder: Path, images_per_char: int = 2) -> tuple[Path, Path]:
    """images_background.zip and images_evaluation.zip with every official alphabet and character
    (only `images_per_char` drawers each): real names and counts, tiny size."""
    from bench.sources.omniglot import BACKGROUND, EVALUATION

    bg = write_zip(folder / "images_background.zip",
                   omniglot_members("images_background", BACKGROUND, images_per_char, seed=1))
    ev = write_zip(folder / "images_evaluation.zip",
                   omniglot_members("images_evaluation", EVALUATION, images_per_char, seed=2))
    return bg, ev


# ---------------------------------------------------------------------------------------------
# miniImageNet
# ---------------------------------------------------------------------------------------------

def mini_classes() -> dict[str, list[str]]:
    """A few real Ravi classes per split (the first sorted wnids, so npz targets line up)."""
    from bench.sources.miniimagenet import RAVI

    return {"train": list(RAVI["train"][:3]), "val": list(RAVI["val"][:2]), "test": list(RAVI["test"][:2])}


def mini_jpeg(root: Path, per_class: int = 4, nested: bool = False, size: tuple[int, int] = (84, 84),
              seed: int = 0) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """images/ of JPEGs + train/val/test.csv. Returns the folder and the decoded images
    {split: {wnid: uint8 [n, H, W, 3]}} (what every other format stores)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    decoded: dict[str, dict[str, np.ndarray]] = {}
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, wnids in mini_classes().items():
        lines = ["filename,label"]
        decoded[split] = {}
        for w in wnids:
            arrs = []
            for i in range(per_class):
                fn = f"{w}{i + 1:08d}.jpg"
                base = rng.integers(0, 256, size=(size[1] // 4 + 1, size[0] // 4 + 1, 3)).astype(np.uint8)
                img = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
                path = root / "images" / (f"{w}/{fn}" if nested else fn)
                path.parent.mkdir(parents=True, exist_ok=True)
                img.save(path, format="JPEG", quality=90)
                with Image.open(path) as im:
                    arrs.append(np.asarray(im.convert("RGB")))
                lines.append(f"{fn},{w}")
            decoded[split][w] = np.stack(arrs)
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root, decoded


def _stack(decoded: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str], list[int]]:
    wnids = list(decoded)
    data = np.concatenate([decoded[w] for w in wnids])
    labels = [k for k, w in enumerate(wnids) for _ in range(len(decoded[w]))]
    return data, wnids, labels


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as Python 2 pickles of numpy arrays do: a plain
    Python 3 load fails with UnicodeDecodeError and encoding="latin1" is needed."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def dump_pickle(obj, path: Path, py2: bool = False) -> Path:
    with open(path, "wb") as f:
        if py2:
            Py2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f, protocol=4)
    return path


def mini_pickle(folder: Path, decoded, py2: bool = False, val_name: str = "val") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, classes in decoded.items():
        data, wnids, labels = _stack(classes)
        rows = np.arange(len(data))
        class_dict = {w: rows[np.asarray(labels) == k].tolist() for k, w in enumerate(wnids)}
        if py2:
            class_dict = {w.encode(): v for w, v in class_dict.items()}
            obj = {b"image_data": data, b"class_dict": class_dict}
        else:
            obj = {"image_data": data, "class_dict": class_dict}
        name = val_name if split == "val" else split
        dump_pickle(obj, folder / f"mini-imagenet-cache-{name}.pkl", py2)
    return folder


def mini_category(folder: Path, decoded, py2: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    offset = {"train": 0, "val": 64, "test": 80}
    for split, classes in decoded.items():
        data, wnids, labels = _stack(classes)
        labels = [offset[split] + k for k in labels]
        c2l = {w: offset[split] + k for k, w in enumerate(wnids)}
        if py2:
            obj = {b"data": data, b"labels": labels, b"catname2label": {w.encode(): v for w, v in c2l.items()}}
        else:
            obj = {"data": data, "labels": labels, "catname2label": c2l}
        name = "train_phase_train" if split == "train" else split
        dump_pickle(obj, folder / f"miniImageNet_category_split_{name}.pickle", py2)
    return folder


def mini_npz(folder: Path, decoded) -> Path:
    from bench.sources.miniimagenet import RAVI

    folder.mkdir(parents=True, exist_ok=True)
    for split, classes in decoded.items():
        data, wnids, _ = _stack(classes)
        order = sorted(RAVI[split])
        targets = np.concatenate([np.full(len(classes[w]), order.index(w), dtype=np.int64) for w in wnids])
        np.savez(folder / f"few-shot-{split}.npz", features=data, targets=targets)
    return folder


def mini_hdf5(folder: Path, decoded) -> Path:
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    for split, classes in decoded.items():
        with h5py.File(folder / f"{split}_data.hdf5", "w") as f:
            g = f.create_group("datasets")
            for w, arr in classes.items():
                g.create_dataset(w, data=arr)
        (folder / f"{split}_labels.json").write_text(json.dumps(sorted(classes)))
    return folder


# ---------------------------------------------------------------------------------------------
# Meta-Dataset: generated records of the official layout
# ---------------------------------------------------------------------------------------------

def md_jpeg(rng: np.random.Generator, size: int = 20, quality: int = 90) -> bytes:
    """A smooth random RGB JPEG (a blurred gradient plus noise: compresses like a photo)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / max(1, size - 1)
    base = rng.uniform(0, 255, (3, 3))
    img = base[:, 0, None, None] * x + base[:, 1, None, None] * y + base[:, 2, None, None] * (1 - x) * (1 - y) / 2
    img = np.clip(img.transpose(1, 2, 0) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def md_spec(name: str, kind: str, per_split: tuple[int, int, int], per_class: int) -> dict:
    """A dataset_spec.json of the official converter for a small source: plain (DatasetSpecification),
    bilevel (one superclass per non-empty split) or hierarchical (one root node per split over its leaves)."""
    total = sum(per_split)
    keys = ("TRAIN", "VALID", "TEST")
    if kind == "hierarchical":
        names = {str(i): f"n{i:08d}" for i in range(total)}
        graphs, ipc, start = {}, {}, 0
        for key, n in zip(keys, per_split):
            leaves = [f"n{i:08d}" for i in range(start, start + n)]
            graphs[key] = [{"wn_id": f"r{key}", "words": key, "children_ids": leaves}] + \
                [{"wn_id": w, "words": w, "children_ids": []} for w in leaves]
            ipc[key] = {w: per_class for w in leaves}
            start += n
        return {"__class__": "HierarchicalDatasetSpecification", "name": name, "file_pattern": "{}.tfrecords",
                "class_names": names, "split_subgraphs": graphs, "images_per_class": ipc}
    spec = {"name": name, "file_pattern": "{}.tfrecords", "images_per_class": {str(i): per_class for i in range(total)},
            "class_names": {str(i): f"{name}-{i}" for i in range(total)}}
    if kind == "plain":
        return {"__class__": "DatasetSpecification", **spec, "classes_per_split": dict(zip(keys, per_split))}
    sizes = [n for n in per_split if n]
    return {"__class__": "BiLevelDatasetSpecification", **spec,
            "superclass_names": {str(k): f"alphabet{k}" for k in range(len(sizes))},
            "classes_per_superclass": {str(k): n for k, n in enumerate(sizes)},
            "superclasses_per_split": dict(zip(keys, [int(n > 0) for n in per_split]))}


def md_source_records(folder: Path, spec: dict, seed: int = 0, size: int = 20) -> Path:
    """Write `spec` and one <class>.tfrecords per class (tf.train.Example image + label) into `folder`."""
    from bench.sources.tfrecord import encode_example, write_records

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    rng = np.random.default_rng(seed)
    counts = spec["images_per_class"]
    if spec["__class__"] == "HierarchicalDatasetSpecification":
        counts = {str(i): counts[k][w] for k in counts for i, w in spec["class_names"].items() if w in counts[k]}
    for c in range(len(spec["class_names"])):
        write_records(folder / f"{c}.tfrecords",
                      [encode_example({"image": [md_jpeg(rng, size)], "label": [c]}) for _ in range(counts[str(c)])])
    return folder


SMALL_MD = {"ilsvrc_2012": ("hierarchical", (6, 6, 6)), "omniglot": ("bilevel", (5, 5, 5)),
            "aircraft": ("plain", (5, 5, 5)), "cu_birds": ("plain", (5, 5, 5)), "dtd": ("plain", (5, 5, 5)),
            "quickdraw": ("plain", (5, 5, 5)), "fungi": ("plain", (5, 5, 5)), "vgg_flower": ("plain", (5, 5, 5)),
            "traffic_sign": ("plain", (0, 0, 5)), "mscoco": ("plain", (0, 5, 5))}
"""The ten official sources in miniature: spec kind and train/valid/test classes."""


def small_meta_dataset(records: Path, per_class: int = 4, only: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Records of the ten official sources (folder names, spec types and file layout of the official
    converter) in miniature (SMALL_MD, `per_class` images per class), under `records`. Returns
    official name -> (classes per split, images): what `OFFICIAL` must say for `prepare` to accept
    them as those sources (tests patch it)."""
    out = {}
    for k, (name, (kind, per_split)) in enumerate(SMALL_MD.items()):
        if only and name not in only:
            continue
        md_source_records(records / name, md_spec(name, kind, per_split, per_class), seed=k)
        out[name] = (per_split, sum(per_split) * per_class)
    return out

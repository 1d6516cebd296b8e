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

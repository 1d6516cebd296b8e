"""Measure Meta-Dataset prepare and sampling at scale on generated records in the official layout.

    python scripts/md_scale.py --work /tmp/md-scale [--classes 1000] [--per-class 10] [--workers 1 2]

Writes two generated sources under WORK/records (kept out of the repository; delete WORK afterwards):
- photos_like: an ILSVRC-like source: `--classes` classes of `--per-class` colour JPEGs each, sizes
  drawn around ILSVRC's (sides 200-500 px, quality 75-95, 4:2:0), smooth colour fields with edges
  and noise so that they compress like photos (~25-60 KB each);
- quickdraw_like: a QuickDraw-like source (spec name "quickdraw": stored at its native 28 px),
  345 classes of 28x28 greyscale stroke drawings.
Then prepares each (images/s per worker count; photos at 84 and 126 px), measures disk per 10k
images and episodes/s (variable-way Meta-Dataset test episodes, pixels gathered) at 84 and 126 px,
and projects time and disk for the real sources from the official image counts. Prints one JSON
report. Every random draw comes from numpy generators seeded here.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.sources.tfrecord import encode_example, write_records  # noqa: E402

QUICKDRAW_CLASSES = 345


def photo(rng: np.random.Generator) -> bytes:
    """One ILSVRC-like JPEG: a smooth random colour field, a few hard-edged shapes, sensor noise."""
    from PIL import Image, ImageDraw

    h, w = int(rng.integers(200, 500)), int(rng.integers(200, 500))
    field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    arr = np.asarray(field, dtype=np.float32) + rng.normal(0, 6, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def drawing(rng: np.random.Generator) -> bytes:
    """One QuickDraw-like 28x28 greyscale JPEG (RGB with R = G = B, as the converter writes)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (28, 28), 255)
    draw = ImageDraw.Draw(img)
    pts = [tuple(int(v) for v in rng.integers(2, 26, 2)) for _ in range(int(rng.integers(3, 8)))]
    draw.line(pts, fill=0, width=2)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def plain_spec(name: str, n_classes: int, per_class: int) -> dict:
    """A DatasetSpecification with ILSVRC's train/valid/test proportions (712/158/130 of 1000)."""
    test = max(1, round(n_classes * 0.13))
    valid = max(1, round(n_classes * 0.158))
    return {"__class__": "DatasetSpecification", "name": name,
            "classes_per_split": {"TRAIN": n_classes - valid - test, "VALID": valid, "TEST": test},
            "images_per_class": {str(c): per_class for c in range(n_classes)},
            "class_names": {str(c): f"class{c:04d}" for c in range(n_classes)},
            "path": "generated", "file_pattern": "{}.tfrecords"}


def write_source(folder: Path, spec: dict, make: Callable[[np.random.Generator], bytes], seed: int) -> float:
    """Write `spec` and its records (`make(rng)` per image); returns the seconds taken."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    for c in range(len(spec["class_names"])):
        rng = np.random.default_rng([seed, c])
        write_records(folder / f"{c}.tfrecords", [encode_example({"image": [make(rng)], "label": [c]})
                                                  for _ in range(spec["images_per_class"][str(c)])])
    return time.perf_counter() - t0


def episodes_per_s(root: Path, source: str, size: int, seconds: float) -> dict:
    """Variable-way test episodes (the md-omniglot-small protocol) of `source` at `size`, pixels gathered."""
    from bench import benchmarks
    from bench.sources import meta_dataset as md

    src = md.open_source(root, source, size)
    bench = dataclasses.replace(benchmarks.get_benchmark("md-omniglot-small"), source=source, image_size=size)
    sampler = bench.protocol.sampler(bench, {source: src})
    start, n, images = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds:
        ep = sampler.materialize(sampler.describe("test", n))
        images += len(ep.support_y) + len(ep.query_y)
        n += 1
    dt = time.perf_counter() - start
    return {"episodes_per_s": round(n / dt, 2), "images_per_episode": round(images / n, 1),
            "gathered_images_per_s": round(images / dt)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--drawings-per-class", type=int, default=60)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)

    from bench.sources import meta_dataset as md

    records = args.work / "records"
    report: dict = {"generate_seconds": {}}
    sources = {"photos_like": (plain_spec("photos_like", args.classes, args.per_class), photo),
               "quickdraw_like": ({**plain_spec("quickdraw", QUICKDRAW_CLASSES, args.drawings_per_class)}, drawing)}
    for k, (name, (spec, make)) in enumerate(sources.items()):
        if not (records / name / "dataset_spec.json").is_file():
            report["generate_seconds"][name] = round(write_source(records / name, spec, make, seed=k), 1)
    quiet = dict(show_progress=False, say=lambda _: None)
    runs = [("photos_like", 84, w) for w in args.workers] + [("photos_like", 126, max(args.workers)),
                                                             ("quickdraw_like", 84, max(args.workers))]
    report["prepare"] = []
    for name, size, workers in runs:
        root = args.work / f"root-{size}-w{workers}"
        if root.exists():
            shutil.rmtree(root)  # our own scratch folder from an earlier run of this script
        n = int(md.load_spec(records / name).images_per_class.sum())
        record_bytes = sum(f.stat().st_size for f in (records / name).glob("*.tfrecords"))
        t0 = time.perf_counter()
        target = md.prepare(records / name, root, size, opts=md.BuildOptions(workers=workers, **quiet))[name]
        dt = time.perf_counter() - t0
        disk = md.dir_size(target)
        row = {"source": name, "image_size": size, "workers": workers, "images": n,
               "record_mib": round(record_bytes / 2**20, 1), "seconds": round(dt, 1),
               "images_per_s": round(n / dt), "disk_per_10k_mib": round(disk / n * 1e4 / 2**20, 1),
               "stored": str(target.name)}
        if workers == max(args.workers):
            for s in ((84, 126) if name == "quickdraw_like" else (size,)):
                row[f"episodes_{s}px"] = episodes_per_s(root, name, s, args.seconds)
        report["prepare"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

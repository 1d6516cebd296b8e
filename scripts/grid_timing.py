"""Benchmark script (not a test): one grid three ways, wall time of each, and Ray's overhead per cell.

3 methods x 3 seeds on glyphs-5w1s at a small budget: (1) sequential `metabench run` calls in one
process, (2) `metabench grid` on local worker processes, (3) `metabench grid --ray` on a local Ray
cluster. Each variant writes into its own fresh folder (same data root), so all three train every
cell; the rows of the three must be identical (checked). Ray's overhead per cell is
(Ray wall time - local wall time) / cells at the same parallelism. Run it on a quiet machine:

    python scripts/grid_timing.py --root DATA [--steps 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from bench import grid
from bench.paths import resolve_root
from bench.results import find_csvs, read_csv
from bench.runner import RunDirs, run

METHODS = ["maml", "fomaml", "protonet"]
SMALL = dict(meta_batch=2, hidden=16, inner_steps_test=3)


def rows(folder: Path) -> pd.DataFrame:
    """Every result row under `folder`, sorted, without the timing columns."""
    frames = [read_csv(p) for p in find_csvs(folder)]  # (not the evaluation-axis files beside them)
    return (pd.concat(frames).drop(columns=["adapt_seconds", "fit_seconds", "code_rev", "device"])
            .sort_values(["method", "seed", "episode"]).reset_index(drop=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="grid-timing-"))
    root = resolve_root(args.root)
    fields = {"methods": METHODS, "benchmarks": ["glyphs-5w1s"], "seeds": "0-2", "steps": args.steps,
              "chunk": args.steps, "val_episodes": 20, "test_episodes": 100, "root": str(root), "threads": 1,
              "method_set": {m: dict(SMALL) for m in METHODS if m != "protonet"} | {"protonet": {"hidden": 16}}}
    times = {}

    torch.set_num_threads(1)
    spec = grid.spec_from({**fields, "results": str(out / "seq" / "results"), "runs": str(out / "seq" / "runs")})
    start = time.perf_counter()
    for cell in spec.cells:
        run(grid.cell_config(cell, spec), RunDirs(root, spec.results, spec.runs), progress=False)
    times["sequential run calls (1 thread)"] = time.perf_counter() - start

    for name, use_ray in (("local executor", False), ("Ray (local cluster)", True)):
        key = "ray" if use_ray else "local"
        spec = grid.spec_from({**fields, "results": str(out / key / "results"), "runs": str(out / key / "runs")})
        start = time.perf_counter()
        outcomes = grid.run_grid(spec, use_ray=use_ray, quiet=True)
        times[f"{name}, {grid.slots(spec)[0]} cells at a time"] = time.perf_counter() - start
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]

    base = rows(out / "seq" / "results")
    for key in ("local", "ray"):
        pd.testing.assert_frame_equal(base, rows(out / key / "results"))
    cells = len(spec.cells)
    print(f"{cells} cells, {args.steps} steps each, identical rows in all three")
    for name, seconds in times.items():
        print(f"  {name:40s} {seconds:7.1f} s")
    local, ray = list(times.values())[1:]
    print(f"  Ray overhead per cell vs the local executor: {(ray - local) / cells:+.2f} s")


if __name__ == "__main__":
    main()

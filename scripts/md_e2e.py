"""End to end on genuine Meta-Dataset records: prepare, fit fomaml, test 600 variable-way episodes,
write the CSV, build the leaderboard.

    python scripts/md_e2e.py [--records DIR] [--work DIR (default .cache/md-e2e)] [--image-size 84] [--steps 20]

--records defaults to the genuine small Omniglot records of the shared test data
(../shared/data/meta_dataset/omniglot_small, or $METABENCH_SHARED_DATA/meta_dataset/omniglot_small).
The budget is CI-sized (a few outer steps, Conv-4 with 8 filters, one inner step): it checks
that the whole pipeline runs on real records, not what fomaml can reach. It prints the decoded
cache size, the sampling speed (episode descriptions and materialized episodes per second) and
the run's mean test accuracy. `--image-size` other than 84 runs the same benchmark at that size
(a test-only variant, registered under the same name for this process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BENCHMARK = "md-omniglot-small"


def shared_records() -> Path:
    base = Path(os.environ.get("METABENCH_SHARED_DATA", REPO.parent / "shared" / "data"))
    return base / "meta_dataset" / "omniglot_small"


def sampling_speed(es: Any, seconds: float = 3.0) -> dict[str, float]:
    """Episodes per second: descriptions only, and with pixels (test split)."""
    out = {}
    for what, fn in (("describe_per_s", es.describe), ("episodes_per_s", es.episode)):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            fn("test", n)
            n += 1
        out[what] = n / (time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path(".cache") / "md-e2e")
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--val-episodes", type=int, default=20)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from bench import benchmarks, data
    from bench.runner import RunConfig, RunDirs, run
    from bench.results import read_csv
    from bench.sources import meta_dataset as md
    from leaderboard.build import build_site

    records = args.records or shared_records()
    root = args.work / "root"
    t0 = time.perf_counter()
    data.prepare("meta-dataset", root, [records], args.image_size, show_progress=False)
    prepare_s = time.perf_counter() - t0
    cache = md.source_cache(root, records.name, args.image_size)
    bench = dataclasses.replace(benchmarks.get_benchmark(BENCHMARK), image_size=args.image_size)
    es = benchmarks.load(bench, root)
    speed = sampling_speed(es)

    cfg = RunConfig("fomaml", bench, seed=0, steps=args.steps, chunk=max(1, args.steps // 2),
                    val_episodes=args.val_episodes, test_episodes=args.test_episodes,
                    overrides=dict(hidden=8, inner_steps=1, inner_steps_test=1, meta_batch=2, outer_lr=1e-3))
    dirs = RunDirs(root, args.work / "results", args.work / "runs")
    t0 = time.perf_counter()
    csv = run(cfg, dirs, progress=False)
    run_s = time.perf_counter() - t0
    frame = read_csv(csv)
    index = build_site([dirs.results], args.work / "site")
    report = {
        "records": str(records), "image_size": args.image_size, "cache": str(cache),
        "cache_mib": round(md.dir_size(cache) / 2**20, 2), "prepare_seconds": round(prepare_s, 1),
        **{k: round(v, 1) for k, v in speed.items()},
        "csv": str(csv), "test_episodes": len(frame), "ways": [int(frame["way"].min()), int(frame["way"].max())],
        "mean_way": round(float(frame["way"].mean()), 2), "accuracy": round(float(frame["accuracy"].mean()), 4),
        "chance": round(float((1 / frame["way"]).mean()), 4), "run_seconds": round(run_s, 1),
        "leaderboard": str(index),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

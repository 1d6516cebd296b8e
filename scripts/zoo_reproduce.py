"""Check that the current code reproduces the committed zoo results (results/zoo) bit for bit.

For each method of the reference run (scripts/zoo_omniglot_small.py, benchmark omniglot-small-5w1s),
re-run it with the reference's settings (outer steps, chunk and validation episodes from its run
card, overrides from zoo_omniglot_small.PLAN, one torch thread as the cards' device says) but only
the first N test episodes, into a fresh results and runs folder, and compare the columns that must
not change row for row with the first N rows of the committed CSV (as written, i.e. the same
"%.6g" text). Prints a table; exits 1 if any row differs. Resumable: re-run with the same --out.

    PYTHONPATH=. python scripts/zoo_reproduce.py --root DATA [--out DIR] [--test-episodes 50] [--methods maml ...]

DATA must hold the omniglot-small source, e.g.
`python -m bench.data download omniglot-small --root DATA --from images_background_small1.zip --from ..._small2.zip`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_omniglot_small import PLAN  # noqa: E402  (the reference run's overrides, not a copy)

import bench.api  # noqa: E402
from bench.paths import resolve_root  # noqa: E402
from bench.results import run_paths  # noqa: E402
from bench.runner import RunConfig, RunDirs, run  # noqa: E402

EVAL_CHUNK: int = getattr(bench.api, "EVAL_CHUNK", 1)  # older revisions (checked with PYTHONPATH=old tree) adapt one by one
BENCHMARK = "omniglot-small-5w1s"
REFERENCE = Path(__file__).resolve().parent.parent / "results" / "zoo"
KEY = ["episode", "episode_hash", "params_hash", "accuracy", "loss", "way", "n_support", "n_query",
       "fit_episodes"]


def reference_config(method: str, card: dict, n_test: int) -> RunConfig:
    """The reference run of `method` as its run card records it, with n_test test episodes."""
    steps = int(card["fit_steps"])
    chunk = max(1, steps // 4)  # as zoo_omniglot_small.py; checked against the recorded curve
    curve_steps = [p["step"] for p in card["curve"]]
    expected = sorted({0, *range(chunk, steps, chunk), steps})
    if curve_steps != expected:
        raise SystemExit(f"{method}: the reference curve has steps {curve_steps}, not chunks of {chunk}")
    return RunConfig(method, BENCHMARK, int(card["seed"]), steps, chunk=chunk, val_episodes=card["val_episodes"],
                     test_episodes=n_test, overrides=PLAN.get(method, {}), label=method)


def compare(method: str, ref_csv: Path, new_csv: Path, n: int) -> dict[str, object]:
    """One table row: the first n rows of both CSVs compared on KEY, as text (fewer than n rows: a failure)."""
    ref = pd.read_csv(ref_csv, dtype=str, keep_default_na=False)[KEY].head(n).reset_index(drop=True)
    new = pd.read_csv(new_csv, dtype=str, keep_default_na=False)[KEY].head(n).reset_index(drop=True)
    m = min(len(ref), len(new))
    ref, new = ref.head(m), new.head(m)
    same = ref == new
    diff = {c: float((ref[c].astype(float) - new[c].astype(float)).abs().max()) for c in ("accuracy", "loss")}
    return {"method": method, "rows": m, "identical": int(same.all(axis=1).sum()),
            "max_acc_diff": diff["accuracy"], "max_loss_diff": diff["loss"],
            "columns_differing": ",".join(c for c in KEY if not same[c].all()) or "-", "ok": m == n and same.all().all()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="data folder with the omniglot-small source")
    p.add_argument("--out", default=None, help="fresh results/ and runs/ go here (default: a new temp dir)")
    p.add_argument("--reference", default=str(REFERENCE), help="the committed results folder")
    p.add_argument("--test-episodes", type=int, default=50, help="compare the first N test episodes")
    p.add_argument("--methods", nargs="*", default=None, help="default: every method in the reference")
    args = p.parse_args()
    torch.set_num_threads(1)  # the reference cards' device is cpu-x86_64-1t
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="zoo-reproduce-"))
    root = resolve_root(args.root)
    dirs = RunDirs(root, out / "results", out / "runs")
    ref_dir = Path(args.reference)
    methods = args.methods or sorted(d.name for d in (ref_dir / BENCHMARK).iterdir() if d.is_dir())
    print(f"out: {out}", flush=True)
    rows, start = [], time.perf_counter()
    for method in methods:
        ref_csv, ref_card = run_paths(ref_dir, BENCHMARK, method, 0)
        card = json.loads(ref_card.read_text())
        n = min(args.test_episodes, int(card["test_episodes"]))
        # whole evaluation chunks, so every compared episode is adapted in the same batch as in the reference
        n_run = min(-(-n // EVAL_CHUNK) * EVAL_CHUNK, int(card["test_episodes"]))
        new_csv, new_card = run_paths(dirs.results, BENCHMARK, method, 0)
        t = time.perf_counter()
        if not (new_card.exists() and json.loads(new_card.read_text())["test_episodes"] == n_run):
            run(reference_config(method, card, n_run), dirs, progress=False)
        rows.append(compare(method, ref_csv, new_csv, n))
        print(f"{method}: {rows[-1]['identical']}/{n} rows identical ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"\n| {' | '.join(k for k in rows[0] if k != 'ok')} |\n|{'---|' * (len(rows[0]) - 1)}")
    for r in rows:
        print("| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in r.items() if k != "ok") + " |")
    print(f"\n{time.perf_counter() - start:.0f} s; results in {dirs.results}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

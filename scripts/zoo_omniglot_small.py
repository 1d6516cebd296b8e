"""Benchmark script (not a test): every registered method on the real Omniglot subset, 5-way 1-shot.

All methods see the identical 600 test episodes of `omniglot-small-5w1s` (train: small1's
alphabets; test: Japanese (katakana), Sanskrit, Tagalog), each with a short, equal budget of
outer steps (paper hyperparameters except where a short budget needs otherwise: the overrides
are listed in PLAN). Writes a results folder and a leaderboard page and prints a table of test
accuracy with 95% CI and fit time. Resumable: re-run with the same arguments.

    python scripts/zoo_omniglot_small.py --results zoo-results --site zoo-site --steps 200
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from baselines import registry
from bench.paths import resolve_root
from bench.results import read_results
from bench.runner import RunConfig, RunDirs, run
from bench.stats import summarize
from leaderboard.build import build_site

_SMALL = dict(meta_batch=4, hidden=32, inner_steps_test=5)
# method -> overrides of the paper defaults for a short budget (narrower Conv-4, smaller meta-batch)
PLAN = {
    "maml": _SMALL,
    "fomaml": _SMALL,
    "anil": _SMALL,
    "boil": _SMALL,
    "metasgd": dict(meta_batch=4, hidden=32),
    "cavia": dict(meta_batch=4, hidden=32, outer_lr=0.003),
    "reptile": dict(hidden=32, inner_lr=0.001, inner_steps_test=20),
    "finetune": dict(hidden=32),
    "mamlpp": dict(meta_batch=4, hidden=32, epoch_steps=2),  # the paper's 100-epoch schedule over 200 steps
    # iMAML: 5 inner steps at MAML's lr 0.4 instead of the paper's 16 at 0.1 (cost ~ inner steps), 10 test steps
    "imaml": dict(meta_batch=4, hidden=32, inner_steps=5, inner_lr=0.4, inner_steps_test=10),
    "mixture": _SMALL,
    "protonet": dict(hidden=32, episodes_per_task=3),  # 15-way training tasks (paper: 60-way, 4x the episodes)
    "protomaml": _SMALL,
    "baseline++": dict(hidden=32),
    # scale-shift: 100 pre-training + 100 meta steps; inner lr 0.5 (the paper's 0.01 barely moves a 32-d head)
    "scale-shift": dict(hidden=32, pretrain_steps=100, inner_lr=0.5, head_lr=0.01),
    "leo": dict(hidden=32, pretrain_steps=100, meta_batch=4),  # 100 pre-training + 100 LEO steps of 4 tasks
    "mt-net": _SMALL,
    # UNICORN-MAML: equal train/test inner steps (the paper's), 3 at lr 0.2 instead of the preset's 10 at 0.1
    "unicorn-maml": dict(meta_batch=4, hidden=32, inner_lr=0.2, inner_steps=3, inner_steps_test=3),
    # MeTAL: its own meta-batch 2, 2 inner steps (loss networks) at lr 0.15 and outer lr 3e-3 (tests/test_learning.py)
    "metal": dict(meta_batch=2, hidden=32, inner_lr=0.15, inner_steps=2, inner_steps_test=2, outer_lr=3e-3),
    "chance": {},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="zoo-results")
    p.add_argument("--site", default="zoo-site")
    p.add_argument("--root", default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    args = p.parse_args()
    root = resolve_root(args.root)
    dirs = RunDirs(root, Path(args.results), root / "runs")
    for method in args.methods or list(registry.METHODS):
        start = time.perf_counter()
        steps = 0 if method == "chance" else args.steps
        cfg = RunConfig(method, "omniglot-small-5w1s", 0, steps, chunk=max(1, steps // 4), val_episodes=100,
                        test_episodes=600, overrides=PLAN.get(method, {}), label=method)
        run(cfg, dirs)
        print(f"{method}: {time.perf_counter() - start:.0f} s", flush=True)
    table = summarize(read_results(dirs.results))
    index = build_site([dirs.results], Path(args.site))
    print(f"\n| method | accuracy (95% CI) | fit seconds | adapt seconds / episode |\n|---|---|---|---|")
    for _, r in table.sort_values("mean", ascending=False).iterrows():
        print(f"| {r['method']} | {100 * r['mean']:.1f} ± {100 * r['ci95']:.1f} | {r['fit_seconds']:.0f} | "
              f"{r['adapt_seconds']:.3f} |")
    print(f"\nleaderboard: {index}")


if __name__ == "__main__":
    main()

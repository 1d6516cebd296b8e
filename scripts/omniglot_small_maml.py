"""Benchmark script (not a test): MAML with the paper's hyperparameters on the real Omniglot subset.

Runs `maml` on `omniglot-small-5w1s` (train: small1's alphabets; test: Japanese (katakana),
Sanskrit, Tagalog) with the registry's paper defaults (Finn et al. 2017, Omniglot 5-way:
inner lr 0.4, 1 inner step at training, 10 at test, meta-batch 32, Adam 1e-3, Conv-4 64),
checkpointing every --chunk outer steps and stopping once --patience checkpoints in a row bring
no better validation accuracy (the plateau), or at the paper's 40,000 steps. Then it tests
600 episodes and prints mean accuracy with its 95% CI and the wall time. Resumable: run it
again with the same arguments to continue a killed run.

    python scripts/omniglot_small_maml.py --results results/ --root ~/.cache/metabench
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.paths import resolve_root
from bench.results import read_card, read_csv
from bench.runner import RunConfig, RunDirs, run
from bench.stats import ci95


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="maml")
    p.add_argument("--results", default="results")
    p.add_argument("--root", default=None)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--val-episodes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = resolve_root(args.root)
    start = time.perf_counter()
    cfg = RunConfig(args.method, "omniglot-small-5w1s", args.seed, chunk=args.chunk, val_episodes=args.val_episodes,
                    patience=args.patience)
    path = run(cfg, RunDirs(root, Path(args.results), root / "runs"))
    frame, card = read_csv(path), read_card(path)
    acc = frame["accuracy"].to_numpy()
    print(f"{args.method} omniglot-small-5w1s: {100 * acc.mean():.2f}% ± {100 * ci95(acc):.2f}% "
          f"over {len(acc)} test episodes")
    print(f"selected step {card['selected_step']} of {card['fit_steps']} "
          f"(best validation {max(p['val_accuracy'] for p in card['curve']):.4f}); "
          f"fit {card['fit_seconds']:.0f} s; wall time this invocation {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

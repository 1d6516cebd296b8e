"""Benchmark script (not a test): the report of the reference board (results/reference) in Markdown.

Per benchmark and method: test accuracy with its 95% CI, the seeds' spread (mean ± sd of the per-seed
means), the steps axis (accuracy at 0 test-time steps, at the method's test steps and at twice them),
the permutation axis (mean, within-episode spread, gap), and compute (meta-training seconds and
FLOPs, evaluation seconds). Then how many of the grid's cells are done, and their summed seconds.

    python scripts/reference_report.py [--results results/reference]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bench import axes, grid
from bench.results import find_csvs, read_axis, read_card, read_results
from bench.stats import summarize


def axis_cells(runs: list[tuple[Path, dict]]) -> tuple[str, str]:
    """(steps-axis text, perms-axis text) of one method's runs on one benchmark."""
    steps = [(c["method"], c["seed"], t) for p, c in runs if (t := read_axis(p, "steps")) is not None]
    perms = [(c["method"], c["seed"], t) for p, c in runs if (t := read_axis(p, "perms")) is not None]
    step_text = perm_text = "—"
    if steps:
        s = axes.step_summary(steps).set_index("steps")["accuracy"]
        test = int(runs[0][1].get("inner_steps_test") or 0)
        points = sorted({0, test, int(s.index.max())} & set(s.index))
        step_text = " / ".join(f"{100 * s[k]:.1f}" for k in points) + f" (steps {', '.join(map(str, points))})"
    if perms:
        r = axes.permutation_summary(perms).iloc[0]
        perm_text = f"{100 * r['mean']:.1f} / {100 * r['spread']:.1f} / {100 * r['gap']:.1f}"
    return step_text, perm_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("results/reference"))
    args = p.parse_args()
    cards = {}
    for path in find_csvs(args.results):
        card = read_card(path)
        cards.setdefault((card["benchmark"], card["method"]), []).append((path, card))
    summary = summarize(read_results(args.results)).set_index(["benchmark", "method"])
    total = 0.0
    for bench in sorted({b for b, _ in cards}):
        print(f"\n### {bench}\n")
        print("| method | accuracy % (95% CI) | seeds: mean ± sd | steps axis % | perms: mean / spread / gap (pp) | "
              "fit s | eval s (test + perms) | GFLOP / outer step | training TFLOP |")
        print("|---|---|---|---|---|---|---|---|---|")
        rows = sorted((k for k in cards if k[0] == bench), key=lambda k: -summary.loc[k, "mean"])
        for key in rows:
            runs, s = cards[key], summary.loc[key]
            step_text, perm_text = axis_cells(runs)
            fit = sum(c["fit_seconds"] for _, c in runs) / len(runs)
            ev = sum(sum((c.get("axis_seconds") or {}).values()) for _, c in runs) / len(runs)
            total += sum(c["fit_seconds"] + sum((c.get("axis_seconds") or {}).values()) for _, c in runs)
            flops = runs[0][1].get("flops") or {}
            train = [axes.training_flops(c) for _, c in runs]
            sd = f" ± {100 * s['seed_sd']:.1f}" if pd.notna(s["seed_sd"]) else ""
            print(f"| {key[1]} | {100 * s['mean']:.2f} ± {100 * s['ci95']:.2f} | {100 * s['seed_mean']:.1f}{sd} "
                  f"({int(s['n_seeds'])}) | {step_text} | {perm_text} | {fit:.0f} | {ev:.0f} | "
                  f"{flops.get('outer_step', 0) / 1e9:.2f} | "
                  f"{(sum(t or 0 for t in train) / len(train)) / 1e12:.1f} |")
    spec = grid.spec_from(grid.load_grid_file(args.results / "GRID.toml"))
    done = sum(len(v) for v in cards.values())
    print(f"\n{done} of {len(spec.cells)} cells done; their fit + test + axis seconds: {total / 3600:.2f} h "
          f"(validation and start-up not included)")


if __name__ == "__main__":
    main()

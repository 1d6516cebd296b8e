"""What a researcher reads off results: `compare`, `table`, and the lines `run` prints.

- `metabench compare RESULTS A B [--benchmark X]`: the paired difference A - B on identical test
  episodes, its paired bootstrap 95% CI, the Wilcoxon signed-rank p-value and n, per benchmark
  (bench.stats.compare).
- `metabench table RESULTS [--format md|latex|csv] [-o FILE]`: the main table, methods x
  benchmarks, mean ± 95% CI (rank-1 cells in bold) and the average rank.
- `run_summary(csv)`: the end of `metabench run`: accuracy ± CI, seeds, fit time, where the
  files are. `preset_note(cfg, dirs)`: before a run without --steps, how many outer steps the
  preset means and roughly how long they take here.

RESULTS is a results folder or a submission bundle (its results/ are read).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from bench import stats
from bench.errors import MetabenchError


def read_folder(path: Path) -> pd.DataFrame:
    """Every result of a results folder or a bundle, validated and consistent (bench.results.read_results)."""
    from bench.bundle import RESULTS_DIR, is_bundle
    from bench.results import read_results

    path = Path(path)
    return read_results(path / RESULTS_DIR if is_bundle(path) else path)


def fmt_seconds(seconds: float) -> str:
    """A duration in words: '42 s', '12.5 min', '3.1 h'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------
# the lines of `metabench run`


def run_summary(csv_path: Path, runs_dir: Path | None = None) -> str:
    """The end-of-run lines: accuracy ± CI of this run, the seeds of this method and benchmark in
    the results folder (and their mean), fit time, where the card and checkpoint (under `runs_dir`)
    are, and last "results: <csv path>" (what `metabench run` always printed last)."""
    from bench.results import find_csvs, outputs_csvs, read_card, read_csv

    csv_path = Path(csv_path)
    if csv_path.suffix == ".json":  # a suite's card: one line per member, then the card and checkpoint
        card = json.loads(csv_path.read_text(encoding="utf-8"))
        table = stats.summarize(pd.concat([read_csv(c) for c in outputs_csvs(csv_path)], ignore_index=True))
        lines = [f"{card['method']} trained once on {card['benchmark']}, seed {card['seed']} (step "
                 f"{card.get('selected_step', '?')} chosen by validation accuracy); test episodes per source:"]
        lines += [f"  {row['benchmark']:22s} {100 * row['mean']:6.2f}% ± {100 * row['ci95']:.2f}% "
                  f"({int(row['n_episodes'])} episodes)" for _, row in table.iterrows()]
        lines.append(f"  fit: {fmt_seconds(float(card.get('fit_seconds', 0.0)))} for {card.get('fit_steps', '?')} "
                     "outer steps")
        if card.get("checkpoint"):
            lines.append(f"  checkpoint: {Path(runs_dir) / card['checkpoint'] if runs_dir else card['checkpoint']}")
        lines.append(f"results: {csv_path}")
        return "\n".join(lines)
    frame = read_csv(csv_path)
    card = read_card(csv_path)
    mine = stats.summarize(frame).iloc[0]
    bench, method, seed = str(mine["benchmark"]), str(mine["method"]), int(frame["seed"].iloc[0])
    lines = [f"{method} on {bench}, seed {seed}: {100 * mine['mean']:.2f}% ± {100 * mine['ci95']:.2f}% "
             f"(95% CI over {int(mine['n_episodes'])} test episodes)"]
    seeds = [read_csv(p) for p in find_csvs(csv_path.parent)]
    if len(seeds) > 1:
        both = stats.summarize(pd.concat(seeds, ignore_index=True)).iloc[0]
        lines.append(f"  {len(seeds)} seeds of {method} here: {100 * both['mean']:.2f}% ± {100 * both['ci95']:.2f}% "
                     f"(seeds {sorted(int(f['seed'].iloc[0]) for f in seeds)})")
    else:
        lines.append("  1 seed so far (a ranked leaderboard row needs 3: --seed 1, --seed 2)")
    fit = float(card.get("fit_seconds", frame["fit_seconds"].iloc[0]))
    lines.append(f"  fit: {fmt_seconds(fit)} for {card.get('fit_steps', '?')} outer steps; checkpoint of step "
                 f"{card.get('selected_step', '?')} chosen by validation accuracy")
    lines.append(f"  run card: {csv_path.with_suffix('.json')}")
    if card.get("checkpoint"):
        where = Path(runs_dir) / card["checkpoint"] if runs_dir is not None else f"{card['checkpoint']} in the runs folder"
        lines.append(f"  checkpoint: {where}")
    lines.append(f"results: {csv_path}")  # last, as before: `metabench grid` reads the CSV path from it
    return "\n".join(lines)


def preset_note(cfg: Any, dirs: Any, restart: bool = False) -> str | None:
    """Before a run without --steps: how many outer steps the method's preset means, from which paper,
    and roughly how long fitting them takes here (two outer steps timed on a throwaway copy of the
    learner; the run itself is unchanged). None when --steps is given or the run is finished (and
    not `restart`ed)."""
    from baselines import registry
    from bench import runner

    if cfg.steps is not None:
        return None
    plan = runner.plan(cfg, dirs)
    if (not restart and runner.finished(plan)) or runner.existing_identity(plan) not in (None, plan.params_hash):
        return None  # nothing to fit, or a clash the run reports at once
    preset = registry.preset(cfg.method, registry.preset_key(cfg.method, plan.bench.preset, cfg.overrides))
    paper = f" ({preset.paper})" if preset is not None and preset.paper else ""
    device = runner.resolve_device(cfg.device)
    learner = runner.build_learner(cfg.method, plan.bench, cfg.seed, cfg.overrides, plan.steps)
    es = plan.bench.with_episodes(None, dirs.root)
    learner.device = device
    learner.setup(es.task_info())
    stream = runner.on_device(es.stream("train"), device)
    learner.fit(stream, 1)  # the first step pays for warm-up
    start = time.perf_counter()
    learner.fit(stream, 1)
    per_step = time.perf_counter() - start
    return (f"no --steps: the {cfg.method} preset for {plan.bench.name} means {plan.steps} outer steps{paper}; at "
            f"{per_step:.3g} s per step here, fitting takes about {fmt_seconds(per_step * plan.steps)} "
            "(plus validation and testing)")


# ---------------------------------------------------------------------------------------------
# compare


def compare_table(frame: pd.DataFrame, a: str, b: str, benchmark: str | None = None, n_boot: int = 2000,
                  seed: int = 0) -> pd.DataFrame:
    """`stats.compare` with the seeds of each method per benchmark (columns PAIR_COLUMNS + seeds_a, seeds_b)."""
    out = stats.compare(frame, a, b, benchmark, n_boot=n_boot, seed=seed)
    seeds = frame.groupby(["benchmark", "method"])["seed"].nunique()
    out["seeds_a"] = [int(seeds[(bm, a)]) for bm in out["benchmark"]]
    out["seeds_b"] = [int(seeds[(bm, b)]) for bm in out["benchmark"]]
    return out


def format_compare(table: pd.DataFrame) -> str:
    """One line per benchmark: A - B in points, the CI, p and n."""
    lines = []
    for _, r in table.iterrows():
        lines.append(f"{r['benchmark']}: {r['a']} - {r['b']} = {100 * r['diff']:+.2f} points, paired bootstrap 95% CI "
                     f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}], Wilcoxon p = {r['p_value']:.3g}, "
                     f"n = {int(r['n'])} paired episodes (seeds: {r['a']} {int(r['seeds_a'])}, {r['b']} {int(r['seeds_b'])})")
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    """Paired comparison of two methods on identical test episodes."""
    table = compare_table(read_folder(Path(args.results)), args.a, args.b, args.benchmark, args.n_boot, args.seed)
    print(format_compare(table))
    return 0


# ---------------------------------------------------------------------------------------------
# table


FORMATS = ("md", "latex", "csv")


def main_table(frame: pd.DataFrame, alpha: float = 0.05) -> tuple[list[str], list[dict]]:
    """(benchmarks, rows) of the main table: per method and benchmark mean, ci95, rank, seeds; the
    average rank. Rows ordered by average rank."""
    summary = stats.summarize(frame).set_index(["benchmark", "method"])
    ranks = stats.ranks(frame, alpha=alpha).set_index(["benchmark", "method"])
    avg = stats.average_rank(ranks.reset_index())
    benchmarks = sorted(summary.index.get_level_values(0).unique())
    rows = []
    for _, a in avg.iterrows():
        m = a["method"]
        cells = {}
        for b in benchmarks:
            if (b, m) in summary.index:
                s = summary.loc[(b, m)]
                cells[b] = {"mean": float(s["mean"]), "ci95": float(s["ci95"]), "rank": int(ranks.loc[(b, m), "rank"]),
                            "seeds": int(s["n_seeds"])}
        rows.append({"method": m, "cells": cells, "average_rank": float(a["average_rank"]),
                     "n_benchmarks": int(a["n_benchmarks"])})
    return benchmarks, rows


def _pm(cell: dict, pm: str) -> str:
    ci = f"{pm}{100 * cell['ci95']:.2f}" if math.isfinite(cell["ci95"]) else ""
    return f"{100 * cell['mean']:.2f}{ci}"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def format_table(benchmarks: list[str], rows: list[dict], fmt: str) -> str:
    """The main table as Markdown, LaTeX (booktabs) or CSV (numbers in percent)."""
    if fmt == "csv":
        out = []
        for r in rows:
            line: dict[str, Any] = {"method": r["method"]}
            for b in benchmarks:
                c = r["cells"].get(b)
                line[f"{b} mean"] = round(100 * c["mean"], 4) if c else None
                line[f"{b} ci95"] = round(100 * c["ci95"], 4) if c and math.isfinite(c["ci95"]) else None
                line[f"{b} rank"] = c["rank"] if c else None
                line[f"{b} seeds"] = c["seeds"] if c else None
            line["average rank"] = round(r["average_rank"], 4)
            out.append(line)
        buf = io.StringIO()
        pd.DataFrame(out).to_csv(buf, index=False)
        return buf.getvalue().rstrip("\n")
    if fmt == "md":
        lines = ["| Method | " + " | ".join(benchmarks) + " | Avg. rank |",
                 "|---|" + "---:|" * len(benchmarks) + "---:|"]
        for r in rows:
            cells = []
            for b in benchmarks:
                c = r["cells"].get(b)
                text = _pm(c, " ± ") if c else "—"
                cells.append(f"**{text}**" if c and c["rank"] == 1 else text)
            name = r["method"].replace("|", "\\|")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['average_rank']:.2f} |")
        lines.append("")
        lines.append("Accuracy (%) ± 95% CI over test episodes; bold: rank 1 (not significantly different from the "
                     "best, paired Wilcoxon).")
        return "\n".join(lines)
    if fmt == "latex":
        lines = [r"\begin{tabular}{l" + "r" * (len(benchmarks) + 1) + "}", r"\toprule",
                 "Method & " + " & ".join(_latex_escape(b) for b in benchmarks) + r" & Avg.\ rank \\", r"\midrule"]
        for r in rows:
            cells = []
            for b in benchmarks:
                c = r["cells"].get(b)
                text = "$" + _pm(c, r" \pm ") + "$" if c else "---"
                cells.append(rf"\textbf{{{text}}}" if c and c["rank"] == 1 else text)
            lines.append(f"{_latex_escape(r['method'])} & " + " & ".join(cells) + f" & {r['average_rank']:.2f} \\\\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines)
    raise MetabenchError(f"unknown table format {fmt!r}: use one of {', '.join(FORMATS)}")


def split_budgets(frame: pd.DataFrame, budgets: Mapping[tuple[str, str], int | None]
                  ) -> tuple[pd.DataFrame, list[dict]]:
    """(the rows at each benchmark's board budget, the other rows' summaries) of a results table.

    budgets: (benchmark, method) -> outer-step budget (bench.results.read_budgets); the board's budget
    of a benchmark is the one most methods share (bench.results.board_budgets). The others (a long run,
    say) are listed apart: method, benchmark, budget, board budget, mean, ci95, seeds."""
    from bench.results import board_budgets, other_budget

    board = board_budgets(budgets)
    keys = list(zip(frame["benchmark"].astype(str), frame["method"].astype(str)))
    other = pd.Series([other_budget(budgets.get(k), board.get(k[0])) for k in keys], index=frame.index, dtype=bool)
    rows = [{"method": str(r["method"]), "benchmark": str(r["benchmark"]),
             "budget": budgets.get((str(r["benchmark"]), str(r["method"]))), "board": board.get(str(r["benchmark"])),
             "mean": float(r["mean"]), "ci95": float(r["ci95"]), "seeds": int(r["n_seeds"])}
            for _, r in stats.summarize(frame[other]).iterrows()] if other.any() else []
    return frame[~other], rows


def format_other_budgets(rows: list[dict], fmt: str) -> str:
    """The rows of other budgets (`split_budgets`) as a Markdown or LaTeX table ("" when none, or for CSV)."""
    if not rows or fmt == "csv":
        return ""
    if fmt == "md":
        lines = ["Other budgets (not ranked against the table above):", "",
                 "| Method | Benchmark | Outer steps | Accuracy | Seeds |", "|---|---|---:|---:|---:|"]
        for r in rows:
            name = r["method"].replace("|", "\\|")
            lines.append(f"| {name} | {r['benchmark']} | {r['budget']} (table: {r['board']}) | {_pm(r, ' ± ')} | "
                         f"{r['seeds']} |")
        return "\n".join(lines)
    pm = r" \pm "
    lines = [r"\begin{tabular}{llrrr}", r"\toprule", r"Method & Benchmark & Outer steps & Accuracy & Seeds \\",
             r"\midrule"]
    for r in rows:
        lines.append(f"{_latex_escape(r['method'])} & {_latex_escape(r['benchmark'])} & {r['budget']} & "
                     f"${_pm(r, pm)}$ & {r['seeds']} " + r"\\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])


def cmd_table(args: argparse.Namespace) -> int:
    """Print (or write) the main table of a results folder: the rows at each benchmark's board budget,
    then the rows of other budgets apart."""
    from bench.bundle import RESULTS_DIR, is_bundle
    from bench.results import read_budgets

    path = Path(args.results)
    frame, others = split_budgets(read_folder(path), read_budgets(path / RESULTS_DIR if is_bundle(path) else path))
    benchmarks, rows = main_table(frame, alpha=args.alpha)
    extra = format_other_budgets(others, args.format)
    text = format_table(benchmarks, rows, args.format) + ("\n\n" + extra if extra else "") + "\n"
    if args.output:
        from bench.paths import atomic_write_text

        atomic_write_text(Path(args.output), text)
        print(f"table: {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the `compare` and `table` commands."""
    s = sub.add_parser("compare", help="paired difference of two methods on identical test episodes")
    s.add_argument("results", help="a results folder or a bundle")
    s.add_argument("a", help="method A (as in the method column)")
    s.add_argument("b", help="method B")
    s.add_argument("--benchmark", default=None, help="only this benchmark (default: every benchmark both have)")
    s.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the CI")
    s.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("table", help="the main table (methods x benchmarks) as Markdown, LaTeX or CSV")
    s.add_argument("results", help="a results folder or a bundle")
    s.add_argument("--format", choices=FORMATS, default="md", help="output format")
    s.add_argument("--alpha", type=float, default=0.05, help="significance level of the tie-aware ranks")
    s.add_argument("-o", "--output", default=None, help="write the table to this file (default: print it)")
    s.set_defaults(func=cmd_table)


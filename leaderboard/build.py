"""Build the static leaderboard site from result folders and submission bundles.

`build_site(results_dirs, out, reference_csv=None, verified_dir=None)` writes into `out`:

- `index.html` (or the name given): the main table (rows = methods, columns = benchmarks, cell =
  mean ± 95% CI in percent with the seeds and the fit time beside it, rank-1 cells in bold, an
  average-rank column), sortable by clicking a header (inline vanilla JavaScript), a protocol
  card (opening over the table, not pushing it aside) and a verified / self-reported badge per
  row; then the unranked section; the accuracy figure; the published reference numbers apart;
- `<benchmark>.html` per benchmark: its ranked and unranked tables with seed spread and timings,
  plots (accuracy, paired difference to the best method, training curves, compute) and every
  paired comparison; and, for runs that have them, the evaluation axes (bench.axes, `axes_section`):
  accuracy against test-time inner steps, the label-permutation table, accuracy against FLOPs and the
  equal-budget table (runs without axis files are simply not in them);
- `figures/*.svg` and `figures/*.png`: every figure of the pages as files.

What the page claims, it checks:

- Ranked: a (benchmark, method) row is ranked only with at least MIN_RANKED_SEEDS seeds, every
  test episode of the benchmark (its registered count; for an unregistered benchmark the most
  any method has) and, for a bundle, a method that passes the conformance suite. Other rows go
  in the "unranked" sections, with their reason, without rank or bold.
- Published: every bundle given is re-validated first (bench.validation); one that does not
  validate stops the build with its first problem.
- Verified: a row is verified only when every run comes from a bundle whose manifest hash has a
  successful record in `verified_dir` (written by `metabench verify --record-to DIR`); what a run
  card says about verification is ignored.

Pages are self-contained (inline CSS/JS, figures as base64 SVG data URIs; no network). Every
string from result files, run cards and the reference file goes through jinja2 autoescaping.
Output is deterministic: no timestamps, sorted inputs, fixed float formats, deterministic plots
and a fixed bootstrap seed, so two builds from the same inputs are byte-identical.

Browser-test hooks: the main table is `table#leaderboard`, its unranked rows `table#unranked`,
benchmark tables `table#benchmark-table` and `table#benchmark-unranked`, pair tables
`table#pairs`, reference tables `table#reference`; every sortable table has class
`sortable`, its sortable headers carry `data-key` (`method`, `bench:<name>`, `avg-rank`, ...) and
`data-type` (`number` or `text`); body rows carry `data-method` (and `data-a`/`data-b` for pairs);
cells carry the raw sort key in `data-value`. Clicking a header sorts (first click in the
header's `data-default-order`, then toggles) and sets `aria-sort` on that header.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.resources
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import numpy as np
import pandas as pd

from bench import axes, plots, stats
from bench.bundle import is_bundle
from bench.errors import MetabenchError, ResultsError
from bench.paths import atomic_write_text
from bench.results import (board_budgets, check_consistent, find_csvs, fingerprint_conflicts, other_budget,
                           read_axis, read_card, read_csv, row_budgets)
from bench.validation import MIN_RANKED_SEEDS, Validation

TEMPLATE_PACKAGE = "leaderboard"
TEMPLATE_DIR = "templates"
REFERENCE_COLUMNS = ["method", "benchmark", "accuracy", "ci95", "citation"]
MISSING = "?"
NOT_APPLICABLE = "n/a"

# (label, getter) of the protocol card, in display order; getters return the raw value or
# _ABSENT when the card lacks the field.
_ABSENT = object()


def _get(card: Mapping[str, Any], *keys: str) -> Any:
    value: Any = card
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return _ABSENT
        value = value[key]
    return value


CARD_FIELDS: list[tuple[str, tuple[str, ...]]] = [
    ("batch norm", ("tags", "bn_mode")),
    ("order", ("tags", "order")),
    ("inner steps (train)", ("inner_steps_train",)),
    ("inner steps (test)", ("inner_steps_test",)),
    ("backbone", ("backbone",)),
    ("variable way", ("tags", "variable_way")),
    ("deterministic", ("tags", "deterministic")),
    ("benchmark version", ("benchmark_version",)),
    ("meta-training steps", ("fit_steps",)),
    ("meta-training episodes", ("fit_episodes",)),
    ("selected step", ("selected_step",)),
    ("device", ("device",)),
    ("torch", ("torch_version",)),
    ("code revision", ("code_rev",)),
    ("params hash", ("params_hash",)),
    ("hyperparameters", ("params",)),
]


def render_value(value: Any) -> str:
    """A card value as display text: '?' when absent, 'n/a' for null, stable float formats."""
    if value is _ABSENT:
        return MISSING
    if value is None:
        return NOT_APPLICABLE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        if not value:
            return "(none)"
        return ", ".join(f"{k}={render_value(value[k])}" for k in sorted(value, key=str))
    if isinstance(value, (list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


# ---------------------------------------------------------------------------------------------
# loading


@dataclass
class Run:
    """One (benchmark, method, seed) run: where it came from and its run card ({} if absent);
    bundle: the submission bundle it came from (None for a results folder)."""

    benchmark: str
    method: str
    seed: int
    csv: Path
    card: dict
    code_rev: str
    bundle: Path | None = None


@dataclass
class Loaded:
    """Everything read from the result folders."""

    frame: pd.DataFrame
    runs: list[Run] = field(default_factory=list)

    def runs_of(self, benchmark: str | None = None, method: str | None = None) -> list[Run]:
        """Runs filtered by benchmark and/or method, in (benchmark, method, seed) order."""
        return [r for r in self.runs if (benchmark is None or r.benchmark == benchmark)
                and (method is None or r.method == method)]


def load_results(results_dirs: Sequence[Path]) -> Loaded:
    """Read and validate every result CSV (and run card) under the given folders.

    A folder may also be a submission bundle (bench.bundle; it holds metadata.json or
    MANIFEST.json): its `results/` subfolder is read (validate it first: `check_bundles`).

    Raises ResultsError when a folder has no results, when one (benchmark, method, seed) appears
    twice, or when runs of one benchmark disagree on its version or episode hashes.
    """
    frames: list[pd.DataFrame] = []
    names: list[str] = []
    runs: list[Run] = []
    seen: dict[tuple[str, str, int], Path] = {}
    for results_dir in results_dirs:
        results_dir = bundle = Path(results_dir)
        if is_bundle(bundle):
            results_dir = bundle / "results"  # a submission bundle (bench.bundle): its CSVs live here
        else:
            bundle = None
        paths = find_csvs(results_dir)
        if not paths:
            raise ResultsError(f"{results_dir}: no result CSVs found")
        for path in paths:
            frame = read_csv(path)
            card = read_card(path)
            key = (str(frame["benchmark"].iloc[0]), str(frame["method"].iloc[0]), int(frame["seed"].iloc[0]))
            if key in seen:
                raise ResultsError(f"{path}: run {key[0]}/{key[1]}/seed{key[2]} also in {seen[key]}")
            seen[key] = path
            frames.append(frame)
            names.append(str(path))
            runs.append(Run(benchmark=key[0], method=key[1], seed=key[2], csv=path, card=card,
                            code_rev=str(frame["code_rev"].iloc[0]), bundle=bundle))
    if not frames:
        raise ResultsError("no result folders given")
    frame = check_consistent(frames, names)
    conflicts = fingerprint_conflicts((str(r.csv), r.card) for r in runs)
    if conflicts:
        raise ResultsError(conflicts[0])
    runs.sort(key=lambda r: (r.benchmark, r.method, r.seed))
    return Loaded(frame=frame, runs=runs)


PUBLISHED_COLUMNS = ["method", "dataset", "ways", "shots", "accuracy", "ci95", "source"]
"""The columns of a published-results table by dataset (method, dataset, ways, shots, accuracy, ci95,
backbone, transductive, source), which `read_reference` also reads (`published_as_reference`)."""
MD_REGIMES = {"IN-only": "md-", "all": "md-all-"}


def published_as_reference(table: pd.DataFrame) -> pd.DataFrame:
    """Published rows by dataset as reference rows by benchmark: "MD/<source> [IN-only]" and "[all]" ->
    md-<source> / md-all-<source> (Meta-Dataset display names, e.g. "MD/VGG Flower [all]" ->
    md-all-vgg-flower); Omniglot and miniImageNet W-way K-shot -> omniglot-WwKs / miniimagenet-WwKs;
    other rows are left out. Citation: the source column, with the backbone when given. An accuracy or
    ci95 that is not a plain number (e.g. "0.7 (over 3 seeds)") is kept as its leading number (the
    note stays in the shared file)."""
    from bench.sources.meta_dataset import OFFICIAL

    md_keys = {o.display: o.key for o in OFFICIAL.values()}
    rows = []
    for _, r in table.iterrows():
        dataset, bench = str(r["dataset"]), None
        m = re.fullmatch(r"MD/(.+) \[(IN-only|all)\]", dataset)
        if m and m.group(1) in md_keys:
            bench = MD_REGIMES[m.group(2)] + md_keys[m.group(1)]
        elif dataset in ("Omniglot", "miniImageNet") and str(r["ways"]).isdigit() and str(r["shots"]).isdigit():
            bench = f"{dataset.lower()}-{r['ways']}w{r['shots']}s"
        if bench is None:
            continue
        backbone = f" ({r['backbone']})" if "backbone" in table.columns and pd.notna(r.get("backbone")) else ""
        rows.append({"method": str(r["method"]), "benchmark": bench, "accuracy": _leading_number(r["accuracy"]),
                     "ci95": _leading_number(r["ci95"]), "citation": f"{r['source']}{backbone}"})
    return pd.DataFrame(rows, columns=REFERENCE_COLUMNS)


def _leading_number(value: object) -> float:
    """The number a published cell starts with ("0.7 (over 3 seeds)" -> 0.7); NaN when there is none."""
    m = re.match(r"\s*([0-9]+(?:\.[0-9]*)?)", str(value))
    return float(m.group(1)) if m else float("nan")


def read_reference(path: Path) -> pd.DataFrame:
    """Read published numbers: columns method, benchmark, accuracy, ci95 (may be empty), citation; or a
    published-results table by dataset (`PUBLISHED_COLUMNS`, converted by `published_as_reference`).

    Accuracy and ci95 may be fractions or percent: when any accuracy exceeds 1 the whole file is
    taken as percent. Returned as fractions, sorted by benchmark, method, citation.
    """
    path = Path(path)
    try:
        ref = pd.read_csv(path, dtype={"method": str, "benchmark": str, "citation": str},
                          keep_default_na=True)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise ResultsError(f"{path}: not a readable CSV ({e})") from e
    if set(PUBLISHED_COLUMNS) <= set(ref.columns) and "benchmark" not in ref.columns:
        ref = published_as_reference(ref)
    missing = [c for c in REFERENCE_COLUMNS if c not in ref.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {missing}; a reference file needs {REFERENCE_COLUMNS}")
    ref = ref[REFERENCE_COLUMNS].copy()
    for col in ("method", "benchmark"):
        if ref[col].isna().any():
            row = int(ref[col].isna().to_numpy().nonzero()[0][0])
            raise ResultsError(f"{path}: row {row + 2}: column {col!r} is empty")
    ref["citation"] = ref["citation"].fillna("")
    for col in ("accuracy", "ci95"):
        values = pd.to_numeric(ref[col], errors="coerce")
        bad = values.isna() & ref[col].notna()
        if col == "accuracy":
            bad = bad | values.isna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise ResultsError(f"{path}: row {row + 2}: column {col!r} is not a number ({ref[col].iloc[row]!r})")
        ref[col] = values.astype(float)
    if (ref["accuracy"] > 1).any():
        ref["accuracy"] = ref["accuracy"] / 100.0
        ref["ci95"] = ref["ci95"] / 100.0
    if ((ref["accuracy"] < 0) | (ref["accuracy"] > 1)).any():
        raise ResultsError(f"{path}: accuracies must lie in [0, 1] or [0, 100]")
    return ref.sort_values(["benchmark", "method", "citation"], kind="mergesort").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# formatting


def pct(x: float) -> str:
    """A fraction as percent with two decimals ('?' for NaN)."""
    return f"{x * 100:.2f}" if x is not None and math.isfinite(x) else MISSING


def mean_ci(mean: float, ci: float) -> str:
    """'mean ± ci95' in percent (just the mean when the CI is unknown)."""
    return f"{pct(mean)} ± {pct(ci)}" if ci is not None and math.isfinite(ci) else pct(mean)


def fmt_p(p: float) -> str:
    """A p-value with three significant digits."""
    return f"{p:.3g}" if math.isfinite(p) else MISSING


def fmt_num(x: float, digits: int = 3) -> str:
    """A number with `digits` significant digits ('?' for NaN)."""
    return f"{x:.{digits}g}" if x is not None and math.isfinite(x) else MISSING


def sort_value(x: float | None, digits: int = 6) -> str:
    """The data-value of a numeric cell: fixed decimals, '' for missing."""
    return f"{x:.{digits}f}" if x is not None and math.isfinite(x) else ""


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")


def page_name(benchmark: str) -> str:
    """File name of a benchmark's page: `<benchmark>.html` when the name is file-safe."""
    if _SAFE_NAME.fullmatch(benchmark) and benchmark.lower() != "index":
        return f"{benchmark}.html"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", benchmark).strip("._-")[:60] or "benchmark"
    return f"{slug}-{hashlib.sha256(benchmark.encode('utf-8')).hexdigest()[:8]}.html"


def fmt_duration(seconds: float) -> str:
    """A duration for a cell: '8.2 s', '95 s', '12 min', '3.4 h' ('?' for NaN)."""
    if seconds is None or not math.isfinite(seconds):
        return MISSING
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


FIGURES_DIR = "figures"


def write_figure(fig: Any, out: Path, stem: str, title: str, key: str) -> dict[str, str]:
    """Write `fig` as out/figures/<stem>.svg and .png; its template entry (title, key, the SVG as a
    data URI for the page, and the two files' relative paths)."""
    png, svg = plots.save(fig, Path(out) / FIGURES_DIR / stem)
    uri = "data:image/svg+xml;base64," + base64.b64encode(svg.read_bytes()).decode("ascii")
    return {"title": title, "key": key, "uri": uri, "svg": f"{FIGURES_DIR}/{svg.name}", "png": f"{FIGURES_DIR}/{png.name}"}


# ---------------------------------------------------------------------------------------------
# protocol cards


def _merge(values: Iterable[str]) -> str:
    distinct = sorted(set(values))
    return " / ".join(distinct) if distinct else MISSING


def protocol_fields(runs: Sequence[Run], n_seeds: int, n_episodes: int) -> list[tuple[str, str]]:
    """The protocol card of one (benchmark, method): (label, text) pairs; '?' for missing fields.

    Values that differ across seeds are joined with ' / '.
    """
    out = [("seeds", str(n_seeds)), ("test episodes", str(n_episodes))]
    for label, keys in CARD_FIELDS:
        texts = []
        for run in runs:
            value = _get(run.card, *keys)
            if value is _ABSENT and keys == ("code_rev",):
                value = run.code_rev
            texts.append(render_value(value))
        out.append((label, _merge(texts) if texts else MISSING))
    return out


def combine_cards(per_benchmark: Mapping[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Merge per-benchmark cards of one method: a field equal everywhere is shown once, else
    as 'benchmark: value; ...'."""
    if not per_benchmark:
        return []
    benches = sorted(per_benchmark)
    labels = [label for label, _ in per_benchmark[benches[0]]]
    out = []
    for i, label in enumerate(labels):
        values = {b: per_benchmark[b][i][1] for b in benches}
        if len(set(values.values())) == 1:
            out.append((label, values[benches[0]]))
        else:
            out.append((label, "; ".join(f"{b}: {values[b]}" for b in benches)))
    return out


# ---------------------------------------------------------------------------------------------
# what the page claims: published (validated), ranked, verified


def check_bundles(results_dirs: Sequence[Path], root: Path | None, trust_code: bool) -> dict[Path, Validation]:
    """Validate every bundle among `results_dirs` (bench.validation); ResultsError naming the first
    problem of one that does not validate. Returns the validations by bundle folder."""
    from bench.validation import validate_bundle

    out = {}
    for path in map(Path, results_dirs):
        if not is_bundle(path):
            continue
        v = validate_bundle(path, root, trust_code)
        if not v.ok:
            raise ResultsError(f"{path}: the bundle does not validate ({len(v.errors)} problem(s); first: "
                               f"{v.errors[0]}); run `metabench validate {path}` for all of them")
        out[path] = v
    return out


def expected_episodes(benchmark: str, counts: Iterable[int]) -> int:
    """Test episodes a ranked row needs: the registered benchmark's, else the most any method has."""
    from bench.benchmarks import BENCHMARKS

    if benchmark in BENCHMARKS:  # a registered or installed benchmark (never a "pkg.module:NAME" import)
        try:
            return int(BENCHMARKS.get(benchmark).test_episodes)
        except MetabenchError:
            pass
    return max(counts)


def failed_checks(runs: Sequence[Run], validations: Mapping[Path, Validation]) -> list[str]:
    """The conformance checks the method of the runs' bundles fails, as re-run by validation."""
    failed: set[str] = set()
    for bundle in {r.bundle for r in runs if r.bundle is not None}:
        report = validations[bundle].conformance
        if report is not None and not report["ok"]:
            failed.update(report["failed"])
    return sorted(failed)


def unranked_reasons(runs: Sequence[Run], n_seeds: int, n_episodes: int, expected: int,
                     validations: Mapping[Path, Validation]) -> list[str]:
    """Why a (benchmark, method) row is not ranked ([] when it is)."""
    reasons = []
    if n_seeds < MIN_RANKED_SEEDS:
        reasons.append(f"{n_seeds} seed(s); a ranked row needs {MIN_RANKED_SEEDS}")
    if n_episodes < expected:
        reasons.append(f"{n_episodes} of {expected} test episodes")
    if any(validations[r.bundle].conformance is None for r in runs if r.bundle is not None):
        reasons.append("conformance suite not re-run (a method that is not registered or installed; "
                       "build with --trust-code to import it)")
    failed = failed_checks(runs, validations)
    if failed:
        reasons.append(f"fails the conformance suite: {', '.join(failed)}")
    return reasons


def verification(runs: Sequence[Run], records: Mapping[str, dict], shas: Mapping[Path, str]) -> dict | None:
    """The verification record covering every run (None unless all come from bundles with a record)."""
    found = [records.get(shas.get(r.bundle, "")) if r.bundle is not None else None for r in runs]
    return found[0] if runs and all(found) else None


def badge_title(record: dict | None) -> str:
    """The tooltip of a row's badge."""
    if record is None:
        return "numbers as submitted, not re-run (no verification record for this bundle)"
    return (f"re-run from the submitted checkpoints on {record.get('date', MISSING)}: {record.get('n_compared', MISSING)} "
            f"episode(s) compared, largest accuracy difference {render_value(record.get('max_accuracy_difference'))}")


# ---------------------------------------------------------------------------------------------
# rendering


def _load_template(name: str) -> str:
    if "/" in name or "\\" in name or name.startswith("."):
        raise jinja2.TemplateNotFound(name)
    resource = importlib.resources.files(TEMPLATE_PACKAGE) / TEMPLATE_DIR / name
    if not resource.is_file():
        raise jinja2.TemplateNotFound(name)
    return resource.read_text(encoding="utf-8")


def environment() -> jinja2.Environment:
    """The jinja2 environment: package-data templates, autoescape on, strict undefined."""
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _write(path: Path, text: str) -> None:
    if not text.endswith("\n"):
        text += "\n"
    atomic_write_text(path, text)
    path.chmod(0o644)  # a published page must be world-readable (the atomic temp file is 0600)


def _reference_table(ref: pd.DataFrame | None, benchmarks: Sequence[str] | None = None) -> dict | None:
    """Reference rows grouped by (method, citation), one column per benchmark."""
    if ref is None:
        return None
    if benchmarks is not None:
        ref = ref[ref["benchmark"].isin(list(benchmarks))]
    if ref.empty:
        return None
    cols = sorted(ref["benchmark"].unique())
    rows = []
    for (method, citation), group in ref.groupby(["method", "citation"], sort=True):
        cells = []
        for b in cols:
            hit = group[group["benchmark"] == b]
            if hit.empty:
                cells.append({"text": "—", "value": ""})
            else:
                r = hit.iloc[0]
                cells.append({"text": mean_ci(float(r["accuracy"]), float(r["ci95"])),
                              "value": sort_value(float(r["accuracy"]))})
        rows.append({"method": str(method), "citation": str(citation), "cells": cells})
    return {"benchmarks": [{"name": b, "page": None} for b in cols], "rows": rows}


@dataclass
class Pair:
    """One (benchmark, method) of the site: its summary row, runs, card, standing and verification."""

    benchmark: str
    method: str
    summary: pd.Series
    runs: list[Run]
    card: list[tuple[str, str]]
    reasons: list[str]
    record: dict | None
    failed: list[str]
    budget: int | None = None
    other_budget: bool = False

    @property
    def ranked(self) -> bool:
        return not self.reasons

    def cell(self, rank: int | None) -> dict:
        """The template cell: accuracy text and sort value, the seeds and fit time beside it, rank."""
        s = self.summary
        n_seeds = int(s["n_seeds"])
        return {"text": mean_ci(float(s["mean"]), float(s["ci95"])), "value": sort_value(float(s["mean"])),
                "meta": f"{n_seeds} seed{'s' if n_seeds != 1 else ''} · fit {fmt_duration(float(s['fit_seconds']))}",
                "best": rank == 1, "rank": rank}


def _pairs(loaded: Loaded, summary: pd.DataFrame, validations: Mapping[Path, Validation],
           records: Mapping[str, dict]) -> dict[tuple[str, str], Pair]:
    shas = {path: v.manifest_sha256 for path, v in validations.items()}
    expected = {b: expected_episodes(b, g["n_episodes"].astype(int)) for b, g in summary.groupby("benchmark")}
    budgets = row_budgets((run.benchmark, run.method, run.card) for run in loaded.runs)
    board = board_budgets(budgets)
    out = {}
    for _, row in summary.iterrows():
        b, m = str(row["benchmark"]), str(row["method"])
        runs = loaded.runs_of(b, m)
        n_seeds, n_eps = int(row["n_seeds"]), int(row["n_episodes"])
        reasons = unranked_reasons(runs, n_seeds, n_eps, expected[b], validations)
        other = other_budget(budgets.get((b, m)), board.get(b))
        if other:
            reasons.append(f"another budget: {budgets[(b, m)]} outer steps (the board's on {b}: {board[b]})")
        out[(b, m)] = Pair(b, m, row, runs, protocol_fields(runs, n_seeds, n_eps), reasons,
                           verification(runs, records, shas), failed_checks(runs, validations), budgets.get((b, m)), other)
    return out


def _ranks(frame: pd.DataFrame, pairs: Mapping[tuple[str, str], Pair], alpha: float) -> pd.DataFrame:
    """Tie-aware ranks among the ranked pairs only (indexed by benchmark, method)."""
    keep = pd.Series([pairs[(b, m)].ranked for b, m in zip(frame["benchmark"], frame["method"])], index=frame.index)
    ranked = frame[keep]
    table = stats.ranks(ranked, alpha=alpha) if not ranked.empty else pd.DataFrame(columns=stats.RANK_COLUMNS)
    return table


def _reason_text(pairs: Sequence[Pair]) -> str:
    if len(pairs) == 1:
        return "; ".join(pairs[0].reasons)
    return "; ".join(f"{p.benchmark}: {', '.join(p.reasons)}" for p in pairs)


def _method_row(m: str, mine: list[Pair]) -> dict:
    records = [p.record for p in mine]
    return {"method": m, "verified": all(records), "badge_title": badge_title(records[0] if all(records) else None),
            "card": combine_cards({p.benchmark: p.card for p in mine}),
            "failed_checks": sorted({c for p in mine for c in p.failed})}


def md_sections(summary: pd.DataFrame, pairs: Mapping[tuple[str, str], Pair], ref: pd.DataFrame | None
                ) -> list[dict]:
    """The Meta-Dataset section: one table per regime (suite) with results or published rows.

    Rows: methods with results on any of the regime's ten sources; cells mean ± 95% CI with the
    Meta-Dataset-style rank (`stats.md_ranks`, among ranked rows only: tied methods share the mean
    of their positions); the average rank over the sources a method is ranked on. The published
    rows of the regime follow in their own table (never ranked, never mixed with measured rows).
    """
    from bench.benchmarks import BENCHMARKS
    from bench.sources.meta_dataset import OFFICIAL

    display = {"md-" + o.key: o.display for o in OFFICIAL.values()}
    out = []
    for suite in (BENCHMARKS.get(n) for n in BENCHMARKS):
        if not suite.is_suite:
            continue
        members = list(suite.members)
        mine = summary[summary["benchmark"].isin(members)]
        ranked = mine.loc[np.array([pairs[(b, m)].ranked for b, m in zip(mine["benchmark"], mine["method"])],
                                   dtype=bool)]
        rank = stats.md_ranks(ranked, members).set_index(["benchmark", "method"])
        rows = []
        for method in sorted(set(mine["method"]), key=str.lower):
            cells, got = [], []
            for b in members:
                p = pairs.get((b, method))
                if p is None:
                    cells.append({"text": "—", "value": "", "best": False, "rank": None})
                    continue
                r = float(rank.loc[(b, method), "rank"]) if (b, method) in rank.index else None
                got += [r] if r is not None else []
                cells.append({"text": mean_ci(float(p.summary["mean"]), float(p.summary["ci95"])),
                              "value": sort_value(float(p.summary["mean"])), "best": r is not None and r < 2,
                              "rank": None if r is None else f"{r:g}",
                              "meta": f"rank {r:g}" if r is not None else "unranked"})
            avg = sum(got) / len(got) if got else None
            rows.append({"method": method, "cells": cells,
                         "avg_text": "—" if avg is None else f"{avg:.2f}" + (f" ({len(got)}/{len(members)})"
                                                                             if len(got) < len(members) else ""),
                         "avg_value": "" if avg is None else sort_value(avg, 4)})
        rows.sort(key=lambda r: (r["avg_value"] == "", r["avg_value"], r["method"]))
        reference = _reference_table(ref, members)
        if reference is not None:  # columns in the regime's source order, named by source
            order = {b: i for i, b in enumerate(members)}
            cols = [c["name"] for c in reference["benchmarks"]]
            perm = sorted(range(len(cols)), key=lambda i: order[cols[i]])
            reference["benchmarks"] = [{"name": display[cols[i].replace("md-all-", "md-")], "page": None} for i in perm]
            for row in reference["rows"]:
                row["cells"] = [row["cells"][i] for i in perm]
        if rows or reference is not None:
            regime = "ImageNet only" if suite.name == "md-imagenet" else "all datasets"
            out.append({"suite": suite.name, "regime": regime, "rows": rows, "reference": reference,
                        "sources": [{"name": display[b.replace("md-all-", "md-")], "page": None, "bench": b}
                                    for b in members]})
    return out


def build_site(results_dirs: list[Path], out: Path, reference_csv: Path | None = None, *,
               verified_dir: Path | None = None, root: Path | None = None, trust_code: bool = False,
               index_name: str = "index.html", alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> Path:
    """Build the static leaderboard site into `out`; returns the path of its main page.

    `results_dirs`: result folders (`<dir>/<benchmark>/<method>/seed<N>.csv` + `.json` cards) and
    submission bundles, each bundle re-validated first (`check_bundles`, with the data folder
    `root` and `trust_code`; validation writes nothing); `reference_csv`: optional published
    numbers (method, benchmark, accuracy, ci95, citation), shown only in separate "published"
    sections; `verified_dir`: the maintainer's verification records (`metabench verify
    --record-to`), the only source of verified badges; `index_name`: the file name of the main
    page. `alpha` is the significance level of the tie-aware ranks; `n_boot` and `seed` drive the
    paired bootstrap CIs. Files in `out` other than the pages and figures written are left alone.
    """
    from bench.verify import read_records

    try:
        records = read_records(Path(verified_dir)) if verified_dir is not None else {}
    except MetabenchError as e:
        raise ResultsError(str(e)) from e
    ref = read_reference(Path(reference_csv)) if reference_csv is not None else None
    validations = check_bundles(results_dirs, root, trust_code)
    loaded = load_results([Path(d) for d in results_dirs])
    frame = loaded.frame
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()

    summary = stats.summarize(frame)
    pairs = _pairs(loaded, summary, validations, records)
    rank_table = _ranks(frame, pairs, alpha)
    avg = stats.average_rank(rank_table).set_index("method") if not rank_table.empty else None
    r_idx = rank_table.set_index(["benchmark", "method"])
    benchmarks = sorted(summary["benchmark"].unique())
    pages = {b: page_name(b) for b in benchmarks}
    if len(set(pages.values())) != len(pages) or index_name in pages.values():
        raise ResultsError(f"two benchmark names (or a benchmark and the main page {index_name}) map to the same file")

    ranked_methods = sorted({m for (b, m), p in pairs.items() if p.ranked},
                            key=lambda m: (float(avg.loc[m, "average_rank"]), m))
    rows = []
    for m in ranked_methods:
        mine = [pairs[(b, m)] for b in benchmarks if (b, m) in pairs and pairs[(b, m)].ranked]
        cells = []
        for b in benchmarks:
            p = pairs.get((b, m))
            if p is None:
                cells.append({"text": "—", "value": "", "best": False, "rank": None})
            elif not p.ranked:
                cells.append({"text": "unranked", "value": "", "best": False, "rank": None, "note": True})
            else:
                cells.append(p.cell(int(r_idx.loc[(b, m), "rank"])))
        a = avg.loc[m]
        avg_text = f"{float(a['average_rank']):.2f}"
        if int(a["n_benchmarks"]) < len(benchmarks):
            avg_text += f" ({int(a['n_benchmarks'])}/{len(benchmarks)})"
        rows.append({**_method_row(m, mine), "cells": cells, "avg_text": avg_text,
                     "avg_value": sort_value(float(a["average_rank"]), 4)})

    unranked = []
    for m in sorted({m for (b, m), p in pairs.items() if not p.ranked}, key=str.lower):
        mine = [pairs[(b, m)] for b in benchmarks if (b, m) in pairs and not pairs[(b, m)].ranked]
        cells = [pairs[(b, m)].cell(None) if pairs.get((b, m)) in mine else
                 {"text": "ranked above" if (b, m) in pairs else "—", "value": "", "best": False, "rank": None,
                  "note": (b, m) in pairs} for b in benchmarks]
        unranked.append({**_method_row(m, mine), "cells": cells, "reason": _reason_text(mine)})

    index_html = env.get_template("index.html").render(
        title="metabench leaderboard",
        index=index_name,
        benchmarks=[{"name": b, "page": pages[b]} for b in benchmarks],
        rows=rows,
        unranked=unranked,
        min_seeds=MIN_RANKED_SEEDS,
        alpha=alpha,
        accuracy_figure=write_figure(plots.plot_accuracy(summary), out, "accuracy",
                                     "Mean test accuracy with 95% CI over episodes, per benchmark.", "accuracy"),
        reference=_reference_table(ref, [b for b in ref["benchmark"].unique() if not b.startswith("md-")])
        if ref is not None else None,
        md=md_sections(summary, pairs, ref),
    )
    _write(out / index_name, index_html)

    board = _Board(env, out, loaded, summary, pairs, r_idx, ref, index_name, alpha, n_boot, seed)
    for b in benchmarks:
        _write(out / pages[b], _benchmark_page(board, b))
    return out / index_name


@dataclass(frozen=True)
class _Board:
    """What every benchmark page of one build shares: the template environment and output folder, the loaded
    runs and their summary, the (benchmark, method) pairs and their ranks (indexed by benchmark and method), the
    published numbers, and the build's settings."""

    env: jinja2.Environment
    out: Path
    loaded: Loaded
    summary: pd.DataFrame
    pairs: Mapping[tuple[str, str], Pair]
    ranks: pd.DataFrame
    ref: pd.DataFrame | None
    index_name: str
    alpha: float
    n_boot: int
    seed: int


def _benchmark_page(board: _Board, bench: str) -> str:
    """The HTML page of benchmark `bench`: its ranked table, pairwise tests, figures and axes."""
    out, loaded, pairs, alpha, n_boot, seed = board.out, board.loaded, board.pairs, board.alpha, board.n_boot, board.seed
    frame = loaded.frame[loaded.frame["benchmark"] == bench]
    order = stats.method_order(frame, bench)
    summary = board.summary[board.summary["benchmark"] == bench]
    rows, unranked, other_budgets = [], [], []
    for m in order:
        p = pairs[(bench, m)]
        s = p.summary
        rank = int(board.ranks.loc[(bench, m), "rank"]) if p.ranked else None
        seed_text = (f"{pct(float(s['seed_mean']))} ± {pct(float(s['seed_sd']))}"
                     if math.isfinite(float(s["seed_sd"])) else pct(float(s["seed_mean"])))
        row = {
            "method": m, "rank": rank, "best": rank == 1, "verified": p.record is not None,
            "badge_title": badge_title(p.record), "card": p.card, "reason": "; ".join(p.reasons),
            "failed_checks": p.failed,
            "acc_text": mean_ci(float(s["mean"]), float(s["ci95"])), "acc_value": sort_value(float(s["mean"])),
            "seed_text": seed_text, "seed_value": sort_value(float(s["seed_mean"])),
            "n_episodes": int(s["n_episodes"]), "n_seeds": int(s["n_seeds"]),
            "adapt_text": fmt_num(float(s["adapt_seconds"])), "adapt_value": sort_value(float(s["adapt_seconds"])),
            "fit_text": fmt_duration(float(s["fit_seconds"])), "fit_value": sort_value(float(s["fit_seconds"])),
            "budget": p.budget,
        }
        (rows if p.ranked else other_budgets if p.other_budget else unranked).append(row)
    rows.sort(key=lambda r: (r["rank"], order.index(r["method"])))

    best = rows[0]["method"] if rows else order[0]
    pairs_rows = []
    if len(order) > 1:
        table = stats.pairwise(frame, bench, n_boot=n_boot, seed=seed)
        for _, p in table.iterrows():
            pairs_rows.append({
                "a": p["a"], "b": p["b"], "n": int(p["n"]),
                "diff_text": f"{float(p['diff']) * 100:+.2f}", "diff_value": sort_value(float(p["diff"])),
                "ci_text": f"[{float(p['ci_low']) * 100:+.2f}, {float(p['ci_high']) * 100:+.2f}]",
                "p_text": fmt_p(float(p["p_value"])), "p_value": f"{float(p['p_value']):.6e}",
                "significant": float(p["p_value"]) < alpha,
            })

    stem = page_name(bench)[:-len(".html")]
    figures = [write_figure(plots.plot_accuracy(summary), out, f"{stem}-accuracy",
                            "Accuracy with 95% CI over test episodes", "accuracy")]
    if len(order) > 1:
        figures.append(write_figure(plots.plot_paired(frame, bench, best, n_boot=n_boot, seed=seed), out,
                                    f"{stem}-paired",
                                    f"Paired difference to the best{' ranked' if rows else ''} method ({best}), "
                                    "bootstrap 95% CI", "paired"))
    curve_cards = []
    for run in loaded.runs_of(bench):
        if run.card.get("curve"):
            card = dict(run.card)
            card["method"], card["seed"] = run.method, run.seed
            curve_cards.append(card)
    if curve_cards:
        figures.append(write_figure(plots.plot_curves(curve_cards, title=bench), out, f"{stem}-curves",
                                    "Meta-training curves (validation accuracy)", "curves"))
    figures.append(write_figure(plots.plot_compute(summary, benchmark=bench), out, f"{stem}-compute",
                                "Accuracy against compute", "compute"))

    versions = sorted(set(int(v) for v in frame["benchmark_version"]))
    axis_part = axes_section(out, loaded, bench, summary, stem)
    return board.env.get_template("benchmark.html").render(
        axes=axis_part,
        title=f"{bench} — metabench",
        index=board.index_name,
        benchmark=bench,
        version=", ".join(map(str, versions)),
        rows=rows,
        unranked=unranked,
        other_budgets=other_budgets,
        budget=board_budgets({k: p.budget for k, p in pairs.items() if k[0] == bench}).get(bench),
        min_seeds=MIN_RANKED_SEEDS,
        pairs=pairs_rows,
        best=best,
        alpha=alpha,
        n_boot=n_boot,
        figures=figures,
        reference=_reference_table(board.ref, [bench]),
    )


# ---------------------------------------------------------------------------------------------
# evaluation axes (bench.axes): steps, label permutations, FLOPs and the equal-budget table


def _axis_tables(loaded: Loaded, bench: str, axis: str) -> list[tuple[str, int, pd.DataFrame]]:
    """(method, seed, table) of evaluation axis `axis` of every run of `bench` that has it."""
    out = []
    for run in loaded.runs_of(bench):
        table = read_axis(run.csv, axis)
        if table is not None:
            out.append((run.method, run.seed, table))
    return out


def axes_section(out: Path, loaded: Loaded, bench: str, summary: pd.DataFrame, stem: str) -> dict:
    """The evaluation-axes part of a benchmark page: figures (accuracy against test-time steps, against
    FLOPs), the permutation table and the equal-budget table, each present only when some run has it."""
    figures: list[dict] = []
    part: dict[str, Any] = {"perms": None, "budget": None}
    steps = _axis_tables(loaded, bench, "steps")
    if steps:
        figures.append(write_figure(plots.plot_steps(axes.step_summary(steps), title=bench), out, f"{stem}-steps",
                                    "Query accuracy after each test-time inner step (0 to twice the method's test "
                                    "steps, one adaptation pass), 95% CI over episodes; a method without an inner "
                                    "loop it can record is one point at its test steps", "steps"))
    perms = _axis_tables(loaded, bench, "perms")
    if perms:
        part["perms"] = [{"method": r["method"], "mean": pct(r["mean"]), "mean_value": sort_value(r["mean"]),
                          "identity": pct(r["identity"]), "spread": pct(r["spread"]),
                          "spread_value": sort_value(r["spread"]), "gap": pct(r["gap"]), "gap_value": sort_value(r["gap"]),
                          "n_perms": r["n_perms"], "n_episodes": r["n_episodes"], "n_seeds": r["n_seeds"]}
                         for _, r in axes.permutation_summary(perms).iterrows()]
    cards = [(r.method, r.card) for r in loaded.runs_of(bench) if axes.training_flops(r.card) is not None]
    if cards:
        per_run = pd.DataFrame([{"method": m, "train_flops": axes.training_flops(c),
                                 "adapt_flops": float(c["flops"]["adaptation"])} for m, c in cards])
        flops = summary.merge(per_run.groupby("method").mean().reset_index(), on="method")
        figures.append(write_figure(plots.plot_compute(flops, benchmark=bench, panels=plots.FLOP_PANELS), out,
                                    f"{stem}-flops", "Accuracy against FLOPs (counted once per run on the per-task "
                                    "reference path: matrix products and convolutions): meta-training (outer step x "
                                    "steps) and one adaptation (support set + query prediction)", "flops"))
        budget, table = axes.equal_budget(cards)
        if budget is not None:
            part["budget"] = {"flops": f"{budget:.3g}", "rows": [
                {"method": r["method"], "step": f"{r['step']:.0f}", "flops": f"{r['flops']:.3g}",
                 "val": pct(r["val_accuracy"]), "val_value": sort_value(r["val_accuracy"]),
                 "full": pct(r["full_val_accuracy"]), "n_runs": int(r["n_runs"])} for _, r in table.iterrows()]}
    part["figures"] = figures
    return part


# ---------------------------------------------------------------------------------------------
# CLI


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Build the static leaderboard site from results folders and bundles."""
    from bench.paths import resolve_root

    out = Path(args.output)
    html = out.suffix.lower() in (".html", ".htm")
    index = build_site([Path(p) for p in args.results], out.parent if html else out,
                       Path(args.reference) if args.reference else None,
                       verified_dir=Path(args.verified) if args.verified else None, root=resolve_root(args.root),
                       trust_code=args.trust_code, index_name=out.name if html else "index.html")
    print(f"leaderboard: {index}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the `leaderboard` command."""
    s = sub.add_parser("leaderboard", help="build the static leaderboard site (re-validates every bundle)")
    s.add_argument("results", nargs="+", help="results folders or submission bundles")
    s.add_argument("-o", "--output", default="site/index.html",
                   help="the main page (FILE.html: written under that name, with the other pages and figures "
                        "beside it) or a folder (index.html in it)")
    s.add_argument("--verified", default=None, metavar="DIR",
                   help="verification records (metabench verify --record-to DIR): the only source of verified badges")
    s.add_argument("--reference", default=None, metavar="CSV",
                   help="published numbers (method, benchmark, accuracy, ci95, citation), shown apart from the ranks")
    s.add_argument("--root", default=None, help="data folder for re-validating bundles (default: per-user cache); "
                                                "read, never written")
    s.add_argument("--trust-code", action="store_true",
                   help="import bundled methods that are not registered or installed, to re-run their conformance suite")
    s.set_defaults(func=cmd_leaderboard)

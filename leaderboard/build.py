"""Build the static leaderboard site from result folders.

`build_site(results_dirs, out, reference_csv=None)` writes into `out`:

- `index.html`: the main table (rows = methods, columns = benchmarks, cell = mean ± 95% CI in
  percent, rank-1 cells in bold, an average-rank column), sortable by clicking a header (inline
  vanilla JavaScript), a protocol card and a verified / self-reported badge per row, the
  accuracy figure, and the published reference numbers in a separate table;
- `<benchmark>.html` per benchmark: its table with seed spread and timings, plots (accuracy,
  paired difference to the best method, training curves, compute) and every paired comparison.

Pages are self-contained (inline CSS/JS, figures as base64 SVG data URIs; no network). Every
string from result files, run cards and the reference file goes through jinja2 autoescaping.
Output is deterministic: no timestamps, sorted inputs, fixed float formats, deterministic plots
and a fixed bootstrap seed, so two builds from the same inputs are byte-identical.

Browser-test hooks: the main table is `table#leaderboard`, benchmark tables `table#benchmark-table`,
pair tables `table#pairs`, reference tables `table#reference`; every sortable table has class
`sortable`, its sortable headers carry `data-key` (`method`, `bench:<name>`, `avg-rank`, ...) and
`data-type` (`number` or `text`); body rows carry `data-method` (and `data-a`/`data-b` for pairs);
cells carry the raw sort key in `data-value`. Clicking a header sorts (first click in the
header's `data-default-order`, then toggles) and sets `aria-sort` on that header.
"""

from __future__ import annotations

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
import pandas as pd

from bench import plots, stats
from bench.errors import ResultsError
from bench.paths import atomic_write_text
from bench.results import check_consistent, find_csvs, read_card, read_csv

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
    """One (benchmark, method, seed) run: where it came from and its run card ({} if absent)."""

    benchmark: str
    method: str
    seed: int
    csv: Path
    card: dict
    code_rev: str


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
    MANIFEST.json): its `results/` subfolder is read, and its run cards say whether it is verified.

    Raises ResultsError when a folder has no results, when one (benchmark, method, seed) appears
    twice, or when runs of one benchmark disagree on its version or episode hashes.
    """
    frames: list[pd.DataFrame] = []
    names: list[str] = []
    runs: list[Run] = []
    seen: dict[tuple[str, str, int], Path] = {}
    for results_dir in results_dirs:
        results_dir = Path(results_dir)
        if (results_dir / "metadata.json").is_file() or (results_dir / "MANIFEST.json").is_file():
            results_dir = results_dir / "results"  # a submission bundle (bench.bundle): its CSVs live here
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
                            code_rev=str(frame["code_rev"].iloc[0])))
    if not frames:
        raise ResultsError("no result folders given")
    frame = check_consistent(frames, names)
    runs.sort(key=lambda r: (r.benchmark, r.method, r.seed))
    return Loaded(frame=frame, runs=runs)


def read_reference(path: Path) -> pd.DataFrame:
    """Read published numbers: columns method, benchmark, accuracy, ci95 (may be empty), citation.

    Accuracy and ci95 may be fractions or percent: when any accuracy exceeds 1 the whole file is
    taken as percent. Returned as fractions, sorted by benchmark, method, citation.
    """
    path = Path(path)
    try:
        ref = pd.read_csv(path, dtype={"method": str, "benchmark": str, "citation": str},
                          keep_default_na=True)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise ResultsError(f"{path}: not a readable CSV ({e})") from e
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


def figure_uri(fig) -> str:
    """A figure as a `data:image/svg+xml;base64,...` URI (deterministic SVG)."""
    return "data:image/svg+xml;base64," + base64.b64encode(plots.svg_bytes(fig)).decode("ascii")


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


def is_verified(runs: Sequence[Run]) -> bool:
    """True when there are runs and every one has a run card with `"verified": true`."""
    return bool(runs) and all(r.card.get("verified") is True for r in runs)


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


def build_site(results_dirs: list[Path], out: Path, reference_csv: Path | None = None, *,
               alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> Path:
    """Build the static leaderboard site into `out`; returns the path of `out/index.html`.

    `results_dirs`: result folders (`<dir>/<benchmark>/<method>/seed<N>.csv` + `.json` cards);
    `reference_csv`: optional published numbers (method, benchmark, accuracy, ci95, citation),
    shown only in separate "published" sections. `alpha` is the significance level of the
    tie-aware ranks; `n_boot` and `seed` drive the paired bootstrap CIs. Files in `out` other
    than the pages written are left alone.
    """
    loaded = load_results([Path(d) for d in results_dirs])
    frame = loaded.frame
    ref = read_reference(Path(reference_csv)) if reference_csv is not None else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()

    summary = stats.summarize(frame)
    rank_table = stats.ranks(frame, alpha=alpha)
    avg = stats.average_rank(rank_table).set_index("method")
    benchmarks = sorted(summary["benchmark"].unique())
    pages = {b: page_name(b) for b in benchmarks}
    if len(set(pages.values())) != len(pages):
        raise ResultsError("two benchmark names map to the same page file")
    s_idx = summary.set_index(["benchmark", "method"])
    r_idx = rank_table.set_index(["benchmark", "method"])

    cards: dict[tuple[str, str], list[tuple[str, str]]] = {}
    verified: dict[tuple[str, str], bool] = {}
    for (b, m), row in s_idx.iterrows():
        runs = loaded.runs_of(b, m)
        cards[(b, m)] = protocol_fields(runs, int(row["n_seeds"]), int(row["n_episodes"]))
        verified[(b, m)] = is_verified(runs)

    methods = sorted(summary["method"].unique(), key=lambda m: (float(avg.loc[m, "average_rank"]), m))
    rows = []
    for m in methods:
        cells = []
        mine = [b for b in benchmarks if (b, m) in s_idx.index]
        for b in benchmarks:
            if (b, m) not in s_idx.index:
                cells.append({"text": "—", "value": "", "best": False, "rank": None})
                continue
            s = s_idx.loc[(b, m)]
            rank = int(r_idx.loc[(b, m), "rank"])
            cells.append({"text": mean_ci(float(s["mean"]), float(s["ci95"])), "value": sort_value(float(s["mean"])),
                          "best": rank == 1, "rank": rank})
        a = avg.loc[m]
        avg_text = f"{float(a['average_rank']):.2f}"
        if int(a["n_missing"]) > 0:
            avg_text += f" ({int(a['n_benchmarks'])}/{len(benchmarks)})"
        rows.append({
            "method": m,
            "verified": all(verified[(b, m)] for b in mine),
            "card": combine_cards({b: cards[(b, m)] for b in mine}),
            "cells": cells,
            "avg_text": avg_text,
            "avg_value": sort_value(float(a["average_rank"]), 4),
        })

    index_html = env.get_template("index.html").render(
        title="metabench leaderboard",
        benchmarks=[{"name": b, "page": pages[b]} for b in benchmarks],
        rows=rows,
        alpha=alpha,
        accuracy_figure=figure_uri(plots.plot_accuracy(summary)),
        reference=_reference_table(ref),
    )
    _write(out / "index.html", index_html)

    for b in benchmarks:
        _write(out / pages[b], _benchmark_page(env, loaded, b, s_idx, r_idx, cards, verified, ref,
                                               alpha=alpha, n_boot=n_boot, seed=seed))
    return out / "index.html"


def _benchmark_page(env: jinja2.Environment, loaded: Loaded, bench: str, s_idx: pd.DataFrame,
                    r_idx: pd.DataFrame, cards: Mapping, verified: Mapping, ref: pd.DataFrame | None,
                    *, alpha: float, n_boot: int, seed: int) -> str:
    frame = loaded.frame[loaded.frame["benchmark"] == bench]
    order = stats.method_order(frame, bench)
    summary = s_idx.xs(bench, level="benchmark").reset_index()
    summary.insert(0, "benchmark", bench)
    rows = []
    for m in sorted(order, key=lambda m: (int(r_idx.loc[(bench, m), "rank"]), order.index(m))):
        s = s_idx.loc[(bench, m)]
        rank = int(r_idx.loc[(bench, m), "rank"])
        seed_text = (f"{pct(float(s['seed_mean']))} ± {pct(float(s['seed_sd']))}"
                     if math.isfinite(float(s["seed_sd"])) else pct(float(s["seed_mean"])))
        rows.append({
            "method": m, "rank": rank, "best": rank == 1, "verified": verified[(bench, m)],
            "card": cards[(bench, m)],
            "acc_text": mean_ci(float(s["mean"]), float(s["ci95"])), "acc_value": sort_value(float(s["mean"])),
            "seed_text": seed_text, "seed_value": sort_value(float(s["seed_mean"])),
            "n_episodes": int(s["n_episodes"]), "n_seeds": int(s["n_seeds"]),
            "adapt_text": fmt_num(float(s["adapt_seconds"])), "adapt_value": sort_value(float(s["adapt_seconds"])),
            "fit_text": fmt_num(float(s["fit_seconds"])), "fit_value": sort_value(float(s["fit_seconds"])),
        })

    best = order[0]
    pairs = []
    if len(order) > 1:
        table = stats.pairwise(frame, bench, n_boot=n_boot, seed=seed)
        for _, p in table.iterrows():
            pairs.append({
                "a": p["a"], "b": p["b"], "n": int(p["n"]),
                "diff_text": f"{float(p['diff']) * 100:+.2f}", "diff_value": sort_value(float(p["diff"])),
                "ci_text": f"[{float(p['ci_low']) * 100:+.2f}, {float(p['ci_high']) * 100:+.2f}]",
                "p_text": fmt_p(float(p["p_value"])), "p_value": f"{float(p['p_value']):.6e}",
                "significant": float(p["p_value"]) < alpha,
            })

    figures = [{"title": "Accuracy with 95% CI over test episodes", "key": "accuracy",
                "uri": figure_uri(plots.plot_accuracy(summary))}]
    if len(order) > 1:
        figures.append({"title": f"Paired difference to the best method ({best}), bootstrap 95% CI",
                        "key": "paired",
                        "uri": figure_uri(plots.plot_paired(frame, bench, best, n_boot=n_boot, seed=seed))})
    curve_cards = []
    for run in loaded.runs_of(bench):
        if run.card.get("curve"):
            card = dict(run.card)
            card["method"], card["seed"] = run.method, run.seed
            curve_cards.append(card)
    if curve_cards:
        figures.append({"title": "Meta-training curves (validation accuracy)", "key": "curves",
                        "uri": figure_uri(plots.plot_curves(curve_cards, title=bench))})
    figures.append({"title": "Accuracy against compute", "key": "compute",
                    "uri": figure_uri(plots.plot_compute(summary, benchmark=bench))})

    versions = sorted(set(int(v) for v in frame["benchmark_version"]))
    return env.get_template("benchmark.html").render(
        title=f"{bench} — metabench",
        benchmark=bench,
        version=", ".join(map(str, versions)),
        rows=rows,
        pairs=pairs,
        best=best,
        alpha=alpha,
        n_boot=n_boot,
        figures=figures,
        reference=_reference_table(ref, [bench]),
    )

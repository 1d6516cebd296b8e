"""Plots of results (matplotlib, Agg backend, no pyplot global state).

Every `plot_*` function returns a `matplotlib.figure.Figure`; `save(fig, path)` writes it as PNG
and SVG, `svg_bytes(fig)` / `png_bytes(fig)` render it in memory. Output is deterministic:
fixed SVG hash salt, no dates or software names in the metadata, fixed DPI, sorted methods and
a fixed colour per method, so the same input gives byte-identical files.

Accuracies are fractions in [0, 1] in the inputs and drawn in percent.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, without pyplot
from matplotlib.figure import Figure

from bench import stats

DPI = 100
_RC = {
    "svg.hashsalt": "metabench",
    "svg.fonttype": "path",
    "path.simplify": True,
    "font.family": "DejaVu Sans",
    "font.size": 9,
}
_SVG_META = {"Date": None, "Creator": None}
_PNG_META = {"Software": None}


def _rc():
    return matplotlib.rc_context(_RC)


def _label(text: Any) -> str:
    """A string safe to draw: '$' would otherwise switch matplotlib to mathtext."""
    return str(text).replace("$", r"\$")


def method_colors(methods: Iterable[str]) -> dict[str, Any]:
    """A fixed colour per method (sorted names, tab10 then tab20 cycling)."""
    names = sorted(set(map(str, methods)))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(names)}


def _new_figure(width: float, height: float) -> Figure:
    with _rc():
        fig = Figure(figsize=(width, height), dpi=DPI)
        FigureCanvasAgg(fig)
    return fig


def svg_bytes(fig: Figure) -> bytes:
    """The figure as deterministic SVG bytes."""
    buf = io.BytesIO()
    with _rc():
        fig.savefig(buf, format="svg", metadata=_SVG_META, dpi=DPI)
    return buf.getvalue()


def png_bytes(fig: Figure) -> bytes:
    """The figure as deterministic PNG bytes."""
    buf = io.BytesIO()
    with _rc():
        fig.savefig(buf, format="png", metadata=_PNG_META, dpi=DPI)
    return buf.getvalue()


def save(fig: Figure, path: str | Path) -> list[Path]:
    """Write `fig` as `<path>.png` and `<path>.svg` (any suffix of `path` is replaced).

    Creates parent folders; returns the two paths written.
    """
    from bench.paths import atomic_write_bytes

    path = Path(path)
    base = path.with_suffix("") if path.suffix.lower() in (".png", ".svg") else path
    png = base.parent / (base.name + ".png")
    svg = base.parent / (base.name + ".svg")
    for target, data in ((png, png_bytes(fig)), (svg, svg_bytes(fig))):
        atomic_write_bytes(target, data)
        target.chmod(0o644)  # the atomic temp file is created 0600
    return [png, svg]


def _maybe_save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        save(fig, path)
    return fig


def _as_summary(table: pd.DataFrame) -> pd.DataFrame:
    """`stats.summarize` output, computing it when given a raw result table."""
    return stats.summarize(table) if "episode" in table.columns else table


def _accuracy_limits(low: np.ndarray, high: np.ndarray, min_span: float = 4.0) -> tuple[float, float]:
    """Axis limits (percent) around the intervals [low, high]: padded, at least `min_span` points wide
    (one method, or a CI of zero, still gets a readable axis), within [0, 100]."""
    lo, hi = float(np.nanmin(low)), float(np.nanmax(high))
    pad = max(0.1 * (hi - lo), (min_span - (hi - lo)) / 2, 0.5)
    lo, hi = lo - pad, hi + pad
    if lo < 0:
        lo, hi = 0.0, min(100.0, hi - lo)
    if hi > 100:
        lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi


def _time_limits(values: np.ndarray) -> tuple[float, float] | None:
    """Axis limits for times that are all one value (one method): 0 to twice it (None otherwise)."""
    finite = values[np.isfinite(values)]
    if finite.size and np.ptp(finite) == 0:
        v = float(finite[0])
        return (0.0, 2 * v) if v > 0 else (-1.0, 1.0)
    return None


def _empty(fig: Figure, ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def plot_accuracy(table: pd.DataFrame, benchmarks: Sequence[str] | None = None,
                  path: str | Path | None = None) -> Figure:
    """Mean accuracy with 95% CI error bars: one panel per benchmark, one row per method.

    `table` is a `stats.summarize` table or a raw result table. Methods are ordered by mean,
    best at the top. Saved with `save` when `path` is given.
    """
    summary = _as_summary(table)
    names = sorted(summary["benchmark"].astype(str).unique()) if benchmarks is None else list(benchmarks)
    colors = method_colors(summary["method"])
    n_methods = max([1] + [int((summary["benchmark"] == b).sum()) for b in names])
    cols = min(3, max(1, len(names)))
    rows = (max(1, len(names)) + cols - 1) // cols
    with _rc():
        fig = _new_figure(4.2 * cols, max(2.0, 0.35 * n_methods + 1.2) * rows)
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        if not names:
            _empty(fig, axes[0], "no results")
        for ax, bench in zip(axes, names):
            sub = summary[summary["benchmark"] == bench].copy()
            sub = sub.sort_values(["mean", "method"], ascending=[True, False], kind="mergesort")
            y = np.arange(len(sub))
            err = np.nan_to_num(sub["ci95"].to_numpy(dtype=float) * 100.0)
            for yi, (_, row), e in zip(y, sub.iterrows(), err):
                ax.errorbar(row["mean"] * 100.0, yi, xerr=e, fmt="o", capsize=3,
                            color=colors[str(row["method"])])
            ax.set_yticks(y, [_label(m) for m in sub["method"]])
            ax.set_ylim(-0.7, len(sub) - 0.3)
            means = sub["mean"].to_numpy(dtype=float) * 100.0
            ax.set_xlim(*_accuracy_limits(means - err, means + err))
            ax.ticklabel_format(axis="x", useOffset=False)
            ax.set_xlabel("accuracy (%) ± 95% CI")
            ax.set_title(_label(bench))
            ax.grid(axis="x", alpha=0.3)
        for ax in axes[len(names):] if names else axes[1:]:
            ax.set_axis_off()
        fig.tight_layout()
    return _maybe_save(fig, path)


def plot_paired(frame: pd.DataFrame, benchmark: str, reference: str, n_boot: int = 2000,
                seed: int = 0, path: str | Path | None = None) -> Figure:
    """Paired difference of every other method to `reference` on `benchmark`, with bootstrap CIs.

    `frame` is a raw result table. Each bar is mean(method - reference) over identical episodes
    (percentage points) with its paired bootstrap 95% CI; the Wilcoxon p-value is annotated.
    """
    others = [m for m in stats.method_order(frame, benchmark) if m != reference]
    results = [stats.paired(frame, benchmark, m, reference, n_boot=n_boot, seed=seed) for m in others]
    colors = method_colors(frame.loc[frame["benchmark"] == benchmark, "method"])
    with _rc():
        fig = _new_figure(6.0, max(2.0, 0.4 * len(others) + 1.2))
        ax = fig.subplots()
        if not results:
            _empty(fig, ax, f"only {_label(reference)} on {_label(benchmark)}")
        else:
            y = np.arange(len(results))[::-1]
            for yi, r in zip(y, results):
                d = r.diff * 100.0
                lo, hi = r.ci_low * 100.0, r.ci_high * 100.0
                xerr = [[max(0.0, d - lo)], [max(0.0, hi - d)]] if np.isfinite(lo) else None
                ax.errorbar(d, yi, xerr=xerr, fmt="o", capsize=3, color=colors[r.a])
                ax.annotate(f"p={r.p_value:.3g}", (d, yi), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7)
            ax.axvline(0.0, color="0.3", lw=0.8, ls="--")
            ax.set_yticks(y, [_label(r.a) for r in results])
            ax.set_ylim(-0.7, len(results) - 0.3)
            ax.set_xlabel(f"accuracy difference to {_label(reference)} (points), paired bootstrap 95% CI")
            ax.grid(axis="x", alpha=0.3)
        ax.set_title(_label(benchmark))
        fig.tight_layout()
    return _maybe_save(fig, path)


def _curve_points(card: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, ys, steps = [], [], []
    for point in card.get("curve") or []:
        if not isinstance(point, Mapping):
            continue
        x, y = point.get("fit_episodes"), point.get("val_accuracy")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and np.isfinite(x) and np.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
            steps.append(point.get("step"))
    order = np.argsort(xs, kind="mergesort")
    return np.asarray(xs)[order], np.asarray(ys)[order], np.asarray(steps, dtype=object)[order]


def plot_curves(cards: Iterable[Mapping[str, Any]], title: str | None = None,
                path: str | Path | None = None) -> Figure:
    """Meta-training curves: validation accuracy against fit episodes, one line per run card.

    Runs of the same method share a colour; the checkpoint picked (`selected_step`) is circled.
    Cards without a usable "curve" list are skipped.
    """
    cards = [c for c in cards if isinstance(c, Mapping)]
    keyed = sorted(cards, key=lambda c: (str(c.get("method", "?")), str(c.get("seed", "?"))))
    colors = method_colors(str(c.get("method", "?")) for c in keyed)
    with _rc():
        fig = _new_figure(6.0, 3.6)
        ax = fig.subplots()
        labelled: set[str] = set()
        drawn = 0
        for card in keyed:
            xs, ys, steps = _curve_points(card)
            if xs.size == 0:
                continue
            method = str(card.get("method", "?"))
            label = None if method in labelled else _label(method)
            labelled.add(method)
            ax.plot(xs, ys * 100.0, "-", marker=".", color=colors[method], label=label, lw=1.2)
            sel = card.get("selected_step")
            if sel is not None:
                hit = [i for i, s in enumerate(steps) if s == sel]
                if hit:
                    ax.plot(xs[hit[0]], ys[hit[0]] * 100.0, "o", mfc="none", ms=9, color=colors[method])
            drawn += 1
        if drawn == 0:
            _empty(fig, ax, "no training curves")
        else:
            ax.set_xlabel("meta-training episodes")
            ax.set_ylabel("validation accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        if title:
            ax.set_title(_label(title))
        fig.tight_layout()
    return _maybe_save(fig, path)


def plot_steps(data: pd.DataFrame, title: str | None = None, path: str | Path | None = None) -> Figure:
    """Accuracy against test-time inner steps: one line (with 95% CI band) per method.

    `data` has columns method, steps, accuracy, ci95 (accuracy and ci95 as fractions); with a
    `benchmark` column, one panel per benchmark.
    """
    missing = [c for c in ("method", "steps", "accuracy", "ci95") if c not in data.columns]
    if missing:
        raise ValueError(f"plot_steps needs columns method, steps, accuracy, ci95; missing {missing}")
    benches = sorted(data["benchmark"].astype(str).unique()) if "benchmark" in data.columns else [None]
    colors = method_colors(data["method"])
    with _rc():
        fig = _new_figure(5.0 * len(benches), 3.6)
        axes = fig.subplots(1, len(benches), squeeze=False).ravel()
        for ax, bench in zip(axes, benches):
            sub = data if bench is None else data[data["benchmark"].astype(str) == bench]
            for method in sorted(sub["method"].astype(str).unique()):
                m = sub[sub["method"].astype(str) == method].sort_values("steps", kind="mergesort")
                x = m["steps"].to_numpy(dtype=float)
                y = m["accuracy"].to_numpy(dtype=float) * 100.0
                e = np.nan_to_num(m["ci95"].to_numpy(dtype=float) * 100.0)
                ax.plot(x, y, "-o", color=colors[method], label=_label(method), ms=4)
                ax.fill_between(x, y - e, y + e, color=colors[method], alpha=0.2, lw=0)
            ax.set_xlabel("test-time inner steps")
            ax.set_ylabel("accuracy (%) ± 95% CI")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            if bench is not None:
                ax.set_title(_label(bench))
            elif title:
                ax.set_title(_label(title))
        fig.tight_layout()
    return _maybe_save(fig, path)


COMPUTE_PANELS = (("fit_seconds", "meta-training time per seed (s)"),
                  ("adapt_seconds", "adaptation time per episode (s)"))
"""plot_compute's default panels: (summary column, x label)."""
FLOP_PANELS = (("train_flops", "meta-training FLOPs per seed"), ("adapt_flops", "FLOPs of one adaptation"))
"""plot_compute's panels of accuracy against FLOPs (columns added by the leaderboard from the run cards)."""


def plot_compute(table: pd.DataFrame, benchmark: str | None = None, path: str | Path | None = None,
                 panels: Sequence[tuple[str, str]] = COMPUTE_PANELS) -> Figure:
    """Accuracy against compute: by default fit seconds (left panel) and adapt seconds per episode (right);
    `panels` names other columns of the table, e.g. FLOP_PANELS.

    `table` is a `stats.summarize` table or a raw result table; `benchmark` restricts it to one
    benchmark (otherwise every benchmark is drawn with its own marker). Log-scaled x axes when all
    values are positive and span more than a factor of 3; one figure legend names the methods (and
    the benchmarks' markers).
    """
    summary = _as_summary(table)
    if benchmark is not None:
        summary = summary[summary["benchmark"] == benchmark]
    colors = method_colors(summary["method"])
    benches = sorted(summary["benchmark"].astype(str).unique())
    markers = "osD^v<>ph*"
    with _rc():
        fig = _new_figure(9.0 if len(benches) < 2 else 10.0, 3.6)
        axes = fig.subplots(1, len(panels), squeeze=False).ravel()
        for ax, (col, xlabel) in zip(axes, panels):
            if summary.empty:
                _empty(fig, ax, "no results")
                continue
            for bi, bench in enumerate(benches):
                sub = summary[summary["benchmark"] == bench].sort_values("method", kind="mergesort")
                for _, row in sub.iterrows():
                    err = float(row["ci95"]) * 100.0 if np.isfinite(row["ci95"]) else 0.0
                    ax.errorbar(float(row[col]), float(row["mean"]) * 100.0, yerr=err,
                                fmt=markers[bi % len(markers)], capsize=2, color=colors[str(row["method"])])
            times = summary[col].to_numpy(dtype=float)
            if (times > 0).all() and times.max() > 3 * times.min():
                ax.set_xscale("log")
            elif _time_limits(times) is not None:
                ax.set_xlim(*_time_limits(times))
            means = summary["mean"].to_numpy(dtype=float) * 100.0
            errs = np.nan_to_num(summary["ci95"].to_numpy(dtype=float) * 100.0)
            ax.set_ylim(*_accuracy_limits(means - errs, means + errs))
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy (%) ± 95% CI")
            ax.grid(alpha=0.3)
        if not summary.empty:  # one legend for both panels: methods by colour, benchmarks by marker
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], color=colors[m], marker="o", ls="", label=_label(m)) for m in sorted(colors)]
            if len(benches) > 1:
                handles += [Line2D([], [], color="0.4", marker=markers[i % len(markers)], ls="", label=_label(b))
                            for i, b in enumerate(benches)]
            fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
        title = benchmark if benchmark is not None else (benches[0] if len(benches) == 1 else None)
        if title is not None:
            fig.suptitle(_label(title))
        fig.tight_layout(rect=(0, 0, 0.8 if not summary.empty else 1, 1))
    return _maybe_save(fig, path)

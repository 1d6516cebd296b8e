"""Tests of bench.plots: every plot returns a figure, saves PNG + SVG, deterministically."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from bench import plots, stats
from bench.results import read_results, write_run


def make_rows(benchmark: str, method: str, seed: int, accs, fit_seconds: float = 10.0,
              adapt_seconds: float = 0.01) -> list[dict]:
    return [{
        "benchmark": benchmark, "benchmark_version": 1, "split": "test", "episode": i,
        "episode_hash": f"h{i:04d}", "method": method, "params_hash": "p0", "seed": seed,
        "code_rev": "abc123", "device": "cpu", "way": 5, "n_support": 1, "n_query": 15,
        "accuracy": float(a), "loss": 1.0, "adapt_seconds": adapt_seconds, "fit_episodes": 100,
        "fit_seconds": fit_seconds,
    } for i, a in enumerate(accs)]


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.9, 30)
    for bench, shift in (("omniglot-5w1s", 0.0), ("miniimagenet-5w5s", -0.2)):
        for method, delta, fit in (("maml", 0.0, 100.0), ("anil", -0.05, 40.0), ("we$ird", -0.1, 5.0)):
            for seed in (0, 1):
                accs = np.clip(base + shift + delta + rng.normal(0, 0.02, base.size), 0, 1)
                write_run(root, make_rows(bench, method, seed, accs, fit_seconds=fit + seed), {})
    return read_results(root)


def _cards() -> list[dict]:
    cards = []
    for method, top in (("maml", 0.8), ("anil", 0.7)):
        for seed in (0, 1):
            curve = [{"step": s, "fit_episodes": s * 4, "fit_seconds": s * 0.1,
                      "val_accuracy": top * (1 - np.exp(-s / 50)) + 0.01 * seed} for s in range(0, 201, 25)]
            cards.append({"method": method, "seed": seed, "curve": curve, "selected_step": 150})
    cards.append({"method": "nocurve", "seed": 0})  # skipped
    return cards


def _check_saved(fig: Figure, path) -> None:
    written = plots.save(fig, path)
    png, svg = written
    assert png.suffix == ".png" and svg.suffix == ".svg"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    text = svg.read_text(encoding="utf-8")
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert "dc:date" not in text


def test_accuracy_plot(frame, tmp_path):
    fig = plots.plot_accuracy(stats.summarize(frame))
    assert isinstance(fig, Figure)
    assert len([ax for ax in fig.axes if ax.axison]) == 2
    _check_saved(fig, tmp_path / "accuracy")
    # a raw table is summarised on the fly, and `path` saves
    plots.plot_accuracy(frame, benchmarks=["omniglot-5w1s"], path=tmp_path / "one.png")
    assert (tmp_path / "one.png").exists() and (tmp_path / "one.svg").exists()


def test_paired_plot(frame, tmp_path):
    fig = plots.plot_paired(frame, "omniglot-5w1s", "maml", n_boot=200)
    assert isinstance(fig, Figure)
    _check_saved(fig, tmp_path / "paired")
    single = frame[frame["method"] == "maml"]
    _check_saved(plots.plot_paired(single, "omniglot-5w1s", "maml"), tmp_path / "single")


def test_curves_plot(tmp_path):
    fig = plots.plot_curves(_cards(), title="omniglot-5w1s")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.get_legend().get_texts()) == 2  # one entry per method, not per seed
    _check_saved(fig, tmp_path / "curves")
    _check_saved(plots.plot_curves([]), tmp_path / "empty")


def test_steps_plot(tmp_path):
    data = pd.DataFrame([{"method": m, "steps": s, "accuracy": 0.5 + 0.02 * s + off, "ci95": 0.01}
                         for m, off in (("maml", 0.0), ("anil", -0.03)) for s in (1, 5, 10, 20)])
    fig = plots.plot_steps(data, title="steps")
    assert isinstance(fig, Figure)
    _check_saved(fig, tmp_path / "steps")
    multi = pd.concat([data.assign(benchmark="a"), data.assign(benchmark="b")])
    assert len(plots.plot_steps(multi).axes) == 2
    with pytest.raises(ValueError, match="ci95"):
        plots.plot_steps(data.drop(columns="ci95"))


def test_compute_plot(frame, tmp_path):
    fig = plots.plot_compute(stats.summarize(frame))
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    assert fig.axes[0].get_xscale() == "log"
    _check_saved(fig, tmp_path / "compute")
    _check_saved(plots.plot_compute(frame, benchmark="omniglot-5w1s"), tmp_path / "compute1")


def test_plots_are_deterministic(frame, tmp_path):
    summary = stats.summarize(frame)
    makers = [
        lambda: plots.plot_accuracy(summary),
        lambda: plots.plot_paired(frame, "omniglot-5w1s", "maml", n_boot=200, seed=3),
        lambda: plots.plot_curves(_cards()),
        lambda: plots.plot_compute(summary),
    ]
    for i, make in enumerate(makers):
        a = plots.save(make(), tmp_path / "a" / f"fig{i}")
        b = plots.save(make(), tmp_path / "b" / f"fig{i}")
        for pa, pb in zip(a, b):
            assert pa.read_bytes() == pb.read_bytes(), pa.name
        assert plots.svg_bytes(make()) == a[1].read_bytes()


def test_method_colors_are_stable():
    c1 = plots.method_colors(["b", "a", "c"])
    c2 = plots.method_colors(["c", "a", "b", "a"])
    assert c1 == c2 and len(c1) == 3


def _one_method(frame):
    return stats.summarize(frame[(frame["method"] == "maml") & (frame["benchmark"] == "omniglot-5w1s")])


def test_one_method_gets_readable_axes(frame):
    summary = _one_method(frame)
    mean = float(summary["mean"].iloc[0]) * 100
    lo, hi = plots.plot_accuracy(summary).axes[0].get_xlim()
    assert lo < mean < hi and 4 <= hi - lo <= 20 and 0 <= lo and hi <= 100
    nan_ci = summary.assign(ci95=float("nan"))  # one episode: no CI, still a readable axis
    lo, hi = plots.plot_accuracy(nan_ci).axes[0].get_xlim()
    assert hi - lo >= 4
    fig = plots.plot_compute(summary)
    for ax, col in zip(fig.axes, ("fit_seconds", "adapt_seconds")):
        x = float(summary[col].iloc[0])
        lo, hi = ax.get_xlim()
        assert lo <= 0 < x < hi <= 2 * x + 1e-12  # 0 to twice the one time, not a sliver around it
        lo, hi = ax.get_ylim()
        assert lo < mean < hi and hi - lo >= 4
        fig.canvas.draw()
        assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""


def test_every_multi_series_plot_has_a_legend(frame):
    summary = stats.summarize(frame)
    methods = {"maml", "anil", r"we\$ird"}
    compute = plots.plot_compute(summary)  # methods by colour, benchmarks by marker, for both panels
    (legend,) = compute.legends
    labels = {t.get_text() for t in legend.get_texts()}
    assert labels == methods | {"omniglot-5w1s", "miniimagenet-5w5s"}
    one = plots.plot_compute(summary, benchmark="omniglot-5w1s")
    assert {t.get_text() for t in one.legends[0].get_texts()} == methods
    curves = plots.plot_curves(_cards())
    assert {t.get_text() for t in curves.axes[0].get_legend().get_texts()} == {"maml", "anil"}
    steps = pd.DataFrame([{"method": m, "steps": s, "accuracy": 0.5, "ci95": 0.01} for m in ("a", "b") for s in (1, 5)])
    assert {t.get_text() for t in plots.plot_steps(steps).axes[0].get_legend().get_texts()} == {"a", "b"}
    # one series per method on a categorical axis: the methods name the axis itself
    acc = plots.plot_accuracy(summary, benchmarks=["omniglot-5w1s"])
    assert {t.get_text() for t in acc.axes[0].get_yticklabels()} == methods

"""The leaderboard's Meta-Dataset section: per regime, methods x 10 sources, Meta-Dataset-style ties and
average rank; the published numbers of the shared published_results.csv as reference rows apart."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import stats
from bench.benchmarks import get_benchmark
from bench.results import write_run
from leaderboard import build_site
from leaderboard.build import published_as_reference, read_reference

N = 600


def test_md_ranks_share_the_mean_position_of_a_tie():
    summary = pd.DataFrame({"benchmark": ["s"] * 4 + ["t"] * 2, "method": ["a", "b", "c", "d", "a", "b"],
                            "mean": [0.60, 0.59, 0.50, 0.58, 0.7, 0.5], "ci95": [0.01] * 6})
    r = stats.md_ranks(summary, ["s", "t"]).set_index(["benchmark", "method"])["rank"]
    # b and d are within sqrt(0.01^2 + 0.01^2) of a? b (0.01) yes, d (0.02) no: group {a, b} -> 1.5
    assert r[("s", "a")] == r[("s", "b")] == 1.5 and r[("s", "d")] == 3 and r[("s", "c")] == 4
    assert r[("t", "a")] == 1 and r[("t", "b")] == 2
    three = pd.DataFrame({"benchmark": ["s"] * 3, "method": ["a", "b", "c"], "mean": [0.6, 0.6, 0.6],
                          "ci95": [0.01] * 3})
    assert stats.md_ranks(three, ["s"])["rank"].tolist() == [2.0, 2.0, 2.0]


def _rows(bench: str, method: str, seed: int, accs: np.ndarray) -> list[dict]:
    return [{"benchmark": bench, "benchmark_version": 1, "split": "test", "episode": i,
             "episode_hash": f"{bench}-{i}", "method": method, "params_hash": "p", "seed": seed, "code_rev": "r",
             "device": "cpu", "way": 5, "n_support": 10, "n_query": 50, "accuracy": float(a), "loss": 1.0,
             "adapt_seconds": 0.01, "fit_episodes": 10, "fit_seconds": 1.0} for i, a in enumerate(accs)]


@pytest.fixture(scope="module")
def md_results(tmp_path_factory) -> Path:
    """md-imagenet's ten sources: "best" ahead everywhere, "close" within the CI of best on the first five
    sources only, "worse" far behind; 3 seeds x 600 episodes each."""
    root = tmp_path_factory.mktemp("md-results")
    rng = np.random.default_rng(1)
    for k, bench in enumerate(get_benchmark("md-imagenet").members):
        base = rng.uniform(0.3, 0.8, N)
        for method, shift in (("best", 0.0), ("close", -0.005 if k < 5 else -0.2), ("worse", -0.25)):
            for seed in range(3):
                write_run(root, _rows(bench, method, seed, np.clip(base + shift, 0, 1)),
                          {"method": method, "benchmark": bench, "seed": seed, "suite": "md-imagenet"})
    return root


def _section(html: str, ident: str) -> str:
    m = re.search(rf'<table id="{ident}".*?</table>', html, re.S)
    assert m, ident
    return m.group(0)


def test_meta_dataset_section(md_results, shared_data, tmp_path):
    index = build_site([md_results], tmp_path / "site", shared_data / "published_results.csv")
    html = index.read_text()
    table = _section(html, "md-table-md-imagenet")
    heads = re.findall(r'data-key="bench:([^"]+)"', table)
    assert heads == list(get_benchmark("md-imagenet").members)
    assert ">ILSVRC</th>" in table and ">Traffic Signs</th>" in table
    rows = {m: row for m, row in re.findall(r'<tr data-method="([^"]+)">(.*?)</tr>', table, re.S)}
    assert list(rows) == ["best", "close", "worse"]  # by average rank
    assert rows["best"].count('data-rank="1.5"') == 5 and rows["best"].count('data-rank="1"') == 5
    assert rows["close"].count('data-rank="1.5"') == 5 and rows["close"].count('data-rank="2"') == 5
    assert rows["worse"].count('data-rank="3"') == 10
    avg = lambda m: re.findall(r'<td data-value="[^"]*">([0-9.]+)</td>\s*$', rows[m].strip())[0]  # noqa: E731
    assert (avg("best"), avg("close"), avg("worse")) == ("1.25", "1.75", "3.00")
    # published rows: apart, per regime, never in the measured table
    ref = _section(html, "md-reference-md-imagenet")
    assert "fo-MAML" in ref and "45.51" in ref and "fo-Proto-MAML" in ref and "Prototypical Networks" in ref
    assert "fo-MAML" not in table and "published" not in table
    all_ref = _section(html, "md-reference-md-all")  # the all-datasets regime: reference rows only
    assert "37.83" in all_ref and "45.51" not in all_ref
    assert "No measured results for this regime yet" in html
    main_ref = _section(html, "reference")
    assert "MD/" not in main_ref and "45.51" not in main_ref and "miniimagenet-5w1s" in main_ref


def test_published_results_as_reference_rows(shared_data):
    ref = read_reference(shared_data / "published_results.csv")
    fo = ref[(ref["method"] == "fo-MAML") & ref["benchmark"].str.startswith("md-")]
    assert len(fo) == 20 and set(fo["benchmark"]) == set(get_benchmark("md-imagenet").members) | set(
        get_benchmark("md-all").members)
    row = fo[fo["benchmark"] == "md-all-vgg-flower"].iloc[0]
    assert row["accuracy"] == pytest.approx(0.7994) and row["ci95"] == pytest.approx(0.0084)
    assert "Meta-Dataset (ICLR20)" in row["citation"]
    table = pd.DataFrame([{"method": "x", "dataset": "MD/Nowhere [all]", "ways": "var", "shots": "var",
                           "accuracy": 50, "ci95": "1 (over 3 seeds)", "source": "s"},
                          {"method": "y", "dataset": "Omniglot", "ways": "5", "shots": "1", "accuracy": 98.0,
                           "ci95": "0.7 (over 3 seeds)", "source": "t"}])
    out = published_as_reference(table)
    assert out["benchmark"].tolist() == ["omniglot-5w1s"] and out["ci95"].tolist() == [0.7]

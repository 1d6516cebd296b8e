"""Tests of bench.stats: CI formula, seed spread, paired comparisons, tie-aware ranks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sstats

from bench import stats
from bench.errors import ResultsError
from bench.results import COLUMNS, read_results, write_run


def make_rows(benchmark: str, method: str, seed: int, accs, hashes=None, fit_seconds: float = 10.0,
              adapt_seconds: float = 0.01) -> list[dict]:
    """Result rows of one synthetic run (episode i has hash `h<i>` unless `hashes` is given)."""
    return [{
        "benchmark": benchmark, "benchmark_version": 1, "split": "test", "episode": i,
        "episode_hash": hashes[i] if hashes is not None else f"h{i:04d}", "method": method,
        "params_hash": "p0", "seed": seed, "code_rev": "abc123", "device": "cpu", "way": 5,
        "n_support": 1, "n_query": 15, "accuracy": float(a), "loss": 1.0,
        "adapt_seconds": adapt_seconds, "fit_episodes": 100, "fit_seconds": fit_seconds,
    } for i, a in enumerate(accs)]


def frame_of(*runs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([r for rows in runs for r in rows], columns=COLUMNS)


ACC = np.array([0.2, 0.4, 0.4, 0.6, 0.8, 1.0, 0.6, 0.4, 0.8, 0.6])


def test_ci_formula_single_seed(tmp_path):
    write_run(tmp_path, make_rows("b1", "m", 0, ACC), {"method": "m"})
    frame = read_results(tmp_path)
    s = stats.summarize(frame)
    assert list(s.columns) == stats.SUMMARY_COLUMNS
    row = s.iloc[0]
    assert row["mean"] == pytest.approx(ACC.mean())
    assert row["ci95"] == pytest.approx(1.96 * ACC.std(ddof=1) / math.sqrt(ACC.size))
    assert row["n_episodes"] == 10 and row["n_seeds"] == 1
    assert row["seed_mean"] == pytest.approx(ACC.mean())
    assert math.isnan(row["seed_sd"])
    assert row["adapt_seconds"] == pytest.approx(0.01)
    assert row["fit_seconds"] == pytest.approx(10.0)


def test_seed_spread_and_ci_over_seed_averaged_episodes():
    acc1 = ACC
    acc2 = np.clip(ACC[::-1] * 0.5 + 0.2, 0, 1)
    frame = frame_of(make_rows("b1", "m", 0, acc1, fit_seconds=10.0),
                     make_rows("b1", "m", 1, acc2, fit_seconds=20.0))
    row = stats.summarize(frame).iloc[0]
    per_episode = (acc1 + acc2) / 2
    assert row["mean"] == pytest.approx(np.concatenate([acc1, acc2]).mean())
    assert row["ci95"] == pytest.approx(1.96 * per_episode.std(ddof=1) / math.sqrt(10))
    assert row["n_episodes"] == 10 and row["n_seeds"] == 2
    seed_means = np.array([acc1.mean(), acc2.mean()])
    assert row["seed_mean"] == pytest.approx(seed_means.mean())
    assert row["seed_sd"] == pytest.approx(seed_means.std(ddof=1))
    assert row["fit_seconds"] == pytest.approx(15.0)


def test_summarize_is_per_benchmark_and_method():
    frame = frame_of(make_rows("b1", "x", 0, ACC), make_rows("b1", "y", 0, ACC * 0.5),
                     make_rows("b2", "x", 0, ACC[:5]))
    s = stats.summarize(frame)
    assert list(zip(s["benchmark"], s["method"])) == [("b1", "x"), ("b1", "y"), ("b2", "x")]
    assert s.iloc[2]["n_episodes"] == 5


def test_seeds_disagreeing_on_hash_raise():
    hashes = [f"h{i:04d}" for i in range(10)]
    hashes[2] = "other"
    frame = frame_of(make_rows("b1", "m", 0, ACC), make_rows("b1", "m", 1, ACC, hashes=hashes))
    with pytest.raises(ResultsError, match="episode 2"):
        stats.summarize(frame)


def test_paired_difference_and_wilcoxon():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.4, 0.9, 60)
    b = np.clip(a - rng.normal(0.05, 0.05, 60), 0, 1)
    frame = frame_of(make_rows("b1", "a", 0, a), make_rows("b1", "b", 0, b))
    r = stats.paired(frame, "b1", "a", "b")
    d = a - b
    assert r.n == 60
    assert r.diff == pytest.approx(d.mean())
    assert r.p_value == pytest.approx(sstats.wilcoxon(d).pvalue)
    assert r.p_value < 0.001
    assert r.ci_low < r.diff < r.ci_high
    assert (r.a, r.b, r.benchmark) == ("a", "b", "b1")
    reverse = stats.paired(frame, "b1", "b", "a")
    assert reverse.diff == pytest.approx(-r.diff)
    assert reverse.p_value == pytest.approx(r.p_value)


def test_paired_averages_over_seeds():
    frame = frame_of(make_rows("b1", "a", 0, ACC), make_rows("b1", "a", 1, ACC * 0.5),
                     make_rows("b1", "b", 0, ACC * 0.25))
    r = stats.paired(frame, "b1", "a", "b", n_boot=0)
    assert r.diff == pytest.approx((0.75 * ACC - 0.25 * ACC).mean())
    assert math.isnan(r.ci_low) and math.isnan(r.ci_high)


def test_paired_all_zero_differences_give_p_one():
    frame = frame_of(make_rows("b1", "a", 0, ACC), make_rows("b1", "b", 0, ACC))
    r = stats.paired(frame, "b1", "a", "b")
    assert r.p_value == 1.0
    assert r.diff == 0.0 and r.ci_low == 0.0 and r.ci_high == 0.0


def test_paired_requires_matching_hashes(tmp_path):
    hashes = [f"h{i:04d}" for i in range(10)]
    hashes[3] = "different"
    frame = frame_of(make_rows("b1", "a", 0, ACC), make_rows("b1", "b", 0, ACC, hashes=hashes))
    with pytest.raises(ResultsError, match="episode 3"):
        stats.paired(frame, "b1", "a", "b")
    # read_results rejects such files too
    write_run(tmp_path, make_rows("b1", "a", 0, ACC), {})
    write_run(tmp_path, make_rows("b1", "b", 0, ACC, hashes=hashes), {})
    with pytest.raises(ResultsError):
        read_results(tmp_path)


def test_paired_matches_by_episode_index():
    # b has the episodes in another order and one fewer: pairing is by index, not by row
    rows_b = make_rows("b1", "b", 0, ACC * 0.5)[::-1][:-1]
    frame = frame_of(make_rows("b1", "a", 0, ACC), rows_b)
    r = stats.paired(frame, "b1", "a", "b", n_boot=0)
    assert r.n == 9
    assert r.diff == pytest.approx((ACC[1:] * 0.5).mean())


def test_paired_unknown_method_or_no_shared_episode():
    frame = frame_of(make_rows("b1", "a", 0, ACC))
    with pytest.raises(ResultsError, match="zzz"):
        stats.paired(frame, "b1", "a", "zzz")
    frame = frame_of(make_rows("b1", "a", 0, ACC[:3]), make_rows("b1", "b", 0, ACC)[5:])
    with pytest.raises(ResultsError, match="share no test episode"):
        stats.paired(frame, "b1", "a", "b")


def test_bootstrap_is_deterministic():
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, 40)
    b = rng.uniform(0, 1, 40)
    frame = frame_of(make_rows("b1", "a", 0, a), make_rows("b1", "b", 0, b))
    r1 = stats.paired(frame, "b1", "a", "b", n_boot=500, seed=7)
    r2 = stats.paired(frame, "b1", "a", "b", n_boot=500, seed=7)
    r3 = stats.paired(frame, "b1", "a", "b", n_boot=500, seed=8)
    assert (r1.ci_low, r1.ci_high) == (r2.ci_low, r2.ci_high)
    assert (r1.ci_low, r1.ci_high) != (r3.ci_low, r3.ci_high)
    # the global numpy state plays no part
    np.random.seed(0)
    r4 = stats.paired(frame, "b1", "a", "b", n_boot=500, seed=7)
    assert (r4.ci_low, r4.ci_high) == (r1.ci_low, r1.ci_high)


def _tie_example() -> pd.DataFrame:
    """best and twin: practically identical (p high); worse: clearly worse (p tiny)."""
    rng = np.random.default_rng(0)
    n = 40
    best = rng.uniform(0.5, 0.9, n)
    noise = np.tile([0.02, -0.02], n // 2)
    noise[0] = 0.04  # best is slightly ahead on average, but not significantly
    twin = best - noise
    worse = best - 0.2
    return frame_of(make_rows("b1", "best", 0, best), make_rows("b1", "twin", 0, twin),
                    make_rows("b1", "worse", 0, worse))


def test_ranks_share_rank_one_and_skip():
    frame = _tie_example()
    assert stats.paired(frame, "b1", "best", "twin").p_value > 0.5
    r = stats.ranks(frame)
    assert list(r.columns) == stats.RANK_COLUMNS
    got = dict(zip(r["method"], r["rank"]))
    assert got == {"best": 1, "twin": 1, "worse": 3}
    assert dict(zip(r["method"], r["tied_with_best"])) == {"best": True, "twin": True, "worse": False}
    assert dict(zip(r["method"], r["leader"])) == {"best": "best", "twin": "best", "worse": "worse"}


def test_ranks_next_group_ties_with_its_own_leader():
    rng = np.random.default_rng(5)
    n = 40
    top = rng.uniform(0.6, 0.9, n)
    second = top - 0.15
    noise = np.tile([0.02, -0.02], n // 2)
    noise[0] = 0.04
    third = second - noise
    frame = frame_of(make_rows("b1", "top", 0, top), make_rows("b1", "second", 0, second),
                     make_rows("b1", "third", 0, third))
    got = dict(zip(*[stats.ranks(frame)[c] for c in ("method", "rank")]))
    assert got == {"top": 1, "second": 2, "third": 2}


def test_ranks_alpha_controls_ties():
    frame = _tie_example()
    # with alpha above every p-value nothing ties: ranks 1, 2, 3
    got = dict(zip(*[stats.ranks(frame, alpha=1.01)[c] for c in ("method", "rank")]))
    assert got == {"best": 1, "twin": 2, "worse": 3}


def test_average_rank_with_missing_benchmark():
    f1 = _tie_example()
    rng = np.random.default_rng(9)
    base = rng.uniform(0.3, 0.7, 30)
    f2 = frame_of(make_rows("b2", "worse", 0, base + 0.2), make_rows("b2", "best", 0, base))
    frame = pd.concat([f1, f2], ignore_index=True)
    r = stats.ranks(frame)
    avg = stats.average_rank(r).set_index("method")
    assert avg.loc["best", "average_rank"] == pytest.approx((1 + 2) / 2)
    assert avg.loc["worse", "average_rank"] == pytest.approx((3 + 1) / 2)
    assert avg.loc["twin", "average_rank"] == pytest.approx(1.0)
    assert avg.loc["twin", "n_benchmarks"] == 1 and avg.loc["twin", "n_missing"] == 1
    assert avg.loc["best", "n_benchmarks"] == 2 and avg.loc["best", "n_missing"] == 0
    # a raw frame is ranked on the fly; a suite restricts the benchmarks
    assert stats.average_rank(frame).equals(stats.average_rank(r))
    only_b2 = stats.average_rank(r, benchmarks=["b2"]).set_index("method")
    assert set(only_b2.index) == {"best", "worse"}
    assert only_b2.loc["worse", "average_rank"] == 1.0


def test_pairwise_lists_every_pair_best_first():
    frame = _tie_example()
    pw = stats.pairwise(frame, "b1", n_boot=200)
    assert list(pw.columns) == stats.PAIR_COLUMNS
    assert list(zip(pw["a"], pw["b"])) == [("best", "twin"), ("best", "worse"), ("twin", "worse")]
    assert (pw["diff"] > 0).all()


def test_compare_pairs_two_methods_on_every_shared_benchmark():
    rng = np.random.default_rng(4)
    base = rng.uniform(0.3, 0.8, 30)
    frame = frame_of(make_rows("b1", "a", 0, base + 0.05), make_rows("b1", "b", 0, base),
                     make_rows("b2", "a", 0, base), make_rows("b2", "b", 0, base + 0.02),
                     make_rows("b3", "a", 0, base))
    table = stats.compare(frame, "a", "b", n_boot=200)
    assert list(table.columns) == stats.PAIR_COLUMNS and table["benchmark"].tolist() == ["b1", "b2"]
    assert table["diff"].tolist() == pytest.approx([0.05, -0.02])
    assert table.iloc[0].to_dict() == pytest.approx(stats.paired(frame, "b1", "a", "b", n_boot=200).as_dict())
    assert stats.compare(frame, "a", "b", "b2", n_boot=200)["benchmark"].tolist() == ["b2"]
    with pytest.raises(ResultsError, match="no results of method 'c' \\(methods: a, b\\)"):
        stats.compare(frame, "a", "c")
    with pytest.raises(ResultsError, match="no results of method 'b' on b3"):
        stats.compare(frame, "a", "b", "b3")
    with pytest.raises(ResultsError, match="no results on benchmark 'b9'"):
        stats.compare(frame, "a", "b", "b9")

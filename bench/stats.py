"""Statistics over result tables: per-method summaries, paired comparisons, tie-aware ranks.

Conventions (see DESIGN.md, "Statistics, plots, leaderboard"):

- Accuracy is a fraction in [0, 1]; one row of a result table is one (run, test episode).
- The 95% confidence interval of a method's mean is over test episodes: 1.96 * sd / sqrt(n),
  where, for several training seeds, the per-episode accuracy is first averaged over the seeds
  and n is the number of distinct episodes. The spread over training seeds (mean +- sd of the
  per-seed means) is reported separately.
- Methods are compared on identical episodes (same index and same episode hash): paired
  bootstrap CI of the mean difference and Wilcoxon signed-rank test.
- Ranks follow the Meta-Dataset leaderboard: methods not significantly different from the best
  share its rank, and the next group's rank is 1 + the number of methods already ranked.

Every function takes a table with (at least) the columns of `bench.results.COLUMNS` as returned by
`bench.results.read_results`. Nothing here uses a module-level random state.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Iterable

import numpy as np
import pandas as pd
from scipy import stats as _sstats

from bench.errors import ResultsError

Z95 = 1.96
"""The normal quantile used for the 95% confidence intervals over episodes."""

SUMMARY_COLUMNS = [
    "benchmark", "method", "mean", "ci95", "n_episodes", "n_seeds", "seed_mean", "seed_sd",
    "adapt_seconds", "fit_seconds",
]
RANK_COLUMNS = ["benchmark", "method", "mean", "rank", "tied_with_best", "leader", "p_vs_leader"]
PAIR_COLUMNS = ["benchmark", "a", "b", "diff", "ci_low", "ci_high", "p_value", "n"]


def _require(frame: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ResultsError(f"result table lacks column(s) {missing}")
    if frame.empty:
        raise ResultsError("result table is empty")


def per_episode(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (benchmark, method, episode): accuracy averaged over seeds, the episode hash, seed count.

    Raises ResultsError when the seeds of one method disagree on an episode's hash.
    Returns columns benchmark, method, episode, episode_hash, accuracy, n_seeds, sorted.
    """
    _require(frame, ["benchmark", "method", "episode", "episode_hash", "accuracy", "seed"])
    keys = ["benchmark", "method", "episode"]
    grouped = frame.groupby(keys, sort=True)
    n_hashes = grouped["episode_hash"].nunique()
    if (n_hashes > 1).any():
        bench, method, ep = n_hashes[n_hashes > 1].index[0]
        raise ResultsError(f"{bench}/{method}: the seeds disagree on the hash of episode {ep} "
                           "(not the same test episodes)")
    out = grouped.agg(episode_hash=("episode_hash", "first"), accuracy=("accuracy", "mean"),
                      n_seeds=("seed", "nunique")).reset_index()
    return out.sort_values(keys, kind="mergesort").reset_index(drop=True)


def ci95(values: np.ndarray) -> float:
    """95% CI half-width of the mean of `values`: 1.96 * sd / sqrt(n) (sample sd; NaN when n < 2)."""
    values = np.asarray(values, dtype=float)
    n = values.size
    if n < 2:
        return float("nan")
    return float(Z95 * values.std(ddof=1) / math.sqrt(n))


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (benchmark, method): accuracy with its 95% CI over episodes, the seed spread, timings.

    Columns (`SUMMARY_COLUMNS`), one row per (benchmark, method), sorted by benchmark, method:

    - mean: mean accuracy over all test episodes of all seeds (all rows);
    - ci95: 1.96 * sd / sqrt(n) of the per-episode accuracy averaged over seeds, n = number of
      distinct episodes (NaN for a single episode);
    - n_episodes, n_seeds;
    - seed_mean, seed_sd: mean and sample sd of the per-seed mean accuracies (sd NaN for one seed);
    - adapt_seconds: mean over rows; fit_seconds: mean over seeds of each run's fit time.
    """
    _require(frame, ["benchmark", "method", "episode", "episode_hash", "accuracy", "seed",
                     "adapt_seconds", "fit_seconds"])
    episodes = per_episode(frame)
    rows = []
    for (bench, method), group in frame.groupby(["benchmark", "method"], sort=True):
        eps = episodes[(episodes["benchmark"] == bench) & (episodes["method"] == method)]
        per_seed = group.groupby("seed", sort=True)
        seed_means = per_seed["accuracy"].mean().to_numpy(dtype=float)
        fit = per_seed["fit_seconds"].mean().to_numpy(dtype=float)
        rows.append({
            "benchmark": str(bench),
            "method": str(method),
            "mean": float(group["accuracy"].mean()),
            "ci95": ci95(eps["accuracy"].to_numpy()),
            "n_episodes": int(len(eps)),
            "n_seeds": int(seed_means.size),
            "seed_mean": float(seed_means.mean()),
            "seed_sd": float(seed_means.std(ddof=1)) if seed_means.size > 1 else float("nan"),
            "adapt_seconds": float(group["adapt_seconds"].mean()),
            "fit_seconds": float(fit.mean()),
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


@dataclass(frozen=True)
class Paired:
    """Result of `paired`: the difference a - b of mean accuracy on identical episodes."""

    benchmark: str
    a: str
    b: str
    diff: float
    """mean over episodes of accuracy(a) - accuracy(b) (each averaged over seeds)"""
    ci_low: float
    """lower end of the paired bootstrap 95% CI of `diff` (NaN when n_boot == 0)"""
    ci_high: float
    """upper end of the paired bootstrap 95% CI of `diff` (NaN when n_boot == 0)"""
    p_value: float
    """two-sided Wilcoxon signed-rank p-value (1.0 when every difference is zero)"""
    n: int
    """number of paired episodes"""

    def as_dict(self) -> dict:
        """The fields as a plain dict (keys `PAIR_COLUMNS`)."""
        return asdict(self)


def paired_differences(frame: pd.DataFrame, benchmark: str, a: str, b: str) -> np.ndarray:
    """Per-episode accuracy(a) - accuracy(b) on `benchmark`, episodes matched by index and hash.

    Each method's accuracy is first averaged over its seeds. Only the episodes both methods have
    are used. Raises ResultsError when either method has no rows on the benchmark, they share no
    episode, or a shared episode index has different hashes (not the same test episodes).
    """
    _require(frame, ["benchmark", "method", "episode", "episode_hash", "accuracy", "seed"])
    sub = frame[frame["benchmark"] == benchmark]
    for m in (a, b):
        if not (sub["method"] == m).any():
            raise ResultsError(f"no results for method {m!r} on benchmark {benchmark!r}")
    eps = per_episode(sub[sub["method"].isin([a, b])])
    cols = ["episode", "episode_hash", "accuracy"]
    joined = pd.merge(eps.loc[eps["method"] == a, cols], eps.loc[eps["method"] == b, cols], on="episode",
                      how="inner", suffixes=("_a", "_b")).sort_values("episode").set_index("episode")
    if joined.empty:
        raise ResultsError(f"{benchmark}: methods {a!r} and {b!r} share no test episode")
    bad = joined["episode_hash_a"] != joined["episode_hash_b"]
    if bad.any():
        ep = int(joined.index[bad.to_numpy()][0])
        raise ResultsError(f"{benchmark}: episode {ep} has hash {joined['episode_hash_a'][ep]} for {a!r} "
                           f"but {joined['episode_hash_b'][ep]} for {b!r} (not the same test episodes)")
    return (joined["accuracy_a"] - joined["accuracy_b"]).to_numpy(dtype=float)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zeros dropped).

    Returns 1.0 when every difference is zero (no evidence of any difference).
    """
    diffs = np.asarray(diffs, dtype=float)
    if diffs.size == 0 or not np.any(diffs != 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = _sstats.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue
    p = float(p)
    return 1.0 if math.isnan(p) else min(1.0, p)


def bootstrap_ci(diffs: np.ndarray, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `diffs` (resampling episodes with replacement).

    Deterministic: draws come from `np.random.default_rng(seed)` only.
    """
    diffs = np.asarray(diffs, dtype=float)
    if n_boot <= 0 or diffs.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n = diffs.size
    means = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // n))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diffs[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def paired(frame: pd.DataFrame, benchmark: str, a: str, b: str, n_boot: int = 2000,
           seed: int = 0) -> Paired:
    """Paired comparison of methods `a` and `b` on identical test episodes of `benchmark`.

    Episodes are matched by index and must have equal episode hashes (else ResultsError); each
    method's per-episode accuracy is averaged over its seeds. Returns the mean difference a - b,
    its paired bootstrap 95% CI (`n_boot` resamples drawn from `np.random.default_rng(seed)`),
    the Wilcoxon signed-rank p-value (1.0 when all differences are zero) and the number of
    paired episodes.
    """
    d = paired_differences(frame, benchmark, a, b)
    low, high = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    return Paired(benchmark=str(benchmark), a=str(a), b=str(b), diff=float(d.mean()), ci_low=low,
                  ci_high=high, p_value=wilcoxon_p(d), n=int(d.size))


def compare(frame: pd.DataFrame, a: str, b: str, benchmark: str | None = None, n_boot: int = 2000,
            seed: int = 0) -> pd.DataFrame:
    """`paired(a, b)` on `benchmark`, or on every benchmark both methods have (sorted): columns PAIR_COLUMNS.

    Raises ResultsError naming the known methods when `a` or `b` has no results (on `benchmark`),
    and when the two share no benchmark.
    """
    _require(frame, ["benchmark", "method"])
    sub = frame if benchmark is None else frame[frame["benchmark"] == benchmark]
    if benchmark is not None and sub.empty:
        raise ResultsError(f"no results on benchmark {benchmark!r} (benchmarks: "
                           f"{', '.join(sorted(frame['benchmark'].astype(str).unique()))})")
    for m in (a, b):
        if not (sub["method"] == m).any():
            where = f" on {benchmark}" if benchmark else ""
            raise ResultsError(f"no results of method {m!r}{where} (methods: "
                               f"{', '.join(sorted(sub['method'].astype(str).unique()))})")
    shared = sorted(set(sub.loc[sub["method"] == a, "benchmark"]) & set(sub.loc[sub["method"] == b, "benchmark"]))
    if not shared:
        raise ResultsError(f"methods {a!r} and {b!r} share no benchmark")
    rows = [paired(sub, bench, a, b, n_boot=n_boot, seed=seed).as_dict() for bench in shared]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def method_order(frame: pd.DataFrame, benchmark: str) -> list[str]:
    """Methods on `benchmark` by mean accuracy, best first (ties broken by name)."""
    sub = frame[frame["benchmark"] == benchmark]
    means = sub.groupby("method")["accuracy"].mean()
    return sorted(means.index.astype(str), key=lambda m: (-float(means[m]), m))


def pairwise(frame: pd.DataFrame, benchmark: str, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Every pair of methods on `benchmark` (a before b in `method_order`): `paired(a, b)` rows.

    Columns `PAIR_COLUMNS`. Every pair uses the same bootstrap seed, so the table is deterministic.
    """
    order = method_order(frame, benchmark)
    rows = [paired(frame, benchmark, a, b, n_boot=n_boot, seed=seed).as_dict()
            for a, b in combinations(order, 2)]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def ranks(frame: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Tie-aware ranks per benchmark (the Meta-Dataset leaderboard convention).

    Per benchmark, methods are sorted by mean accuracy. The best one gets rank 1 and so does every
    remaining method whose paired Wilcoxon test against it gives p >= `alpha`; they are removed,
    and the best of the rest (the next "leader") gets rank 1 + the number already ranked, shared
    likewise with the methods not significantly different from it; and so on.

    Columns `RANK_COLUMNS`: benchmark, method, mean, rank (int), tied_with_best (rank == 1),
    leader (the method whose group this one joined), p_vs_leader (NaN for the leader itself).
    Rows sorted by benchmark, rank, then mean descending, then method.
    """
    _require(frame, ["benchmark", "method", "episode", "episode_hash", "accuracy", "seed"])
    rows = []
    for bench in sorted(frame["benchmark"].astype(str).unique()):
        sub = frame[frame["benchmark"] == bench]
        means = sub.groupby("method")["accuracy"].mean()
        remaining = method_order(sub, bench)
        ranked = 0
        while remaining:
            leader = remaining[0]
            group = [(leader, float("nan"))]
            for other in remaining[1:]:
                p = wilcoxon_p(paired_differences(sub, bench, leader, other))
                if p >= alpha:
                    group.append((other, p))
            rank = ranked + 1
            for method, p in group:
                rows.append({"benchmark": bench, "method": method, "mean": float(means[method]),
                             "rank": rank, "tied_with_best": rank == 1, "leader": leader,
                             "p_vs_leader": p})
            ranked += len(group)
            members = {m for m, _ in group}
            remaining = [m for m in remaining if m not in members]
    out = pd.DataFrame(rows, columns=RANK_COLUMNS)
    if not out.empty:
        out["rank"] = out["rank"].astype("int64")
        out["tied_with_best"] = out["tied_with_best"].astype(bool)
    return out


def average_rank(rank_table: pd.DataFrame, benchmarks: Iterable[str] | None = None,
                 alpha: float = 0.05) -> pd.DataFrame:
    """Average rank of each method across the benchmarks of a suite.

    `rank_table` is the output of `ranks` (a raw result table is also accepted and ranked with
    `alpha`). `benchmarks` is the suite (default: every benchmark in the table). A method missing
    on a benchmark is averaged over the benchmarks it has; the counts are reported.

    Columns: method, average_rank, n_benchmarks (benchmarks averaged over), n_missing (suite
    benchmarks without results for this method). Sorted by average_rank, then method.
    """
    if "rank" not in rank_table.columns:
        rank_table = ranks(rank_table, alpha=alpha)
    suite = sorted(set(rank_table["benchmark"].astype(str))) if benchmarks is None else sorted(set(benchmarks))
    sub = rank_table[rank_table["benchmark"].isin(suite)]
    rows = []
    for method, group in sub.groupby("method", sort=True):
        rows.append({"method": str(method), "average_rank": float(group["rank"].mean()),
                     "n_benchmarks": int(group["benchmark"].nunique()),
                     "n_missing": int(len(suite) - group["benchmark"].nunique())})
    out = pd.DataFrame(rows, columns=["method", "average_rank", "n_benchmarks", "n_missing"])
    return out.sort_values(["average_rank", "method"], kind="mergesort").reset_index(drop=True)


def md_ranks(summary: pd.DataFrame, benchmarks: Iterable[str]) -> pd.DataFrame:
    """Meta-Dataset-style ranks per benchmark (source) from summary rows (benchmark, method, mean, ci95).

    Per benchmark, methods sorted by mean; the best one and every remaining method not significantly
    different from it (|mean difference| <= sqrt(ci95_a^2 + ci95_b^2), i.e. 1.96 * sqrt(sd_a^2/n_a +
    sd_b^2/n_b)) form a tie group; a group of t methods after r already ranked shares rank
    r + 1 + (t - 1) / 2; the rest are ranked likewise. Columns: benchmark, method, mean, ci95,
    rank (float). `benchmarks` restricts the table (a regime's ten sources).
    """
    rows: list[dict] = []
    if summary.empty:  # nothing ranked (yet) in this regime
        return pd.DataFrame(rows, columns=["benchmark", "method", "mean", "ci95", "rank"])
    _require(summary, ["benchmark", "method", "mean", "ci95"])
    for bench in sorted(set(benchmarks)):
        sub = summary[summary["benchmark"] == bench].sort_values(["mean", "method"], ascending=[False, True])
        remaining = [(str(r["method"]), float(r["mean"]), float(r["ci95"]) if r["ci95"] == r["ci95"] else 0.0)
                     for _, r in sub.iterrows()]
        ranked = 0
        while remaining:
            lead = remaining[0]
            group = [m for m in remaining if abs(lead[1] - m[1]) <= math.hypot(lead[2], m[2])]
            rank = ranked + 1 + (len(group) - 1) / 2
            rows += [{"benchmark": bench, "method": m[0], "mean": m[1], "ci95": m[2], "rank": rank} for m in group]
            ranked += len(group)
            remaining = [m for m in remaining if m not in group]
    return pd.DataFrame(rows, columns=["benchmark", "method", "mean", "ci95", "rank"])

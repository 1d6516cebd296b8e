"""metabench harness: sources, sampling, benchmarks, runs, results, statistics, plots, CLI.

The public surface for use from Python (README, "From Python"):

    import bench

    es = bench.load_benchmark("synthetic-5w1s")                  # its episodes (bench.protocols.EpisodeSet)
    for ep in bench.episodes("synthetic-5w1s", "test", n=3):     # bench.api.Episode: tensors
        ep.support_x, ep.support_y, ep.query_x, ep.query_y       # [n, C, H, W] float32 in [0, 1]; int64 labels
    learner = bench.make_method("fomaml", "synthetic-5w1s", hidden=8)   # preset + overrides, set up
    learner.fit(es.stream("train"), 10)                          # 10 outer steps
    scores = bench.evaluate(learner, "synthetic-5w1s", n=50)     # pandas: one row per test episode
    results = bench.read_results("results/")                     # pandas: the result CSVs of a folder or bundle
    bench.summarize(results)                                     # mean, 95% CI, seeds per (benchmark, method)

A benchmark is a registered name, a "pkg.module:NAME", a .toml file, a `Benchmark` or an
EpisodeSet already loaded; `root` is the data folder (default: $METABENCH_ROOT, else the per-user
cache). Imports are lazy: `import bench` loads neither torch nor pandas.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from bench.api import Episode, MetaLearner
    from bench.protocols import EpisodeSet

__version__ = "0.1.0"
__all__ = ["__version__", "episodes", "evaluate", "load_benchmark", "make_method", "read_results", "summarize"]


def load_benchmark(benchmark: Any, root: str | Path | None = None) -> "EpisodeSet":
    """The episodes of `benchmark` on its data in `root` (`describe`, `episode`, `episodes`, `stream`, `task_info`)."""
    from bench.benchmarks import load
    from bench.paths import resolve_root
    from bench.protocols import EpisodeSet

    return benchmark if isinstance(benchmark, EpisodeSet) else load(benchmark, resolve_root(root))


def episodes(benchmark: Any, split: str = "test", n: int | None = None, root: str | Path | None = None,
             start: int = 0) -> Iterator["Episode"]:
    """Episodes start, start+1, ... of `split` (n of them; None: the benchmark's test or validation count,
    endless for "train"), each with its support and query tensors."""
    es = load_benchmark(benchmark, root)
    if n is None and split != "train":
        n = es.bench.test_episodes if split == "test" else es.bench.val_episodes
    i = start
    while n is None or i < start + n:
        yield es.episode(split, i)
        i += 1


def make_method(method: str, benchmark: Any, seed: int = 0, root: str | Path | None = None,
                **hyperparameters: Any) -> "MetaLearner":
    """Method `method` with its preset for the benchmark, then `hyperparameters`, set up for its episodes."""
    from bench.runner import build_learner

    es = load_benchmark(benchmark, root)
    return build_learner(method, es.bench, seed, hyperparameters).setup(es.task_info())


def evaluate(learner: "MetaLearner", benchmark: Any, n: int | None = None, split: str = "test",
             root: str | Path | None = None) -> "pd.DataFrame":
    """Score `learner` on the first `n` episodes of `split` (default: every test episode): one row per
    episode (benchmark, split, episode, episode_hash, accuracy, loss, way, n_support, n_query,
    adapt_seconds, adapt_batch), as the runner scores them."""
    import itertools

    import pandas as pd

    from bench.api import EVAL_CHUNK

    es = load_benchmark(benchmark, root)
    if learner.info is None:
        learner.setup(es.task_info())
    rows: list[dict] = []
    stream = episodes(es, split, n)
    while chunk := list(itertools.islice(stream, EVAL_CHUNK)):
        for ep, r in zip(chunk, learner.evaluate(chunk)):
            rows.append({"benchmark": es.bench.name, "split": split, "episode": ep.index, "episode_hash": ep.spec_hash,
                         **r})
    return pd.DataFrame(rows)


def read_results(path: str | Path) -> "pd.DataFrame":
    """Every result row of a results folder or a submission bundle (validated; bench.results.COLUMNS)."""
    from bench.report import read_folder

    return read_folder(Path(path))


def summarize(frame: "pd.DataFrame") -> "pd.DataFrame":
    """Per (benchmark, method): mean accuracy, 95% CI over episodes, seeds and their spread, timings."""
    from bench.stats import summarize as _summarize

    return _summarize(frame)

"""Runs: fit a method on a benchmark in chunks with checkpoints, select by validation, test, write rows.

`run(cfg, dirs)` is resumable: after every chunk the learner's full state (parameters,
optimizer, RNG, stream position), the validation curve and the best checkpoint are written
atomically, so a run killed at any point continues from its last chunk and produces exactly
the same results as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bench import benchmarks
from bench.api import EVAL_CHUNK, MetaLearner
from bench.errors import MetabenchError
from bench.paths import atomic_path, atomic_write_text
from bench.results import run_paths, write_run
from bench.sampling import EpisodeSet
from baselines import registry


@dataclass(frozen=True)
class RunConfig:
    """What to run. benchmark: a registered name, "pkg.module:NAME", a .toml file or a Benchmark;
    steps: outer updates (None: the method's preset for the benchmark); chunk: updates per checkpoint;
    val_episodes / test_episodes: None means the benchmark's numbers; overrides: hyperparameters;
    patience: stop fitting early once `patience` chunks in a row brought no new best validation
    accuracy (None: never)."""

    method: str
    benchmark: str | benchmarks.Benchmark
    seed: int = 0
    steps: int | None = None
    chunk: int = 100
    val_episodes: int | None = None
    test_episodes: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    patience: int | None = None


def plateaued(curve: list[dict[str, Any]], patience: int | None) -> bool:
    """True when the last `patience` validation points are all below the best before them."""
    if patience is None or len(curve) <= patience:
        return False
    best_before = max(p["val_accuracy"] for p in curve[:-patience])
    return all(p["val_accuracy"] <= best_before for p in curve[-patience:])


@dataclass(frozen=True)
class RunDirs:
    """Where a run reads data (root), keeps checkpoints (runs) and writes result files (results)."""

    root: Path
    results: Path
    runs: Path


def params_hash(params: dict[str, Any]) -> str:
    """Short hash of a hyperparameter dict (sorted JSON)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def code_rev() -> str:
    """The git revision of this code (with "+dirty" for uncommitted changes), else the package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty=+dirty", "--abbrev=12"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from bench import __version__

    return f"v{__version__}"


def device_name() -> str:
    """A short description of the compute device, e.g. "cpu-x86_64-2t"."""
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save atomically."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True (tensors and primitives only)."""
    return torch.load(path, weights_only=True)


def mean_accuracy(learner: MetaLearner, episodes: list) -> float:
    """Mean query accuracy of `learner` over `episodes`."""
    return float(np.mean([r["accuracy"] for r in learner.evaluate(episodes)]))


def run_steps(cfg: RunConfig, bench: benchmarks.Benchmark) -> int:
    """Outer steps of a run: cfg.steps, else the method's preset for the benchmark (an error if it has none)."""
    if cfg.steps is not None:
        return cfg.steps
    return registry.outer_steps(cfg.method, bench.preset, bench.name)


def build_learner(method: str, bench: benchmarks.Benchmark, seed: int, overrides: dict[str, Any],
                  steps: int | None = None) -> MetaLearner:
    """Method `method` with its preset for `bench`, then `overrides` (not yet set up).

    A method with a `total_steps` hyperparameter (the length of a schedule, e.g. Reptile's
    annealed meta step) gets `steps` (the run's length) unless `overrides` sets it. The runner and
    `verify` build learners through this one function.
    """
    cls = registry.method_class(method)
    overrides = dict(overrides)
    if steps is not None and "total_steps" in {f.name for f in dataclasses.fields(cls)} and "total_steps" not in overrides:
        overrides["total_steps"] = max(1, steps)
    return registry.make(method, bench.preset, seed, **overrides)


def build(cfg: RunConfig, root: Path) -> tuple[MetaLearner, EpisodeSet]:
    """A set-up learner for cfg and the benchmark's episodes (bad method names fail before data loads)."""
    registry.method_class(cfg.method)
    bench = benchmarks.get_benchmark(cfg.benchmark)
    steps = run_steps(cfg, bench)
    es = bench.with_episodes(None, root)
    learner = build_learner(cfg.method, bench, cfg.seed, cfg.overrides, steps)
    learner.setup(es.task_info())
    return learner, es


def run_dir(cfg: RunConfig, dirs: RunDirs, learner: MetaLearner) -> Path:
    """Checkpoint folder of a run: keyed by everything that changes its trajectory."""
    # `steps` is not part of the key: a run asked for more steps later continues the same trajectory.
    bench = benchmarks.get_benchmark(cfg.benchmark)
    key = params_hash({"params": learner.params(), "chunk": cfg.chunk, "val": cfg.val_episodes,
                       "version": bench.version})
    return Path(dirs.runs) / bench.name / cfg.method.replace(":", "_") / f"seed{cfg.seed}-{key}"


def run(cfg: RunConfig, dirs: RunDirs, resume: bool = True, progress: bool = True) -> Path:
    """Fit, select, test and write the results of one run; returns the result CSV path.

    With resume=False an existing checkpoint folder of the same run is discarded first.
    """
    rev = code_rev()  # the code this process loaded, even if the tree changes while it runs
    learner, es = build(cfg, dirs.root)
    bench = es.bench
    steps = run_steps(cfg, bench)
    n_val = cfg.val_episodes if cfg.val_episodes is not None else bench.val_episodes
    n_test = cfg.test_episodes if cfg.test_episodes is not None else bench.test_episodes
    folder = run_dir(cfg, dirs, learner)
    if not resume and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    last, best = folder / "last.pt", folder / "best.pt"
    val = es.episodes("val", n_val)

    if last.exists():
        ckpt = load_checkpoint(last)
        learner.load_state_dict(ckpt["learner"])
        curve, fit_seconds = ckpt["curve"], float(ckpt["fit_seconds"])
    else:
        curve, fit_seconds = [], 0.0
        acc = mean_accuracy(learner, val)
        curve.append({"step": 0, "fit_episodes": 0, "fit_seconds": 0.0, "val_accuracy": acc})
        save_checkpoint(best, {"learner": learner.state_dict(), "step": 0})
        save_checkpoint(last, {"learner": learner.state_dict(), "curve": curve, "fit_seconds": 0.0})

    if learner.info.max_way < bench.max_way:
        raise MetabenchError(f"{folder}: the checkpoint of {cfg.method} was set up for max_way={learner.info.max_way}, "
                             f"but {bench.name} has episodes of up to {bench.max_way} ways")
    if learner.fit_steps > steps:
        raise MetabenchError(f"{folder}: the checkpoint is at step {learner.fit_steps}, beyond the {steps} steps "
                             "asked for; ask for at least as many steps, or start over without --resume")
    bar = tqdm(total=steps, initial=learner.fit_steps, desc=f"fit {cfg.method} {bench.name}",
               unit="step", disable=not progress)
    while learner.fit_steps < steps and not plateaued(curve, cfg.patience):
        n = min(cfg.chunk, steps - learner.fit_steps)
        start = time.perf_counter()
        learner.fit(es.stream("train", start=learner.fit_episodes), n)
        fit_seconds += time.perf_counter() - start
        acc = mean_accuracy(learner, val)
        if acc > max(p["val_accuracy"] for p in curve):
            save_checkpoint(best, {"learner": learner.state_dict(), "step": learner.fit_steps})
        curve.append({"step": learner.fit_steps, "fit_episodes": learner.fit_episodes,
                      "fit_seconds": fit_seconds, "val_accuracy": acc})
        save_checkpoint(last, {"learner": learner.state_dict(), "curve": curve, "fit_seconds": fit_seconds})
        bar.update(n)
        bar.set_postfix(val=f"{acc:.3f}")
    bar.close()

    chosen = load_checkpoint(best)
    learner.load_state_dict(chosen["learner"])
    ph = params_hash(learner.params())
    dev = device_name()
    rows = []
    test_bar = tqdm(total=n_test, desc=f"test {cfg.method} {bench.name}", unit="ep", disable=not progress)
    for first in range(0, n_test, EVAL_CHUNK):
        eps = [es.episode("test", i) for i in range(first, min(first + EVAL_CHUNK, n_test))]
        for i, ep, r in zip(itertools.count(first), eps, learner.evaluate(eps)):
            rows.append({"benchmark": bench.name, "benchmark_version": bench.version, "split": "test",
                         "episode": i, "episode_hash": ep.spec_hash, "method": cfg.method, "params_hash": ph,
                         "seed": cfg.seed, "code_rev": rev, "device": dev, **r,
                         "fit_episodes": learner.fit_episodes, "fit_seconds": fit_seconds})
        test_bar.update(len(eps))
    test_bar.close()
    tags = learner.tags
    card = {
        "method": cfg.method, "benchmark": bench.name, "benchmark_version": bench.version, "seed": cfg.seed,
        "params": learner.params(), "params_hash": ph, "tags": dataclasses.asdict(tags),
        "backbone": learner.backbone,
        "inner_steps_train": learner.params().get("inner_steps"),
        "inner_steps_test": learner.params().get("inner_steps_test", learner.params().get("inner_steps")),
        "code_rev": rev, "device": dev, "torch_version": torch.__version__,
        "fit_steps": curve[-1]["step"], "fit_episodes": learner.fit_episodes, "fit_seconds": fit_seconds,
        "selected_step": int(chosen["step"]), "val_episodes": n_val, "test_episodes": n_test,
        "curve": curve, "checkpoint": best.relative_to(dirs.runs).as_posix(),
    }
    csv_path = write_run(dirs.results, rows, card)
    atomic_write_text(folder / "done.json", json.dumps({"csv": str(csv_path)}))
    return csv_path

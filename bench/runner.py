"""Runs: fit a method on a benchmark in chunks with checkpoints, select by validation, test, write rows.

`run(cfg, dirs)` is resumable: after every chunk the learner's full state (parameters,
optimizer, RNG, stream position), the validation curve and the best checkpoint are written
atomically, so a run killed at any point continues from its last chunk and produces exactly
the same results as an uninterrupted run.

A suite (a Benchmark with members, e.g. md-imagenet) is one run: it trains and selects once, then
tests the chosen checkpoint on every member's test episodes and writes one CSV (with its card)
per member, plus one suite run card (`<results>/<suite>/<method>/seed<N>.json`) that lists them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from bench import benchmarks
from bench.allocator import tune_malloc_for
from bench.api import EVAL_CHUNK, Episode, MetaLearner
from bench.axes import DEFAULT_PERMUTATIONS, count_flops, permutation_rows, step_rows, steps_upto
from bench.errors import MetabenchError, MethodError
from bench.hparams import plain
from bench.paths import atomic_path, atomic_write_text
from bench.results import inner_steps_of, protocol_shot, read_card, run_paths, write_run
from bench.sampling import EpisodeSet
from baselines import fused, registry


@dataclass(frozen=True)
class RunConfig:
    """What to run. benchmark: a registered name, "pkg.module:NAME", a .toml file or a Benchmark;
    steps: outer updates (None: the method's preset for the benchmark); chunk: updates per checkpoint;
    val_episodes / test_episodes: None means the benchmark's numbers; overrides: hyperparameters;
    patience: stop fitting early once `patience` chunks in a row brought no new best validation
    accuracy (None: never); label: the method column and folder of the results (default: the
    method, plus "+<params hash>" when overrides are given); device: cpu, cuda, cuda:N or auto.
    Evaluation axes (bench.axes, files beside the results): step_curve: accuracy after each test-time
    inner step; permutations: label permutations per test episode (the identity included; 0 or 1: off);
    axis_episodes: the steps and permutation axes on the first this many test episodes only (None: all;
    they cost several evaluations each); flops: count the FLOPs of one outer step and one adaptation into
    the run card. fused: run with baselines/fused.py's kernel switched on (batch norm, max-pool and ReLU as
    one kernel: the same numbers up to rounding, the device column ends in "-fused"); False leaves the
    switch as METABENCH_FUSED says."""

    method: str
    benchmark: str | benchmarks.Benchmark
    seed: int = 0
    steps: int | None = None
    chunk: int = 100
    val_episodes: int | None = None
    test_episodes: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    patience: int | None = None
    label: str | None = None
    device: str = "cpu"
    step_curve: bool = True
    permutations: int = DEFAULT_PERMUTATIONS
    flops: bool = True
    axis_episodes: int | None = None
    fused: bool = False


SEED_MAX = 2**63 - 1
"""Largest seed: seeds go into int64 CSV columns and numpy's SeedSequence."""


def check_config(cfg: RunConfig) -> None:
    """One clear error for any impossible RunConfig field (before any data is built)."""
    def whole(name: str, value: Any, lo: int, hi: int = SEED_MAX, optional: bool = True) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise MetabenchError(f"--{name.replace('_', '-')} {plain(value)}: must be a whole number from {lo}"
                                 f"{'' if hi == SEED_MAX else f' to {hi}'}" + (" (fits numpy's and torch's seeding)"
                                                                               if name == "seed" else ""))

    whole("seed", cfg.seed, 0, optional=False)
    whole("steps", cfg.steps, 0)
    whole("chunk", cfg.chunk, 1, optional=False)
    whole("val_episodes", cfg.val_episodes, 1)
    whole("test_episodes", cfg.test_episodes, 1)
    whole("patience", cfg.patience, 1)
    whole("permutations", cfg.permutations, 0, 1000, optional=False)
    whole("axis_episodes", cfg.axis_episodes, 1)
    if not isinstance(cfg.overrides, dict):
        raise MetabenchError(f"overrides must be a dict of hyperparameters (got {type(cfg.overrides).__name__})")
    if cfg.label is not None and (not cfg.label or "/" in cfg.label or cfg.label.startswith(".") or "\\" in cfg.label):
        raise MetabenchError(f"--label {cfg.label!r}: must be a non-empty name without '/' that does not start with '.'")


def ensure_writable(folder: Path, what: str) -> None:
    """Create `folder` and test-write a file in it; one clear error (read-only, a file, a full disk)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".metabench-write-test-", suffix=".tmp") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise MetabenchError(f"{folder}: the {what} folder is not writable ({e.strerror or e}); nothing was run") from e


def clean_stale_temps(folder: Path) -> None:
    """Remove temporary files (.*.tmp) that a killed writer left in `folder` (the caller holds its lock)."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


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


def resolve_device(device: str) -> torch.device:
    """cpu, cuda, cuda:N or auto (cuda when available, else cpu); a clear error when CUDA is absent.

    A CUDA device also turns on cuDNN's deterministic algorithms, without autotuning (torch.backends.cudnn,
    process-wide), so that a seed gives the same numbers on the same GPU and software: some of cuDNN's
    convolution backwards add with atomics in an order that changes between runs, and a conv bias before batch
    norm, whose gradient is zero but for round-off, then takes Adam steps of either sign (two runs of 6
    task-batched MAML steps on an H200 ended with unrelated conv0.bias values; with the flag, bitwise equal).
    """
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise MetabenchError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MetabenchError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}, "
                                 "CUDA available: False); use --device cpu")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise MetabenchError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return torch.device(name)


def device_name(device: torch.device | None = None) -> str:
    """A short description of the compute device, e.g. "cpu-x86_64-2t" or "cuda-NVIDIA_H200"; "-fused" added
    where baselines/fused.py's kernel is switched on (METABENCH_FUSED=1: the same numbers up to rounding)."""
    if device is not None and device.type == "cuda":
        return "cuda-" + torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t" + ("-fused" if arithmetic(device) == "cpu-fused"
                                                                   else "")


CPU_DEVICE = re.compile(r"^cpu-.*-(\d+)t(-fused)?$")  # device_name's CPU form


def made_with(device: str) -> tuple[bool, int | None]:
    """What a row's device (`device_name`) says its numbers were computed with: (the fused kernel on, torch's
    thread count); (False, None) for a GPU or another form."""
    m = CPU_DEVICE.match(device)
    return (bool(m.group(2)), int(m.group(1))) if m else (False, None)


ARITHMETIC_HINT = ("cpu-fused: METABENCH_FUSED=1, --fused or a grid file's fused = true, with a C++ compiler to "
                   "build the kernel; cpu: none of them; cuda: --device cuda")


def arithmetic(device: torch.device | None = None) -> str:
    """The arithmetic a run's steps are computed in, beside its hyperparameters and seed: "cuda", "cpu-fused" (the
    fused kernel switched on and built) or "cpu". Its checkpoints record it, and a run resumes only in the same one
    (each gives the same numbers as the others only up to rounding)."""
    if device is not None and device.type == "cuda":
        return "cuda"
    return "cpu-fused" if fused.enabled() and fused.available() else "cpu"


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota (cpu.max)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path in ("/sys/fs/cgroup/cpu.max",):
        try:
            quota, period = Path(path).read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    return max(1, cores)


def warn_oversubscription() -> None:
    """Warn (stderr) when torch's threads exceed the cores this process may use."""
    threads, cores = torch.get_num_threads(), available_cores()
    if threads > cores:
        print(f"metabench: warning: {threads} torch threads on {cores} usable core(s) oversubscribe the CPU "
              f"(runs side by side slow down 20-50x); set OMP_NUM_THREADS={cores} or fewer", file=sys.stderr)


def cpu_identity() -> dict[str, str]:
    """The processor model and the instruction set torch's kernels use: float32 results (and so whole
    training trajectories) differ between them, so a run card records both."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"model": model, "capability": str(torch.backends.cpu.get_cpu_capability())}


def on_device(episodes: Iterator[Episode], device: torch.device) -> Iterator[Episode]:
    """The episodes with their tensors on `device` (the CPU stream itself when device is the CPU)."""
    return episodes if device.type == "cpu" else (ep.to(device) for ep in episodes)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save atomically; a failed write (a full disk) is one clear error and leaves the old file."""
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as e:
        raise MetabenchError(f"{path}: cannot write the checkpoint ({e}); the previous one is kept") from e


def load_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True (tensors and primitives only); one clear error otherwise."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for unloadable files
        raise MethodError(f"{path}: cannot load the checkpoint with weights_only=True ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}); a method's state_dict must hold tensors and primitives "
                          "only (`metabench check` tests this)") from e


def mean_accuracy(learner: MetaLearner, episodes: list, desc: str | None = None) -> float:
    """Mean query accuracy of `learner` over `episodes`; with `desc`, a progress bar of that title.

    Episodes are evaluated EVAL_CHUNK at a time, the chunks `evaluate` makes itself, so the bar
    changes nothing in the results.
    """
    rows = []
    with tqdm(total=len(episodes), desc=desc, unit="ep", leave=False, disable=desc is None) as bar:
        for first in range(0, len(episodes), EVAL_CHUNK):
            rows += learner.evaluate(episodes[first:first + EVAL_CHUNK])
            bar.update(len(episodes[first:first + EVAL_CHUNK]))
    return float(np.mean([r["accuracy"] for r in rows]))


def run_steps(cfg: RunConfig, bench: benchmarks.Benchmark) -> int:
    """Outer steps of a run: cfg.steps, else the method's preset for the benchmark (an error if it has none)."""
    if cfg.steps is not None:
        return cfg.steps
    return registry.outer_steps(cfg.method, bench.preset, bench.name, cfg.overrides)


def build_learner(method: str, bench: benchmarks.Benchmark, seed: int, overrides: dict[str, Any],
                  steps: int | None = None) -> MetaLearner:
    """Method `method` with its preset for `bench`, then `overrides` (not yet set up).

    A method with a `total_steps` hyperparameter (the length of a schedule, e.g. Reptile's
    annealed meta step) gets `steps` (the run's length) unless `overrides` sets it. The runner and
    `verify` build learners through this one function.
    """
    cls = registry.method_class(method)
    overrides = dict(overrides)
    if "seed" in overrides:
        raise MetabenchError("seed is not a hyperparameter to --set: give the run's seed with --seed")
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


@dataclass(frozen=True)
class Plan:
    """A run resolved before any data is built: the benchmark, the learner (not set up), its
    steps and episode counts, its label and result/checkpoint paths."""

    cfg: RunConfig
    bench: benchmarks.Benchmark
    learner: MetaLearner
    steps: int
    n_val: int
    n_test: int
    label: str
    params_hash: str
    csv: Path
    card: Path
    folder: Path


def run_label(cfg: RunConfig, ph: str) -> str:
    """The method column and folder of a run: --label, else the method, with "+<params hash>" when
    the run overrides hyperparameters (so runs of different hyperparameters never share a file)."""
    if cfg.label:
        return cfg.label
    base = cfg.method.replace(":", "_")
    return f"{base}+{ph[:6]}" if cfg.overrides else base


def plan(cfg: RunConfig, dirs: RunDirs) -> Plan:
    """Resolve a run without building data: bad names, steps or hyperparameters fail here."""
    check_config(cfg)
    registry.method_class(cfg.method)
    bench = benchmarks.get_benchmark(cfg.benchmark)
    steps = run_steps(cfg, bench)
    learner = build_learner(cfg.method, bench, cfg.seed, cfg.overrides, steps)
    ph = params_hash(learner.params())
    label = run_label(cfg, ph)
    csv, card = run_paths(dirs.results, bench.name, label, cfg.seed)
    n_val = cfg.val_episodes if cfg.val_episodes is not None else bench.val_episodes
    n_test = cfg.test_episodes if cfg.test_episodes is not None else bench.test_episodes
    if n_test > bench.test_episodes:
        raise MetabenchError(f"--test-episodes {n_test}: {bench.name} has {bench.test_episodes} test episodes")
    return Plan(cfg, bench, learner, steps, n_val, n_test, label, ph, csv, card, run_dir(cfg, dirs, learner))


def result_identity(card: dict[str, Any], suite: str | None) -> str:
    """The identity of a written result as a run of `suite` (None: of the benchmark alone) sees it:
    its params hash, marked when the result came from another suite or from a run of its own."""
    ph, came_from = str(card.get("params_hash", "unknown")), card.get("suite")
    if came_from == suite:
        return ph
    return f"{ph} (written by {'suite ' + came_from if came_from else 'a run of the benchmark alone'})"


def member_csvs(p: Plan) -> list[Path]:
    """The result CSVs a plan writes: one per member of a suite, else the plan's own."""
    if not p.bench.is_suite:
        return [p.csv]
    return [run_paths(p.csv.parent.parent.parent, m, p.label, p.cfg.seed)[0] for m in p.bench.members]


def existing_identity(p: Plan) -> str | None:
    """The identity of a result already at the plan's paths (None when there is none); for a suite the
    first member result of another identity, else its suite card's params hash."""
    suite = p.bench.name if p.bench.is_suite else None
    for csv in member_csvs(p):
        if csv.exists():
            ident = result_identity(read_card(csv), suite)
            if ident != p.params_hash:
                return ident
    if suite is None:
        return p.params_hash if p.csv.exists() else None
    return str(json.loads(p.card.read_text()).get("params_hash", "unknown")) if p.card.exists() else None


def check_identity(p: Plan, overwrite: bool) -> None:
    """Refuse to write over a result of another identity (unless overwrite), before any work."""
    other = existing_identity(p)
    if other is not None and other != p.params_hash and not overwrite:
        raise MetabenchError(f"{p.csv}: holds a run with params_hash {other}; this run has params_hash "
                             f"{p.params_hash} (other hyperparameters). Give it another --label, or pass "
                             "--overwrite to replace it")


def output_path(p: Plan) -> Path:
    """The file a run of this plan returns and names: its result CSV (a suite: its suite card)."""
    return p.card if p.bench.is_suite else p.csv


def finished(p: Plan) -> bool:
    """True when this exact run (identity, steps, test episodes) has already written its results."""
    if existing_identity(p) != p.params_hash or not all(c.exists() for c in member_csvs(p)):
        return False
    card = json.loads(p.card.read_text()) if p.bench.is_suite else read_card(p.csv)
    return card.get("steps") == p.steps and card.get("test_episodes") == p.n_test


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """One writer per run folder: an exclusive lock on folder/lock (released by the OS if its holder
    dies); a second process fails at once with a message naming the holder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise MetabenchError(f"{folder}: this run is in progress in {holder}; wait for it to finish "
                                 "(re-running it afterwards does nothing) or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def move_aside(folder: Path) -> Path | None:
    """--restart: rename a run's checkpoint folder to <folder>.old-<time> (nothing is deleted)."""
    if not folder.exists():
        return None
    aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    folder.rename(aside)
    return aside


def run(cfg: RunConfig, dirs: RunDirs, restart: bool = False, overwrite: bool = False,
        progress: bool = True) -> Path:
    """Fit, select, test and write the results of one run; returns the result CSV path (a suite: its
    suite card, see `write_outputs`).

    The run continues from its last checkpoint when one exists; a finished run does nothing.
    restart: move the old checkpoints aside and start from step 0. overwrite: replace a result
    of another identity at the same path (otherwise an error, before any work).
    """
    p = plan(cfg, dirs)
    check_identity(p, overwrite)
    resolve_device(cfg.device)
    ensure_writable(dirs.results, "results")
    ensure_writable(dirs.runs, "checkpoint (--runs)")
    benchmarks.check_root(dirs.root)
    if not restart and finished(p):
        if progress:
            print(f"{p.label} {p.bench.name} seed {cfg.seed}: already finished ({output_path(p)}); nothing to do",
                  file=sys.stderr)
        return output_path(p)
    with run_lock(p.folder):
        clean_stale_temps(p.folder)
        clean_stale_temps(p.csv.parent)
        if restart:
            aside = move_aside(p.folder)
            p.folder.mkdir(parents=True)
            (p.folder / "lock").touch()
            if aside and progress:
                print(f"old checkpoints moved to {aside}", file=sys.stderr)
        rows, card, axes = execute(p, dirs, progress)
        check_identity(p, overwrite)  # another identity may have been written while this one ran
        csv_path = write_outputs(dirs.results, rows, card, axes)
        atomic_write_text(p.folder / "done.json", json.dumps({"csv": str(csv_path), "steps": p.steps,
                                                               "test_episodes": p.n_test}))
    return csv_path


def execute(p: Plan, dirs: RunDirs,
            progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Fit in chunks with checkpoints under p.folder, select by validation, test: the rows, the card and
    the evaluation axes' rows (bench.axes; those the config switches on).

    The caller holds the run's lock and writes the results (the Ray executor returns them to the
    driver, which writes them where the results live).
    """
    with fused.fused(True) if p.cfg.fused else contextlib.nullcontext():
        return _fit_and_test(p, dirs, progress)


def _fit_and_test(p: Plan, dirs: RunDirs,
                  progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """`execute`'s work, under the run's kernel switch."""
    cfg, bench, learner, steps, n_test = p.cfg, p.bench, p.learner, p.steps, p.n_test
    rev = code_rev()  # the code this process loaded, even if the tree changes while it runs
    device = resolve_device(cfg.device)
    es = bench.with_episodes(None, dirs.root)
    learner.device = device
    learner.setup(es.task_info())
    folder = p.folder
    folder.mkdir(parents=True, exist_ok=True)
    last, best = folder / "last.pt", folder / "best.pt"
    val = list(on_device(iter(es.episodes("val", p.n_val)), device))
    val_desc = f"validate {p.label} {bench.name}" if progress else None

    arith = arithmetic(device)
    if last.exists():
        ckpt = load_checkpoint(last)
        made = ckpt.get("arithmetic", arith)  # (checkpoints from before it was recorded: as this process runs)
        if made != arith:
            raise MetabenchError(f"{last}: the run so far was trained as {made!r} and this process would continue it "
                                 f"as {arith!r} ({ARITHMETIC_HINT}), which gives the same numbers only up to rounding: "
                                 "it would not be the run an uninterrupted one makes. Resume it as it was made, or start it "
                                 "over (`metabench run ... --restart` moves the old checkpoints aside)")
        learner.load_state_dict(ckpt["learner"])
        curve, fit_seconds = ckpt["curve"], float(ckpt["fit_seconds"])
    else:
        curve, fit_seconds = [], 0.0
        acc = mean_accuracy(learner, val, val_desc)
        curve.append({"step": 0, "fit_episodes": 0, "fit_seconds": 0.0, "val_accuracy": acc})
        save_checkpoint(best, {"learner": learner.state_dict(), "step": 0})
        save_checkpoint(last, {"learner": learner.state_dict(), "curve": curve, "fit_seconds": 0.0,
                               "arithmetic": arith})

    if learner.info.max_way < bench.max_way:
        raise MetabenchError(f"{folder}: the checkpoint of {cfg.method} was set up for max_way={learner.info.max_way}, "
                             f"but {bench.name} has episodes of up to {bench.max_way} ways")
    if learner.fit_steps > steps:
        raise MetabenchError(f"{folder}: the checkpoint is at step {learner.fit_steps}, beyond the {steps} steps "
                             "asked for; ask for at least as many steps, or pass --restart to start over")
    bar = tqdm(total=steps, initial=learner.fit_steps, desc=f"fit {p.label} {bench.name}",
               unit="step", disable=not progress)
    while learner.fit_steps < steps and not plateaued(curve, cfg.patience):
        n = min(cfg.chunk, steps - learner.fit_steps)
        start = time.perf_counter()
        for _ in range(n):  # one outer step per call, so the bar moves every step: fit(a) + fit(b) == fit(a + b)
            learner.fit(on_device(es.stream("train", start=learner.fit_episodes), device), 1)
            bar.update(1)
        fit_seconds += time.perf_counter() - start
        acc = mean_accuracy(learner, val, val_desc)
        if acc > max(q["val_accuracy"] for q in curve):
            save_checkpoint(best, {"learner": learner.state_dict(), "step": learner.fit_steps})
        curve.append({"step": learner.fit_steps, "fit_episodes": learner.fit_episodes,
                      "fit_seconds": fit_seconds, "val_accuracy": acc})
        save_checkpoint(last, {"learner": learner.state_dict(), "curve": curve, "fit_seconds": fit_seconds,
                               "arithmetic": arith})
        bar.set_postfix(val=f"{acc:.3f}")
    bar.close()

    chosen = load_checkpoint(best)
    learner.load_state_dict(chosen["learner"])
    ph = params_hash(learner.params())
    dev = device_name(device)
    rows: list[dict[str, Any]] = []
    axes: dict[str, dict[str, list[dict[str, Any]]]] = {}
    axis_seconds = {"test": 0.0, "perms": 0.0}
    upto = steps_upto(learner) if cfg.step_curve else None
    for test_es in (bench.member_sets(es) if bench.is_suite else [es]):
        tb = test_es.bench
        n = min(n_test, tb.test_episodes)
        n_axis = n if cfg.axis_episodes is None else min(n, cfg.axis_episodes)
        mine = axes.setdefault(tb.name, {"steps": [], "perms": []})
        test_bar = tqdm(total=n, desc=f"test {p.label} {tb.name}", unit="ep", disable=not progress)
        for first in range(0, n, EVAL_CHUNK):
            eps = list(on_device((test_es.episode("test", i) for i in range(first, min(first + EVAL_CHUNK, n))),
                                 device))
            tune_malloc_for(learner, eps)  # (where fit did not run first: a run resumed after training)
            k = max(0, min(len(eps), n_axis - first))  # the chunk's episodes on the axes
            start = time.perf_counter()
            results = (learner.evaluate(eps[:k], steps_upto=upto) if k else []) + (
                learner.evaluate(eps[k:]) if k < len(eps) else [])
            axis_seconds["test"] += time.perf_counter() - start
            if cfg.permutations > 1 and k:
                start = time.perf_counter()
                mine["perms"] += permutation_rows(learner, eps[:k], [r["accuracy"] for r in results[:k]],
                                                  cfg.permutations)
                axis_seconds["perms"] += time.perf_counter() - start
            for i, ep, r in zip(itertools.count(first), eps, results):
                if upto is not None and i < n_axis:
                    mine["steps"] += step_rows(i, ep.spec_hash, r)
                r = {k: v for k, v in r.items() if k != "steps"}
                rows.append({"benchmark": tb.name, "benchmark_version": tb.version, "split": "test",
                             "episode": i, "episode_hash": ep.spec_hash, "method": p.label, "params_hash": ph,
                             "seed": cfg.seed, "code_rev": rev, "device": dev, "shot": protocol_shot(tb.protocol),
                             "inner_steps_test": inner_steps_of(learner.params()), **r,
                             "fit_episodes": learner.fit_episodes, "fit_seconds": fit_seconds})
            test_bar.update(len(eps))
        test_bar.close()
    flops = None
    if cfg.flops:
        start = time.perf_counter()
        flops = count_flops(learner, on_device(es.stream("train", start=learner.fit_episodes), device),
                            on_device(iter([es.episode("test", 0)]), device).__next__())
        flops["seconds"] = time.perf_counter() - start
    tags = learner.tags
    card = {
        "method": p.label, "base_method": cfg.method, "overrides": dict(cfg.overrides),
        "benchmark": bench.name, "benchmark_version": bench.version, "seed": cfg.seed,
        "params": learner.params(), "params_hash": ph, "tags": dataclasses.asdict(tags),
        "backbone": learner.backbone_label,
        "inner_steps_train": learner.params().get("inner_steps"),
        "inner_steps_test": learner.params().get("inner_steps_test", learner.params().get("inner_steps")),
        "code_rev": rev, "device": dev, "cpu": cpu_identity(), "torch_version": torch.__version__,
        "fit_steps": curve[-1]["step"], "fit_episodes": learner.fit_episodes, "fit_seconds": fit_seconds,
        "selected_step": int(chosen["step"]), "steps": steps, "val_episodes": p.n_val, "test_episodes": n_test,
        "curve": curve, "checkpoint": best.relative_to(dirs.runs).as_posix(),
        "data_fingerprints": {n: src.content_fingerprint() for n, src in es.sources.items()},
    }
    card |= axis_card(cfg, upto, axis_seconds, flops)
    if bench.is_suite:
        card["members"] = list(bench.members)
    return rows, card, {member: {name: r for name, r in by_axis.items() if r} for member, by_axis in axes.items()}


def axis_card(cfg: RunConfig, upto: int | None, seconds: dict[str, float],
              flops: dict[str, Any] | None) -> dict[str, Any]:
    """The run card's entries of the evaluation axes: FLOPs (with fit_seconds beside them in the card), the
    steps recorded (step_curve_upto), permutations per episode, and test / perms evaluation seconds."""
    out: dict[str, Any] = {"axis_seconds": seconds, "permutations": cfg.permutations if cfg.permutations > 1 else 0}
    if cfg.axis_episodes is not None and (upto is not None or cfg.permutations > 1):
        out["axis_episodes"] = cfg.axis_episodes
    if upto is not None:
        out["step_curve_upto"] = upto
    if flops is not None:
        out["flops"] = flops
    return out


def write_outputs(results: Path, rows: list[dict[str, Any]], card: dict[str, Any],
                  axes: dict[str, dict[str, list[dict[str, Any]]]] | None = None) -> Path:
    """Write a run's results: its CSV, card and evaluation-axis files (`write_run`; axes by benchmark
    name, then axis); returns the CSV path.

    A suite's rows (card["members"]) go to one CSV per member, each with a card of that benchmark
    that names the suite and that member's axis files; then the suite card (the run's card, plus the
    members' CSV paths relative to `results`) is written atomically beside where the suite's own CSV
    would be, and its path returned.
    """
    axes = axes or {}
    if "members" not in card:
        return write_run(results, rows, card, axes.get(card["benchmark"]))
    csvs = {}
    for member in card["members"]:
        mine = [r for r in rows if r["benchmark"] == member]
        member_card = {**card, "benchmark": member, "benchmark_version": mine[0]["benchmark_version"],
                       "suite": card["benchmark"], "test_episodes": len(mine)}
        del member_card["members"]
        csvs[member] = write_run(results, mine, member_card, axes.get(member)).relative_to(results).as_posix()
    path = run_paths(results, card["benchmark"], card["method"], int(card["seed"]))[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**card, "csvs": csvs}, indent=1, sort_keys=True))
    return path

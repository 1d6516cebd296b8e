"""`metabench grid`: methods x benchmarks x seeds, each cell one `run`, on local worker processes or Ray.

    metabench grid --methods maml,fomaml --benchmarks glyphs-5w1s --seeds 0-2 --results DIR [--steps N]
        [--set k=v ...] [--workers N] [--ray [ADDRESS]] [--device cuda] [--retries 2]
    metabench grid GRID.toml          # the same fields, plus per-method overrides and per-benchmark steps
    metabench grid GRID.toml --methods maml --benchmarks glyphs-5w1s --seeds 1   # some of its cells

Every cell is exactly one run (bench.runner: same identity, files and rows as `metabench run`), so a
grid is idempotent: finished cells are skipped, interrupted ones continue from their checkpoints.
A failing cell is retried `retries` times, then reported; the other cells go on.

Executors:
- local (default): each cell attempt is a `metabench run` worker process; `workers` cells at a
  time with `threads` torch threads each, so that workers x threads never exceeds the cores this
  process may use (affinity and cgroup quota): the oversubscription guard.
- Ray (`--ray`, `--ray auto`, `--ray HOST:PORT`): each cell is a Ray task with num_cpus = its
  threads (num_gpus = 1 on CUDA), retried on worker or node loss. Rows and cards come back to
  this driver, which writes them under --results, so results need no shared file system;
  checkpoints go to --runs, which every node must reach for a cell to resume on another node.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from bench.errors import MetabenchError
from bench.paths import resolve_root

AXIS_KEYS = ("step_curve", "permutations", "flops", "axis_episodes")
"""Run fields of the evaluation axes (bench.axes; RunConfig): step_curve and flops true/false, permutations N,
axis_episodes N (the first N test episodes)."""
RUN_KEYS = ("chunk", "val_episodes", "test_episodes", "patience", "fused", *AXIS_KEYS)
GRID_KEYS = {"methods", "benchmarks", "seeds", "steps", "results", "runs", "root", "device", "retries", "workers",
             "threads", "set", "method_set", "benchmark_steps", "label", "part", *RUN_KEYS}
SWITCHES = {"step_curve": True, "flops": True, "fused": False}
"""Run fields that are true or false, with RunConfig's default: the `metabench run` flag of one is --KEY
(default false) or --no-KEY (default true), given only when the value is not the default."""
FUSED_HELP = ("run with baselines/fused.py's kernel (batch norm, max-pool and ReLU as one: the same numbers up to "
              "rounding; the device column ends in -fused)")
PART_KEYS = {"methods", "benchmarks", "seeds", "steps", "benchmark_steps", "set", "method_set", "label", *RUN_KEYS}
"""Keys of a grid file's `[[part]]` tables: a grid of its own beside the main one (another budget, a long run),
which takes the main grid's methods, benchmarks, seeds, set, method_set and label where it does not say."""


@dataclass(frozen=True, eq=False)
class Cell:
    """One run of a grid: method, benchmark, seed, steps (None: the method's preset), overrides, label, and
    run_args of its own (its part's chunk, episodes, patience, axes) over the grid's."""

    method: str
    benchmark: str
    seed: int
    steps: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    run_args: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.label or self.method} {self.benchmark} seed {self.seed}"


@dataclass(frozen=True)
class GridSpec:
    """A grid: its cells and how every cell runs (chunk, episodes, patience, device, folders, executor)."""

    cells: tuple[Cell, ...]
    results: Path
    runs: Path
    root: Path
    run_args: dict[str, Any] = field(default_factory=dict)  # chunk, val_episodes, test_episodes, patience
    device: str = "cpu"
    retries: int = 2
    workers: int | None = None
    threads: int | None = None


@dataclass
class Outcome:
    """What happened to one cell: ok, the CSV, attempts, seconds, and the error of the last attempt."""

    cell: Cell
    ok: bool
    csv: Path | None = None
    attempts: int = 0
    seconds: float = 0.0
    error: str = ""


def parse_seeds(text: str | int | list) -> list[int]:
    """"0-2" -> [0, 1, 2]; "0,3,5" -> [0, 3, 5]; a list or one int as is."""
    if isinstance(text, int) and not isinstance(text, bool):
        return [text]
    if isinstance(text, list):
        items = text
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            if sep and lo.strip().isdigit() and hi.strip().isdigit():
                items += list(range(int(lo), int(hi) + 1))
            else:
                items.append(part)
    seeds = []
    for s in items:
        if isinstance(s, bool) or not str(s).isdigit():
            raise MetabenchError(f"--seeds: {s!r} is not a seed (whole numbers, ranges like 0-2, commas)")
        seeds.append(int(s))
    if not seeds:
        raise MetabenchError("--seeds: no seeds given")
    return seeds


def make_cells(methods: list[str], benchmarks: list[str], seeds: list[int], spec: dict[str, Any]) -> tuple[Cell, ...]:
    """The cells of methods x benchmarks x seeds, with spec's steps, benchmark_steps, set, method_set, label;
    then those of each of spec's parts (`part_fields`), whose run fields go with their cells."""
    cells = []
    for b in benchmarks:
        steps = spec.get("benchmark_steps", {}).get(b, spec.get("steps"))
        for m in methods:
            overrides = {**spec.get("set", {}), **spec.get("method_set", {}).get(m, {})}
            for seed in seeds:
                cells.append(Cell(m, b, seed, steps, overrides, spec.get("label", {}).get(m)))
    for part in spec.get("part", []):
        fields = part_fields(spec, part)
        run_args = {k: part[k] for k in RUN_KEYS if k in part}
        cells += [replace(c, run_args=run_args) for c in make_cells(list(fields["methods"]), list(fields["benchmarks"]),
                                                                   parse_seeds(fields.get("seeds", "0")), fields)]
    return tuple(cells)


def part_fields(spec: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """A part's grid fields: its own, else the main grid's methods, benchmarks and seeds; set and label merged
    over the grid's; method_set entries replace the grid's for their method; steps are the part's alone
    when it gives any."""
    own_steps = "steps" in part or "benchmark_steps" in part
    return {"methods": spec.get("methods"), "benchmarks": spec.get("benchmarks"), "seeds": spec.get("seeds", "0"),
            **({} if own_steps else {k: spec[k] for k in ("steps", "benchmark_steps") if k in spec}),
            **{k: v for k, v in part.items() if k not in ("set", "method_set", "label")},
            "set": {**spec.get("set", {}), **part.get("set", {})},
            "method_set": {**spec.get("method_set", {}), **part.get("method_set", {})},
            "label": {**spec.get("label", {}), **part.get("label", {})}}


def load_grid_file(path: Path) -> dict[str, Any]:
    """The fields of a GRID.toml (relative folders are relative to the file); every error names the file."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise MetabenchError(f"{path}: cannot read the grid file ({e})") from e
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown:
        raise MetabenchError(f"{path}: unknown key(s) {unknown}; a grid file has {sorted(GRID_KEYS)}")
    for key in ("methods", "benchmarks"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise MetabenchError(f"{path}: {key!r} must be a non-empty list")
    for key in ("results", "runs", "root"):
        if key in data:
            data[key] = str((Path(path).parent / data[key]).resolve())
    data["benchmarks"] = [str((Path(path).parent / b).resolve()) if b.endswith(".toml") else b
                          for b in data["benchmarks"]]
    parts = data.get("part", [])
    if not isinstance(parts, list) or not all(isinstance(c, dict) for c in parts):
        raise MetabenchError(f"{path}: 'part' must be [[part]] tables")
    for i, part in enumerate(parts):
        unknown = sorted(set(part) - PART_KEYS)
        if unknown:
            raise MetabenchError(f"{path}: [[part]] number {i + 1}: unknown key(s) {unknown}; a part has "
                                 f"{sorted(PART_KEYS)}")
        if "benchmarks" in part:
            part["benchmarks"] = [str((Path(path).parent / b).resolve()) if b.endswith(".toml") else b
                                  for b in part["benchmarks"]]
    for where, table in (("", data), *((f"[[part]] number {i + 1}: ", part) for i, part in enumerate(parts))):
        wrong = [k for k in SWITCHES if k in table and not isinstance(table[k], bool)]
        if wrong:
            raise MetabenchError(f"{path}: {where}{wrong[0]} must be true or false, not {table[wrong[0]]!r}")
    return data


def spec_from(fields: dict[str, Any]) -> GridSpec:
    """A GridSpec from grid fields (a GRID.toml's or the command line's)."""
    if not fields.get("results"):
        raise MetabenchError("a grid needs --results")
    root = resolve_root(fields.get("root"))
    cells = make_cells(list(fields["methods"]), list(fields["benchmarks"]), parse_seeds(fields.get("seeds", "0")),
                       fields)
    seen: dict[tuple, Cell] = {}
    for c in cells:
        key = (c.label or c.method, c.benchmark, c.seed)
        if key in seen:
            raise MetabenchError(f"two cells of the grid write the same results: {seen[key].name} (steps "
                                 f"{seen[key].steps}) and {c.name} (steps {c.steps}); give one a label")
        seen[key] = c
    run_args = {k: fields[k] for k in RUN_KEYS if fields.get(k) is not None}
    return GridSpec(cells, Path(fields["results"]), Path(fields.get("runs") or root / "runs"), root, run_args,
                    fields.get("device", "cpu"), int(fields.get("retries", 2)), fields.get("workers"),
                    fields.get("threads"))


def cell_config(cell: Cell, spec: GridSpec) -> Any:
    """The bench.runner.RunConfig of a cell."""
    from bench.runner import RunConfig

    return RunConfig(cell.method, cell.benchmark, cell.seed, cell.steps, overrides=dict(cell.overrides),
                     label=cell.label, device=spec.device, **{**spec.run_args, **cell.run_args})


def pick_cells(spec: GridSpec, source: Path, chosen: dict[str, str | None]) -> GridSpec:
    """The cells of a grid file's spec that the command line picks: `chosen` maps methods, benchmarks and seeds
    to a flag's text (None: all). A cell is picked by its row name (its label where the file gives one, else its
    method), its benchmark and its seed; every cell keeps the settings of its part. A value that no cell of the
    file has is an error naming the file."""
    def row(c: Cell) -> str:
        return c.label or c.method

    def benchmark(b: str) -> str:
        return str(Path(b).resolve()) if b.endswith(".toml") else b

    keys = {"methods": (row, _split), "seeds": (lambda c: c.seed, parse_seeds),
            "benchmarks": (lambda c: c.benchmark, lambda t: [benchmark(b) for b in _split(t)])}
    cells = spec.cells
    for flag, text in chosen.items():
        if text is None:
            continue
        of_cell, parse = keys[flag]
        wanted, present = parse(text), {of_cell(c) for c in spec.cells}
        missing = [w for w in wanted if w not in present]
        if missing:
            raise MetabenchError(f"{source}: --{flag}: no cell of this grid has {missing[0]!r} (it has "
                                 f"{', '.join(map(str, sorted(present)))})")
        cells = tuple(c for c in cells if of_cell(c) in wanted)
    if not cells:
        raise MetabenchError(f"{source}: no cell of this grid has all of the --methods, --benchmarks and --seeds given")
    return replace(spec, cells=cells)


def triage(spec: GridSpec) -> tuple[dict[Cell, str], dict[Cell, Path]]:
    """Resolve every cell before any work: the cells that cannot run, with their error, and those whose exact
    run (identity, steps, test episodes) has already written its results, with their result file (skipped
    without starting a worker)."""
    from bench.runner import RunDirs, check_identity, finished, output_path, plan

    dirs = RunDirs(spec.root, spec.results, spec.runs)
    bad, done = {}, {}
    for cell in spec.cells:
        try:
            p = plan(cell_config(cell, spec), dirs)
            check_identity(p, overwrite=False)
        except MetabenchError as e:
            bad[cell] = str(e)
            continue
        if finished(p):
            done[cell] = output_path(p)
    return bad, done


def slots(spec: GridSpec) -> tuple[int, int]:
    """(parallel cells, torch threads per cell) with cells x threads <= usable cores."""
    from bench.runner import available_cores

    cores = available_cores()
    workers = max(1, min(int(spec.workers or cores), len(spec.cells) or 1, cores))
    threads = max(1, int(spec.threads or cores // workers))
    if workers * threads > cores:
        threads = max(1, cores // workers)
    return workers, threads


# --- the local executor ---------------------------------------------------------------------------------
def run_args_cli(cell: Cell, spec: GridSpec) -> list[str]:
    """The `metabench run` arguments of a cell."""
    args = ["run", cell.method, cell.benchmark, "--seed", str(cell.seed), "--results", str(spec.results),
            "--runs", str(spec.runs), "--root", str(spec.root), "--device", spec.device]
    if cell.steps is not None:
        args += ["--steps", str(cell.steps)]
    if cell.label:
        args += ["--label", cell.label]
    for key, value in {**spec.run_args, **cell.run_args}.items():
        if key in SWITCHES:
            args += [] if value == SWITCHES[key] else [f"--{'' if value else 'no-'}{key.replace('_', '-')}"]
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    for key, value in cell.overrides.items():
        args += ["--set", f"{key}={value!r}"]
    return args


def local_attempt(cell: Cell, spec: GridSpec, threads: int) -> tuple[bool, str]:
    """One attempt of a cell as a `metabench run` worker process; (ok, error line or CSV path)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "METABENCH_TASK_WORKERS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench", *run_args_cli(cell, spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode == 0:
        return True, proc.stdout.strip().rsplit("results: ", 1)[-1]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    why = lines[-1] if lines else f"exit status {proc.returncode}"
    return False, why.removeprefix("metabench: error: ") + (f" (exit status {proc.returncode})"
                                                          if proc.returncode < 0 or proc.returncode > 2 else "")


def run_local(spec: GridSpec, report: Callable[[Outcome], None]) -> list[Outcome]:
    """Every cell on local worker processes, `slots(spec)` at a time."""
    workers, threads = slots(spec)

    def one(cell: Cell) -> Outcome:
        start, out = time.perf_counter(), Outcome(cell, False)
        for attempt in range(spec.retries + 1):
            out.attempts = attempt + 1
            ok, text = local_attempt(cell, spec, threads)
            if ok:
                out.ok, out.csv, out.error = True, Path(text), ""
                break
            out.error = text
        out.seconds = time.perf_counter() - start
        return out

    outcomes = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for fut in as_completed([pool.submit(one, c) for c in spec.cells]):
            outcomes.append(fut.result())
            report(outcomes[-1])
    return outcomes


# --- the Ray executor -----------------------------------------------------------------------------------
def ray_cell(cfg: Any, root: str, runs: str, threads: int) -> tuple[list[dict], dict, dict]:
    """A cell on a Ray worker: fit and test under the run's lock; the rows, card and axes go back to the driver."""
    import torch

    from bench.runner import RunDirs, execute, plan, run_lock

    torch.set_num_threads(threads)
    os.environ["METABENCH_TASK_WORKERS"] = str(threads)
    dirs = RunDirs(Path(root), Path(runs) / ".ray-results-unused", Path(runs))
    p = plan(cfg, dirs)
    with run_lock(p.folder):
        return execute(p, dirs, progress=False)


def run_ray(spec: GridSpec, address: str | None, report: Callable[[Outcome], None]) -> list[Outcome]:
    """Every cell as a Ray task (connecting to `address`, or starting a local cluster when None)."""
    try:
        import ray
    except ImportError as e:
        raise MetabenchError("--ray needs Ray: pip install 'metabench[ray]'") from e
    from bench.runner import RunDirs, check_identity, plan, write_outputs

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    threads = int(spec.threads or 1)
    gpus = 1 if spec.device.startswith("cuda") or spec.device == "auto" and _has_cuda() else 0
    task = ray.remote(ray_cell).options(num_cpus=threads, num_gpus=gpus, max_retries=spec.retries,
                                        retry_exceptions=True)
    dirs = RunDirs(spec.root, spec.results, spec.runs)
    pending, outcomes, starts = {}, [], {}
    try:
        for cell in spec.cells:
            p = plan(cell_config(cell, spec), dirs)
            starts[cell] = time.perf_counter()
            pending[task.remote(p.cfg, str(spec.root), str(spec.runs), threads)] = (cell, p)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell, p = pending.pop(done[0])
            out = Outcome(cell, False, attempts=1, seconds=time.perf_counter() - starts[cell])
            try:
                rows, card, axes = ray.get(done[0])
                check_identity(p, overwrite=False)
                out.csv, out.ok = write_outputs(spec.results, rows, card, axes), True
            except Exception as e:  # noqa: BLE001 - a cell may fail in any way; the others go on
                cause = getattr(e, "cause", None) or e
                out.error = f"{type(cause).__name__}: {cause}".splitlines()[0]
            outcomes.append(out)
            report(out)
    finally:
        if started_here:
            ray.shutdown()
    return outcomes


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- the command ------------------------------------------------------------------------------------------
def summary_table(results: Path, outcomes: list[Outcome]) -> str:
    """method x benchmark: mean accuracy +- 95% CI over the runs' episodes, seeds done."""
    import pandas as pd

    from bench.results import outputs_csvs, read_csv
    from bench.stats import summarize

    frames = [read_csv(c) for o in outcomes if o.ok and o.csv for c in outputs_csvs(o.csv)]
    if not frames:
        return "no finished cells"
    table = summarize(pd.concat(frames, ignore_index=True))
    lines = [f"{'method':24s} {'benchmark':22s} {'accuracy':>18s} seeds"]
    for _, row in table.iterrows():
        lines.append(f"{row['method']:24s} {row['benchmark']:22s} {100 * row['mean']:7.2f}% +- {100 * row['ci95']:5.2f}% "
                     f"{int(row['n_seeds']) if 'n_seeds' in row else '?'}")
    return "\n".join(lines)


def run_grid(spec: GridSpec, ray_address: str | None = None, use_ray: bool = False, quiet: bool = False
             ) -> list[Outcome]:
    """Run a grid; cells that cannot even be planned are reported as failed, finished ones are skipped, the
    others run."""
    from tqdm.auto import tqdm

    unplannable, done = triage(spec)
    runnable = replace(spec, cells=tuple(c for c in spec.cells if c not in unplannable and c not in done))
    outcomes = [Outcome(c, False, error=e) for c, e in unplannable.items()]
    outcomes += [Outcome(c, True, csv, 0, 0.0) for c, csv in done.items()]
    bar = tqdm(total=len(spec.cells), unit="cell", desc="grid", disable=quiet)
    bar.update(len(outcomes))
    if done:
        bar.write(f"{len(done)} of {len(spec.cells)} cells already finished: skipped")

    def report(o: Outcome) -> None:
        status = "ok" if o.ok else f"FAILED after {o.attempts} attempt(s): {o.error}"
        bar.write(f"{o.cell.name}: {status} ({o.seconds:.0f} s)")
        bar.update(1)

    for cell, error in unplannable.items():
        bar.write(f"{cell.name}: FAILED: {error}")
    if runnable.cells:
        outcomes += run_ray(runnable, ray_address, report) if use_ray else run_local(runnable, report)
    bar.close()
    return outcomes


def grid_spec(args: argparse.Namespace) -> GridSpec:
    """The grid of `metabench grid`'s arguments: a grid file's cells (those --methods, --benchmarks and --seeds
    pick), or the flags' methods x benchmarks x seeds; the run flags given override every cell's, a part's too."""
    if args.file:
        fields = load_grid_file(Path(args.file))
        if args.steps is not None or args.set:
            raise MetabenchError(f"{args.file}: the grid file sets each cell's steps and hyperparameters; change them "
                                 f"in the file (or a copy of it), not with --steps or --set")
    else:
        from bench.cli import parse_overrides

        if not args.methods or not args.benchmarks:
            raise MetabenchError("a grid needs --methods and --benchmarks (or a GRID.toml)")
        fields = {"methods": _split(args.methods), "benchmarks": _split(args.benchmarks), "seeds": args.seeds or "0",
                  "steps": args.steps, "set": parse_overrides(args.set)}
    for key in ("results", "runs", "root", "device", "workers", "threads", *RUN_KEYS):
        if getattr(args, key, None) is not None:
            fields[key] = getattr(args, key)
    if args.retries is not None:
        fields["retries"] = args.retries
    spec = spec_from(fields)
    if args.file:
        spec = pick_cells(spec, Path(args.file), {"methods": args.methods, "benchmarks": args.benchmarks,
                                                  "seeds": args.seeds})
    given = {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None) is not None}
    return replace(spec, cells=tuple(replace(c, run_args={**c.run_args, **given}) for c in spec.cells))


def cmd_grid(args: argparse.Namespace) -> int:
    """`metabench grid`: run the cells, print a table, build the site; exit 1 if any cell failed."""
    spec = grid_spec(args)
    from bench.runner import resolve_device

    resolve_device(spec.device)  # fail at once on a machine without CUDA
    start = time.perf_counter()
    outcomes = run_grid(spec, None if args.ray in (None, "local") else args.ray, args.ray is not None, args.quiet)
    failed = [o for o in outcomes if not o.ok]
    print(f"\ngrid: {len(outcomes) - len(failed)} of {len(outcomes)} cells done in {time.perf_counter() - start:.0f} s")
    print(summary_table(spec.results, outcomes))
    if failed:
        print(f"\n{len(failed)} cell(s) failed:", file=sys.stderr)
        for o in failed:
            print(f"  {o.cell.name}: {o.error}", file=sys.stderr)
    if not args.no_site and len(failed) < len(outcomes):
        from leaderboard.build import build_site

        print(f"leaderboard: {build_site([spec.results], spec.results / 'site')}")
    return 1 if failed else 0


def add_axis_flags(parser: argparse.ArgumentParser, default: bool | None = True) -> None:
    """The flags that switch the evaluation axes (bench.axes) off, for `run` and `grid` (default None: the
    grid file's or the run's own default)."""
    from bench.axes import DEFAULT_PERMUTATIONS

    parser.add_argument("--no-step-curve", dest="step_curve", action="store_false", default=default,
                        help="do not record the accuracy after each test-time inner step (the steps axis)")
    parser.add_argument("--permutations", type=int, default=None if default is None else DEFAULT_PERMUTATIONS,
                        metavar="P", help=f"label permutations per test episode, the identity included (default "
                                          f"{DEFAULT_PERMUTATIONS}; 0 or 1: the permutation axis off)")
    parser.add_argument("--no-flops", dest="flops", action="store_false", default=default,
                        help="do not count the FLOPs of one outer step and one adaptation")
    parser.add_argument("--axis-episodes", type=int, default=None, metavar="N",
                        help="the steps and permutation axes on the first N test episodes only (default: all)")


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `metabench grid`."""
    s = sub.add_parser("grid", help="run methods x benchmarks x seeds (local processes or a Ray cluster)",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("file", nargs="?", default=None,
                   help="a GRID.toml (--methods, --benchmarks and --seeds then pick among its cells, each with its "
                        "part's settings; the run flags below override its fields)")
    s.add_argument("--methods", help="comma-separated methods (with a grid file: its cells' row names, the label where it "
                                          "gives one)")
    s.add_argument("--benchmarks", help="comma-separated benchmarks (names, pkg.module:NAME or .toml files)")
    s.add_argument("--seeds", default=None, help="seeds: 0-2, or 0,3,5 (default: 0; with a grid file: its seeds)")
    s.add_argument("--steps", type=int, default=None,
                   help="outer steps of every cell (default: the presets; not with a grid file)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter (not with a grid file)")
    s.add_argument("--results", default=None, help="results folder (the site goes to RESULTS/site)")
    s.add_argument("--runs", default=None, help="checkpoint folder, reachable from every node (default: ROOT/runs)")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache)")
    s.add_argument("--chunk", type=int, default=None, help="outer steps between checkpoints (run's default: 100)")
    s.add_argument("--val-episodes", type=int, default=None, help="validation episodes (default: the benchmark's)")
    s.add_argument("--test-episodes", type=int, default=None, help="test episodes (default: the benchmark's)")
    s.add_argument("--patience", type=int, default=None, help="early stop after this many chunks without gain")
    add_axis_flags(s, default=None)
    s.add_argument("--fused", action="store_const", const=True, default=None,
                   help=FUSED_HELP + " (default: the grid file's fused, else as METABENCH_FUSED says)")
    s.add_argument("--workers", type=int, default=None, help="cells at a time (default: usable cores)")
    s.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: cores / workers)")
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: a local cluster, 'auto' (a running one) or HOST:PORT")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cpu)")
    s.add_argument("--retries", type=int, default=None, help="retries of a failing cell (default: 2)")
    s.add_argument("--no-site", action="store_true", help="do not build the leaderboard site")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_grid)

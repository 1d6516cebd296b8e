"""Verification of a submission bundle: re-run test episodes from its checkpoints, keep a record.

`verify_bundle` first validates the bundle (bench.validation), then, for every run, builds the
method like the runner does (`bench.runner.build_learner` with the card's hyperparameters, set
up with the episode set's `task_info()`), loads the run's checkpoint and re-runs a random sample
of its test episodes; the per-episode accuracies must equal the submitted ones. Rows made with
baselines/fused.py's kernel (their device ends in "-fused") are re-run with it, the others without it, and
on the number of torch threads their device records (`bench.runner.made_with`).

- The episodes are chosen from a fresh random seed (`choose_episodes`), recorded, so nobody can
  know in advance which episodes are checked; `episodes="all"` re-runs every one. At least one
  episode is compared, and the report says how many.
- Only a registered or installed method is imported (baselines.registry.METHODS, entry points
  included), unless `trust_code`; the report says what is imported.
- A bundle is never changed. A successful verification is a record, a JSON file written into a
  folder the maintainer keeps (`record_to`): the bundle's manifest hash, code revision, torch
  version, device, the episodes re-run, the largest differences found and the date. The
  leaderboard shows a bundle as verified only when given a record of its manifest hash
  (`metabench leaderboard ... --verified DIR`).

CLI: `metabench verify BUNDLE [--episodes K|all] [--seed S] [--record-to DIR] [--trust-code]`;
a failure exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import secrets
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.allocator import tune_malloc_for
from bench.bundle import file_slug, json_text, manifest_sha256, print_report
from bench.errors import MetabenchError
from bench.paths import atomic_write_text, resolve_root
from bench.validation import Bundle, MethodCode, Run, short_list, validate

NONDETERMINISTIC_TOLERANCE = 0.02
"""For methods tagged non-deterministic: largest accepted |mean accuracy difference| in verify."""
RESULT_FORMAT = "%.6g"
"""The float format of result CSVs (bench.results.write_run); verify compares at this precision."""
LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-5
"""Re-run losses further than this from the submitted ones are reported (as warnings: accuracy is what is ranked)."""
RECORD_FORMAT = 1
RECORD_KIND = "metabench-verification"


@dataclass
class Verification:
    """The outcome of `verify_bundle`.

    ok: every checked episode reproduced; seed: the seed of the choice of episodes; imports: what
    was imported to build the method; checked: (benchmark, seed, episode indices) per run;
    n_compared: episodes compared in all; max_accuracy_diff / max_loss_diff: the largest
    |re-run - submitted| found; mismatches: dicts with benchmark, seed, episode, submitted and
    recomputed accuracy; record: the record file written (None when none was).
    """

    ok: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seed: int = 0
    imports: str = ""
    checked: list[dict] = field(default_factory=list)
    n_compared: int = 0
    max_accuracy_diff: float = 0.0
    max_loss_diff: float = 0.0
    mismatches: list[dict] = field(default_factory=list)
    record: Path | None = None


class _Unverifiable(Exception):
    """A run cannot be re-run (the message says why); verification goes on with the next run."""


def fresh_seed() -> int:
    """A seed nobody can predict (63 random bits from the operating system)."""
    return secrets.randbits(63)


def choose_episodes(n: int, k: int | str, seed: int, benchmark: str, run_seed: int) -> list[int]:
    """A seeded choice of min(k, n) distinct episode indices out of 0..n-1, sorted; k="all": every one.

    Depends only on (seed, benchmark, run seed), so a verification recorded with its seed can be
    repeated exactly. k must be at least 1.
    """
    if k == "all":
        return list(range(int(n)))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MetabenchError(f"episodes to re-run must be at least 1 or 'all' (got {k!r})")
    k = min(k, int(n))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFFFFFFFFFF, zlib.crc32(benchmark.encode()), int(run_seed) & 0xFFFFFFFF])))
    return sorted(int(i) for i in rng.choice(int(n), size=k, replace=False))


def _rounded(x: float) -> float:
    return float(RESULT_FORMAT % x)


def _label(run: Run) -> str:
    return f"{run.benchmark}/seed{run.seed}"


class _Sets:
    """The episode sets (with pixels) of the benchmarks being verified, loaded once each."""

    def __init__(self, root: Path | None, device: Any = "cpu") -> None:
        self.root, self.sets, self.device = resolve_root(root), {}, device

    def __call__(self, name: str) -> Any:
        from bench import benchmarks

        if name not in self.sets:
            try:
                self.sets[name] = benchmarks.load(name, self.root)
            except MetabenchError as e:
                raise _Unverifiable(f"benchmark {name}: cannot load its data to re-run episodes: {e}") from e
        return self.sets[name]


def _rebuild(b: Bundle, run: Run, code: MethodCode, es: Any, device: Any) -> Any:
    """The run's method built from its card, set up, with its checkpoint loaded and its params_hash checked."""
    import torch

    from bench.runner import build_learner, params_hash

    label = _label(run)
    if run.checkpoint is None:
        raise _Unverifiable(f"{label}: no checkpoint in the bundle; cannot verify")
    params = {k: v for k, v in run.card["params"].items() if k != "seed"}
    try:
        with b.importable(code):
            learner = build_learner(code.name, run.bench, run.seed, params)
        learner.device = device
        learner.setup(es.task_info())
    except Exception as e:  # noqa: BLE001 - a submitted method may fail in any way
        raise _Unverifiable(f"{label}: cannot build the method: {type(e).__name__}: {e}") from e
    rel = run.checkpoint.relative_to(b.path).as_posix()
    try:
        ckpt = torch.load(run.checkpoint, weights_only=True, map_location="cpu")
        state = ckpt["learner"] if isinstance(ckpt, dict) and "learner" in ckpt else ckpt
        learner.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any failure to load is a verification failure
        raise _Unverifiable(f"{label}: checkpoint {rel} cannot be loaded into {run.card['method']}: "
                            f"{type(e).__name__}: {e}") from e
    ph = params_hash(learner.params())
    if ph != run.card.get("params_hash"):
        raise _Unverifiable(f"{label}: the rebuilt method has params_hash {ph}, the card "
                            f"{run.card.get('params_hash')!r}")
    return learner


def _rerun(run: Run, learner: Any, es: Any, chosen: list[int], device: Any) -> tuple[dict[int, dict], dict[str, list]]:
    """The learner's result row of each chosen test episode (evaluated together, as the runner does), and
    the rows of the evaluation axes its card records (bench.axes) for them, after checking that the data
    here is the data the run was made on (cache fingerprints)."""
    from bench.axes import permutation_rows, step_rows

    for source, fp in (run.card.get("data_fingerprints") or {}).items():
        here = es.sources[source].content_fingerprint() if source in es.sources else None
        if here is not None and here != fp:
            raise _Unverifiable(f"{_label(run)}: the run was made on {source} data with fingerprint {fp}, but the data "
                                f"here has {here} (another or a modified cache): re-running would not be comparable")
    recorded = run.card.get("axes") or {}
    upto = run.card.get("step_curve_upto") if "steps" in recorded else None
    limit = run.card.get("axis_episodes")
    on_axes = [i for i in chosen if limit is None or i < limit]  # the axes cover the first `limit` episodes only
    rest = [i for i in chosen if i not in on_axes]
    try:
        eps = {i: es.episode("test", i).to(device) for i in chosen}
        tune_malloc_for(learner, list(eps.values()))  # (this process only evaluates: bench/allocator.py)
        axis_eps = [eps[i] for i in on_axes]
        results = dict(zip(on_axes, learner.evaluate(axis_eps, steps_upto=upto) if on_axes else []))
        results.update(zip(rest, learner.evaluate([eps[i] for i in rest]) if rest else []))
        axes = {"steps": [row for i in on_axes for row in step_rows(i, eps[i].spec_hash, results[i])]
                if upto is not None else []}
        if "perms" in recorded:
            axes["perms"] = permutation_rows(learner, axis_eps, [results[i]["accuracy"] for i in on_axes],
                                             int(run.card.get("permutations") or 0)) if on_axes else []
        return {i: results[i] for i in chosen}, {k: v for k, v in axes.items() if k in recorded}
    except Exception as e:  # noqa: BLE001
        raise _Unverifiable(f"{_label(run)}: re-running the test episodes failed: {type(e).__name__}: {e}") from e


def _compare(run: Run, rows: dict[int, dict], deterministic: bool, result: Verification) -> None:
    """Judge the re-run rows against the submitted ones; add errors, warnings, mismatches and the
    largest differences to `result`."""
    label = _label(run)
    frame = run.frame.set_index("episode")
    diffs, mismatched, losses = [], [], []
    for i, r in rows.items():
        submitted = float(frame.loc[i, "accuracy"])
        recomputed = float(r["accuracy"])
        diffs.append(recomputed - submitted)
        result.max_accuracy_diff = max(result.max_accuracy_diff, abs(_rounded(recomputed) - submitted))
        loss, submitted_loss = _rounded(float(r["loss"])), float(frame.loc[i, "loss"])
        result.max_loss_diff = max(result.max_loss_diff, abs(loss - submitted_loss))
        if _rounded(recomputed) != submitted:
            mismatched.append({"benchmark": run.benchmark, "seed": run.seed, "episode": i,
                               "submitted": submitted, "recomputed": recomputed})
        elif not math.isclose(loss, submitted_loss, rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL):
            losses.append((i, loss, submitted_loss))
    result.n_compared += len(rows)
    if losses:
        i, loss, submitted_loss = max(losses, key=lambda x: abs(x[1] - x[2]))
        result.warnings.append(
            f"{label}: the re-run loss differs from the submitted one beyond the tolerance (relative {LOSS_RTOL:g}, "
            f"absolute {LOSS_ATOL:g}) on {len(losses)} of {len(rows)} episode(s) {short_list([x[0] for x in losses])}, "
            f"most on episode {i}: re-run {loss:.6g}, submitted {submitted_loss:.6g}; accuracy matches")
    if not mismatched:
        return
    eps = [m["episode"] for m in mismatched]
    first = mismatched[0]
    text = (f"{label}: accuracy differs on {len(eps)} of {len(rows)} checked episode(s) {short_list(eps)} "
            f"(episode {first['episode']}: submitted {first['submitted']:.6g}, re-run {first['recomputed']:.6g}; "
            f"compared at the result files' precision, {RESULT_FORMAT})")
    if deterministic:
        result.mismatches += mismatched
        result.errors.append(text)
    elif abs(float(np.mean(diffs))) > NONDETERMINISTIC_TOLERANCE:
        result.mismatches += mismatched
        result.errors.append(text + f"; mean difference {np.mean(diffs):+.4f} exceeds "
                                    f"{NONDETERMINISTIC_TOLERANCE} for a non-deterministic method")
    else:
        result.warnings.append(text + f" (non-deterministic method; mean within the tolerance "
                                      f"{NONDETERMINISTIC_TOLERANCE})")


def _rerun_as_made(run: Run, learner: Any, es: Any, chosen: list[int], device: Any) -> tuple[dict[int, dict],
                                                                                           dict[str, list]]:
    """`_rerun` as each episode's row was made, whatever this process's settings: baselines/fused.py's kernel on
    where the device ends in "-fused" and off elsewhere (whatever METABENCH_FUSED says), and torch's thread
    count the device records ("-2t"; what runs on torch's intra-op threads, such as a variable-way episode's
    adaptation, sums in another order at another count). Either can move an accuracy. A clear error where rows
    were made with the kernel and it cannot be built here."""
    import torch

    from baselines import fused
    from baselines.parallel import task_workers, threads_set, workers_set
    from bench.runner import made_with

    made = {int(e): made_with(str(d)) for e, d in zip(run.frame["episode"], run.frame["device"])}
    groups: dict[tuple[bool, int | None], list[int]] = {}
    for i in chosen:
        groups.setdefault(made[i], []).append(i)
    rows: dict[int, dict] = {}
    axes: dict[str, list] = {}
    threads, workers = torch.get_num_threads(), task_workers()
    for (on, count), part in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or 0)):
        if on and not fused.available():
            raise _Unverifiable(f"{_label(run)}: its rows were made with the fused kernel (device ending in -fused), "
                                f"which cannot be built here ({fused.build_error()}); re-running them without it "
                                "would not be comparable")
        # the pool kept at its size (its numbers do not depend on it) while torch's thread count changes
        with fused.fused(on), threads_set(count or threads), workers_set(str(workers)):
            got, got_axes = _rerun(run, learner, es, part, device)
        rows.update(got)
        for key, values in got_axes.items():
            axes.setdefault(key, []).extend(values)
    return {i: rows[i] for i in chosen}, axes


def _verify_run(b: Bundle, run: Run, code: MethodCode, sets: _Sets, episodes: int | str,
                result: Verification) -> None:
    """Re-run the seeded choice of `episodes` test episodes of `run`; record the outcome in `result`."""
    try:
        es = sets(run.benchmark)
        learner = _rebuild(b, run, code, es, sets.device)
        index = sorted(int(e) for e in run.frame["episode"])
        chosen = [index[i] for i in choose_episodes(len(index), episodes, result.seed, run.benchmark, run.seed)]
        rows, axes = _rerun_as_made(run, learner, es, chosen, sets.device)
    except _Unverifiable as e:
        result.errors.append(str(e))
        return
    result.checked.append({"benchmark": run.benchmark, "seed": run.seed, "episodes": chosen})
    _compare(run, rows, bool(learner.tags.deterministic), result)
    _compare_axes(b, run, axes, bool(learner.tags.deterministic), result)


def _compare_axes(b: Bundle, run: Run, axes: dict[str, list], deterministic: bool, result: Verification) -> None:
    """Judge the re-run evaluation-axis rows against the submitted files, like the main rows: accuracies equal
    at the result files' precision (for a non-deterministic method: warnings, as long as the mean agrees)."""
    import pandas as pd

    from bench.results import read_axis

    for axis, rows in axes.items():
        key = "step" if axis == "steps" else "perm"
        submitted = read_axis(b.path / run.csv_rel, axis).set_index(["episode", key])["accuracy"]
        redone = pd.DataFrame(rows, columns=["episode", key, "accuracy"] if rows else None)
        if redone.empty:
            continue
        redone = redone.set_index(["episode", key])["accuracy"].map(_rounded)
        missing = [i for i in redone.index if i not in submitted.index]
        wrong = [i for i in redone.index if i in submitted.index and redone[i] != float(submitted[i])]
        if not (missing or wrong):
            continue
        first = (missing or wrong)[0]
        text = (f"{_label(run)}: the {axis} axis differs on {len(missing) + len(wrong)} of {len(redone)} re-run "
                f"point(s) (episode {first[0]}, {key} {first[1]}: submitted "
                f"{submitted.get(first, 'missing')}, re-run {redone[first]:.6g})")
        mean_diff = float((redone - submitted.reindex(redone.index)).mean()) if not missing else float("inf")
        if deterministic or abs(mean_diff) > NONDETERMINISTIC_TOLERANCE:
            result.errors.append(text)
        else:
            result.warnings.append(text + " (non-deterministic method; mean within the tolerance)")


def verify_bundle(path: Path, root: Path | None = None, episodes: int | str = 20, *, seed: int | None = None,
                  trust_code: bool = False, record_to: Path | None = None, device: str = "cpu") -> Verification:
    """Re-run `episodes` test episodes ("all": every one) of every run from its checkpoint.

    The bundle must validate first (`trust_code` as in validation). The method is imported only
    when registered or installed, or with `trust_code`. For each run the method is built with the
    card's hyperparameters (bench.runner.build_learner), the checkpoint is loaded with
    torch.load(weights_only=True), and `choose_episodes(n, episodes, seed, ...)` are evaluated;
    `seed` None draws a fresh one (`fresh_seed`), kept in the result and the record. Accuracies
    must equal the submitted ones at the precision of the result files; for methods tagged
    non-deterministic, per-episode differences are warnings and the mean over the checked
    episodes must agree within NONDETERMINISTIC_TOLERANCE. Losses further apart than LOSS_RTOL /
    LOSS_ATOL are warnings that name the tolerance. The bundle is never written; on success and
    with `record_to`, the verification record is written there (`write_record`).
    """
    from bench.runner import resolve_device

    choose_episodes(1, episodes, 0, "", 0)  # a bad count fails before any work
    dev = resolve_device(device)  # so does a device this machine does not have
    result = Verification(ok=False, seed=fresh_seed() if seed is None else int(seed))
    b = validate(path, root, trust_code)
    if b.errors:
        result.errors = ["the bundle does not validate:"] + b.errors
        return result
    result.warnings += b.warnings
    code = b.method_code()
    if code is None:
        result.errors = b.errors
        return result
    result.imports = code.describe()
    why = code.untrusted(trust_code)
    if why:
        result.errors.append(why)
        return result
    sets = _Sets(root, dev)
    for run in b.live():
        _verify_run(b, run, code, sets, episodes, result)
    if not result.errors and result.n_compared == 0:
        result.errors.append("no episode was compared")
    result.ok = not result.errors
    if result.ok and record_to is not None:
        result.record = write_record(Path(record_to), b, result, episodes, dev)
    return result


def write_record(folder: Path, b: Bundle, result: Verification, episodes: int | str, device: Any = None) -> Path:
    """Write the verification record of bundle `b` into `folder`; returns its path.

    The file, `<method>-<manifest sha256[:16]>.json`, holds: kind, format, method, bundle (the
    folder's name when verified), manifest_sha256, ok, date (UTC), code_rev, torch_version,
    device, seed, episodes_per_run (as asked), runs (benchmark, seed, episodes), n_compared,
    max_accuracy_difference, max_loss_difference, the tolerances used, imports and warnings.
    """
    import torch

    from bench.runner import code_rev, device_name

    sha = manifest_sha256(b.path)
    record = {
        "kind": RECORD_KIND, "format": RECORD_FORMAT, "method": str(b.metadata.get("method")),
        "bundle": b.path.name, "manifest_sha256": sha, "ok": result.ok,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_rev": code_rev(), "torch_version": torch.__version__, "device": device_name(device),
        "seed": result.seed, "episodes_per_run": episodes, "runs": result.checked, "n_compared": result.n_compared,
        "max_accuracy_difference": result.max_accuracy_diff, "max_loss_difference": result.max_loss_diff,
        "tolerance": {"accuracy": f"equal at {RESULT_FORMAT}", "loss_rtol": LOSS_RTOL, "loss_atol": LOSS_ATOL,
                      "nondeterministic_mean_accuracy": NONDETERMINISTIC_TOLERANCE},
        "imports": result.imports, "warnings": result.warnings,
    }
    path = Path(folder) / f"{file_slug(record['method'])}-{sha[:16]}.json"
    try:
        atomic_write_text(path, json_text(record))
        path.chmod(0o644)
    except OSError as e:
        raise MetabenchError(f"{folder}: cannot write the verification record there ({e.strerror or e})") from e
    return path


def read_records(folder: Path) -> dict[str, dict]:
    """The successful verification records in `folder`, by manifest sha256 (the newest per bundle).

    A file that is not a record of this kind is an error naming it (a maintainer's folder holds
    records only).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MetabenchError(f"{folder}: verification records folder not found")
    out: dict[str, dict] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MetabenchError(f"{path}: not a readable verification record ({e})") from e
        if not (isinstance(record, dict) and record.get("kind") == RECORD_KIND
                and isinstance(record.get("manifest_sha256"), str)):
            raise MetabenchError(f"{path}: not a metabench verification record")
        sha = record["manifest_sha256"]
        if record.get("ok") is True and str(record.get("date", "")) >= str(out.get(sha, {}).get("date", "")):
            out[sha] = record
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def episodes_arg(text: str) -> int | str:
    """--episodes: a positive count or "all"."""
    if text.strip().lower() == "all":
        return "all"
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"at least 1 episode must be re-run (got {k}); or 'all'")
    return k


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a submission bundle by re-running test episodes from its checkpoints."""
    r = verify_bundle(Path(args.bundle), resolve_root(args.root), args.episodes, seed=args.seed,
                      trust_code=args.trust_code, record_to=Path(args.record_to) if args.record_to else None,
                      device=args.device)
    if r.imports:
        print(f"verify: {r.imports}")
    print_report(f"verification failed: {args.bundle}", r.errors, r.warnings)
    if r.ok:
        print(f"verified: {args.bundle}: {r.n_compared} episode(s) compared in {len(r.checked)} run(s), chosen "
              f"with seed {r.seed}; largest accuracy difference {r.max_accuracy_diff:.6g}, largest loss "
              f"difference {r.max_loss_diff:.6g}")
        print(f"record: {r.record}" if r.record else
              "no --record-to: nothing recorded (the leaderboard shows a bundle verified only with a record)")
    return 0 if r.ok else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the `verify` command."""
    s = sub.add_parser("verify", help="re-run test episodes from a bundle's checkpoints; record the verification")
    s.add_argument("bundle", help="the bundle folder (never modified)")
    s.add_argument("--episodes", type=episodes_arg, default=20,
                   help="test episodes re-run per run: a positive number or 'all'")
    s.add_argument("--seed", type=int, default=None,
                   help="seed of the choice of episodes (default: a fresh random seed, recorded)")
    s.add_argument("--record-to", default=None, metavar="DIR",
                   help="on success, write the verification record into this folder (the maintainer's)")
    s.add_argument("--trust-code", action="store_true",
                   help="import a method that is not registered or installed (the bundle's code/ or this "
                        "environment); without it only registered or installed methods are imported")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto: where the episodes are re-run")
    s.set_defaults(func=cmd_verify)

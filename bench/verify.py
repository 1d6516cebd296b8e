"""Verification of a submission bundle: re-run test episodes from its checkpoints, compare accuracies.

`verify_bundle` first validates the bundle (bench.validation), then, for every run, builds the
method like the runner does (`bench.runner.build_learner` with the card's hyperparameters, set
up with the episode set's `task_info()`), loads the run's checkpoint and re-runs a seeded
sample of its test episodes (`choose_episodes`); the per-episode accuracies must equal the
submitted ones. On success it marks the run cards `"verified": true` (and updates the
manifest), which the leaderboard shows as a badge.

CLI: `metabench verify BUNDLE [--episodes K] [--seed S] [--no-mark]`; a failure exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.bundle import MANIFEST, print_report, update_manifest
from bench.paths import atomic_write_text, resolve_root
from bench.validation import Bundle, Run, short_list, validate

NONDETERMINISTIC_TOLERANCE = 0.02
"""For methods tagged non-deterministic: largest accepted |mean accuracy difference| in verify."""
RESULT_FORMAT = "%.6g"
"""The float format of result CSVs (bench.results.write_run); verify compares at this precision."""


@dataclass
class Verification:
    """The outcome of `verify_bundle`.

    ok: every checked episode reproduced; checked: (benchmark, seed, episode indices) per run;
    mismatches: dicts with benchmark, seed, episode, submitted and recomputed accuracy;
    marked: the run cards were marked verified.
    """

    ok: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: list[dict] = field(default_factory=list)
    mismatches: list[dict] = field(default_factory=list)
    marked: bool = False


class _Unverifiable(Exception):
    """A run cannot be re-run (the message says why); verification goes on with the next run."""


def choose_episodes(n: int, k: int, seed: int, benchmark: str, run_seed: int) -> list[int]:
    """A deterministic, seeded choice of min(k, n) distinct episode indices out of 0..n-1, sorted.

    Depends only on (seed, benchmark, run seed), so a verification can be repeated exactly;
    a maintainer may pass a private seed so submitters cannot know which episodes are checked.
    """
    k = max(0, min(int(k), int(n)))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFF, zlib.crc32(benchmark.encode()), int(run_seed) & 0xFFFFFFFF])))
    return sorted(int(i) for i in rng.choice(int(n), size=k, replace=False)) if k else []


def _rounded(x: float) -> float:
    return float(RESULT_FORMAT % x)


def _label(run: Run) -> str:
    return f"{run.benchmark}/seed{run.seed}"


def _rebuild(b: Bundle, run: Run) -> Any:
    """The run's method built from its card, set up, with its checkpoint loaded and its params_hash checked."""
    import torch

    from bench.runner import build_learner, params_hash

    label = _label(run)
    if run.checkpoint is None:
        raise _Unverifiable(f"{label}: no checkpoint in the bundle; cannot verify")
    params = {k: v for k, v in run.card["params"].items() if k != "seed"}
    try:
        learner = build_learner(run.card.get("base_method", run.card["method"]), run.bench, run.seed, params)
        learner.setup(b.sets[run.benchmark].task_info())
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


def _rerun(b: Bundle, run: Run, learner: Any, chosen: list[int]) -> dict[int, dict]:
    """The learner's result row of each chosen test episode."""
    es = b.sets[run.benchmark]
    try:
        return {i: learner.evaluate([es.episode("test", i)])[0] for i in chosen}
    except Exception as e:  # noqa: BLE001
        raise _Unverifiable(f"{_label(run)}: re-running the test episodes failed: {type(e).__name__}: {e}") from e


def _compare(run: Run, rows: dict[int, dict], deterministic: bool, result: Verification) -> None:
    """Judge the re-run rows against the submitted ones; add errors, warnings and mismatches to `result`."""
    label = _label(run)
    frame = run.frame.set_index("episode")
    diffs = []
    mismatched = []
    for i, r in rows.items():
        submitted = float(frame.loc[i, "accuracy"])
        recomputed = float(r["accuracy"])
        diffs.append(recomputed - submitted)
        if _rounded(recomputed) != submitted:
            mismatched.append({"benchmark": run.benchmark, "seed": run.seed, "episode": i,
                               "submitted": submitted, "recomputed": recomputed})
        elif not math.isclose(_rounded(float(r["loss"])), float(frame.loc[i, "loss"]), rel_tol=1e-3, abs_tol=1e-5):
            result.warnings.append(f"{label}: episode {i}: loss {r['loss']:.6g} differs from the submitted "
                                   f"{float(frame.loc[i, 'loss']):.6g} (accuracy matches)")
    if not mismatched:
        return
    eps = [m["episode"] for m in mismatched]
    first = mismatched[0]
    text = (f"{label}: accuracy differs on {len(eps)} of {len(rows)} checked episode(s) {short_list(eps)} "
            f"(episode {first['episode']}: submitted {first['submitted']:.6g}, re-run {first['recomputed']:.6g})")
    if deterministic:
        result.mismatches += mismatched
        result.errors.append(text)
    elif abs(float(np.mean(diffs))) > NONDETERMINISTIC_TOLERANCE:
        result.mismatches += mismatched
        result.errors.append(text + f"; mean difference {np.mean(diffs):+.4f} exceeds "
                                    f"{NONDETERMINISTIC_TOLERANCE} for a non-deterministic method")
    else:
        result.warnings.append(text + " (non-deterministic method; mean within tolerance)")


def _verify_run(b: Bundle, run: Run, episodes: int, seed: int, result: Verification) -> None:
    """Re-run a seeded choice of `episodes` test episodes of `run`; record the outcome in `result`."""
    try:
        learner = _rebuild(b, run)
        index = sorted(int(e) for e in run.frame["episode"])
        chosen = [index[i] for i in choose_episodes(len(index), episodes, seed, run.benchmark, run.seed)]
        rows = _rerun(b, run, learner, chosen)
    except _Unverifiable as e:
        result.errors.append(str(e))
        return
    result.checked.append({"benchmark": run.benchmark, "seed": run.seed, "episodes": chosen})
    _compare(run, rows, bool(learner.tags.deterministic), result)


def verify_bundle(path: Path, root: Path | None = None, episodes: int = 20, *, seed: int = 0,
                  mark: bool = True) -> Verification:
    """Re-run `episodes` test episodes of every run from its checkpoint; require the same accuracies.

    The bundle must validate first. For each run the method is built with the card's
    hyperparameters (bench.runner.build_learner), the checkpoint is loaded with
    torch.load(weights_only=True), and a seeded choice of episodes (`choose_episodes(n, episodes,
    seed, ...)`) is evaluated. Accuracies must equal the submitted ones at the precision of the
    result files; for methods tagged non-deterministic, per-episode differences are warnings and
    the mean over the checked episodes must agree within NONDETERMINISTIC_TOLERANCE. With `mark`
    and on success, every run card in the bundle gets `"verified": true` and a `"verification"`
    record, and the manifest is updated (all writes atomic). Nothing is written on failure.
    """
    import torch

    from bench.runner import code_rev

    b = validate(path, root)
    result = Verification(ok=False)
    if b.errors:
        result.errors = ["the bundle does not validate:"] + b.errors
        return result
    result.warnings += b.warnings
    for run in b.live():
        _verify_run(b, run, episodes, seed, result)
    result.ok = not result.errors
    if result.ok and mark:
        _mark_verified(b, result, {"episodes_per_run": int(episodes), "seed": int(seed),
                                   "code_rev": code_rev(), "torch_version": torch.__version__})
        result.marked = True
    return result


def _mark_verified(b: Bundle, result: Verification, record: dict) -> None:
    """Set "verified": true (and the verification record) in every run card; update the manifest."""
    checked = {(c["benchmark"], c["seed"]): c["episodes"] for c in result.checked}
    runs = b.live()
    for run in runs:
        card = dict(run.card)
        card["verified"] = True
        card["verification"] = {**record, "episodes": checked[(run.benchmark, run.seed)]}
        atomic_write_text(b.path / run.card_rel, json.dumps(card, indent=1, sort_keys=True))
    update_manifest(b.path, [run.card_rel for run in runs])
    for p in [b.path / MANIFEST, *(b.path / run.card_rel for run in runs)]:
        p.chmod(0o644)


# ---------------------------------------------------------------------------------------------
# CLI


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a submission bundle by re-running test episodes from its checkpoints."""
    r = verify_bundle(Path(args.bundle), resolve_root(args.root), args.episodes, seed=args.seed,
                      mark=not args.no_mark)
    print_report(f"verification failed: {args.bundle}", r.errors, r.warnings)
    if r.ok:
        n = sum(len(c["episodes"]) for c in r.checked)
        print(f"verified: {args.bundle} ({n} episode(s) in {len(r.checked)} run(s) reproduced"
              f"{'; run cards marked verified' if r.marked else ''})")
    return 0 if r.ok else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the `verify` command."""
    s = sub.add_parser("verify", help="re-run test episodes from a bundle's checkpoints and mark it verified")
    s.add_argument("bundle")
    s.add_argument("--episodes", type=int, default=20, help="test episodes re-run per run (default 20)")
    s.add_argument("--seed", type=int, default=0, help="seed of the choice of episodes")
    s.add_argument("--no-mark", action="store_true", help="do not mark the run cards verified")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache)")
    s.set_defaults(func=cmd_verify)

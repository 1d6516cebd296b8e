"""Submission bundles for tests/test_bundle.py, test_validation.py, test_verify.py and the leaderboard tests.

What a test module makes fixtures of: `made_runs`, three tiny fomaml runs on the synthetic
benchmark and two chance runs; `pristine_bundle`, a valid bundle of the fomaml runs (never
changed); `fresh_bundle`, a copy of it for a test that changes it; `chance_bundles`, quick
bundles of chance-like methods that are ranked, unranked for each reason, or fail the
conformance suite (`GlobalRngChance`, an unregistered method), with a verification record of
the ranked one. The runs and the bundles are built once per test process, however many modules
use them. Helpers change a bundle on purpose: `edit_csv`, `edit_json`, `reseal`; `snapshot`
proves that nothing was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from baselines.chance import Chance
from bench.bundle import MANIFEST, make_bundle, manifest_of
from bench.runner import RunConfig, RunDirs, run

BENCH = "synthetic-5w1s"
TINY = dict(meta_batch=2, hidden=8, inner_steps_test=1)
NO_AXES = dict(step_curve=False, permutations=0, flops=False)
"""These runs are made as before the evaluation axes (bench.axes): such bundles must still validate and verify;
tests/test_axes.py bundles runs with the axes."""
SEED0 = f"results/{BENCH}/fomaml/seed0"

_BUILT: dict[str, Any] = {}  # built once per test process, shared by every module that uses them


def _once(key: str, build: Callable[[], Any]) -> Any:
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def _make_runs(base: Path) -> tuple[RunDirs, RunDirs]:
    torch.set_num_threads(1)
    dirs = RunDirs(base / "root", base / "results", base / "runs")
    for seed in (0, 1, 2):
        run(RunConfig("fomaml", BENCH, seed, steps=2, chunk=1, val_episodes=2, overrides=TINY, label="fomaml",
                      **NO_AXES), dirs, progress=False)
    run(RunConfig("chance", BENCH, 0, steps=0, val_episodes=2, **NO_AXES), dirs, progress=False)
    other = RunDirs(base / "root", base / "other", base / "runs")
    run(RunConfig("chance", BENCH, 1, steps=0, val_episodes=2, **NO_AXES), other, progress=False)
    return dirs, other


def made_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDirs, RunDirs]:
    """Three tiny fomaml runs (seeds 0-2, all 50 test episodes) and one chance run in another folder."""
    return _once("made", lambda: _make_runs(tmp_path_factory.mktemp("made")))


def pristine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid bundle of the three fomaml runs; tests must not change it (see `fresh_bundle`)."""
    dirs, _ = made_runs(tmp_path_factory)
    return _once("pristine", lambda: make_bundle("fomaml", dirs.results, dirs.runs,
                                                 tmp_path_factory.mktemp("b") / "bundle"))


def fresh_bundle(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A fresh copy of the valid bundle under `tmp_path`, for a test that changes it."""
    return Path(shutil.copytree(pristine_bundle(tmp_path_factory), tmp_path / "bundle"))


def snapshot(path: Path) -> dict:
    """Every entry under `path` with its type, bytes hash and mtime: proves nothing was written."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p))
        elif p.is_dir():
            out[str(p)] = ("dir", st.st_mtime_ns)
        else:
            out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_mode)
    return out


def reseal(b: Path) -> None:
    """Rewrite the manifest after a deliberate change, so the content checks (not the hashes) judge it."""
    (b / MANIFEST).write_text(json.dumps(manifest_of(b), indent=1), encoding="utf-8")


def edit_csv(b: Path, fn: Callable[[pd.DataFrame], pd.DataFrame], rel: str = SEED0 + ".csv", seal: bool = True) -> None:
    """Change a result CSV of the bundle (all columns as strings), and the csv_sha256 its run card records
    (as a submitter rewriting both would); reseal the manifest unless `seal` is False."""
    frame = pd.read_csv(b / rel, dtype=str, keep_default_na=False)
    frame = fn(frame)
    frame.to_csv(b / rel, index=False)
    card = (b / rel).with_suffix(".json")
    if card.exists():
        data = json.loads(card.read_text())
        if isinstance(data, dict) and "csv_sha256" in data:
            data["csv_sha256"] = hashlib.sha256((b / rel).read_bytes()).hexdigest()
            card.write_text(json.dumps(data, indent=1))
    if seal:
        reseal(b)


def edit_json(b: Path, rel: str, fn: Callable[[Any], None], seal: bool = True) -> None:
    """Change a JSON file of the bundle in place; reseal the manifest unless `seal` is False."""
    data = json.loads((b / rel).read_text())
    fn(data)
    (b / rel).write_text(json.dumps(data, indent=1))
    if seal:
        reseal(b)


@dataclass
class GlobalRngChance(Chance):
    """Chance that draws from the global torch RNG when adapting: fails check_global_rng_untouched
    (its predictions, uniform, do not change). Unregistered: import it as "bundlefixtures:GlobalRngChance"."""

    def adapt(self, support_x, support_y):
        torch.rand(1)
        return super().adapt(support_x, support_y)


BROKEN = "bundlefixtures:GlobalRngChance"
CHANCE_BUNDLES = {  # label: (method, seeds, test episodes)
    "chance": ("chance", (0, 1, 2), None),
    "lonely": ("chance", (0,), None),
    "partial": ("chance", (0, 1, 2), 20),
    "broken": (BROKEN, (0, 1, 2), None),
}


def _make_chance_bundles(base: Path) -> dict[str, Path]:
    from bench.verify import verify_bundle

    dirs = RunDirs(base / "root", base / "results", base / "runs")
    out = {}
    for label, (method, seeds, n_test) in CHANCE_BUNDLES.items():
        for seed in seeds:
            run(RunConfig(method, BENCH, seed, steps=0, val_episodes=2, test_episodes=n_test, label=label), dirs,
                progress=False)
        out[label] = make_bundle(label, dirs.results, dirs.runs, base / "bundles" / label)
    r = verify_bundle(out["chance"], dirs.root, episodes=3, record_to=base / "records")
    assert r.ok, r.errors
    out["records"] = base / "records"
    return out


def chance_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles of chance-like methods on the synthetic benchmark (tests must not change them):
    "chance" (3 seeds, every test episode: ranked, with a verification record in "records"),
    "lonely" (1 seed), "partial" (20 of 50 test episodes) and "broken" (GlobalRngChance, which fails
    the conformance suite)."""
    return _once("chance", lambda: _make_chance_bundles(tmp_path_factory.mktemp("chance")))

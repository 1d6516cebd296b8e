"""Verification (bench.verify): bundle -> validate -> verify -> leaderboard, and results the checkpoints do not reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import data
from bench.bundle import METADATA, make_bundle
from bench.runner import RunConfig, RunDirs, run
from bench.validation import validate_bundle
from bench.verify import choose_episodes, verify_bundle
from bundlefixtures import BENCH, edit_csv, fresh_bundle, made_runs, reseal, snapshot
from leaderboard import build_site


@pytest.fixture
def made(tmp_path_factory) -> tuple[RunDirs, RunDirs]:
    return made_runs(tmp_path_factory)


@pytest.fixture
def bundle(tmp_path_factory, tmp_path) -> Path:
    return fresh_bundle(tmp_path_factory, tmp_path)


def test_submit_validate_verify_leaderboard(bundle, made, tmp_path):
    _, other = made
    v = validate_bundle(bundle)
    assert v.ok and v.ranked and v.errors == [] and v.warnings == []

    r = verify_bundle(bundle, other.root, episodes=6)
    assert r.ok, r.errors
    assert r.marked and r.mismatches == []
    assert [(c["seed"], len(c["episodes"])) for c in r.checked] == [(0, 6), (1, 6), (2, 6)]
    assert r.checked[0]["episodes"] == choose_episodes(50, 6, 0, BENCH, 0)
    for s in range(3):
        card = json.loads((bundle / f"results/{BENCH}/fomaml/seed{s}.json").read_text())
        assert card["verified"] is True and card["verification"]["episodes"] == r.checked[s]["episodes"]
    assert validate_bundle(bundle).ok  # the manifest follows the marked cards

    site = tmp_path / "site"
    build_site([bundle, other.results], site, n_boot=100)
    html = (site / "index.html").read_text()
    assert 'data-method="fomaml" data-verified="true"' in html
    assert 'data-method="chance" data-verified="false"' in html
    row = html.split('data-method="fomaml"')[1].split("</tr>")[0]
    assert "badge verified" in row


def test_verify_reports_changed_accuracies(bundle):
    checked = choose_episodes(50, 4, 0, BENCH, 0)
    target = checked[1]

    def change(f):
        acc = float(f.loc[f["episode"] == str(target), "accuracy"].iloc[0])
        f.loc[f["episode"] == str(target), "accuracy"] = "%.6g" % (acc + 0.04 if acc < 0.9 else acc - 0.04)
        return f

    edit_csv(bundle, change)
    assert validate_bundle(bundle).ok  # the files are consistent; only a re-run can tell
    before = snapshot(bundle)
    r = verify_bundle(bundle, episodes=4)
    assert not r.ok and not r.marked
    assert [(m["seed"], m["episode"]) for m in r.mismatches] == [(0, target)]
    assert any(f"seed0: accuracy differs on 1 of 4 checked episode(s) [{target}]" in e for e in r.errors), r.errors
    assert snapshot(bundle) == before


def test_verify_reports_a_tampered_checkpoint(bundle):
    path = bundle / f"checkpoints/{BENCH}/fomaml/seed0.pt"
    ckpt = torch.load(path, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for name, t in ckpt["learner"]["meta"].items():
        ckpt["learner"]["meta"][name] = t + torch.randn(t.shape, generator=gen)
    torch.save(ckpt, path)
    reseal(bundle)
    assert validate_bundle(bundle).ok
    before = snapshot(bundle)
    r = verify_bundle(bundle, episodes=10)
    assert not r.ok and r.mismatches and {m["seed"] for m in r.mismatches} == {0}
    assert any("seed0: accuracy differs" in e for e in r.errors)
    assert snapshot(bundle) == before


def test_verify_reports_an_unloadable_checkpoint(bundle):
    (bundle / f"checkpoints/{BENCH}/fomaml/seed1.pt").write_bytes(b"not a checkpoint")
    reseal(bundle)
    before = snapshot(bundle)
    r = verify_bundle(bundle, episodes=1)
    assert not r.ok and any("seed1: checkpoint checkpoints/" in e and "cannot be loaded" in e for e in r.errors)
    assert snapshot(bundle) == before


def test_choose_episodes_is_deterministic_and_spread():
    a = choose_episodes(600, 20, 0, "glyphs-5w1s", 0)
    assert a == choose_episodes(600, 20, 0, "glyphs-5w1s", 0) and len(set(a)) == 20 and a == sorted(a)
    assert a != choose_episodes(600, 20, 1, "glyphs-5w1s", 0)
    assert choose_episodes(5, 20, 0, "x", 0) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# a variable-way Meta-Dataset run, from the genuine records, through bundle, validate and verify


MD_BENCH = "md-omniglot-small"
MD_TINY = dict(hidden=4, meta_batch=1, inner_steps=1, inner_steps_test=1)


@pytest.mark.slow
def test_variable_way_meta_dataset_bundle_validates_and_verifies(shared_data, tmp_path):
    """The registered md-omniglot-small (84 px, ways 5..47) at a tiny budget: 1 seed, 5 of 600 test episodes.

    About 25 s on 2 cores (prepare 3 s, run 16 s, verify 6 s).
    """
    dirs = RunDirs(tmp_path / "root", tmp_path / "results", tmp_path / "runs")
    records = shared_data / "meta_dataset" / "omniglot_small"
    assert data.main(["prepare", "meta-dataset", "--records", str(records), "--root", str(dirs.root),
                      "--no-progress"]) == 0
    run(RunConfig("fomaml", MD_BENCH, 0, steps=2, chunk=2, val_episodes=2, test_episodes=5, overrides=MD_TINY,
                  label="fomaml"),
        dirs, progress=False)
    out = make_bundle("fomaml", dirs.results, dirs.runs, tmp_path / "bundle")
    rows = json.loads((out / METADATA).read_text())["runs"]
    assert [(r["benchmark"], r["test_episodes"]) for r in rows] == [(MD_BENCH, 5)]

    v = validate_bundle(out, dirs.root)
    assert v.ok and not v.ranked, v.errors
    text = " ".join(v.warnings)
    assert "5 of md-omniglot-small's 600 test episodes" in text and "1 training seed(s)" in text

    frame = pd.read_csv(out / f"results/{MD_BENCH}/fomaml/seed0.csv")
    assert len(frame) == 5
    for col in ("way", "n_support", "n_query"):  # variable-way episodes: the shape differs between episodes
        assert frame[col].nunique() > 1, frame[["way", "n_support", "n_query"]]

    r = verify_bundle(out, dirs.root, episodes=5)
    assert r.ok and r.marked, r.errors
    assert r.checked == [{"benchmark": MD_BENCH, "seed": 0, "episodes": [0, 1, 2, 3, 4]}]
    assert validate_bundle(out, dirs.root).ok

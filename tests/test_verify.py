"""Verification (bench.verify): bundle -> validate -> verify (a record, the bundle untouched) -> leaderboard;
results the checkpoints do not reproduce; episodes nobody can predict; code imported only when trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import data
from bench.bundle import METADATA, make_bundle, manifest_sha256
from bench.cli import main
from bench.errors import MetabenchError
from bench.runner import RunConfig, RunDirs, run
from bench.validation import validate_bundle
from bench.verify import choose_episodes, fresh_seed, verify_bundle
from bundlefixtures import BENCH, chance_bundles, edit_csv, fresh_bundle, made_runs, reseal, snapshot
from leaderboard import build_site

REPO = Path(__file__).resolve().parents[1]


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
    assert v.conformance["ok"] and v.conformance["failed"] == []  # re-run here (a registered method)

    before = snapshot(bundle)
    records = tmp_path / "records"
    r = verify_bundle(bundle, other.root, episodes=6, seed=11, record_to=records)
    assert r.ok, r.errors
    assert r.mismatches == [] and r.n_compared == 18 and r.max_accuracy_diff == 0
    assert [(c["seed"], len(c["episodes"])) for c in r.checked] == [(0, 6), (1, 6), (2, 6)]
    assert r.checked[0]["episodes"] == choose_episodes(50, 6, 11, BENCH, 0)
    assert "baselines.maml:FOMAML" in r.imports and "registered" in r.imports
    assert snapshot(bundle) == before  # the bundle is never written
    record = json.loads(r.record.read_text())
    assert r.record.parent == records and record["kind"] == "metabench-verification" and record["ok"] is True
    assert record["manifest_sha256"] == manifest_sha256(bundle)
    for key in ("code_rev", "torch_version", "device", "date", "seed", "runs", "n_compared",
                "max_accuracy_difference", "max_loss_difference", "tolerance"):
        assert key in record, key
    assert record["seed"] == 11 and record["runs"] == r.checked and record["n_compared"] == 18

    site = tmp_path / "site"
    build_site([bundle, other.results], site, verified_dir=records, n_boot=100)
    html = (site / "index.html").read_text()
    assert 'data-method="fomaml" data-verified="true"' in html
    assert 'data-method="chance" data-verified="false"' in html
    row = html.split('data-method="fomaml"')[1].split("</tr>")[0]
    assert "badge verified" in row
    build_site([bundle], tmp_path / "no-records", n_boot=100)  # no record given: no badge
    assert 'data-verified="true"' not in (tmp_path / "no-records" / "index.html").read_text()


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
    r = verify_bundle(bundle, episodes=4, seed=0, record_to=bundle.parent / "records")
    assert not r.ok and r.record is None and not (bundle.parent / "records").exists()
    assert [(m["seed"], m["episode"]) for m in r.mismatches] == [(0, target)]
    assert any(f"seed0: accuracy differs on 1 of 4 checked episode(s) [{target}]" in e for e in r.errors), r.errors
    assert snapshot(bundle) == before


def test_an_unchecked_episode_cannot_be_gamed(bundle):
    """Accuracy 1 on an episode a fixed seed never checks: the same seed passes, but episodes are drawn
    from a fresh seed each time (recorded), and "all" compares every one."""
    unchecked = sorted(set(range(50)) - set(choose_episodes(50, 3, 0, BENCH, 0)))[0]
    edit_csv(bundle, lambda f: f.assign(accuracy=f["accuracy"].where(f["episode"] != str(unchecked), "1")))
    assert verify_bundle(bundle, episodes=3, seed=0).ok  # what a predictable choice let through
    seeds = {verify_bundle(bundle, episodes=1).seed for _ in range(3)}
    assert len(seeds) == 3  # a fresh seed each time
    r = verify_bundle(bundle, episodes="all")
    assert not r.ok and r.n_compared == 150 and [m["episode"] for m in r.mismatches] == [unchecked]


def test_at_least_one_episode_is_compared(bundle, capsys):
    for bad in (0, -5, "some"):
        with pytest.raises(MetabenchError, match="at least 1 or 'all'"):
            verify_bundle(bundle, episodes=bad)
    for bad in ("0", "-5"):
        with pytest.raises(SystemExit) as info:
            main(["verify", str(bundle), "--episodes", bad])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "at least 1 episode must be re-run" in err and "Traceback" not in err
    assert main(["verify", str(bundle), "--episodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "verified:" in out and "3 episode(s) compared in 3 run(s), chosen with seed" in out
    assert "nothing recorded" in out


def test_a_loss_difference_is_reported_with_its_tolerance(bundle):
    target = choose_episodes(50, 2, 5, BENCH, 0)[0]
    edit_csv(bundle, lambda f: f.assign(loss=f["loss"].where(f["episode"] != str(target), "9.5")))
    r = verify_bundle(bundle, episodes=2, seed=5)
    assert r.ok and r.max_loss_diff > 5
    (warning,) = [w for w in r.warnings if "loss" in w]
    assert f"on 1 of 2 episode(s) [{target}]" in warning and "submitted 9.5" in warning
    assert "tolerance (relative 0.001, absolute 1e-05)" in warning


def test_rows_are_re_run_with_the_fused_kernel_and_the_threads_they_were_made_with(bundle, monkeypatch):
    """The fused kernel, and torch's thread count where work runs on its intra-op threads, give the same numbers
    only up to rounding: a row is re-run as its device says it was made (-fused or not, "-<N>t"), whatever
    METABENCH_FUSED and the thread count say in the verifier's process, which keeps both."""
    from baselines import fused
    from baselines.core import GradientLearner

    seen = []
    evaluate = GradientLearner.evaluate
    monkeypatch.setattr(GradientLearner, "evaluate",
                        lambda self, *a, **k: seen.append((fused.enabled(), torch.get_num_threads()))
                        or evaluate(self, *a, **k))
    monkeypatch.setenv("METABENCH_FUSED", "1")
    made_with = torch.get_num_threads()
    assert verify_bundle(bundle, episodes=2, seed=0).ok and seen and not any(on for on, _ in seen)

    edit_csv(bundle, lambda f: f.assign(device=f["device"].str.replace(r"-\d+t$", "-3t-fused", regex=True)))  # seed 0
    monkeypatch.setenv("METABENCH_FUSED", "0")
    for name in ("applies", "stem_applies", "conv_applies"):  # switched on, but runs the unfused ops here
        monkeypatch.setattr(fused, name, lambda *a: False)
    monkeypatch.setattr(fused, "available", lambda: True)
    seen.clear()
    r = verify_bundle(bundle, episodes=2, seed=0)
    assert r.ok, r.errors
    assert seen[0] == (True, 3) and set(seen[1:]) == {(False, made_with)}  # seed 0 as made, seeds 1-2 as made
    assert torch.get_num_threads() == made_with and not fused.enabled()

    monkeypatch.setattr(fused, "available", lambda: False)
    monkeypatch.setattr(fused, "build_error", lambda: "OSError: no C++ compiler")
    r = verify_bundle(bundle, episodes=2, seed=0)
    assert not r.ok and r.mismatches == []
    assert any("seed0" in e and "made with the fused kernel" in e and "no C++ compiler" in e for e in r.errors), r.errors


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
    assert choose_episodes(5, "all", 0, "x", 0) == [0, 1, 2, 3, 4]
    assert choose_episodes(600, 3, fresh_seed(), "x", 0) != choose_episodes(600, 3, fresh_seed(), "x", 0)


# ---------------------------------------------------------------------------------------------
# code: only registered or installed methods are imported, unless trusted


def test_unregistered_methods_are_imported_only_when_trusted(tmp_path_factory, capsys):
    broken = chance_bundles(tmp_path_factory)["broken"]  # bundlefixtures:GlobalRngChance, not registered
    r = verify_bundle(broken, episodes=2)
    assert not r.ok and len(r.errors) == 1
    assert "not registered or installed, imports module 'bundlefixtures'" in r.errors[0]
    assert "--trust-code" in r.errors[0]
    assert main(["verify", str(broken), "--episodes", "2"]) == 1
    captured = capsys.readouterr()
    assert "verify: method 'bundlefixtures:GlobalRngChance': not registered" in captured.out
    assert "Traceback" not in captured.err
    r = verify_bundle(broken, episodes=2, trust_code=True)
    assert r.ok, r.errors
    # trusted, it is imported; the conformance failure is validation's concern (unranked), not verify's
    assert any("fails the conformance suite" in w for w in r.warnings)


def test_bundled_method_source_is_imported_from_the_bundle_only_when_trusted(made, tmp_path):
    dirs, _ = made
    pkg = tmp_path / "src" / "mb_shipped"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "method.py").write_text("from baselines.chance import Chance\n\n\nclass Shipped(Chance):\n"
                                   "    \"\"\"Chance, shipped in a bundle.\"\"\"\n")
    out = tmp_path / "bundle"
    script = (f"from pathlib import Path\nfrom bench.runner import RunConfig, RunDirs, run\n"
              f"from bench.bundle import make_bundle\n"
              f"d = RunDirs(Path({str(dirs.root)!r}), Path({str(tmp_path / 'results')!r}), Path({str(tmp_path / 'runs')!r}))\n"
              f"for s in (0, 1, 2):\n"
              f"    run(RunConfig('mb_shipped.method:Shipped', {BENCH!r}, s, steps=0, val_episodes=2, label='shipped'), d, "
              f"progress=False)\n"
              f"make_bundle('shipped', d.results, d.runs, Path({str(out)!r}), sources=[Path({str(pkg)!r})])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), str(REPO)])}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)  # the submitter's machine
    meta = json.loads((out / METADATA).read_text())
    assert meta["method_source"] == ["code/mb_shipped/__init__.py", "code/mb_shipped/method.py"]
    assert "mb_shipped" not in sys.modules  # here, the package exists only inside the bundle
    r = verify_bundle(out, dirs.root, episodes=1)
    assert not r.ok and "imports module 'mb_shipped.method' from the bundle's code/ folder" in r.errors[0]
    assert "mb_shipped" not in sys.modules
    r = verify_bundle(out, dirs.root, episodes=1, trust_code=True)  # trusted, the bundle's code/ is imported
    assert r.ok, r.errors
    assert sys.modules["mb_shipped.method"].__file__.startswith(str(out.resolve() / "code"))
    assert str(out.resolve() / "code") not in sys.path  # only while importing
    v = validate_bundle(out, dirs.root, trust_code=True)
    assert v.ok and v.ranked and v.conformance["ok"], v.warnings


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

    r = verify_bundle(out, dirs.root, episodes="all")
    assert r.ok and r.n_compared == 5, r.errors
    assert r.checked == [{"benchmark": MD_BENCH, "seed": 0, "episodes": [0, 1, 2, 3, 4]}]
    assert validate_bundle(out, dirs.root).ok


def test_verify_on_cuda_without_cuda_is_one_clear_error(bundle):
    import torch

    from bench.errors import MetabenchError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(MetabenchError, match="no CUDA device"):
        verify_bundle(bundle, episodes=1, device="cuda")

"""Submissions: bundle -> validate -> verify -> leaderboard, and every way a bundle is rejected."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import bench.submit as submit
from bench import benchmarks
from bench.cli import main
from bench.runner import RunConfig, RunDirs, run
from bench.submit import (MANIFEST, METADATA, SubmissionError, choose_episodes, make_bundle, manifest_of,
                          validate_bundle, verify_bundle)
from leaderboard import build_site

BENCH = "synthetic-5w1s"
TINY = dict(meta_batch=2, hidden=8, inner_steps_test=1)
SEED0 = f"results/{BENCH}/fomaml/seed0"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Three tiny fomaml runs (seeds 0-2, all 50 test episodes) and one chance run in another folder."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("made")
    dirs = RunDirs(base / "root", base / "results", base / "runs")
    for seed in (0, 1, 2):
        run(RunConfig("fomaml", BENCH, seed, steps=2, chunk=1, val_episodes=2, overrides=TINY), dirs, progress=False)
    run(RunConfig("chance", BENCH, 0, steps=0, val_episodes=2), dirs, progress=False)
    other = RunDirs(base / "root", base / "other", base / "runs")
    run(RunConfig("chance", BENCH, 1, steps=0, val_episodes=2), other, progress=False)
    return dirs, other


@pytest.fixture(scope="module")
def pristine(made, tmp_path_factory) -> Path:
    dirs, _ = made
    return make_bundle("fomaml", dirs.results, dirs.runs, tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    """A fresh copy of the valid bundle, for tests that change it."""
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


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


def edit_csv(b: Path, fn, rel: str = SEED0 + ".csv", seal: bool = True) -> None:
    frame = pd.read_csv(b / rel, dtype=str, keep_default_na=False)
    frame = fn(frame)
    frame.to_csv(b / rel, index=False)
    if seal:
        reseal(b)


def edit_json(b: Path, rel: str, fn, seal: bool = True) -> None:
    data = json.loads((b / rel).read_text())
    fn(data)
    (b / rel).write_text(json.dumps(data, indent=1))
    if seal:
        reseal(b)


# ---------------------------------------------------------------------------------------------
# the happy path


def test_bundle_layout_metadata_and_manifest(pristine, made):
    dirs, _ = made
    files = sorted(p.relative_to(pristine).as_posix() for p in pristine.rglob("*") if p.is_file())
    assert files == [MANIFEST, *(f"checkpoints/{BENCH}/fomaml/seed{s}.pt" for s in range(3)), METADATA,
                     *(f"results/{BENCH}/fomaml/seed{s}.{ext}" for s in range(3) for ext in ("csv", "json"))]
    meta = json.loads((pristine / METADATA).read_text())
    assert meta["method"] == "fomaml" and meta["target"] == "baselines.maml:MAML"
    assert meta["seeds"] == {BENCH: [0, 1, 2]}
    assert set(meta["environment"]) >= {"python", "torch", "numpy", "platform"}
    assert meta["code_rev"]
    assert [r["params"]["hidden"] for r in meta["runs"]] == [8, 8, 8]
    assert all(r["params"]["first_order"] is True for r in meta["runs"])
    manifest = json.loads((pristine / MANIFEST).read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    assert sorted(listed) == [f for f in files if f != MANIFEST]
    for rel, e in listed.items():
        data = (pristine / rel).read_bytes()
        assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    # the checkpoints are the cards' best.pt, byte for byte; the chance run is not included
    card = json.loads((dirs.results / BENCH / "fomaml" / "seed0.json").read_text())
    assert (pristine / f"checkpoints/{BENCH}/fomaml/seed0.pt").read_bytes() == (dirs.runs / card["checkpoint"]).read_bytes()
    assert "chance" not in json.dumps(manifest)
    assert not [p for p in pristine.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


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


def test_cli_submit_validate_verify(made, tmp_path, capsys):
    dirs, _ = made
    out = tmp_path / "cli-bundle"
    assert main(["submit", "fomaml", "--results", str(dirs.results), "--runs", str(dirs.runs),
                 "--root", str(dirs.root), "-o", str(out)]) == 0
    assert "bundle:" in capsys.readouterr().out
    assert main(["validate", str(out), "--root", str(dirs.root)]) == 0
    out_text = capsys.readouterr().out
    assert "valid:" in out_text and "(ranked)" in out_text
    assert main(["verify", str(out), "--episodes", "2", "--root", str(dirs.root), "--no-mark"]) == 0
    assert "verified:" in capsys.readouterr().out
    assert "verified" not in json.loads((out / f"{SEED0}.json").read_text())
    site = tmp_path / "site" / "index.html"
    assert main(["leaderboard", str(out), "-o", str(site)]) == 0
    assert 'data-method="fomaml" data-verified="false"' in site.read_text()
    # exists already: refused, nothing replaced
    before = snapshot(out)
    assert main(["submit", "fomaml", "--results", str(dirs.results), "--runs", str(dirs.runs), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert snapshot(out) == before


def test_make_bundle_errors_write_nothing(made, tmp_path):
    dirs, _ = made
    out = tmp_path / "b"
    with pytest.raises(SubmissionError, match="no results of method 'maml'.*fomaml"):
        make_bundle("maml", dirs.results, dirs.runs, out)
    with pytest.raises(SubmissionError, match="checkpoint .* not found"):
        make_bundle("fomaml", dirs.results, tmp_path / "wrong-runs", out)
    with pytest.raises(SubmissionError, match="neither registered nor importable"):
        make_bundle("no_such_method", dirs.results, dirs.runs, out)
    assert list(tmp_path.iterdir()) == []


def test_few_seeds_or_partial_episodes_are_accepted_unranked(bundle):
    for s in (1, 2):
        for rel in (f"results/{BENCH}/fomaml/seed{s}.csv", f"results/{BENCH}/fomaml/seed{s}.json",
                    f"checkpoints/{BENCH}/fomaml/seed{s}.pt"):
            (bundle / rel).unlink()
    edit_json(bundle, METADATA, lambda m: m.update(runs=m["runs"][:1], seeds={BENCH: [0]}), seal=False)
    edit_csv(bundle, lambda f: f[f["episode"].astype(int) < 20], seal=False)
    edit_json(bundle, SEED0 + ".json", lambda c: c.update(test_episodes=20))
    v = validate_bundle(bundle)
    assert v.ok and not v.ranked, v.errors
    text = " ".join(v.warnings)
    assert "1 training seed(s)" in text and "at least 3" in text
    assert "20 of synthetic-5w1s's 50 test episodes" in text and "unranked" in text


# ---------------------------------------------------------------------------------------------
# rejected bundles: each with a clear reason, nothing written, verify refuses too


def _rename_column(b):
    edit_csv(b, lambda f: f.rename(columns={"loss": "xent"}))


def _drop_episode(b):
    edit_csv(b, lambda f: f[f["episode"] != "7"])


def _extra_episode(b):
    def add(f):
        row = f.iloc[[-1]].copy()
        row["episode"] = "50"
        return pd.concat([f, row])
    edit_csv(b, add)


def _extra_vs_card(b):
    edit_json(b, SEED0 + ".json", lambda c: c.update(test_episodes=40))


def _tampered_hash(b):
    def change(f):
        f.loc[f["episode"] == "3", "episode_hash"] = "0123456789abcdef"
        return f
    edit_csv(b, change)


def _nan(b):
    def change(f):
        f.loc[f["episode"] == "5", "accuracy"] = "nan"
        return f
    edit_csv(b, change)


def _out_of_range(b):
    def change(f):
        f.loc[f["episode"] == "5", "accuracy"] = "1.5"
        return f
    edit_csv(b, change)


def _unknown_benchmark(b):
    def change(f):
        f["benchmark"] = "synthetic-9w9s"
        return f
    edit_csv(b, change, seal=False)
    edit_json(b, SEED0 + ".json", lambda c: c.update(benchmark="synthetic-9w9s"))


def _traversal_in_manifest(b):
    (b.parent / "x").write_text("outside")
    edit_json(b, MANIFEST, lambda m: m["files"].append({"path": "../x", "sha256": "0" * 64, "size": 7}), seal=False)


def _absolute_in_manifest(b):
    edit_json(b, MANIFEST, lambda m: m["files"].append({"path": "/etc/hostname", "sha256": "0" * 64, "size": 1}),
              seal=False)


def _traversal_in_metadata(b):
    edit_json(b, METADATA, lambda m: m["runs"][0].update(checkpoint="../../runs/best.pt"))


def _symlink_file(b):
    target = b.parent / "outside.csv"
    shutil.copy(b / f"{SEED0}.csv", target)
    (b / f"{SEED0}.csv").unlink()
    (b / f"{SEED0}.csv").symlink_to(target)


def _symlink_dir(b):
    (b / "extra").symlink_to(b.parent)


def _oversized_file(b, monkeypatch):
    monkeypatch.setattr(submit, "MAX_FILE_BYTES", 4000)  # the checkpoints are larger


def _oversized_total(b, monkeypatch):
    monkeypatch.setattr(submit, "MAX_TOTAL_BYTES", 20000)


def _manifest_mismatch(b):
    path = b / f"{SEED0}.csv"
    data = bytearray(path.read_bytes())
    i = data.index(b"fomaml")
    data[i:i + 6] = b"FOMAML"  # one changed field; the manifest is not updated
    path.write_bytes(bytes(data))


def _unlisted_file(b):
    (b / "results" / "notes.txt").write_text("hello")


def _missing_file(b):
    (b / f"results/{BENCH}/fomaml/seed2.json").unlink()


def _card_disagrees(b):
    edit_json(b, SEED0 + ".json", lambda c: c.update(seed=7))


def _params_tampered(b):
    edit_json(b, SEED0 + ".json", lambda c: c["params"].update(hidden=64))


BAD = {
    "wrong columns": (_rename_column, "missing column(s) ['loss']"),
    "missing episode": (_drop_episode, "missing test episode(s) [7]"),
    "extra episode": (_extra_episode, "extra test episode(s) [50]"),
    "extra episode vs card": (_extra_vs_card, "beyond the run card's test_episodes (40)"),
    "tampered hash": (_tampered_hash, "episode hash mismatch at episode(s) [3]"),
    "NaN": (_nan, "column 'accuracy' is empty, NaN or not a number"),
    "out of range": (_out_of_range, "accuracy 1.5 is outside [0, 1]"),
    "unknown benchmark": (_unknown_benchmark, "unknown benchmark 'synthetic-9w9s'"),
    "traversal in manifest": (_traversal_in_manifest, "path '../x' contains '..' (path traversal)"),
    "absolute path in manifest": (_absolute_in_manifest, "'/etc/hostname' is an absolute path"),
    "traversal in metadata": (_traversal_in_metadata, "contains '..' (path traversal)"),
    "symlinked file": (_symlink_file, f"{SEED0}.csv: is a symbolic link"),
    "symlinked folder": (_symlink_dir, "extra: is a symbolic link"),
    "oversized file": (_oversized_file, "over the per-file limit of 4000"),
    "oversized bundle": (_oversized_total, "over the limit of 20000"),
    "manifest sha mismatch": (_manifest_mismatch, f"{SEED0}.csv: sha256 does not match MANIFEST.json"),
    "unlisted file": (_unlisted_file, "results/notes.txt: not listed in MANIFEST.json"),
    "missing file": (_missing_file, "seed2.json: listed in MANIFEST.json but missing"),
    "card disagrees": (_card_disagrees, "seed 7 does not match the results (0)"),
    "params tampered": (_params_tampered, "params_hash does not match its hyperparameters"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bundle_is_rejected_with_a_reason_and_nothing_written(case, bundle, monkeypatch, capsys):
    monkeypatch.setenv("METABENCH_ROOT", str(bundle.parent / "root"))
    spoil, reason = BAD[case]
    if "monkeypatch" in spoil.__code__.co_varnames:
        spoil(bundle, monkeypatch)
    else:
        spoil(bundle)
    before = snapshot(bundle.parent)
    v = validate_bundle(bundle)
    assert not v.ok and not v.ranked
    assert any(reason in e for e in v.errors), v.errors
    r = verify_bundle(bundle, episodes=2)
    assert not r.ok and not r.marked and any(reason in e for e in r.errors)
    assert main(["validate", str(bundle)]) == 1
    err = capsys.readouterr().err
    assert "rejected" in err and reason in err
    assert main(["verify", str(bundle), "--episodes", "1"]) == 1
    assert snapshot(bundle.parent) == before


def test_stale_benchmark_version(bundle, monkeypatch):
    current = benchmarks.BENCHMARKS[BENCH]
    monkeypatch.setitem(benchmarks.BENCHMARKS, BENCH, dataclasses.replace(current, version=current.version + 1))
    before = snapshot(bundle)
    v = validate_bundle(bundle)
    assert not v.ok
    assert any(f"stale benchmark version {BENCH} v1; the current protocol is v2" in e for e in v.errors), v.errors
    assert snapshot(bundle) == before


def test_not_a_bundle(tmp_path):
    v = validate_bundle(tmp_path / "absent")
    assert not v.ok and "not a folder" in v.errors[0]
    (tmp_path / "empty").mkdir()
    v = validate_bundle(tmp_path / "empty")
    assert not v.ok and "MANIFEST.json is missing" in v.errors[0]


# ---------------------------------------------------------------------------------------------
# verify catches results that the checkpoint does not reproduce


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

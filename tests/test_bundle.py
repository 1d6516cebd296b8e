"""The bundle format (bench.bundle): making a bundle, its layout and manifest, its integrity, `metabench submit`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from bench.bundle import (CONFORMANCE, MANIFEST, METADATA, SubmissionError, check_integrity, is_bundle, make_bundle,
                          unsafe_path)
from bench.cli import main
from bench.runner import RunDirs
from bundlefixtures import BENCH, SEED0, made_runs, pristine_bundle, snapshot


@pytest.fixture
def made(tmp_path_factory) -> tuple[RunDirs, RunDirs]:
    return made_runs(tmp_path_factory)


@pytest.fixture
def pristine(tmp_path_factory) -> Path:
    return pristine_bundle(tmp_path_factory)


def test_bundle_layout_metadata_and_manifest(pristine, made):
    dirs, _ = made
    files = sorted(p.relative_to(pristine).as_posix() for p in pristine.rglob("*") if p.is_file())
    assert files == [MANIFEST, *(f"checkpoints/{BENCH}/fomaml/seed{s}.pt" for s in range(3)), CONFORMANCE, METADATA,
                     *(f"results/{BENCH}/fomaml/seed{s}.{ext}" for s in range(3) for ext in ("csv", "json"))]
    meta = json.loads((pristine / METADATA).read_text())
    # fomaml is its own class (baselines.maml:FOMAML) since the method registry became class-based
    assert meta["method"] == "fomaml" and meta["target"] == "baselines.maml:FOMAML"
    assert meta["base_method"] == "fomaml" and meta["method_source"] == []
    # the conformance suite ran when the bundle was made; its report travels with the bundle
    report = json.loads((pristine / CONFORMANCE).read_text())
    assert report["method"] == "fomaml" and report["ok"] is True and report["failed"] == []
    assert {c["check"] for c in report["checks"]} >= {"check_interface", "check_adapt_leaves_meta_untouched"}
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


def test_integrity_of_a_pristine_bundle(pristine, tmp_path):
    found = check_integrity(pristine)
    assert found.errors == [] and found.intact == found.listed and METADATA in found.intact
    assert len(found.listed) == 11  # metadata.json, conformance.json and 3 x (csv, card, checkpoint)
    assert is_bundle(pristine) and not is_bundle(tmp_path)


@pytest.mark.parametrize("name, why", [
    ("results/a.csv", None), ("../x", "contains '..' (path traversal)"), ("/etc/x", "is an absolute path"),
    ("C:x", "is an absolute path"), ("a//b", "has an empty or '.' component"), ("a/./b", "has an empty or '.' component"),
    ("a\\b", "contains a backslash or control character"), ("", "not a non-empty string"), (3, "not a non-empty string"),
])
def test_unsafe_path(name, why):
    assert unsafe_path(name) == why


def test_cli_submit_validate_verify(made, tmp_path, capsys):
    dirs, _ = made
    out = tmp_path / "cli-bundle"
    assert main(["submit", "fomaml", "--results", str(dirs.results), "--runs", str(dirs.runs),
                 "--root", str(dirs.root), "-o", str(out)]) == 0
    assert "conformance suite: passed" in capsys.readouterr().out
    assert main(["validate", str(out), "--root", str(dirs.root)]) == 0
    out_text = capsys.readouterr().out
    assert "valid:" in out_text and "(ranked; conformance suite passed)" in out_text
    before = snapshot(out)
    records = tmp_path / "records"
    assert main(["verify", str(out), "--episodes", "2", "--root", str(dirs.root), "--record-to", str(records)]) == 0
    out_text = capsys.readouterr().out
    assert "verified:" in out_text and "6 episode(s) compared" in out_text and f"record: {records}" in out_text
    assert snapshot(out) == before  # verify writes the record, never the bundle
    assert "verified" not in json.loads((out / f"{SEED0}.json").read_text())
    site = tmp_path / "site" / "index.html"
    assert main(["leaderboard", str(out), "-o", str(site), "--root", str(dirs.root)]) == 0
    assert 'data-method="fomaml" data-verified="false"' in site.read_text()
    assert main(["leaderboard", str(out), "-o", str(site), "--root", str(dirs.root), "--verified", str(records)]) == 0
    assert 'data-method="fomaml" data-verified="true"' in site.read_text()
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
    renamed = Path(shutil.copytree(dirs.results / BENCH / "fomaml", tmp_path / "res" / BENCH / "fomaml"))
    for card in renamed.glob("*.json"):
        card.write_text(json.dumps(json.loads(card.read_text()) | {"base_method": "no_such_method"}))
    with pytest.raises(SubmissionError, match="neither registered nor importable"):
        make_bundle("fomaml", tmp_path / "res", dirs.runs, out)
    shutil.rmtree(tmp_path / "res")
    with pytest.raises(SubmissionError, match="--source takes .py files or package folders"):
        make_bundle("fomaml", dirs.results, dirs.runs, out, sources=[tmp_path / "absent.py"])
    assert list(tmp_path.iterdir()) == []

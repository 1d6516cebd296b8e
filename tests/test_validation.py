"""Validation of bundles (bench.validation): valid, valid but unranked, and every way a bundle is rejected."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bench.bundle as bundle_format
from bench import benchmarks
from bench.bundle import CONFORMANCE, MANIFEST, METADATA, make_bundle
from bench.cli import main
from bench.errors import DataError
from bench.results import ADDED_COLUMNS
from bench.runner import RunConfig, RunDirs, run
from bench.sources import SOURCES
from bench.validation import RULES, describe_loader, validate_bundle
from bench.verify import verify_bundle
from bundlefixtures import (BENCH, SEED0, chance_bundles, edit_csv, edit_json, fresh_bundle, pristine_bundle, reseal,
                            snapshot)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundle(tmp_path_factory, tmp_path) -> Path:
    return fresh_bundle(tmp_path_factory, tmp_path)


def test_pristine_bundle_is_valid_and_ranked(tmp_path_factory):
    v = validate_bundle(pristine_bundle(tmp_path_factory))
    assert v.ok and v.ranked and v.errors == [] and v.warnings == [] and v.failed == {}
    assert v.conformance["ok"] and v.conformance["method"] == "fomaml"  # the suite, re-run here


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


def _linked_folder(b):
    real = b.parent / "real-bundle"
    b.rename(real)
    b.symlink_to(real)


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


def _other_data(b):
    edit_json(b, SEED0 + ".json", lambda c: c["data_fingerprints"].update(synthetic="0" * 16))


def _set(column, value, episode=None):
    """A spoil that sets `column` of seed 0's results to `value`, in the row of `episode` (None: every row)."""
    def spoil(b):
        def change(f):
            f.loc[f["episode"] == str(episode) if episode is not None else f.index, column] = value
            return f
        edit_csv(b, change)
    return spoil


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


def _metadata_format(b):
    edit_json(b, METADATA, lambda m: m.update(format=2))


def _seeds_disagree(b):
    edit_json(b, METADATA, lambda m: m.update(seeds={BENCH: [0, 1, 5]}))


def _symlink_file(b):
    target = b.parent / "outside.csv"
    shutil.copy(b / f"{SEED0}.csv", target)
    (b / f"{SEED0}.csv").unlink()
    (b / f"{SEED0}.csv").symlink_to(target)


def _symlink_dir(b):
    (b / "extra").symlink_to(b.parent)


def _oversized_file(b, monkeypatch):
    monkeypatch.setattr(bundle_format, "MAX_FILE_BYTES", 4000)  # the checkpoints are larger


def _oversized_total(b, monkeypatch):
    monkeypatch.setattr(bundle_format, "MAX_TOTAL_BYTES", 20000)


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


def _undeclared_code(b):
    (b / "results" / "sitecustomize.py").write_text("import os\n")
    reseal(b)


def _conformance_garbage(b):
    (b / CONFORMANCE).write_text(json.dumps({"ok": "yes"}))
    reseal(b)


BAD = {
    "symlinked bundle folder": (_linked_folder, "the bundle folder is a symbolic link"),
    "wrong columns": (_rename_column, "missing column(s) ['loss']"),
    "missing episode": (_drop_episode, "missing test episode(s) [7]"),
    "extra episode": (_extra_episode, "extra test episode(s) [50]"),
    "extra episode vs card": (_extra_vs_card, "beyond the run card's test_episodes (40)"),
    "tampered hash": (_set("episode_hash", "0123456789abcdef", episode=3),
                      "episode hash mismatch at episode(s) [3]"),
    "NaN": (_set("accuracy", "nan", episode=5), "column 'accuracy' is empty, NaN or not a number"),
    "out of range": (_set("accuracy", "1.5", episode=5), "accuracy 1.5 is outside [0, 1]"),
    "not the test split": (_set("split", "val"), "split must be 'test' (found ['val'])"),
    "row off the protocol": (_set("n_query", "24", episode=4),
                             "episode 4: n_query 24, but the protocol (5-way 1-shot 5 query) has 25"),
    "unknown benchmark": (_unknown_benchmark, "unknown benchmark 'synthetic-9w9s'"),
    "traversal in manifest": (_traversal_in_manifest, "path '../x' contains '..' (path traversal)"),
    "absolute path in manifest": (_absolute_in_manifest, "'/etc/hostname' is an absolute path"),
    "traversal in metadata": (_traversal_in_metadata, "contains '..' (path traversal)"),
    "metadata format": (_metadata_format, "metadata.json: format 2, expected 1"),
    "axis file missing": (lambda b: edit_json(b, SEED0 + ".json", lambda c: c.update(
        axes={"steps": {"file": "seed0.steps.csv", "sha256": "0" * 64}})),
        f"its card records a steps axis, but 'axes' does not list {SEED0}.steps.csv"),
    "seeds disagree": (_seeds_disagree, "seeds of synthetic-5w1s [0, 1, 5] do not match the runs ([0, 1, 2])"),
    "symlinked file": (_symlink_file, f"{SEED0}.csv: is a symbolic link"),
    "symlinked folder": (_symlink_dir, "extra: is a symbolic link"),
    "oversized file": (_oversized_file, "over the per-file limit of 4000"),
    "oversized bundle": (_oversized_total, "over the limit of 20000"),
    "manifest sha mismatch": (_manifest_mismatch, f"{SEED0}.csv: sha256 does not match MANIFEST.json"),
    "unlisted file": (_unlisted_file, "results/notes.txt: not listed in MANIFEST.json"),
    "missing file": (_missing_file, "seed2.json: listed in MANIFEST.json but missing"),
    "card disagrees": (_card_disagrees, "seed 7 does not match the results (0)"),
    "params tampered": (_params_tampered, "params_hash does not match its hyperparameters"),
    "undeclared code": (_undeclared_code, "results/sitecustomize.py: a code file the bundle does not declare as its "
                                          "method source"),
    "conformance report garbage": (_conformance_garbage, "conformance.json: not a conformance report"),
    "runs on other data": (_other_data, "(another or a modified cache): not comparable"),
}

# the broken bundle each validation rule must reject, with its reason (a case of BAD)
RULE_CASES = {
    "bundle_is_a_folder": "symlinked bundle folder",
    "files_match_manifest": "manifest sha mismatch",
    "metadata_is_well_formed": "metadata format",
    "run_files_are_listed": "traversal in metadata",
    "code_files_are_declared": "undeclared code",
    "results_columns_are_valid": "wrong columns",
    "card_matches_results": "card disagrees",
    "params_hash_matches": "params tampered",
    "rows_are_test_episodes": "not the test split",
    "benchmark_is_known_and_current": "unknown benchmark",
    "rows_fit_the_protocol": "row off the protocol",
    "test_episodes_are_complete": "missing episode",
    "episode_hashes_match": "tampered hash",
    "axis_files_match_results": "axis file missing",
    "seeds_are_distinct_and_enough": "seeds disagree",
    "data_fingerprints_agree": "runs on other data",
    "method_conforms": "conformance report garbage",
}


def spoil(case, b, monkeypatch):
    """Break bundle `b` the way BAD[case] says; its expected reason."""
    fn, reason = BAD[case]
    if "monkeypatch" in fn.__code__.co_varnames:
        fn(b, monkeypatch)
    else:
        fn(b)
    return reason


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bundle_is_rejected_with_a_reason_and_nothing_written(case, bundle, monkeypatch, capsys):
    monkeypatch.setenv("METABENCH_ROOT", str(bundle.parent / "root"))
    reason = spoil(case, bundle, monkeypatch)
    before = snapshot(bundle.parent)
    v = validate_bundle(bundle)
    assert not v.ok and not v.ranked
    assert any(reason in e for e in v.errors), v.errors
    r = verify_bundle(bundle, episodes=2)
    assert not r.ok and r.record is None and any(reason in e for e in r.errors)
    assert main(["validate", str(bundle)]) == 1
    err = capsys.readouterr().err
    assert "rejected" in err and reason in err
    assert main(["verify", str(bundle), "--episodes", "1"]) == 1
    assert snapshot(bundle.parent) == before


def test_every_rule_has_a_broken_bundle():
    assert list(RULE_CASES) == list(RULES)  # the rules, in the order they run
    assert all(RULES.entry(name).about for name in RULES)  # each says what it requires


@pytest.mark.parametrize("rule", list(RULE_CASES))
def test_each_rule_rejects_its_broken_bundle_with_its_reason(rule, bundle, monkeypatch):
    reason = spoil(RULE_CASES[rule], bundle, monkeypatch)
    v = validate_bundle(bundle)
    assert not v.ok and any(reason in e for e in v.failed.get(rule, [])), v.failed
    assert [e for errors in v.failed.values() for e in errors] == v.errors  # each error, by its rule


def test_stale_benchmark_version(bundle, monkeypatch):
    current = benchmarks.get_benchmark(BENCH)
    newer = dataclasses.replace(current, version=current.version + 1)
    registered = benchmarks.get_benchmark  # BENCHMARKS is a Registry: replace what validation looks up
    monkeypatch.setattr(benchmarks, "get_benchmark", lambda name: newer if name == BENCH else registered(name))
    before = snapshot(bundle)
    v = validate_bundle(bundle)
    assert not v.ok
    assert any(f"stale benchmark version {BENCH} v1; the current protocol is v2" in e for e in v.errors), v.errors
    assert v.failed["benchmark_is_known_and_current"] == v.errors
    assert snapshot(bundle) == before


def test_not_a_bundle(tmp_path):
    v = validate_bundle(tmp_path / "absent")
    assert not v.ok and "not a folder" in v.errors[0]
    (tmp_path / "empty").mkdir()
    v = validate_bundle(tmp_path / "empty")
    assert not v.ok and "MANIFEST.json is missing" in v.errors[0]


# ---------------------------------------------------------------------------------------------
# old result files, conformance, code


def test_a_bundle_of_result_files_without_the_added_columns_stays_valid(bundle):
    for s in range(3):
        edit_csv(bundle, lambda f: f.drop(columns=list(ADDED_COLUMNS)), rel=f"results/{BENCH}/fomaml/seed{s}.csv")
    assert "adapt_batch" not in (bundle / f"{SEED0}.csv").read_text()
    v = validate_bundle(bundle)
    assert v.ok and v.ranked, v.errors


def test_a_bundle_without_a_conformance_report_is_checked_here(bundle):
    (bundle / CONFORMANCE).unlink()
    reseal(bundle)
    v = validate_bundle(bundle)
    assert v.ok and v.ranked and v.conformance["ok"]
    assert any("conformance.json is missing" in w for w in v.warnings)


def test_a_method_failing_the_conformance_suite_is_accepted_unranked(tmp_path_factory, capsys):
    broken = chance_bundles(tmp_path_factory)["broken"]
    submitted = json.loads((broken / CONFORMANCE).read_text())
    assert submitted["ok"] is False and submitted["failed"] == ["check_global_rng_untouched"]
    v = validate_bundle(broken)  # not registered: not imported, so not re-run
    assert v.ok and not v.ranked and v.conformance is None
    assert any("the conformance suite was not re-run" in w and "--trust-code" in w for w in v.warnings)
    v = validate_bundle(broken, trust_code=True)
    assert v.ok and not v.ranked and v.conformance["failed"] == ["check_global_rng_untouched"]
    assert any("fails the conformance suite (bench.checks): check_global_rng_untouched" in w for w in v.warnings)
    assert main(["validate", str(broken), "--trust-code"]) == 0
    assert "(unranked; conformance suite FAILED)" in capsys.readouterr().out


def test_declared_method_source_must_be_python_under_code(bundle):
    (bundle / "code").mkdir()
    (bundle / "code" / "helper.so").write_bytes(b"\x7fELF")
    edit_json(bundle, METADATA, lambda m: m.update(method_source=["code/helper.so", "code/missing.py"]))
    v = validate_bundle(bundle)
    assert not v.ok
    assert any("method source 'code/helper.so' must be a .py file under code/" in e for e in v.errors)
    assert any("method source code/missing.py is not in the bundle's MANIFEST.json" in e for e in v.errors)
    assert any("code/helper.so: a code file the bundle does not declare" in e for e in v.errors)


# ---------------------------------------------------------------------------------------------
# read-only: validation writes no data cache


GOLDEN = json.loads((REPO / "tests" / "golden" / "spec_hashes.json").read_text())


def test_glyphs_episodes_are_described_from_the_class_table_without_pixels(tmp_path):
    es = benchmarks.load("glyphs-5w1s", tmp_path / "root", loader=describe_loader)
    assert es.source.images.shape[0] == 0  # no pixels
    for split in ("train", "val", "test"):
        assert [es.describe(split, i).hash for i in range(5)] == GOLDEN["glyphs-5w1s"][split]
    assert not (tmp_path / "root").exists()


def test_a_source_that_would_build_its_cache_is_refused_not_built(tmp_path):
    with pytest.raises(DataError, match="'omniglot-small' is not prepared at 28px .* validation writes no data cache"):
        describe_loader("omniglot-small", tmp_path / "root", 28)
    assert not (tmp_path / "root").exists()


def _fake_glyphs(root, image_size):
    """The glyphs' classes with blank pixels: the same episodes (hashes) without rendering."""
    src = describe_loader("glyphs", root, image_size)
    return dataclasses.replace(src, images=np.zeros((int(src.class_count.sum()), image_size, image_size), np.uint8))


def test_validating_a_glyphs_bundle_writes_no_cache(tmp_path, monkeypatch, capsys):
    """`validate` without --root once rendered 29 MB of glyphs into the user's cache."""
    dirs = RunDirs(tmp_path / "build-root", tmp_path / "results", tmp_path / "runs")
    with monkeypatch.context() as m:
        m.setitem(SOURCES._resolved, "glyphs", _fake_glyphs)
        for seed in (0, 1, 2):
            run(RunConfig("chance", "glyphs-5w1s", seed, steps=0, val_episodes=2), dirs, progress=False)
    out = make_bundle("chance", dirs.results, dirs.runs, tmp_path / "bundle")
    empty = tmp_path / "user-cache"
    monkeypatch.setenv("METABENCH_ROOT", str(empty))
    before = snapshot(out)
    assert main(["validate", str(out)]) == 0
    out_text = capsys.readouterr().out
    assert "valid:" in out_text and "(ranked;" in out_text
    assert not empty.exists() and snapshot(out) == before
    v = validate_bundle(out)
    assert v.ok and v.ranked, v.errors
    assert not empty.exists()

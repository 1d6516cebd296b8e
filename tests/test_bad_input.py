"""Bad input never becomes a wrong result: every case below exits 2 with one line on stderr (no
traceback) and changes nothing in the results, runs and data folders."""

from __future__ import annotations

import errno
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench.cli import main
from bench.errors import DataError

SMALL = ["--steps", "1", "--chunk", "1", "--val-episodes", "2", "--test-episodes", "2",
         "--set", "hidden=4", "--set", "meta_batch=1", "--set", "inner_steps_test=1"]

BROKEN = {
    "syntax_mod.py": "def broken(:\n",
    "raising_mod.py": "raise RuntimeError('boom at import')\n",
    "bad_methods.py": '''
        from dataclasses import dataclass
        import torch
        from baselines.maml import FOMAML


        @dataclass
        class WrongShape(FOMAML):
            def adapt_many(self, supports):
                return [lambda q: torch.zeros(len(q), 2) for _ in supports]


        @dataclass
        class NaNLogits(FOMAML):
            def adapt_many(self, supports):
                return [lambda q: torch.full((len(q), 5), float("nan")) for _ in supports]


        @dataclass
        class ObjectState(FOMAML):
            def state_dict(self):
                return {**super().state_dict(), "thing": object()}
    ''',
}

CASES = {
    # wrong results with exit 0 before
    "val-episodes-0": (["--val-episodes", "0"], "--val-episodes 0: must be a whole number from 1"),
    "huge-seed": (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999: must be a whole number"),
    "seed-negative": (["--seed", "-1"], "--seed -1: must be a whole number from 0"),
    "first-order-maybe": (["--set", "first_order=maybe"], "first_order='maybe' must be true or false"),
    "inner-steps-negative": (["--set", "inner_steps=-2"], "inner_steps=-2 must be >=1"),
    "patience-negative": (["--patience", "-1"], "--patience -1: must be a whole number from 1"),
    "steps-negative": (["--steps", "-5"], "--steps -5: must be a whole number from 0"),
    # never-ending or late failures
    "chunk-0": (["--chunk", "0"], "--chunk 0: must be a whole number from 1"),
    "chunk-negative": (["--chunk", "-1"], "--chunk -1: must be a whole number from 1"),
    "test-episodes-0": (["--test-episodes", "0"], "--test-episodes 0: must be a whole number from 1"),
    "test-episodes-beyond": (["--test-episodes", "700"], "synthetic-5w1s has 50 test episodes"),
    # tracebacks before
    "hidden-abc": (["--set", "hidden=abc"], "hidden='abc' must be a whole number"),
    "hidden-negative": (["--set", "hidden=-3"], "hidden=-3 must be >=1"),
    "hidden-float": (["--set", "hidden=8.0"], "hidden=8.0 must be a whole number"),
    "meta-batch-0": (["--set", "meta_batch=0"], "meta_batch=0 must be >=1"),
    "inner-lr-nan": (["--set", "inner_lr=nan"], "inner_lr='nan' must be a number"),
    "inner-steps-float": (["--set", "inner_steps=1.5"], "inner_steps=1.5 must be a whole number"),
    "seed-as-override": (["--set", "seed=5"], "give the run's seed with --seed"),
    "unknown-hyperparameter": (["--set", "inner_lrr=0.1"], "did you mean 'inner_lr'"),
    "device-cuda": (["--device", "cuda"], "no CUDA device"),
    "bad-label": (["--label", "a/b"], "--label 'a/b'"),
}
METHOD_CASES = {
    "target-colon": (":X", "must look like 'pkg.module:Class'"),
    "syntax-error": ("syntax_mod:X", "SyntaxError"),
    "raises-on-import": ("raising_mod:X", "RuntimeError: boom at import"),
    "adapt-many-shape": ("bad_methods:WrongShape", "logits of shape [25, 2], expected [n_query, way] = [25, 5]"),
    "adapt-many-nan": ("bad_methods:NaNLogits", "non-finite logits"),
    "state-dict-object": ("bad_methods:ObjectState", "cannot load the checkpoint with weights_only=True"),
}


@pytest.fixture()
def place(tmp_path, monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir()
    for name, text in BROKEN.items():
        (mods / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(mods))
    return tmp_path


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "mods" not in p.parts and "__pycache__" not in p.parts}


def one_clean_error(capsys, code: int, expect: str) -> str:
    err = capsys.readouterr().err
    # progress bars redraw with "\r"; what a terminal keeps of each line is its last segment
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", ln).split("\r")[-1] for ln in err.splitlines()]
    lines = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith(("fit ", "test ", "validate ", "glyphs:"))]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("metabench: error: "), err
    assert expect in lines[0], lines[0]
    return lines[0]


def folders(tmp: Path, results: str = "results", runs: str = "runs", root: str = "root") -> list[str]:
    return ["--results", str(tmp / results), "--runs", str(tmp / runs), "--root", str(tmp / root)]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_run_arguments(place, capsys, case):
    args, expect = CASES[case]
    before = snapshot(place)
    code = main(["run", "fomaml", "synthetic-5w1s", *SMALL, *folders(place), *args])
    one_clean_error(capsys, code, expect)
    assert snapshot(place) == before


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_bad_methods(place, capsys, case):
    target, expect = METHOD_CASES[case]
    before = snapshot(place)
    code = main(["run", target, "synthetic-5w1s", *SMALL, *folders(place)])
    one_clean_error(capsys, code, expect)
    results = snapshot(place / "results") if (place / "results").exists() else {}
    assert not [k for k in results if k.endswith((".csv", ".json"))]  # no result of a broken method
    if case in ("target-colon", "syntax-error", "raises-on-import"):
        assert snapshot(place) == before


@pytest.mark.parametrize("where", ["results", "runs", "root"])
def test_output_folder_under_a_file(place, capsys, where):
    (place / "afile").write_text("x")
    kw = {where: "afile/sub"}
    before = snapshot(place)
    code = main(["run", "fomaml", "glyphs-5w1s" if where == "root" else "synthetic-5w1s", *SMALL,
                 *folders(place, **kw)])
    one_clean_error(capsys, code, "afile")
    assert snapshot(place) == before


def test_results_is_a_file(place, capsys):
    (place / "results").write_text("not a folder")
    before = snapshot(place)
    code = main(["run", "fomaml", "synthetic-5w1s", *SMALL, *folders(place)])
    one_clean_error(capsys, code, "results folder is not writable")
    assert snapshot(place) == before


def test_full_disk_is_caught_before_any_work(place, capsys, monkeypatch):
    import tempfile

    real = tempfile.NamedTemporaryFile

    def full(*args, **kwargs):
        if "metabench-write-test" in str(kwargs.get("prefix", "")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", full)
    code = main(["run", "fomaml", "synthetic-5w1s", *SMALL, *folders(place)])
    one_clean_error(capsys, code, "No space left on device")
    assert not (place / "runs").exists() or not list((place / "runs").rglob("*.pt"))


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(place, capsys, monkeypatch):
    import torch

    assert main(["run", "fomaml", "synthetic-5w1s", *SMALL, *folders(place), "--label", "x"]) == 0
    before = snapshot(place / "runs")
    capsys.readouterr()

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 18432 vs 18324")

    monkeypatch.setattr(torch, "save", full)
    code = main(["run", "fomaml", "synthetic-5w1s", *SMALL, *folders(place), "--label", "x", "--steps", "2"])
    one_clean_error(capsys, code, "cannot write the checkpoint")
    after = snapshot(place / "runs")
    assert {k: v for k, v in after.items() if k.endswith(".pt")} == {k: v for k, v in before.items() if k.endswith(".pt")}


def test_a_modified_cache_is_refused(tmp_path):
    from bench.sources.base import load_cache, save_cache
    from bench.sources.synthetic import make_synthetic

    path = tmp_path / "cache"
    save_cache(path, make_synthetic(image_size=28))
    assert load_cache(path).content_fingerprint()
    images = np.load(path / "images.npy", mmap_mode="r+")
    images[:] = 255 - images  # inverted pixels: same shape, same episode hashes, other numbers
    images.flush()
    del images
    with pytest.raises(DataError, match="modified since it was built"):
        load_cache(path)


def test_temporary_files_of_a_killed_writer_are_cleaned_by_the_next_one(place, capsys):
    args = ["run", "fomaml", "synthetic-5w1s", *SMALL, *folders(place), "--label", "x"]
    assert main(args) == 0
    folder = next((place / "runs").rglob("last.pt")).parent
    stale = folder / ".last.pt.abc123.tmp"
    stale.write_text("half a checkpoint")
    result_tmp = place / "results" / "synthetic-5w1s" / "x" / ".seed0.csv.zz.tmp"
    result_tmp.write_text("half a csv")
    assert main([*args, "--steps", "2"]) == 0
    assert not stale.exists() and not result_tmp.exists()


def test_runs_on_other_data_are_not_joined(tmp_path):
    """A card records the data's fingerprint; the page (and validation) refuse to join runs of one
    benchmark made on different data."""
    import json

    from bench.errors import ResultsError
    from bench.results import fingerprint_conflicts
    from bench.runner import RunConfig, RunDirs, run
    from leaderboard.build import load_results

    dirs = RunDirs(tmp_path / "root", tmp_path / "results", tmp_path / "runs")
    small = dict(hidden=4, meta_batch=1, inner_steps_test=1)
    for method in ("fomaml", "chance"):
        run(RunConfig(method, "synthetic-5w1s", 0, 0 if method == "chance" else 1, chunk=1, val_episodes=2,
                      test_episodes=2, overrides=small if method == "fomaml" else {}, label=method), dirs, progress=False)
    cards = sorted((tmp_path / "results").rglob("seed0.json"))
    fps = [json.loads(c.read_text())["data_fingerprints"] for c in cards]
    assert fps[0] == fps[1] and len(fps[0]["synthetic"]) == 16
    assert load_results([tmp_path / "results"]).runs
    card = json.loads(cards[0].read_text())
    card["data_fingerprints"]["synthetic"] = "0" * 16  # as if run on a modified cache
    cards[0].write_text(json.dumps(card))
    assert fingerprint_conflicts([(str(c), json.loads(c.read_text())) for c in cards])
    with pytest.raises(ResultsError, match="not comparable"):
        load_results([tmp_path / "results"])


@pytest.mark.parametrize("command", ["leaderboard", "submit"])
def test_outputs_under_a_file_are_one_line(tmp_path, capsys, command):
    assert main(["run", "chance", "synthetic-5w1s", "--steps", "0", "--val-episodes", "2", "--test-episodes", "2",
                 *folders(tmp_path), "--quiet"]) == 0
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    before = snapshot(tmp_path)
    if command == "leaderboard":
        code = main(["leaderboard", str(tmp_path / "results"), "-o", str(tmp_path / "afile" / "site" / "index.html")])
    else:
        code = main(["submit", "chance", "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"),
                     "--root", str(tmp_path / "root"), "-o", str(tmp_path / "afile" / "bundle")])
    one_clean_error(capsys, code, "a file is in the way of a folder")
    assert snapshot(tmp_path) == before

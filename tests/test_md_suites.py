"""Meta-Dataset suites end to end on generated records of the official layout: md-imagenet and md-all
train once, validate on ILSVRC, and write one CSV per test source whose episodes are exactly those of
the single-source benchmark; through `run` and `grid`; missing sources fail before any training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench import benchmarks, grid
from bench.errors import DataError, MetabenchError
from bench.results import read_axis, read_card, read_csv
from bench.runner import RunConfig, RunDirs, check_identity, plan, run
from bench.sources import meta_dataset as md
from datafixtures import small_meta_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = dict(hidden=4, inner_steps=1, inner_steps_test=1)
N_TEST = 3


@pytest.fixture(scope="module")
def small_md(tmp_path_factory):
    """(records, root) with the ten official sources in miniature, prepared at 84 px (OFFICIAL patched to
    their miniature class and image counts so `prepare` accepts them under the official names)."""
    base = tmp_path_factory.mktemp("small-md")
    counts = small_meta_dataset(base / "records")
    with pytest.MonkeyPatch.context() as mp:
        for name, (per_split, images) in counts.items():
            mp.setitem(md.OFFICIAL, name, dataclasses.replace(md.OFFICIAL[name], classes=per_split, images=images))
        md.prepare(base / "records", base / "root", opts=md.QUIET)
        yield base / "records", base / "root"


def test_suites_are_registered_with_the_ten_single_source_benchmarks():
    imagenet, every = benchmarks.get_benchmark("md-imagenet"), benchmarks.get_benchmark("md-all")
    assert imagenet.members == tuple("md-" + md.source_key(n)[3:] for n in md.OFFICIAL)
    assert every.members == tuple("md-all-" + md.source_key(n)[3:] for n in md.OFFICIAL)
    for suite in (imagenet, every):
        assert suite.is_suite and len(suite.members) == 10 and suite.preset == "meta-dataset"
        for m in suite.member_benchmarks():  # the same regime: training and validation sources agree
            assert m.protocol.split_sources(m, "train") == suite.protocol.split_sources(suite, "train")
            assert m.protocol.split_sources(m, "val") == ("md-ilsvrc-2012",)
    assert not benchmarks.get_benchmark("md-aircraft").is_suite


def test_missing_sources_fail_before_training(small_md, tmp_path):
    records, _ = small_md
    root = tmp_path / "root"
    md.prepare(records, root, opts=md.QUIET, only=("ilsvrc_2012", "aircraft"))
    dirs = RunDirs(root, tmp_path / "results", tmp_path / "runs")
    with pytest.raises(DataError) as e:
        run(RunConfig("fomaml", "md-imagenet", steps=2, overrides=TINY, label="fomaml"), dirs, progress=False)
    msg = str(e.value)
    missing = [n for n in md.OFFICIAL if n not in ("ilsvrc_2012", "aircraft")]
    assert "needs 8 sources" in msg and "md-aircraft:" not in msg
    for name in missing:
        assert f"md-{md.OFFICIAL[name].key}: Meta-Dataset" in msg and f"({name})" in msg
    assert msg.count("metabench data prepare meta-dataset --records DIR") == 8
    assert not list((tmp_path / "runs").rglob("*.pt"))  # nothing was trained
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.csv"))


@pytest.mark.slow
def test_imagenet_suite_end_to_end(small_md, tmp_path):
    _, root = small_md
    dirs = RunDirs(root, tmp_path / "results", tmp_path / "runs")
    cfg = RunConfig("fomaml", "md-imagenet", steps=2, chunk=1, val_episodes=2, test_episodes=N_TEST,
                    overrides=TINY, label="fomaml")
    card_path = run(cfg, dirs, progress=False)
    assert card_path == tmp_path / "results" / "md-imagenet" / "fomaml" / "seed0.json"
    card = json.loads(card_path.read_text())
    assert card["members"] == list(benchmarks.get_benchmark("md-imagenet").members)
    assert len(card["curve"]) == 3 and card["fit_steps"] == 2 and card["steps"] == 2
    assert not list((tmp_path / "results" / "md-imagenet").rglob("*.csv"))  # the suite itself has no CSV
    params = None
    for member in card["members"]:
        csv = tmp_path / "results" / member / "fomaml" / "seed0.csv"
        assert card["csvs"][member] == f"{member}/fomaml/seed0.csv"
        frame = read_csv(csv)
        alone = benchmarks.load(member, root)  # the single-source benchmark's own test episodes
        assert frame["episode_hash"].tolist() == [alone.describe("test", i).hash for i in range(N_TEST)]
        assert set(frame["benchmark"]) == {member} and len(frame) == N_TEST
        member_card = read_card(csv)
        assert member_card["suite"] == "md-imagenet" and member_card["benchmark"] == member
        assert member_card["selected_step"] == card["selected_step"]
        params = params or member_card["params_hash"]
        assert member_card["params_hash"] == params == card["params_hash"]  # one training, one checkpoint
        for axis in ("steps", "perms"):  # each member's evaluation axes beside its CSV, of its own episodes
            assert member_card["axes"][axis]["file"] == f"seed0.{axis}.csv"
            assert set(read_axis(csv, axis)["episode_hash"]) == set(frame["episode_hash"])
    assert len(list((tmp_path / "runs").rglob("best.pt"))) == 1

    # a finished suite does nothing; a run of one member alone would write over it: refused
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*") if p.is_file()}
    assert run(cfg, dirs, progress=False) == card_path  # (the suite card again, as a grid worker reports it)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*") if p.is_file()}
    alone = plan(dataclasses.replace(cfg, benchmark="md-aircraft"), dirs)
    with pytest.raises(MetabenchError, match="written by suite md-imagenet"):
        check_identity(alone, overwrite=False)


@pytest.mark.slow
def test_all_datasets_suite_through_grid(small_md, tmp_path, monkeypatch):
    _, root = small_md
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(REPO)
    spec = grid.spec_from({"methods": ["fomaml"], "benchmarks": ["md-all"], "seeds": "0", "steps": 2, "chunk": 1,
                           "val_episodes": 2, "test_episodes": N_TEST, "set": TINY, "label": {"fomaml": "fomaml"},
                           "results": str(tmp_path / "results"), "runs": str(tmp_path / "runs"), "root": str(root),
                           "threads": 1, "workers": 1})
    (out,) = grid.run_grid(spec, quiet=True)
    assert out.ok, out.error
    assert out.csv == tmp_path / "results" / "md-all" / "fomaml" / "seed0.json"
    sources = set()
    for member in benchmarks.get_benchmark("md-all").members:
        frame = read_csv(tmp_path / "results" / member / "fomaml" / "seed0.csv")
        alone = benchmarks.load(member, root)
        assert frame["episode_hash"].tolist() == [alone.describe("test", i).hash for i in range(N_TEST)]
        sources |= set(read_card(tmp_path / "results" / member / "fomaml" / "seed0.csv")["data_fingerprints"])
    assert len(sources) == 10
    assert "md-all-fungi" in grid.summary_table(tmp_path / "results", [out])
    (again,) = grid.run_grid(spec, quiet=True)  # finished: skipped by the driver, the same outcome's files
    assert again.ok and again.attempts == 0 and again.csv == out.csv

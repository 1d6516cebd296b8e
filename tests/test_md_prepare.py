"""Meta-Dataset prepare at scale: decoding in worker processes (the cache does not depend on their
number), resuming an interrupted prepare (a killed or failed one continues and ends equal to a
one-shot prepare), native-size storage of the fixed-size sources, disk in `data status`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from datafixtures import md_jpeg, md_source_records, md_spec

from bench import data
from bench.errors import DataError
from bench.sources import meta_dataset as md
from bench.sources.tfrecord import encode_example, write_records


@pytest.fixture(scope="module")
def records(shared_data):
    folder = shared_data / "meta_dataset" / "omniglot_small"
    if not (folder / md.SPEC_FILE).is_file():
        pytest.skip(f"genuine records not present: {folder}")
    return folder


@pytest.fixture(scope="module")
def one_shot(records, tmp_path_factory):
    """The genuine records prepared in one go, in this process."""
    root = tmp_path_factory.mktemp("one-shot")
    md.prepare(records, root, 84, opts=md.BuildOptions(workers=1, show_progress=False, say=lambda _: None))
    return root


def same_cache(a, b) -> None:
    """Two caches of one source hold the same pixels, class tables and meta (not the same mtimes)."""
    ia, ib = (json.loads((p / "index.json").read_text()) for p in (a, b))
    assert np.array_equal(np.load(a / "images.npy", mmap_mode="r"), np.load(b / "images.npy", mmap_mode="r"))
    assert ia["content"]["sha256"] == ib["content"]["sha256"]
    for d in (ia, ib):
        del d["content"]
    assert ia == ib


def test_worker_count_does_not_change_the_cache(records, one_shot, tmp_path):
    md.prepare(records, tmp_path, 84, opts=md.BuildOptions(workers=3, show_progress=False, say=lambda _: None))
    same_cache(md.cache_dir(one_shot, "omniglot_small", None), md.cache_dir(tmp_path, "omniglot_small", None))


def test_photo_source_with_workers_equals_one_process(tmp_path):
    """Per-size storage (colour, variable-size JPEGs): the same cache with 1 and 2 workers."""
    spec = md_spec("photos", "plain", (3, 1, 1), 4)
    md_source_records(tmp_path / "rec" / "photos", spec, seed=5, size=37)
    for w in (1, 2):
        md.prepare(tmp_path / "rec", tmp_path / f"w{w}", 28, opts=md.BuildOptions(workers=w, show_progress=False))
    a, b = (md.cache_dir(tmp_path / f"w{w}", "photos", 28) for w in (1, 2))
    assert np.load(a / "images.npy").shape == (20, 28, 28, 3)
    same_cache(a, b)


def test_interrupted_prepare_continues_and_equals_a_one_shot_prepare(records, one_shot, tmp_path, monkeypatch,
                                                                     capsys):
    decode = md.decode_class
    calls = []

    def interrupted(job):
        if len(calls) == 50:
            raise KeyboardInterrupt  # as a user's Ctrl-C or a kill between two classes
        calls.append(job.c)
        return decode(job)

    monkeypatch.setattr(md, "decode_class", interrupted)
    with pytest.raises(KeyboardInterrupt):
        md.prepare(records, tmp_path, 84, opts=md.BuildOptions(workers=1, show_progress=False))
    target = md.cache_dir(tmp_path, "omniglot_small", None)
    partial = md.partial_dir(target)
    assert not target.exists() and sorted(json.loads((partial / md.STATE_FILE).read_text())["done"]) == calls
    rows = data.status(tmp_path)
    row = next(r for r in rows if r["dataset"] == "meta-dataset/omniglot_small")
    assert "interrupted (50 classes done" in row["cached"] and row["disk"].endswith("MiB")
    monkeypatch.setattr(md, "decode_class", decode)
    capsys.readouterr()
    md.prepare(records, tmp_path, 84, opts=md.BuildOptions(workers=2, show_progress=False))
    assert "continuing an interrupted prepare (50 of 242 classes already decoded" in capsys.readouterr().out
    assert not partial.exists()
    same_cache(md.cache_dir(one_shot, "omniglot_small", None), target)


def test_failed_worker_leaves_its_finished_classes_and_prepare_resumes(records, one_shot, tmp_path):
    """A failure inside a worker process (a corrupt record): the classes finished stay done; with the
    record repaired, the next prepare decodes only the others and ends equal to a one-shot prepare."""
    rec = tmp_path / "records" / "omniglot_small"
    shutil.copytree(records, rec)
    for p in rec.iterdir():
        p.chmod(0o644)
    good = (rec / "200.tfrecords").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    (rec / "200.tfrecords").write_bytes(bytes(bad))
    with pytest.raises(DataError, match=r"200\.tfrecords.*checksum"):
        md.prepare(rec, tmp_path / "root", 84, opts=md.BuildOptions(workers=2, show_progress=False))
    state = json.loads((md.partial_dir(md.cache_dir(tmp_path / "root", "omniglot_small", None)) / md.STATE_FILE)
                       .read_text())
    assert 200 not in state["done"] and len(state["done"]) >= 100  # classes are queued in order
    (rec / "200.tfrecords").write_bytes(good)
    md.prepare(rec, tmp_path / "root", 84, opts=md.BuildOptions(workers=2, show_progress=False, say=lambda _: None))
    a, b = md.cache_dir(one_shot, "omniglot_small", None), md.cache_dir(tmp_path / "root", "omniglot_small", None)
    assert np.array_equal(np.load(a / "images.npy"), np.load(b / "images.npy"))


def test_partial_of_other_settings_is_refused_and_force_restarts(records, tmp_path):
    target = md.cache_dir(tmp_path, "omniglot_small", None)
    partial = md.partial_dir(target)
    partial.mkdir(parents=True)
    (partial / md.STATE_FILE).write_text(json.dumps({"identity": {"version": 1}, "done": [0]}))
    with pytest.raises(DataError, match=r"\.cache-native\.partial: an interrupted prepare with other settings.*--force"):
        md.prepare(records, tmp_path, 84, opts=md.QUIET)
    md.prepare(records, tmp_path, 84, force=True, opts=md.QUIET)
    assert (target / "index.json").is_file() and not partial.exists()


def test_old_cache_version_is_rebuilt_or_refused_naming_the_command(records, one_shot, tmp_path, capsys):
    shutil.copytree(md.cache_dir(one_shot, "omniglot_small", None), md.cache_dir(tmp_path, "omniglot_small", None))
    index = md.cache_dir(tmp_path, "omniglot_small", None) / "index.json"
    d = json.loads(index.read_text())
    d["meta"]["version"], d["meta"]["decoder"] = 1, None
    index.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"version=1, expected 2.*metabench data prepare meta-dataset .*--force"):
        md.open_source(tmp_path, "omniglot_small", 84)
    md.prepare(records, tmp_path, 84, opts=md.BuildOptions(workers=2, show_progress=False))
    assert "images verified and decoded, stored at 105x105 px" in capsys.readouterr().out
    assert md.open_source(tmp_path, "omniglot_small", 84).meta["version"] == md.CACHE_VERSION


def test_native_storage_requires_one_size(tmp_path):
    """A greyscale source is stored at its first image's size; an image of another size is a clear error."""
    spec = md_spec("omniglot", "bilevel", (2, 1, 1), 3)
    spec["name"] = "omniglot"
    folder = tmp_path / "rec" / "my_omniglot"
    md_source_records(folder, spec, size=24)
    rng = np.random.default_rng(1)
    write_records(folder / "2.tfrecords", [encode_example({"image": [md_jpeg(rng, 30)], "label": [2]})] * 3)
    with pytest.raises(DataError, match=r"2\.tfrecords record 0: 30x30 pixels, but .* 24x24"):
        md.prepare(folder, tmp_path / "root", 84, opts=md.QUIET)


def test_status_states_disk_per_source(records, one_shot):
    text = data.format_status(data.status(one_shot))
    line = next(x for x in text.splitlines() if x.startswith("meta-dataset/omniglot_small"))
    assert "native 105x105 (any size)" in line and " MiB" in line
    assert "disk" in text.splitlines()[0]


def test_prepare_says_which_checksum_and_decoder(records, one_shot, capsys):
    md.prepare(records, one_shot, 84, opts=md.BuildOptions(workers=2, show_progress=False))
    out = capsys.readouterr().out
    assert "2 worker process(es)" in out and "record checksums: " in out and "fast integer IDCT" in out
    assert "up to date" in out

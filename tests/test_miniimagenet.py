"""miniImageNet: the Ravi split definition (checked against the official CSVs), every accepted
on-disk format (identical decoded arrays), the cache and loader, and every bad-input error."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from bench.errors import DataError
from bench.sources import get_source
from bench.sources import miniimagenet as mini
from bench.sources.base import load_cache
from bench.sources.cachedir import file_digest
from datafixtures import (SHARED, mini_category, mini_classes, mini_hdf5, mini_jpeg, mini_npz, mini_pickle)

RELAXED = dict(expected_per_class=4, require_all_classes=False)


# ---------------------------------------------------------------------------------------------
# the Ravi split
# ---------------------------------------------------------------------------------------------

def test_ravi_definition_shape():
    assert {s: len(v) for s, v in mini.RAVI.items()} == {"train": 64, "val": 16, "test": 20}
    assert len(set().union(*mini.RAVI.values())) == 100
    for s, v in mini.RAVI.items():
        assert list(v) == sorted(v)
        assert mini.RAVI_CSV[s][2] == len(v) * mini.PER_CLASS


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_ravi_matches_official_csvs(split):
    path = SHARED / "splits" / "miniimagenet" / f"ravi_{split}.csv"
    if not path.is_file():
        pytest.skip(f"shared data not available: {path}")
    assert file_digest(path, "sha256") == mini.RAVI_CSV[split][1]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == mini.RAVI_CSV[split][2]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
        assert r["filename"].startswith(r["label"])
    assert sorted(counts) == list(mini.RAVI[split])
    assert set(counts.values()) == {mini.PER_CLASS}


# ---------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_set(tmp_path_factory):
    """The same images in every format: {format name: path to pass to prepare}, and the images."""
    base = tmp_path_factory.mktemp("mini")
    jpeg, decoded = mini_jpeg(base / "jpeg")
    mini_jpeg(base / "jpeg_nested", nested=True)
    paths = {
        "jpeg": jpeg,
        "jpeg-nested": base / "jpeg_nested",
        "pickle": mini_pickle(base / "pickle", decoded),
        "pickle-py2": mini_pickle(base / "pickle_py2", decoded, py2=True, val_name="validation"),
        "npz": mini_npz(base / "npz", decoded),
        "category": mini_category(base / "category", decoded, py2=True),
        "category-py3": mini_category(base / "category_py3", decoded, py2=False),
    }
    try:
        import h5py  # noqa: F401

        paths["hdf5"] = mini_hdf5(base / "hdf5" / "miniimagenet", decoded).parent
    except ImportError:
        pass
    return paths, decoded


def test_py2_fixture_is_really_a_python2_pickle(fixture_set):
    import pickle

    paths, _ = fixture_set
    with pytest.raises(UnicodeDecodeError):
        with open(paths["pickle-py2"] / "mini-imagenet-cache-train.pkl", "rb") as f:
            pickle.load(f)
    obj = mini.load_pickle(paths["pickle-py2"] / "mini-imagenet-cache-train.pkl")
    assert set(obj) == {"image_data", "class_dict"}


@pytest.mark.parametrize("fmt,expected", [("jpeg", "jpeg"), ("jpeg-nested", "jpeg"), ("pickle", "pickle"),
                                          ("pickle-py2", "pickle"), ("npz", "npz"), ("category", "category"),
                                          ("hdf5", "hdf5")])
def test_detect(fixture_set, fmt, expected):
    paths, _ = fixture_set
    if fmt not in paths:
        pytest.skip("h5py not installed")
    assert mini.detect(paths[fmt])[0] == expected


def test_detect_from_a_file_and_nothing_found(fixture_set, tmp_path):
    paths, _ = fixture_set
    assert mini.detect(paths["npz"] / "few-shot-val.npz") == ("npz", paths["npz"])
    assert mini.detect(paths["jpeg"] / "images") == ("jpeg", paths["jpeg"] / "images")
    with pytest.raises(DataError, match="no miniImageNet data found.*cannot download"):
        mini.detect(tmp_path)


def test_every_format_gives_identical_arrays(fixture_set, tmp_path):
    paths, decoded = fixture_set  # (without h5py the hdf5 format is left out)
    expected = np.concatenate([decoded[s][w] for s in ("train", "val", "test") for w in mini_classes()[s]])
    names = [w for s in ("train", "val", "test") for w in mini_classes()[s]]
    for fmt, path in paths.items():
        root = tmp_path / fmt
        cache = mini.prepare(path, root, **RELAXED)
        src = load_cache(cache)
        assert src.images.shape == (7 * 4, 84, 84, 3) and src.images.dtype == np.uint8, fmt
        assert np.array_equal(np.asarray(src.images), expected), fmt
        assert src.class_names == names, fmt
        assert {k: v.tolist() for k, v in src.splits.items()} == {"train": [0, 1, 2], "val": [3, 4], "test": [5, 6]}
        assert src.meta["format"] == fmt.split("-")[0]


def test_images_of_another_size_are_resized(tmp_path):
    from PIL import Image

    path, decoded = mini_jpeg(tmp_path / "big", per_class=2, size=(100, 90))
    cache = mini.prepare(path, tmp_path / "root", expected_per_class=2, require_all_classes=False)
    src = load_cache(cache)
    assert src.images.shape == (14, 84, 84, 3)
    w = mini_classes()["train"][0]
    want = np.asarray(Image.fromarray(decoded["train"][w][0]).resize((84, 84), Image.Resampling.BILINEAR))
    assert np.array_equal(src.images[0], want)
    # the same images given as arrays of that size resize identically
    cache2 = mini.prepare(mini_npz(tmp_path / "npz", decoded), tmp_path / "root2", expected_per_class=2,
                          require_all_classes=False)
    assert np.array_equal(np.asarray(load_cache(cache2).images), np.asarray(src.images))


def test_loader_strict_and_relaxed(fixture_set, tmp_path):
    paths, _ = fixture_set
    mini.prepare(paths["npz"], tmp_path, **RELAXED)
    with pytest.raises(DataError, match="partial copy"):
        get_source("miniimagenet", tmp_path, 84)
    src = mini.load(tmp_path, 84, strict=False)
    x = src.gather([0, 5], [[0, 1], [3]])
    assert tuple(x.shape) == (3, 3, 84, 84)
    assert float(x.max()) <= 1.0


def test_loader_without_data_says_how_to_obtain_it(tmp_path):
    with pytest.raises(DataError, match=r"metabench data prepare miniimagenet --from PATH --root .*image-net\.org"):
        get_source("miniimagenet", tmp_path, 84)


# ---------------------------------------------------------------------------------------------
# bad input: one clear error, nothing half-written
# ---------------------------------------------------------------------------------------------

def assert_nothing_written(root):
    folder = mini.data_dir(root)
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


def test_missing_classes(fixture_set, tmp_path):
    paths, _ = fixture_set
    with pytest.raises(DataError, match=r"few-shot-train\.npz: missing classes: 61 of the 64 Ravi train"):
        mini.prepare(paths["npz"], tmp_path, expected_per_class=4)
    assert_nothing_written(tmp_path)


def test_wrong_image_counts(fixture_set, tmp_path):
    paths, _ = fixture_set
    with pytest.raises(DataError, match=r"mini-imagenet-cache-train\.pkl: wrong image counts: .* has 4"):
        mini.prepare(paths["pickle"], tmp_path, require_all_classes=False)
    assert_nothing_written(tmp_path)


def test_split_mismatch(fixture_set, tmp_path):
    paths, _ = fixture_set
    folder = tmp_path / "src"
    shutil.copytree(paths["jpeg"], folder)
    val_class = mini_classes()["val"][0]
    with open(folder / "train.csv", "a") as f:
        f.write(f"{val_class}00000001.jpg,{val_class}\n")
    with pytest.raises(DataError, match=rf"train\.csv: split mismatch: .*{val_class} \(a Ravi val class\)"):
        mini.prepare(folder, tmp_path / "root", **RELAXED)
    with open(folder / "train.csv", "a") as f:
        f.write("n99999999.jpg,n99999999\n")
    with pytest.raises(DataError, match=r"n99999999 \(not a miniImageNet class\)"):
        mini.prepare(folder, tmp_path / "root", **RELAXED)
    assert_nothing_written(tmp_path / "root")


def test_unreadable_and_missing_images(fixture_set, tmp_path):
    paths, _ = fixture_set
    folder = tmp_path / "src"
    shutil.copytree(paths["jpeg"], folder)
    last = (folder / "test.csv").read_text().strip().splitlines()[-1].split(",")[0]
    victim = folder / "images" / last  # the last test image: fails after train/val were copied
    victim.write_bytes(victim.read_bytes()[:50])
    with pytest.raises(DataError, match=rf"{victim.name}: unreadable image"):
        mini.prepare(folder, tmp_path / "root", **RELAXED)
    assert_nothing_written(tmp_path / "root")
    victim.unlink()
    with pytest.raises(DataError, match=rf"{victim.name}: missing image \(listed in .*test\.csv\)"):
        mini.prepare(folder, tmp_path / "root", **RELAXED)
    assert_nothing_written(tmp_path / "root")


@pytest.mark.parametrize("fmt,name", [("pickle", "mini-imagenet-cache-val.pkl"), ("npz", "few-shot-test.npz"),
                                      ("category", "miniImageNet_category_split_val.pickle"),
                                      ("hdf5", "miniimagenet/test_data.hdf5")])
def test_truncated_files(fixture_set, tmp_path, fmt, name):
    paths, _ = fixture_set
    if fmt not in paths:
        pytest.skip("h5py not installed")
    folder = tmp_path / "src"
    shutil.copytree(paths[fmt], folder)
    victim = folder / name
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    with pytest.raises(DataError, match=rf"{victim.name}: unreadable .*(truncated or corrupt)"):
        mini.prepare(folder, tmp_path / "root", **RELAXED)
    assert_nothing_written(tmp_path / "root")


def test_missing_split_file(fixture_set, tmp_path):
    paths, _ = fixture_set
    folder = tmp_path / "src"
    shutil.copytree(paths["pickle"], folder)
    (folder / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(DataError, match=r"missing mini-imagenet-cache-test\.pkl"):
        mini.prepare(folder, tmp_path / "root", **RELAXED)


def test_not_the_expected_structure(tmp_path):
    import pickle

    folder = tmp_path / "src"
    folder.mkdir()
    for s in ("train", "val", "test"):
        with open(folder / f"mini-imagenet-cache-{s}.pkl", "wb") as f:
            pickle.dump({"images": np.zeros((1, 84, 84, 3), np.uint8)}, f)
    with pytest.raises(DataError, match=r"train\.pkl: not a miniImageNet pickle cache"):
        mini.prepare(folder, tmp_path / "root", **RELAXED)
    folder2 = tmp_path / "src2"
    folder2.mkdir()
    for s in ("train", "val", "test"):
        np.savez(folder2 / f"few-shot-{s}.npz", features=np.zeros((2, 84, 84), np.float32), targets=np.array([0, 0]))
    with pytest.raises(DataError, match=r"few-shot-train\.npz: images are float32"):
        mini.prepare(folder2, tmp_path / "root", expected_per_class=2, require_all_classes=False)


def test_cache_from_another_version(fixture_set, tmp_path):
    paths, _ = fixture_set
    cache = mini.prepare(paths["npz"], tmp_path, **RELAXED)
    index = cache / "index.json"
    d = json.loads(index.read_text())
    d["meta"]["version"] = mini.CACHE_VERSION + 1
    index.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"index\.json: cache was built with version=.*"
                                        r"rebuild: `metabench data prepare"):
        mini.load(tmp_path, 84, strict=False)
    d["format"] = 0
    index.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"index\.json: cache format 0"):
        mini.load(tmp_path, 84, strict=False)


def test_hdf5_without_h5py_says_what_to_install(tmp_path, monkeypatch):
    import sys

    for split in ("train", "val", "test"):
        (tmp_path / f"{split}_data.hdf5").write_bytes(b"")
        (tmp_path / f"{split}_labels.json").write_text("[]")
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(DataError, match="needs h5py: pip install h5py"):
        mini.prepare(tmp_path, tmp_path / "root", **RELAXED)


def test_full_ravi_split_passes_strict_validation_and_samples(tmp_path):
    """All 100 classes x 600 images (8x8 to stay small): the strict path end to end."""
    from bench.benchmarks import Benchmark
    from bench.sampling import EpisodeSet, FixedEpisodes

    rng = np.random.default_rng(0)
    folder = tmp_path / "npz"
    folder.mkdir()
    for split, wnids in mini.RAVI.items():
        targets = np.repeat(np.arange(len(wnids)), mini.PER_CLASS)
        features = rng.integers(0, 256, size=(len(targets), 8, 8, 3), dtype=np.uint8)
        np.savez(folder / f"few-shot-{split}.npz", features=features, targets=targets)
    mini.prepare(folder, tmp_path / "root", image_size=8)
    src = get_source("miniimagenet", tmp_path / "root", 8)
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 64, "val": 16, "test": 20}
    assert mini.is_complete(src) and src.images.shape == (60000, 8, 8, 3)
    episodes = EpisodeSet(Benchmark("mini-tiny", "miniimagenet", FixedEpisodes(5, 1, 15), 8, "miniimagenet"), src)
    ep = episodes.episode("test", 0)
    assert tuple(ep.query_x.shape) == (75, 3, 8, 8)
    assert all(src.class_names[c] in mini.RAVI["test"] for c in ep.classes)

"""Meta-Dataset from genuine records: spec parsing, verified decoding into the cache, episodes,
clear errors for corrupt records, mismatched specs and missing sources, benchmarks and methods.

The genuine records (../shared/data/meta_dataset/omniglot_small) were written by the official
converter from real Omniglot images: a bi-level spec, 8 alphabets, 242 characters x 20 images.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
import torch

from bench import benchmarks, data
from bench.errors import DataError
from bench.md_sampling import MDEpisodes
from bench.sources import get_source
from bench.sources import meta_dataset as md
from bench.sources.tfrecord import parse_example, read_records
from baselines import registry

SPLIT_ALPHABETS = {"train": ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"], "val": ["Tagalog"],
                   "test": ["Japanese_(katakana)", "Sanskrit"]}


@pytest.fixture(scope="module")
def records(shared_data):
    return shared_data / "meta_dataset" / "omniglot_small"


@pytest.fixture(scope="module")
def root(records, tmp_path_factory):
    """A data root with the genuine records prepared at 84 px through the command line."""
    r = tmp_path_factory.mktemp("md-root")
    assert data.main(["prepare", "meta-dataset", "--records", str(records), "--root", str(r), "--no-progress"]) == 0
    return r


def copy_records(records, dest):
    shutil.copytree(records, dest)
    for p in dest.rglob("*"):
        p.chmod(0o644)
    dest.chmod(0o755)
    return dest


def test_spec_parsing(records):
    spec = md.load_spec(records)
    assert spec.kind == "bilevel" and spec.name == "omniglot" and spec.n_classes == 242
    assert {s: len(v) for s, v in spec.splits.items()} == {"train": 136, "val": 17, "test": 89}
    assert [spec.superclass_names[k] for k in spec.superclass_splits["train"]] == SPLIT_ALPHABETS["train"]
    assert [spec.superclass_names[k] for k in spec.superclass_splits["test"]] == SPLIT_ALPHABETS["test"]
    assert [len(g) for g in spec.class_groups("test")] == [47, 42]
    assert set(spec.images_per_class.tolist()) == {20}
    assert spec.class_names[0] == "Balinese-character01"
    # the three spec types parse (reference specs): plain and hierarchical too
    folder = records.parents[1] / "splits" / "meta_dataset" / "dataset_specs"
    assert md.load_spec(folder / "aircraft_dataset_spec.json").kind == "plain"
    assert md.load_spec(folder / "ilsvrc_2012_dataset_spec.json").kind == "hierarchical"


def test_every_record_label_and_count(records):
    spec = md.load_spec(records)
    for c in range(spec.n_classes):
        labels = [parse_example(r)["label"] for r in read_records(records / f"{c}.tfrecords")]
        assert labels == [[c]] * 20
        assert len(md.read_class(records, spec, c)) == spec.images_per_class[c]


def test_cache_layout_and_size(root):
    src = get_source("md-omniglot-small", root, 84)
    # a fixed-size greyscale source: stored once at its native 105 px, one channel, resized when gathered
    assert src.images.shape == (4840, 105, 105) and src.images.dtype == np.uint8
    assert src.gather_size == 84 and src.image_shape == (1, 84, 84)
    assert isinstance(src.images, np.memmap)
    assert src.meta["kind"] == "bilevel" and src.meta["channels"] == 1 and src.meta["image_size"] == "native"
    assert src.meta["decoder"] == md.JPEG_DECODER and src.meta["version"] == md.CACHE_VERSION
    assert src.groups[0] == "Balinese" and src.groups[-1] == "Sanskrit"
    assert {s: len(v) for s, v in src.splits.items()} == {"train": 136, "val": 17, "test": 89}
    cache = md.source_cache(root, "omniglot_small", 84)
    assert cache == md.cache_dir(root, "omniglot_small", None)
    assert 4840 * 105 * 105 <= md.dir_size(cache) < 60 * 2**20
    # the same cache serves 126 px, with another data fingerprint
    big = get_source("md-omniglot-small", root, 126)
    assert big.image_shape == (1, 126, 126) and big.content_fingerprint() != src.content_fingerprint()
    assert big.gather([0], [[0, 1]]).shape == (2, 1, 126, 126)


def tf_reference_resize(img: np.ndarray, size: int) -> np.ndarray:
    """TF's legacy bilinear kernel with align_corners=True, pixel by pixel (independent of the module)."""
    h, w = img.shape[:2]
    sy, sx = (h - 1) / (size - 1), (w - 1) / (size - 1)
    out = np.zeros((size, size) + img.shape[2:])
    f = img.astype(np.float64)
    for y in range(size):
        iy = y * sy
        y0 = int(np.floor(iy))
        y1, dy = min(y0 + 1, h - 1), iy - y0
        for x in range(size):
            ix = x * sx
            x0 = int(np.floor(ix))
            x1, dx = min(x0 + 1, w - 1), ix - x0
            top = f[y0, x0] + (f[y0, x1] - f[y0, x0]) * dx
            bottom = f[y1, x0] + (f[y1, x1] - f[y1, x0]) * dx
            out[y, x] = top + (bottom - top) * dy
    return out


def test_decoded_images_equal_a_direct_decode(records, root):
    import simplejpeg

    src = get_source("md-omniglot-small", root, 84)
    for c in (0, 77, 241):
        for i, rec in enumerate(read_records(records / f"{c}.tfrecords")):
            jpeg = parse_example(rec)["image"][0]
            direct = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", fastdct=True, fastupsample=False)
            assert direct.shape == (105, 105, 3)
            assert (direct[..., 0] == direct[..., 1]).all() and (direct[..., 0] == direct[..., 2]).all()
            assert np.array_equal(src.images[src.class_start[c] + i], direct[..., 0])  # stored as decoded
            if i < 2:  # the pixel-by-pixel reference is slow
                ref = tf_reference_resize(direct[..., 0], 84) / 255.0
                got = src.gather([c], [[i]])[0, 0].numpy()
                assert np.abs(got - ref).max() < 1e-6  # resized when gathered, not rounded
            assert np.array_equal(md.decode_image(jpeg, None, grey=True), direct[..., 0])
            # at the records' own size the resize is the identity
            assert np.array_equal(md.decode_image(jpeg, 105, grey=True), direct[..., 0])
    # Omniglot records are inverted: white strokes on black
    assert src.images[:20].mean() < 64


def test_png_records_are_decoded_by_pillow():
    from PIL import Image

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    assert np.array_equal(md.decode_rgb(buf.getvalue()), img)
    with pytest.raises(DataError, match="rec 3: cannot decode the JPEG"):
        md.decode_rgb(b"\xff\xd8" + bytes(20), "rec 3")


def test_missing_jpeg_decoder_is_a_clear_error(records, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import fails as when it is not installed
    with pytest.raises(DataError, match=r"simplejpeg.*metabench\[meta-dataset\]"):
        md.prepare(records, tmp_path / "root", 28, opts=md.QUIET)
    assert not (tmp_path / "root").exists()


def test_episodes_of_genuine_records(root):
    es = benchmarks.load("md-omniglot-small", root)
    src = es.source
    info = es.task_info()
    assert info.image_shape == (3, 84, 84) and info.max_way == 50 and info.variable_way and info.n_classes == 242
    for split, alphabets in SPLIT_ALPHABETS.items():
        ways = []
        for i in range(60):
            spec = es.describe(split, i)
            groups = {src.groups[c] for c in spec.classes}
            assert len(groups) == 1 and groups <= set(alphabets)  # one alphabet only
            n_chars = sum(g == next(iter(groups)) for g in src.groups)
            way = len(spec.classes)
            assert 5 <= way <= min(50, n_chars)
            assert [len(q) for q in spec.query] == [10] * way  # query 10 per class
            shots = [len(x) for x in spec.support]
            assert min(shots) >= 1 and max(shots) <= 10 and sum(shots) <= 500  # 20 - 10 left per class
            ways.append(way)
        assert len(set(ways)) > 5  # a different number of ways from episode to episode
        for i in range(3):  # pixels
            ep, spec = es.episode(split, i), es.describe(split, i)
            assert ep.spec_hash == spec.hash and ep.classes == spec.classes
            assert ep.query_y.bincount().tolist() == [10] * ep.way
            assert ep.support_y.bincount().tolist() == [len(x) for x in spec.support]
            assert ep.support_x.shape == (len(ep.support_y), 3, 84, 84) and ep.query_x.shape[0] == 10 * ep.way
            assert 0 <= ep.support_x.min() and ep.support_x.max() <= 1
            first = src.gather([spec.classes[0]], [[spec.support[0][0]]])[0, 0]
            assert torch.equal(ep.support_x[0, 1], first)
    a, b = es.episode("test", 123), es.episode("test", 123)
    assert a.spec_hash == b.spec_hash and torch.equal(a.support_x, b.support_x)


def test_fixed_shape_benchmark(root):
    es = benchmarks.load("md-omniglot-small-5w5s", root)
    ep = es.episode("test", 0)
    assert ep.way == 5 and len(ep.support_y) == 25 and len(ep.query_y) == 50
    assert not es.task_info().variable_way


# --- errors ------------------------------------------------------------------------------------

def test_corrupt_record_is_rejected_and_no_cache_is_left(records, tmp_path):
    bad = copy_records(records, tmp_path / "omniglot_small")
    path = bad / "5.tfrecords"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"5\.tfrecords.*checksum"):
        md.prepare(bad, tmp_path / "root", 28, opts=md.QUIET)
    assert not list((tmp_path / "root").rglob("index.json"))  # no cache; the finished classes wait in .partial
    assert md.partial_dir(md.cache_dir(tmp_path / "root", "omniglot_small", None)).is_dir()
    with pytest.raises(DataError, match="prepare was interrupted.*again to continue"):
        md.open_source(tmp_path / "root", "omniglot_small", 28)


def edit_spec(folder, fn):
    spec = json.loads((folder / "dataset_spec.json").read_text())
    fn(spec)
    (folder / "dataset_spec.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("case,message", [
    ("count", "spec says class 3"),
    ("label", "label 1, but the file is class 0"),
    ("missing", "missing record file of class 7"),
    ("extra", "are not classes of its dataset_spec.json"),
    ("split", "splits cover|superclasses_per_split"),
    ("type", "unknown or missing __class__"),
])
def test_spec_that_does_not_match_the_records(records, tmp_path, case, message):
    bad = copy_records(records, tmp_path / "omniglot_small")
    if case == "count":
        edit_spec(bad, lambda s: s["images_per_class"].__setitem__("3", 21))
    elif case == "label":
        (bad / "0.tfrecords").unlink()
        shutil.copy(bad / "1.tfrecords", bad / "0.tfrecords")
    elif case == "missing":
        (bad / "7.tfrecords").unlink()
    elif case == "extra":
        shutil.copy(bad / "1.tfrecords", bad / "999.tfrecords")
    elif case == "split":
        edit_spec(bad, lambda s: s["superclasses_per_split"].__setitem__("TEST", 3))
    elif case == "type":
        edit_spec(bad, lambda s: s.__setitem__("__class__", "SomethingElse"))
    with pytest.raises(DataError, match=message):
        md.prepare(bad, tmp_path / "root", 28, opts=md.QUIET)


def test_official_folder_name_requires_the_official_spec(records, tmp_path):
    copy_records(records, tmp_path / "records" / "omniglot")
    with pytest.raises(DataError, match="not the official Meta-Dataset 'omniglot' spec"):
        md.prepare(tmp_path / "records", tmp_path / "root", 28, opts=md.QUIET)


def test_missing_sources_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no Meta-Dataset source found"):
        md.prepare(tmp_path, tmp_path / "root", 28, opts=md.QUIET)
    with pytest.raises(DataError, match="no such folder"):
        md.prepare(tmp_path / "nope", tmp_path / "root", 28, opts=md.QUIET)
    # every missing source of the benchmark is named (ILSVRC: training and validation source)
    with pytest.raises(DataError, match=r"(?s)md-aircraft needs 2 .*ILSVRC \(ilsvrc_2012\) is not prepared.*"
                                        r"Aircraft \(aircraft\) is not prepared.*metabench data prepare meta-dataset"):
        benchmarks.load("md-aircraft", tmp_path)
    with pytest.raises(DataError, match="needs 9 "):
        benchmarks.load("md-all-mscoco", tmp_path)
    monkeypatch.setattr(md, "find_small_records", lambda: None)
    with pytest.raises(DataError, match="omniglot_small"):
        benchmarks.load("md-omniglot-small", tmp_path)
    assert data.main(["prepare", "meta-dataset", "--root", str(tmp_path)]) == 2  # no --records


def test_prepare_skips_a_current_cache(records, root, capsys):
    md.prepare(records, root, 84, opts=md.BuildOptions(show_progress=False))
    assert "up to date" in capsys.readouterr().out


# --- benchmarks and methods --------------------------------------------------------------------

def test_meta_dataset_benchmarks_registered():
    names = [n for n in benchmarks.BENCHMARKS if n.startswith("md-")]
    for off in md.OFFICIAL.values():
        for regime in ("md-", "md-all-"):
            b = benchmarks.get_benchmark(regime + off.key)
            assert isinstance(b.protocol, MDEpisodes) and b.protocol.variable_way
            assert b.test_episodes == 600 and b.preset == "meta-dataset"
            assert b.source == "md-" + off.key and b.protocol.val_source == "md-ilsvrc-2012"
            assert b.protocol.train_sources == (("md-ilsvrc-2012",) if regime == "md-" else
                                                tuple(md.source_key(s) for s in md.TRAIN_ALL))
    assert len(names) == 24 and len({benchmarks.get_benchmark(n).seed for n in names}) == 24  # 22 + 2 suites
    assert "md-traffic-sign" not in benchmarks.get_benchmark("md-all-aircraft").protocol.train_sources


@pytest.mark.parametrize("method", ["maml", "fomaml", "finetune"])
def test_methods_run_on_variable_way_episodes(root, method):
    torch.manual_seed(0)
    b = dataclasses.replace(benchmarks.get_benchmark("md-omniglot-small"), image_size=28)  # CPU time
    es = benchmarks.load(b, root)  # the 28 px cache is built from the shared records on first use
    assert registry.preset("fomaml", b.preset).values["inner_lr"] == 0.09915
    small = dict(hidden=4, meta_batch=2) | ({"head_steps": 3} if method == "finetune" else
                                           {"inner_steps": 1, "inner_steps_test": 1})
    learner = registry.make(method, b.preset, 0, **small)
    learner.setup(es.task_info())
    learner.fit(es.stream("train"), 1)
    eps = [es.episode("test", i) for i in range(3)]
    out = learner.evaluate(eps)
    assert [r["way"] for r in out] == [e.way for e in eps] and len({e.way for e in eps}) > 1
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in out)


@pytest.mark.slow
def test_fomaml_end_to_end_on_genuine_records(shared_data, tmp_path):
    """prepare, fit, evaluate 600 variable-way test episodes, CSV, leaderboard (28 px for CI time)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "md_e2e.py"
    spec = importlib.util.spec_from_file_location("md_e2e", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--records", str(shared_data / "meta_dataset" / "omniglot_small"),
                          "--work", str(tmp_path), "--image-size", "28", "--steps", "4", "--val-episodes", "10"])
    assert benchmarks.get_benchmark("md-omniglot-small").image_size == 84  # the script used a copy at 28 px
    assert report["test_episodes"] == 600 and report["ways"][0] >= 5 and report["ways"][1] <= 47
    assert Path(report["csv"]).is_file() and Path(report["leaderboard"]).is_file()

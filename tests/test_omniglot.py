"""Omniglot: split definitions (checked against the official split files), archive reading,
decoding, caches, loaders and every bad-input error."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from bench.errors import DataError
from bench.sources import get_source
from bench.sources import omniglot as omni
from bench.sources.base import load_cache
from datafixtures import SHARED, full_omniglot_zips, omniglot_members, omniglot_png, write_folder, write_zip

SMALL_FIXTURE = {"Alpha": 3, "Beta": 2, "Gamma": 4}


def need_shared(*parts: str):
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


# ---------------------------------------------------------------------------------------------
# split definitions
# ---------------------------------------------------------------------------------------------

def test_tables_match_the_published_totals():
    assert len(omni.BACKGROUND) == 30 and sum(omni.BACKGROUND.values()) == 964
    assert len(omni.EVALUATION) == 20 and sum(omni.EVALUATION.values()) == 659
    assert not set(omni.BACKGROUND) & set(omni.EVALUATION)


def test_vinyals_split_rule():
    s = omni.vinyals_split()
    assert {k: len(v) for k, v in s.items()} == {"train": 1028, "val": 172, "test": 423, "trainval": 1200}
    assert set(s["train"]) | set(s["val"]) == set(s["trainval"])
    assert not set(s["train"]) & set(s["val"]) and not set(s["trainval"]) & set(s["test"])
    assert len(set(s["trainval"]) | set(s["test"])) == 1623
    # the boundary of the rule: Gurmukhi characters 01-41 in trainval, 42-45 in test
    assert "Gurmukhi/character41" in s["train"] and "Gurmukhi/character42" in s["test"]
    assert {c.split("/")[0] for c in s["val"]} == set(omni.VINYALS_VAL)


def test_vinyals_split_matches_protonets_files():
    folder = need_shared("splits", "omniglot")
    ours = omni.vinyals_split()
    for split in ("train", "val", "test", "trainval"):
        text = (folder / f"protonets_vinyals_{split}.txt").read_text()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        chars = {ln.rsplit("/", 1)[0] for ln in lines}
        assert chars == set(ours[split]), split
        assert len(lines) == 4 * len(chars)  # every character in 4 rotations
        assert {ln.rsplit("/", 1)[1] for ln in lines} == {"rot000", "rot090", "rot180", "rot270"}


def test_vinyals_split_and_tables_match_torchmeta_files():
    folder = need_shared("splits", "omniglot")
    ours = omni.vinyals_split()
    for split in ("train", "val", "test"):
        d = json.loads((folder / f"torchmeta_{split}.json").read_text())
        chars = {f"{a}/{c}" for group in d.values() for a, cs in group.items() for c in cs}
        assert chars == set(ours[split]), split
        for a in d.get("background", {}):
            assert a in omni.BACKGROUND
        for a in d.get("evaluation", {}):
            assert a in omni.EVALUATION


def test_md_split_matches_meta_dataset_spec():
    spec = json.loads(need_shared("splits", "meta_dataset", "dataset_specs", "omniglot_dataset_spec.json").read_text())
    names = [spec["superclass_names"][str(i)] for i in range(50)]
    per = spec["superclasses_per_split"]
    n_train, n_val = per["TRAIN"], per["VALID"]
    ours = omni.md_alphabet_split()
    assert set(ours["train"]) == set(names[:n_train])
    assert set(ours["val"]) == set(names[n_train:n_train + n_val])
    assert set(ours["test"]) == set(names[n_train + n_val:])
    counts = {spec["superclass_names"][k]: v for k, v in spec["classes_per_superclass"].items()}
    assert counts == {**omni.BACKGROUND, **omni.EVALUATION}
    assert {k: len(v) for k, v in omni.md_split().items()} == {"train": 883, "val": 81, "test": 659}


# ---------------------------------------------------------------------------------------------
# decoding and archives
# ---------------------------------------------------------------------------------------------

def test_decode_png_inverts_and_resizes():
    img = omni.decode_png(omniglot_png(3), 28)
    assert img.shape == (28, 28) and img.dtype == np.uint8
    assert img.max() > 200  # strokes high
    assert np.median(img) == 0  # background low
    full = omni.decode_png(omniglot_png(3), 105)
    assert set(np.unique(full)) <= {0, 255}


def test_stored_rotation_matches_rotate_then_resize():
    """Rotating the stored 28x28 image (class_rot) equals the Vinyals order rotate -> resize -> invert."""
    import io

    from PIL import Image, ImageOps

    for seed in range(10):
        png = omniglot_png(seed)
        stored = omni.decode_png(png, 28).astype(int)
        with Image.open(io.BytesIO(png)) as im:
            grey = im.convert("L")
        for k in (1, 2, 3):
            ref = ImageOps.invert(grey.rotate(90 * k).resize((28, 28), Image.Resampling.BILINEAR))
            assert np.abs(np.rot90(stored, k) - np.asarray(ref, dtype=int)).max() <= 1


def test_from_archives_splits_rotations_and_groups(tmp_path):
    z = write_zip(tmp_path / "set.zip", omniglot_members("images_set", SMALL_FIXTURE, 5))
    src = omni.omniglot_from_archives([z], {"train": ["Gamma", "Alpha"], "test": ["Beta"]}, 28, images_per_char=5)
    assert src.images.shape == (9 * 5, 28, 28) and src.images.dtype == np.uint8
    assert src.n_classes == 9 * 4
    assert len(src.splits["train"]) == 7 * 4 and len(src.splits["test"]) == 2 * 4
    assert src.class_names[:4] == [f"Gamma/character01/rot{r:03d}" for r in (0, 90, 180, 270)]
    assert src.class_rot.tolist()[:8] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert src.groups[0] == "Gamma" and src.groups[-1] == "Beta"
    assert (src.class_start[:4] == 0).all() and (src.class_count == 5).all()
    # a rotated class gathers the rotated image
    x0 = src.gather([0], [[0]])[0, 0].numpy()
    x1 = src.gather([1], [[0]])[0, 0].numpy()
    assert np.array_equal(np.rot90(x0, 1), x1)
    # without rotations
    plain = omni.omniglot_from_archives([z], {"all": ["Alpha"]}, 28, rotations=False, images_per_char=5)
    assert plain.n_classes == 3 and plain.class_rot is None


def test_zip_folder_and_torchvision_layouts_give_identical_arrays(tmp_path):
    members = omniglot_members("images_background", SMALL_FIXTURE, 3)
    z = write_zip(tmp_path / "a" / "images_background.zip", members)
    folder = write_folder(tmp_path / "b", members)
    tv = write_folder(tmp_path / "c" / "omniglot-py", members)
    write_zip(tmp_path / "c" / "omniglot-py" / "images_background.zip", members)  # torchvision keeps both
    split = {"train": ["Alpha", "Beta"], "test": ["Gamma"]}
    args = dict(image_size=28, images_per_char=3, check_md5=False)
    a = omni.omniglot_from_archives([z], split, **args)
    b = omni.omniglot_from_archives([folder / "images_background"], split, **args)
    c = omni.omniglot_from_archives([tmp_path / "c"], split, **args)
    d = omni.omniglot_from_archives([tv], split, **args)
    for other in (b, c, d):
        assert np.array_equal(a.images, other.images)
        assert a.class_names == other.class_names


def test_duplicate_alphabet_in_two_archives_is_deduplicated(tmp_path):
    shared = omniglot_members("s1", {"Greek": 2}, 3)
    z1 = write_zip(tmp_path / "s1.zip", {**shared, **omniglot_members("s1", {"Alpha": 2}, 3)})
    z2 = write_zip(tmp_path / "s2.zip", {**{k.replace("s1/", "s2/"): v for k, v in shared.items()},
                                         **omniglot_members("s2", {"Beta": 2}, 3)})
    src = omni.omniglot_from_archives([z1, z2], {"train": ["Alpha", "Greek"], "test": ["Beta"]}, 28,
                                      images_per_char=3)
    assert src.n_classes == 6 * 4
    # the same character with different files is an error
    z3 = write_zip(tmp_path / "s3.zip", omniglot_members("s3", {"Greek": 2}, 4))
    with pytest.raises(DataError, match="Greek/character01.*different files"):
        omni.omniglot_from_archives([z1, z3], {"train": ["Greek"]}, 28, images_per_char=None)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_truncated_archive(tmp_path):
    z = write_zip(tmp_path / "set.zip", omniglot_members("top", SMALL_FIXTURE, 2))
    data = z.read_bytes()
    bad = tmp_path / "truncated.zip"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"truncated\.zip.*truncated or corrupt"):
        omni.omniglot_from_archives([bad], {"train": ["Alpha"]}, 28, images_per_char=2)


def test_corrupt_member(tmp_path):
    members = omniglot_members("top", {"Alpha": 1}, 2)
    z = tmp_path / "stored.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as f:
        for k, v in members.items():
            f.writestr(k, v)
    data = bytearray(z.read_bytes())
    first = next(iter(members.values()))
    at = bytes(data).index(first) + len(first) // 2
    data[at] ^= 0xFF  # flip a byte inside the first PNG: its CRC no longer matches
    z.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"stored\.zip:top/Alpha/character01/.*corrupt"):
        omni.omniglot_from_archives([z], {"train": ["Alpha"]}, 28, images_per_char=2)


def test_unreadable_image(tmp_path):
    members = omniglot_members("top", {"Alpha": 1}, 2)
    name = sorted(members)[1]
    members[name] = b"not a png at all"
    z = write_zip(tmp_path / "set.zip", members)
    with pytest.raises(DataError, match=f"{name}: unreadable image"):
        omni.omniglot_from_archives([z], {"train": ["Alpha"]}, 28, images_per_char=2)


def test_wrong_checksum_of_an_official_archive(tmp_path):
    z = write_zip(tmp_path / "images_background_small1.zip",
                  omniglot_members("images_background_small1", {"Alpha": 1}, 2))
    with pytest.raises(DataError, match=r"images_background_small1\.zip: wrong checksum"):
        omni.omniglot_from_archives([z], {"train": ["Alpha"]}, 28, images_per_char=2)


def test_missing_alphabet_wrong_count_and_bad_split(tmp_path):
    z = write_zip(tmp_path / "set.zip", omniglot_members("top", SMALL_FIXTURE, 3))
    with pytest.raises(DataError, match=r"missing alphabets \['Delta'\]"):
        omni.omniglot_from_archives([z], {"train": ["Alpha", "Delta"]}, 28, images_per_char=3)
    with pytest.raises(DataError, match=r"character01: 3 images, expected 20"):
        omni.omniglot_from_archives([z], {"train": ["Alpha"]}, 28)
    with pytest.raises(DataError, match="in both splits"):
        omni.omniglot_from_archives([z], {"train": ["Alpha"], "test": ["Alpha"]}, 28, images_per_char=3)
    with pytest.raises(DataError, match="no such file"):
        omni.omniglot_from_archives([tmp_path / "nope.zip"], {"train": ["Alpha"]}, 28)


# ---------------------------------------------------------------------------------------------
# the full dataset: cache and loaders, on a fixture with every official character (2 drawers)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_zips(tmp_path_factory):
    return full_omniglot_zips(tmp_path_factory.mktemp("omniglot_full"), images_per_char=2)


@pytest.fixture(scope="module")
def full_root(tmp_path_factory, full_zips):
    root = tmp_path_factory.mktemp("root")
    omni.build_cache(full_zips, root, 28, images_per_char=2, check_md5=False)
    return root


def test_full_cache_and_vinyals_loader(full_root):
    src = get_source("omniglot", full_root, 28)
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 4112, "val": 688, "test": 1692}
    assert src.images.shape == (1623 * 2, 28, 28) and isinstance(src.images, np.memmap)
    names = set(src.class_names)
    assert "Gurmukhi/character41/rot270" in names
    train = {src.class_names[i].rsplit("/", 1)[0] for i in src.splits["train"]}
    assert train == set(omni.vinyals_split()["train"])
    assert src.groups[src.splits["val"][0]] in omni.VINYALS_VAL
    assert src.meta["split"] == "vinyals"


def test_md_loader(full_root):
    src = get_source("omniglot-md", full_root, 28)
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 883, "val": 81, "test": 659}
    assert src.class_rot is None
    val_alphabets = {src.groups[i] for i in src.splits["val"]}
    assert val_alphabets == set(omni.MD_VAL)


def test_full_cache_rejects_a_split_mismatch(tmp_path):
    tables = {**omni.BACKGROUND}
    tables["Latin"] = 25  # one character short
    bg = write_zip(tmp_path / "bg.zip", omniglot_members("images_background", tables, 1))
    ev = write_zip(tmp_path / "ev.zip", omniglot_members("images_evaluation", omni.EVALUATION, 1))
    with pytest.raises(DataError, match=r"split mismatch.*Latin has 25 characters, expected 26"):
        omni.build_cache([bg, ev], tmp_path / "root", 28, images_per_char=1)
    assert not (tmp_path / "root" / "omniglot").exists() or not any((tmp_path / "root" / "omniglot").iterdir())
    other = write_zip(tmp_path / "other.zip", omniglot_members("x", {"Klingon": 2}, 1))
    with pytest.raises(DataError, match="not Omniglot alphabets"):
        omni.build_cache([bg, ev, other], tmp_path / "root", 28, images_per_char=1)


def test_a_clone_of_the_official_repository_folder(tmp_path, full_zips):
    """python/ of brendenlake/omniglot holds the full and the small archives side by side: the full
    build skips the small ones, the small build the full ones (their drawings may differ)."""
    import shutil

    folder = tmp_path / "python"
    folder.mkdir()
    for z in full_zips:
        shutil.copy(z, folder / z.name)
    split = omni.SMALL_SPLIT
    write_zip(folder / "images_background_small1.zip",
              omniglot_members("images_background_small1", {a: 2 for a in split["train"] + split["val"]}, 20, seed=5))
    write_zip(folder / "images_background_small2.zip",
              omniglot_members("images_background_small2", {a: 2 for a in split["test"]}, 20, seed=6))
    omni.build_cache([folder], tmp_path / "root", 28, images_per_char=2, check_md5=False)
    omni.build_small_cache([folder], tmp_path / "root", 28, check_md5=False)
    assert get_source("omniglot-small", tmp_path / "root", 28).n_classes == 8 * 2 * 4
    assert get_source("omniglot", tmp_path / "root", 28).n_classes == 1623 * 4


def test_loader_without_data_names_the_command(tmp_path):
    with pytest.raises(DataError, match=f"metabench data download omniglot --root {tmp_path}`"):
        get_source("omniglot", tmp_path, 28)
    with pytest.raises(DataError, match="--image-size 32"):
        get_source("omniglot", tmp_path, 32)


def test_loader_builds_from_downloaded_archives(tmp_path, full_zips, monkeypatch):
    folder = omni.data_dir(tmp_path)
    folder.mkdir(parents=True)
    for z in full_zips:
        (folder / z.name).write_bytes(z.read_bytes())
    monkeypatch.setattr(omni, "build_cache", _build_two(omni.build_cache))
    src = get_source("omniglot", tmp_path, 32)
    assert src.images.shape == (1623 * 2, 32, 32)
    assert (omni.cache_dir(tmp_path, 32) / "index.json").exists()


def _build_two(build):
    def wrapped(paths, root, image_size=28, **kw):
        kw.update(images_per_char=2, check_md5=False)
        return build(paths, root, image_size, **kw)
    return wrapped


def test_cache_from_another_version_is_refused(full_root, tmp_path):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(omni.data_dir(full_root), omni.data_dir(root))
    index = omni.cache_dir(root, 28) / "index.json"
    d = json.loads(index.read_text())
    d["meta"]["version"] = omni.CACHE_VERSION + 1
    index.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"index\.json: cache was built with version=.*"
                                        r"rebuild: `metabench data download omniglot"):
        get_source("omniglot", root, 28)
    (omni.cache_dir(root, 28) / "index.json").unlink()
    with pytest.raises(DataError, match="incomplete build"):
        get_source("omniglot", root, 28)


# ---------------------------------------------------------------------------------------------
# omniglot-small
# ---------------------------------------------------------------------------------------------

def test_small_archives_are_found_in_root_first(tmp_path, monkeypatch):
    for name in omni.SMALL_ARCHIVES:
        write_zip(tmp_path / "root" / "omniglot-small" / name, {"x/y.txt": b""})
        write_zip(tmp_path / "env" / "omniglot" / name, {"x/y.txt": b""})
    monkeypatch.setenv("METABENCH_SHARED_DATA", str(tmp_path / "env"))
    assert omni.find_small_archives(tmp_path / "root")[0].parent == tmp_path / "root" / "omniglot-small"
    assert omni.find_small_archives(tmp_path / "elsewhere")[0].parent == tmp_path / "env" / "omniglot"


def test_small_loader_without_archives(tmp_path, monkeypatch):
    monkeypatch.setattr(omni, "find_small_archives", lambda root=None: None)
    with pytest.raises(DataError, match="images_background_small1.zip and images_background_small2.zip not found"):
        get_source("omniglot-small", tmp_path, 28)


@pytest.mark.slow
def test_real_omniglot_small_source_loads_and_samples(tmp_path):
    from bench.benchmarks import load

    folder = need_shared("omniglot")
    for name in omni.SMALL_ARCHIVES:
        if not (folder / name).is_file():
            pytest.skip(f"shared data not available: {folder / name}")
    src = get_source("omniglot-small", tmp_path, 28)
    chars = {n.rsplit("/", 1)[0] for n in src.class_names}
    assert len(chars) == 242 and src.n_classes == 242 * 4
    assert (src.class_count == 20).all() and src.images.shape == (242 * 20, 28, 28)
    assert src.images.dtype == np.uint8
    assert src.images[:200].mean() < 80 and src.images[:200].max() == 255  # strokes high on a dark background
    for split, alphabets in omni.SMALL_SPLIT.items():
        assert {src.groups[i] for i in src.splits[split]} == set(alphabets)
    sizes = {k: len(v) // 4 for k, v in src.splits.items()}
    assert sizes == {"train": 114, "val": 22, "test": 106}
    assert load_cache(omni.small_cache_dir(tmp_path, 28)).meta["alphabets"] == omni.SMALL_SPLIT
    episodes = load("omniglot-small-5w1s", tmp_path)
    ep = episodes.episode("test", 0)
    assert tuple(ep.support_x.shape) == (5, 1, 28, 28) and tuple(ep.query_x.shape) == (75, 1, 28, 28)
    assert all(src.groups[c] in omni.SMALL_SPLIT["test"] for c in ep.classes)
    assert episodes.describe("test", 0).hash == episodes.describe("test", 0).hash
    assert episodes.episode("train", 3).support_x.shape[0] == 5

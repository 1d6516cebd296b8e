"""glyphs, the embedded default source: class table, splits, rendering, determinism and cache."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from bench.errors import DataError
from bench.sources import get_source, glyphs
from bench.sources.glyphs import FONT_FILES, N_EXAMPLES, ClassTable, FontSet


@pytest.fixture(scope="module")
def table() -> ClassTable:
    return glyphs.read_class_table()


@pytest.fixture(scope="module")
def source(data_root):
    """The full glyphs set at 28 px, generated once per session into the shared data root."""
    return get_source("glyphs", data_root, 28)


def small_table(table: ClassTable, per_group: int = 3) -> ClassTable:
    """A few classes of every group (the cache tests do not need to render all of them)."""
    ids: list[int] = []
    seen: dict[str, int] = {}
    for c, g in enumerate(table.groups):
        if seen.get(g, 0) < per_group:
            ids.append(c)
            seen[g] = seen.get(g, 0) + 1
    split_of = {int(c): s for s, v in table.splits.items() for c in v}
    splits = {s: np.asarray([i for i, c in enumerate(ids) if split_of[c] == s], dtype=np.int64)
              for s in ("train", "val", "test")}
    return ClassTable([table.code_points[c] for c in ids], [table.groups[c] for c in ids],
                      [table.fonts[c] for c in ids], splits, digest="small-test-table")


@pytest.fixture
def small(table, monkeypatch) -> ClassTable:
    """Make `glyphs.load` use a small class table; returns it."""
    t = small_table(table)
    monkeypatch.setattr(glyphs, "read_class_table", lambda path=glyphs.TABLE_FILE: t)
    return t


# ---------------------------------------------------------------------------- the class table


def test_table_has_enough_classes_from_usable_fonts(table):
    n = len(table.code_points)
    assert n >= 600
    assert len(set(table.code_points)) == n  # no code point twice
    assert len(set(table.groups)) >= 10
    raw = json.loads(glyphs.TABLE_FILE.read_text(encoding="utf-8"))
    for name in raw["fonts"]:
        assert name in FONT_FILES
    for bad in ("LastResortHE-Regular.ttf", "STIXNonUni.ttf", "STIXSizOneSymReg.ttf",
                "cmsy10.ttf", "cmex10.ttf"):
        assert bad not in FONT_FILES and bad not in raw["fonts"]
    assert all(len(f) >= glyphs.MIN_FONTS for f in table.fonts)
    for cp in table.code_points:  # no marks, separators or controls
        assert unicodedata.category(chr(cp))[0] in "LNSP"


def test_every_listed_font_has_the_glyph(table):
    """What generation checks too: each class's fonts genuinely map the character."""
    fs = FontSet()
    for cp, fonts in zip(table.code_points, table.fonts):
        for f in fonts:
            assert fs.font(f).get_char_index(cp) != 0, (hex(cp), FONT_FILES[f])
            assert fs.has(f, cp)


def test_splits_are_disjoint_cover_all_and_keep_groups_whole(table):
    n = len(table.code_points)
    sets = {k: set(v.tolist()) for k, v in table.splits.items()}
    assert set(sets) == {"train", "val", "test"}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) \
        and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(range(n))
    split_of_group: dict[str, set[str]] = {}
    for s, ids in sets.items():
        for c in ids:
            split_of_group.setdefault(table.groups[c], set()).add(s)
    assert all(len(v) == 1 for v in split_of_group.values()), split_of_group
    for s, want in glyphs.SPLIT_TARGET.items():
        assert abs(len(sets[s]) / n - want) < 0.05, (s, len(sets[s]) / n)
        assert len({table.groups[c] for c in sets[s]}) >= 3


def test_table_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "classes.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="classes.json"):
        glyphs.read_class_table(bad)
    raw = json.loads(glyphs.TABLE_FILE.read_text(encoding="utf-8"))
    raw["groups"][0]["chars"][0][1] = 1  # one font only
    bad.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataError, match="fewer than"):
        glyphs.read_class_table(bad)
    raw = json.loads(glyphs.TABLE_FILE.read_text(encoding="utf-8"))
    raw["fonts"][0] = "LastResortHE-Regular.ttf"
    bad.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataError, match="LastResortHE"):
        glyphs.read_class_table(bad)


# ---------------------------------------------------------------------------- the images


def test_source_shape_and_tables(source, table):
    n = len(table.code_points)
    assert source.name == "glyphs"
    assert source.n_classes == n
    assert source.images.dtype == np.uint8 and source.images.shape == (n * N_EXAMPLES, 28, 28)
    assert (source.class_count == N_EXAMPLES).all()
    assert (source.class_start == np.arange(n) * N_EXAMPLES).all()
    assert source.class_names == table.class_names
    assert source.class_names[0].startswith(table.groups[0] + "/U+")
    assert source.groups == table.groups
    for s in ("train", "val", "test"):
        assert np.array_equal(source.split_classes(s), table.splits[s])
    assert source.image_shape == (1, 28, 28)


def test_images_have_high_ink_on_dark_background(source):
    imgs = np.asarray(source.images)
    assert (imgs.max(axis=(1, 2)) >= 200).all()  # every image has ink
    ink = (imgs >= 128).mean(axis=(1, 2))
    assert (ink > 0.005).all() and (ink < 0.6).all()
    border = np.concatenate([imgs[:, 0], imgs[:, -1], imgs[:, :, 0], imgs[:, :, -1]], axis=1)
    assert (border.max(axis=1) < 64).mean() > 0.99  # glyphs sit inside the frame
    assert np.median(imgs) == 0


def test_glyphs_are_centred(source):
    imgs = np.asarray(source.images[::37])
    for img in imgs:
        rows = np.flatnonzero(img.max(axis=1) > 64)
        cols = np.flatnonzero(img.max(axis=0) > 64)
        # centred on the ink box, up to the +-2 px shift and rounding
        assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 3.5
        assert abs((cols[0] + cols[-1]) / 2 - 13.5) <= 3.5


def test_classes_differ_and_examples_vary(source):
    imgs = np.asarray(source.images)
    firsts = {imgs[c * N_EXAMPLES].tobytes() for c in range(source.n_classes)}
    assert len(firsts) == source.n_classes
    means = imgs.reshape(source.n_classes, N_EXAMPLES, -1).astype(np.float32).mean(axis=1)
    rng = np.random.default_rng(0)
    a, b = rng.integers(source.n_classes, size=(2, 2000))
    keep = a != b
    assert (np.abs(means[a[keep]] - means[b[keep]]).mean(axis=1) > 1.0).all()
    for c in range(0, source.n_classes, 97):  # the 20 examples of a class are not copies
        assert len({imgs[c * N_EXAMPLES + e].tobytes() for e in range(N_EXAMPLES)}) == N_EXAMPLES


def test_gather_gives_floats_with_ink_high(source):
    x = source.gather([0, 5], [[0, 1], [19]])
    assert x.shape == (3, 1, 28, 28)
    assert float(x.max()) > 0.8 and float(x.min()) == 0.0


# ---------------------------------------------------------------------------- determinism


def test_rendering_is_deterministic(source, table):
    for c in (0, 1, len(table.code_points) // 2, len(table.code_points) - 1):
        cp, fonts = table.code_points[c], table.fonts[c]
        a = glyphs.render_class(FontSet(), cp, fonts, 28)
        b = glyphs.render_class(FontSet(), cp, fonts, 28)
        assert a.tobytes() == b.tobytes()
        rows = slice(c * N_EXAMPLES, (c + 1) * N_EXAMPLES)
        assert np.array_equal(np.asarray(source.images[rows]), a)  # the cache holds the same bytes


def test_font_order_and_jitter_are_seeded_per_class_and_example(table):
    cp, fonts = table.code_points[0], table.fonts[0]
    order = glyphs.font_order(cp, fonts)
    assert sorted(order) == sorted(fonts) and order == glyphs.font_order(cp, fonts)
    j = [glyphs.draw_jitter(glyphs.example_rng(cp, e)) for e in range(N_EXAMPLES)]
    assert j == [glyphs.draw_jitter(glyphs.example_rng(cp, e)) for e in range(N_EXAMPLES)]
    assert len(set(j)) == N_EXAMPLES
    for x in j:
        assert abs(x.rotation) <= 10 and 0.85 <= x.scale <= 1.1 and abs(x.dx) <= 2 and abs(x.dy) <= 2
    # drawing from numpy's global generator changes nothing
    np.random.seed(123)
    np.random.random(10)
    assert j[0] == glyphs.draw_jitter(glyphs.example_rng(cp, 0))


def test_other_image_sizes(table):
    c = 7
    img = glyphs.render_class(FontSet(), table.code_points[c], table.fonts[c], 84)
    assert img.shape == (N_EXAMPLES, 84, 84) and img.dtype == np.uint8
    assert (img.max(axis=(1, 2)) >= 200).all()


# ---------------------------------------------------------------------------- the cache


def test_second_load_reuses_the_cache(source, data_root, monkeypatch):
    path = glyphs.cache_dir(data_root, 28)
    mtime = (path / "images.npy").stat().st_mtime_ns

    def no_generate(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(glyphs, "generate", no_generate)
    again = glyphs.load(data_root, 28)
    assert isinstance(again.images, np.memmap)
    assert (path / "images.npy").stat().st_mtime_ns == mtime
    assert again.class_names == source.class_names


def test_stale_cache_is_rebuilt(small, tmp_path, monkeypatch):
    calls = []
    real = glyphs.generate
    monkeypatch.setattr(glyphs, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = glyphs.load(tmp_path, 28)
    assert len(calls) == 1 and first.n_classes == len(small.code_points)
    assert first.images.shape == (len(small.code_points) * N_EXAMPLES, 28, 28)
    glyphs.load(tmp_path, 28)
    assert len(calls) == 1
    index_file = glyphs.cache_dir(tmp_path, 28) / "index.json"
    index = json.loads(index_file.read_text())
    index["meta"]["matplotlib"] = "0.0.0"  # built by another matplotlib
    index_file.write_text(json.dumps(index))
    again = glyphs.load(tmp_path, 28)
    assert len(calls) == 2
    assert np.array_equal(np.asarray(again.images), np.asarray(first.images))
    assert json.loads(index_file.read_text())["meta"]["matplotlib"] != "0.0.0"


def test_corrupt_cache_raises_naming_the_file(small, tmp_path):
    glyphs.load(tmp_path, 28)
    path = glyphs.cache_dir(tmp_path, 28)
    images = path / "images.npy"
    with open(images, "r+b") as f:
        f.truncate(images.stat().st_size // 2)
    with pytest.raises(DataError, match="images.npy"):
        glyphs.load(tmp_path, 28)
    (path / "index.json").write_text("{truncated", encoding="utf-8")
    with pytest.raises(DataError, match="index.json"):
        glyphs.load(tmp_path, 28)


def test_other_size_gets_its_own_cache(small, tmp_path):
    a = glyphs.load(tmp_path, 32)
    assert a.images.shape[1:] == (32, 32)
    assert glyphs.cache_dir(tmp_path, 32).name == f"32px-v{glyphs.GENERATOR_VERSION}"


def test_missing_font_or_glyph_raises_naming_character_and_font(small, tmp_path, monkeypatch):
    cp, fonts = small.code_points[0], small.fonts[0]
    real_has = FontSet.has
    monkeypatch.setattr(FontSet, "has", lambda self, f, c: False if f == fonts[0] else real_has(self, f, c))
    with pytest.raises(DataError, match=rf"U\+{cp:04X}.*{FONT_FILES[fonts[0]]}"):
        glyphs.load(tmp_path / "a", 28)
    monkeypatch.setattr(FontSet, "has", real_has)
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    monkeypatch.setattr(glyphs, "font_dir", lambda: empty)
    with pytest.raises(DataError, match=rf"U\+{cp:04X}.*needs font .*\.ttf.*missing"):
        glyphs.load(tmp_path / "b", 28)
    assert not (glyphs.cache_dir(tmp_path / "b", 28) / "index.json").exists()


def test_no_font_outside_matplotlib_is_opened(table, monkeypatch):
    opened = []
    import matplotlib.ft2font as ft2

    real = ft2.FT2Font

    def spy(path, *a, **k):
        opened.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(ft2, "FT2Font", spy)
    fs = FontSet()
    for c in range(0, len(table.code_points), 50):
        glyphs.render_class(fs, table.code_points[c], table.fonts[c], 28)
    assert opened
    for p in opened:
        assert p.parent == glyphs.font_dir() and p.name in FONT_FILES
        assert p.name != glyphs.EXCLUDED_FONT


@pytest.mark.slow
def test_checked_in_table_is_what_the_builder_writes(tmp_path):
    """The maintainers' rebuild reproduces the checked-in table (same matplotlib fonts)."""
    out = tmp_path / "classes.json"
    assert glyphs.main(["--write-table", "--out", os.fspath(out)]) == 0
    got = json.loads(out.read_text(encoding="utf-8"))
    want = json.loads(glyphs.TABLE_FILE.read_text(encoding="utf-8"))
    got.pop("matplotlib")
    want.pop("matplotlib")
    assert got == want

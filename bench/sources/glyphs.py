"""`glyphs`: the embedded default source, Unicode characters rendered with matplotlib's own fonts.

Each class is one Unicode character (Latin with diacritics, Greek, Cyrillic, Armenian, Georgian,
Lao, double-struck mathematical letters, symbol blocks, ...); classes are grouped by script or
Unicode block the way Omniglot groups characters by alphabet. Each class has 20 examples. Example
`e` of a class is drawn with one of the font files that has the character (a seeded shuffled
cycle through them) and a seeded jitter: rotation, scale, shear, translation and stroke width.

Only the font files inside matplotlib's package data are used, by explicit path (never a system
font), so the images are the same on every machine with the same matplotlib. LastResortHE (a
placeholder box for every code point), the STIXNonUni / STIXSiz* fonts (private-use and size
variants) and cmsy10 / cmex10 (TeX symbol encodings, not Unicode) are excluded; the other
Computer Modern fonts are used only for ASCII letters and digits, where their encoding agrees
with Unicode.

The class list, the fonts of each class and the train / val / test split are the checked-in file
`glyphs_classes.json`, written once by `python -m bench.sources.glyphs --write-table` (see
`build_class_table`). Loading never recomputes them: when the installed matplotlib lacks a listed
font or glyph, `load` raises DataError naming the character and the font.

Images: uint8 [n_classes * 20, image_size, image_size], ink high (255) on a 0 background, each
glyph centred on its ink bounding box. The first `load` at a size renders and caches them under
`root / "glyphs" / "<size>px-v<GENERATOR_VERSION>"`; later loads memory-map the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.errors import DataError
from bench.sources.base import ArraySource, load_cache, save_cache

# Bump when the rendering changes (jitter, sizes, filters): old caches are then not reused.
GENERATOR_VERSION = 1
TABLE_VERSION = 1
TABLE_FILE = Path(__file__).with_name("glyphs_classes.json")

SEED = 0x61F5  # root of every random draw of this module
N_EXAMPLES = 20
MIN_FONTS = 6  # a class needs its character in this many usable font files
MASTER_EM = 96  # pixels per em of the master rendering (stroke-width changes happen there)
SUPERSAMPLE = 3  # jittered glyphs are drawn at SUPERSAMPLE x image_size, then box-downsampled
EM_FRACTION = 0.85  # one em spans this fraction of the image ...
FIT_FRACTION = 0.82  # ... unless the glyph's larger side would exceed this fraction
MAX_ROTATION_DEG = 10.0
SCALE_RANGE = (0.85, 1.10)
MAX_SHEAR = 0.15  # horizontal shear factor (about 8.5 degrees)
MAX_SHIFT_AT_28 = 2.0  # translation in pixels of a 28-pixel image (scaled with image_size)
STROKE_STEPS = (-1, 0, 1, 2)  # erode (<0) or dilate (>0) by this many master pixels
ERODE_KEEP = 0.7  # erosion is skipped when it would remove more than 30% of the ink

# The usable font files of matplotlib/mpl-data/fonts/ttf, in a fixed order (the class table
# refers to them by position, as a bit mask).
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSansDisplay.ttf", "DejaVuSerifDisplay.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmmi10.ttf",
)
EXCLUDED_FONT = "LastResortHE-Regular.ttf"  # draws a placeholder box for every code point

_ASCII_LETTERS = frozenset(range(0x41, 0x5B)) | frozenset(range(0x61, 0x7B))
_ASCII_DIGITS = frozenset(range(0x30, 0x3A))
# Computer Modern files use TeX encodings; only these code points mean what Unicode says.
_FONT_ONLY: dict[str, frozenset[int]] = {
    "cmr10.ttf": _ASCII_LETTERS | _ASCII_DIGITS, "cmb10.ttf": _ASCII_LETTERS | _ASCII_DIGITS,
    "cmti10.ttf": _ASCII_LETTERS | _ASCII_DIGITS, "cmss10.ttf": _ASCII_LETTERS | _ASCII_DIGITS,
    "cmtt10.ttf": _ASCII_LETTERS | _ASCII_DIGITS, "cmmi10.ttf": _ASCII_LETTERS,
}

SPLIT_TARGET = {"train": 0.64, "val": 0.16, "test": 0.20}


# --------------------------------------------------------------------------------------------
# fonts and master renderings


def font_dir() -> Path:
    """matplotlib's own TrueType folder (mpl-data/fonts/ttf); never a system font folder."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _freetype_version() -> str:
    from matplotlib import ft2font

    return str(getattr(ft2font, "__freetype_version__", "unknown"))


def _no_hinting_flag():
    from matplotlib import ft2font

    flags = getattr(ft2font, "LoadFlags", None)
    return flags.NO_HINTING if flags is not None else 2  # FT_LOAD_NO_HINTING


class FontSet:
    """The usable font files opened with FreeType (matplotlib.ft2font), by position in FONT_FILES."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else font_dir()
        self._fonts: dict[int, object] = {}
        self._flags = _no_hinting_flag()

    def font(self, i: int):
        """The FT2Font of FONT_FILES[i] at MASTER_EM pixels per em; DataError when it is missing."""
        ft = self._fonts.get(i)
        if ft is None:
            import matplotlib
            from matplotlib.ft2font import FT2Font

            path = self.folder / FONT_FILES[i]
            if not path.is_file():
                raise DataError(f"glyphs: font file {path} is missing from this matplotlib "
                                f"({matplotlib.__version__}); the glyphs class table needs it")
            major_minor = tuple(int(x) for x in matplotlib.__version__.split(".")[:2] if x.isdigit())
            # Before 3.11 FT2Font oversampled horizontally by 8 unless told otherwise.
            ft = FT2Font(str(path), hinting_factor=1) if major_minor < (3, 11) else FT2Font(str(path))
            ft.set_size(MASTER_EM, 72)  # 72 dpi: one point is one pixel
            self._fonts[i] = ft
        return ft

    def has(self, i: int, cp: int) -> bool:
        """Whether FONT_FILES[i] genuinely maps code point `cp` (and may be used for it)."""
        only = _FONT_ONLY.get(FONT_FILES[i])
        if only is not None and cp not in only:
            return False
        return self.font(i).get_char_index(cp) != 0

    def master(self, i: int, cp: int) -> np.ndarray:
        """Code point `cp` drawn with FONT_FILES[i], cropped to its ink.

        Returns: uint8 [h, w], ink high, at MASTER_EM pixels per em; [0, 0] when nothing is drawn.
        """
        ft = self.font(i)
        ft.clear()
        ft.set_text(chr(cp), 0.0, flags=self._flags)
        ft.draw_glyphs_to_bitmap(antialiased=True)
        img = np.asarray(ft.get_image())
        rows = np.flatnonzero(img.max(axis=1) > 0)
        if rows.size == 0:
            return np.zeros((0, 0), dtype=np.uint8)
        cols = np.flatnonzero(img.max(axis=0) > 0)
        return np.array(img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], dtype=np.uint8)

    def fingerprint(self) -> str:
        """A cheap hash of the names and sizes of the usable font files (names a font install)."""
        h = hashlib.sha256()
        for name in FONT_FILES:
            p = self.folder / name
            h.update(f"{name}:{p.stat().st_size if p.is_file() else -1};".encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# rendering one example


def _stroke(img: np.ndarray, step: int) -> np.ndarray:
    """Dilate (step > 0) or erode (step < 0) `img` by |step| pixels with a square element.

    Dilation pads the image by |step| so the grown ink is kept. Returns uint8 [h', w'].
    """
    if step == 0:
        return img
    r = abs(step)
    if step > 0:
        src = np.zeros((img.shape[0] + 2 * r, img.shape[1] + 2 * r), dtype=img.dtype)
        src[r:-r, r:-r] = img
    else:
        src = img
    op = np.maximum if step > 0 else np.minimum
    h, w = src.shape
    # a (2r+1)-wide running max/min along each axis: the separable square element
    rows = src.copy()
    for k in range(1, r + 1):
        op(rows[k:], src[:h - k], out=rows[k:])
        op(rows[:h - k], src[k:], out=rows[:h - k])
    out = rows.copy()
    for k in range(1, r + 1):
        op(out[:, k:], rows[:, :w - k], out=out[:, k:])
        op(out[:, :w - k], rows[:, k:], out=out[:, :w - k])
    return out


@dataclass(frozen=True)
class Jitter:
    """One example's distortion: rotation (degrees), scale, horizontal shear, shift (pixels of a
    28-pixel image) and stroke step (master pixels; < 0 erodes, > 0 dilates)."""

    rotation: float = 0.0
    scale: float = 1.0
    shear: float = 0.0
    dx: float = 0.0
    dy: float = 0.0
    stroke: int = 0


def example_rng(cp: int, example: int) -> np.random.Generator:
    """The generator of example `example` of the class of code point `cp`."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([SEED, 1, cp, example])))


def draw_jitter(rng: np.random.Generator) -> Jitter:
    """Draw one Jitter from `rng` (one call: six uniforms, always in the same order)."""
    u = rng.random(6)
    return Jitter(
        rotation=float(MAX_ROTATION_DEG * (2.0 * u[0] - 1.0)),
        scale=float(SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * u[1]),
        shear=float(MAX_SHEAR * (2.0 * u[2] - 1.0)),
        dx=float(MAX_SHIFT_AT_28 * (2.0 * u[3] - 1.0)),
        dy=float(MAX_SHIFT_AT_28 * (2.0 * u[4] - 1.0)),
        stroke=int(STROKE_STEPS[min(int(u[5] * len(STROKE_STEPS)), len(STROKE_STEPS) - 1)]),
    )


def place(master: np.ndarray, jitter: Jitter, image_size: int) -> np.ndarray:
    """Draw a master glyph (uint8 [h, w], MASTER_EM px per em) into an image with `jitter`.

    The glyph's ink bounding box is centred (before the shift); one em spans EM_FRACTION of the
    image unless the glyph's larger side would pass FIT_FRACTION, and an example whose jittered
    box would leave the image (less a one-pixel margin) is shrunk to fit. Drawn at SUPERSAMPLE x
    size with bilinear sampling, then box-downsampled. Returns uint8 [image_size, image_size].
    """
    from PIL import Image

    glyph = _stroke(master, jitter.stroke)
    if jitter.stroke < 0 and int(glyph.sum(dtype=np.int64)) < ERODE_KEEP * int(master.sum(dtype=np.int64)):
        glyph = master  # a hairline glyph would fade away: keep it as drawn
    h, w = glyph.shape
    big = image_size * SUPERSAMPLE
    # pixels of the big canvas per master pixel; the fit uses the unjittered master size
    g = min(EM_FRACTION * big / MASTER_EM, FIT_FRACTION * big / max(master.shape))
    theta = math.radians(jitter.rotation)
    c, s = math.cos(theta), math.sin(theta)
    # forward map (master centred -> canvas centred): g * scale * R(theta) @ [[1, shear], [0, 1]]
    b11, b12, b21, b22 = c, c * jitter.shear - s, s, s * jitter.shear + c
    shift = big / 28.0
    sx, sy = jitter.dx * shift, jitter.dy * shift
    # never cut the glyph: shrink this example when its jittered box would leave the image
    # (keeping one output pixel of margin)
    half_x = (abs(b11) * w + abs(b12) * h) / 2.0
    half_y = (abs(b21) * w + abs(b22) * h) / 2.0
    room_x = big / 2.0 - SUPERSAMPLE - abs(sx)
    room_y = big / 2.0 - SUPERSAMPLE - abs(sy)
    k = min(g * jitter.scale, room_x / half_x, room_y / half_y)
    a11, a12, a21, a22 = k * b11, k * b12, k * b21, k * b22
    det = a11 * a22 - a12 * a21
    i11, i12, i21, i22 = a22 / det, -a12 / det, -a21 / det, a11 / det
    ox, oy = big / 2.0 + sx, big / 2.0 + sy
    mx, my = w / 2.0, h / 2.0
    # PIL samples the input at (a x + b y + c, d x + e y + f) for output pixel centre (x, y)
    data = (i11, i12, mx - i11 * ox - i12 * oy, i21, i22, my - i21 * ox - i22 * oy)
    img = Image.fromarray(glyph).transform((big, big), Image.Transform.AFFINE, data,
                                           resample=Image.Resampling.BILINEAR, fillcolor=0)
    if SUPERSAMPLE > 1:
        img = img.reduce(SUPERSAMPLE)
    return np.asarray(img, dtype=np.uint8)


def font_order(cp: int, fonts: Sequence[int]) -> list[int]:
    """The fonts of a class in the seeded order its examples cycle through."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([SEED, 0, cp])))
    fonts = sorted(fonts)
    return [fonts[j] for j in rng.permutation(len(fonts))]


def render_class(fontset: FontSet, cp: int, fonts: Sequence[int], image_size: int,
                 n_examples: int = N_EXAMPLES, label: str | None = None) -> np.ndarray:
    """The `n_examples` images of the class of code point `cp` drawn with font ids `fonts`.

    Raises DataError naming the character and the font when a font lacks the glyph or draws
    nothing. Returns uint8 [n_examples, image_size, image_size].
    """
    label = label or f"U+{cp:04X}"
    order = font_order(cp, fonts)
    used = set(order[:n_examples])
    masters: dict[int, np.ndarray] = {}
    for f in order:  # every listed font must still have the glyph; the used ones must draw it
        where = f"font {fontset.folder / FONT_FILES[f]}"
        try:
            present = fontset.has(f, cp)
        except DataError as e:
            raise DataError(f"glyphs: character {label} ({chr(cp)!r}) needs {where}: {e}") from e
        if not present:
            raise DataError(f"glyphs: character {label} ({chr(cp)!r}) is missing from {where}; "
                            f"the class table {TABLE_FILE.name} expects it there")
        if f in used:
            m = fontset.master(f, cp)
            if m.size == 0 or int(m.max()) == 0:
                raise DataError(f"glyphs: character {label} ({chr(cp)!r}) draws nothing in {where}")
            masters[f] = m
    out = np.empty((n_examples, image_size, image_size), dtype=np.uint8)
    for e in range(n_examples):
        f = order[e % len(order)]
        out[e] = place(masters[f], draw_jitter(example_rng(cp, e)), image_size)
        if not out[e].any():
            raise DataError(f"glyphs: character {label} example {e} (font {FONT_FILES[f]}) "
                            f"rendered empty at {image_size}px")
    return out


# --------------------------------------------------------------------------------------------
# the class table (checked in; build_class_table only (re)creates it)

# (group name, kind, code point ranges (inclusive)), in priority order: when two characters
# look the same, the one of the earlier group is kept. The split balances the kinds ("latin",
# "script": other alphabets, "symbol"). Left out on purpose: Greek polytonic (breathing marks
# are one or two pixels at 28), general punctuation, number forms (fractions), technical
# symbols (bracket pieces), geometric shapes, pictographs and dingbats (one drawing shared by
# the DejaVu fonts, or shapes that differ only by fill or size), box drawing, block elements
# and Braille (centred on their ink they collapse onto each other).
GROUPS: tuple[tuple[str, str, tuple[tuple[int, int], ...]], ...] = (
    ("Basic Latin", "latin", ((0x0021, 0x007E),)),
    ("Latin-1 Supplement", "latin", ((0x00A1, 0x00FF),)),
    ("Latin Extended-A", "latin", ((0x0100, 0x017F),)),
    ("Latin Extended-B", "latin", ((0x0180, 0x024F),)),
    ("IPA Extensions", "latin", ((0x0250, 0x02AF),)),
    ("Greek", "script", ((0x0370, 0x03FF),)),
    ("Cyrillic", "script", ((0x0400, 0x045F),)),
    ("Cyrillic Extended", "script", ((0x0460, 0x052F), (0xA640, 0xA69F))),
    ("Armenian", "script", ((0x0530, 0x058F), (0xFB13, 0xFB17))),
    ("Lao", "script", ((0x0E80, 0x0EFF),)),
    ("Georgian", "script", ((0x10A0, 0x10FF),)),
    ("Georgian Nuskhuri", "script", ((0x2D00, 0x2D2F),)),
    ("Phonetic Extensions", "latin", ((0x1D00, 0x1DBF),)),
    ("Latin Extended Additional", "latin", ((0x1E00, 0x1E9F),)),
    ("Vietnamese", "latin", ((0x1EA0, 0x1EFF),)),
    ("Latin Extended-C and D", "latin", ((0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFB00, 0xFB06))),
    ("Double-Struck", "script", ((0x1D538, 0x1D56B), (0x1D7D8, 0x1D7E1))),
    ("Currency Symbols", "symbol", ((0x20A0, 0x20CF),)),
    ("Letterlike Symbols", "symbol", ((0x2100, 0x214F),)),
    ("Arrows", "symbol", ((0x2190, 0x21FF), (0x27F0, 0x27FF), (0x2900, 0x297F))),
    ("Mathematical Operators I", "symbol", ((0x2200, 0x227F),)),
    ("Mathematical Operators II", "symbol", ((0x2280, 0x22FF),)),
)

# categories never used: marks, separators, controls, modifier letters and symbols, dashes,
# connectors (a bar of some length is not a character class)
_SKIP_CATEGORIES = {"Mn", "Mc", "Me", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn", "Lm", "Sk",
                    "Pd", "Pc"}
_SKIP_DECOMPOSITIONS = ("<super>", "<sub>", "<small>", "<vertical>", "<wide>", "<narrow>",
                        "<square>", "<isolated>", "<initial>", "<medial>", "<final>", "<noBreak>")
MIN_EXTENT_EM = 0.4  # the glyph's larger side, median over its fonts, in ems
DUPLICATE_RMS = 0.065  # canonical 28-px renderings closer than this (RMS, 0..1) look the same


def _candidate(cp: int) -> bool:
    ch = chr(cp)
    if unicodedata.category(ch) in _SKIP_CATEGORIES:
        return False
    if unicodedata.normalize("NFC", ch) != ch:  # a canonical duplicate (e.g. KELVIN SIGN = K)
        return False
    return not unicodedata.decomposition(ch).startswith(_SKIP_DECOMPOSITIONS)


def _split_groups(sizes: dict[str, int], kinds: dict[str, str], seed: int = SEED,
                  tries: int = 20000) -> dict[str, str]:
    """Assign whole groups to train / val / test (only run when the table is rebuilt).

    A seeded random search for the assignment whose class counts are closest to SPLIT_TARGET
    and whose splits hold about the same share of each kind of group ("latin", "script",
    "symbol"); each split gets at least one group of each kind.
    """
    names = sorted(sizes)
    n = np.array([sizes[g] for g in names], dtype=np.float64)
    kind_names = sorted(set(kinds.values()))
    onehot = np.array([[kinds[g] == k for k in kind_names] for g in names], dtype=np.float64)
    target = np.array([SPLIT_TARGET[s] for s in ("train", "val", "test")])
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 2])))
    best, best_cost = None, np.inf
    for _ in range(tries):
        a = rng.choice(3, size=len(names), p=target)
        member = np.eye(3)[a]  # [groups, 3]
        if (member.T @ onehot).min() < 1:  # a split without a group of some kind
            continue
        counts = n @ member
        share = (member.T @ (onehot * n[:, None])) / counts[:, None]  # [3, kinds]
        cost = float(np.abs(counts / n.sum() - target).sum()
                     + 0.2 * np.abs(share - (onehot * n[:, None]).sum(0) / n.sum()).sum())
        if cost < best_cost:
            best, best_cost = a, cost
    assert best is not None
    return {g: ("train", "val", "test")[int(k)] for g, k in zip(names, best)}


def build_class_table(fontset: FontSet | None = None, verbose: bool = True) -> dict:
    """Compute the glyphs class table from the installed matplotlib fonts (maintainers only).

    A character becomes a class when (1) its category is a letter, digit, symbol or punctuation
    that is not a mark, modifier, dash or super/subscript form, (2) at least MIN_FONTS usable font
    files genuinely have it (a glyph index != 0 that draws ink), (3) it is not tiny (larger
    side >= MIN_EXTENT_EM em, median over its fonts), and (4) it does not look like an earlier
    class: in at least half of the fonts both have, their canonical 28-pixel renderings differ
    by less than DUPLICATE_RMS. Groups are then split whole into train / val / test.

    Returns the table as written to glyphs_classes.json.
    """
    fontset = fontset or FontSet()
    cands: list[tuple[str, int, list[int]]] = []
    for group, _, ranges in GROUPS:
        for lo, hi in ranges:
            for cp in range(lo, hi + 1):
                if not _candidate(cp):
                    continue
                fonts = []
                extents = []
                for f in range(len(FONT_FILES)):
                    if fontset.has(f, cp):
                        m = fontset.master(f, cp)
                        if m.size and int(m.max()) >= 128 and int((m >= 128).sum()) >= 16:
                            fonts.append(f)
                            extents.append(max(m.shape) / MASTER_EM)
                if len(fonts) >= MIN_FONTS and float(np.median(extents)) >= MIN_EXTENT_EM:
                    cands.append((group, cp, fonts))
    if verbose:
        print(f"glyphs: {len(cands)} candidate characters", file=sys.stderr)
    # canonical renderings (no jitter) per font, for the look-alike test
    n_c, n_f = len(cands), len(FONT_FILES)
    canon = np.zeros((n_f, n_c, 28 * 28), dtype=np.float32)
    has = np.zeros((n_f, n_c), dtype=bool)
    for j, (_, cp, fonts) in enumerate(cands):
        for f in fonts:
            canon[f, j] = place(fontset.master(f, cp), Jitter(), 28).reshape(-1) / 255.0
            has[f, j] = True
    shared = np.zeros((n_c, n_c), dtype=np.int16)
    close = np.zeros((n_c, n_c), dtype=np.int16)
    for f in range(n_f):
        idx = np.flatnonzero(has[f])
        if idx.size == 0:
            continue
        x = canon[f, idx]
        sq = (x * x).sum(axis=1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0) / x.shape[1]
        sub = np.ix_(idx, idx)
        shared[sub] += 1
        close[sub] += (d2 < DUPLICATE_RMS ** 2).astype(np.int16)
    keep: list[int] = []
    keep_mask = np.zeros(n_c, dtype=bool)
    dropped: list[tuple[int, int]] = []
    for j in range(n_c):
        dup = keep_mask & (shared[j] > 0) & (2 * close[j] >= shared[j])
        if dup.any():
            dropped.append((cands[j][1], cands[int(np.flatnonzero(dup)[0])][1]))
            continue
        keep.append(j)
        keep_mask[j] = True
    if verbose:
        print(f"glyphs: {len(dropped)} look-alikes dropped, e.g. "
              + ", ".join(f"{chr(a)}~{chr(b)}" for a, b in dropped[:40]), file=sys.stderr)
    by_group: dict[str, list[tuple[int, list[int]]]] = {}
    for j in keep:
        group, cp, fonts = cands[j]
        by_group.setdefault(group, []).append((cp, fonts))
    split_of = _split_groups({g: len(v) for g, v in by_group.items()},
                             {g: kind for g, kind, _ in GROUPS if g in by_group})
    import matplotlib

    return {
        "version": TABLE_VERSION,
        "comment": "metabench glyphs classes; written by `python -m bench.sources.glyphs "
                   "--write-table`, do not edit by hand. chars: [code point, mask of fonts].",
        "matplotlib": matplotlib.__version__,
        "min_fonts": MIN_FONTS,
        "fonts": list(FONT_FILES),
        "groups": [{"name": g, "split": split_of[g],
                    "chars": [[cp, sum(1 << f for f in fonts)] for cp, fonts in by_group[g]]}
                   for g, _, _ in GROUPS if g in by_group],
    }


def write_class_table(table: dict, path: Path = TABLE_FILE) -> None:
    """Write the class table compactly: one line per group."""
    head = {k: v for k, v in table.items() if k != "groups"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v)},")
    lines.append('  "groups": [')
    for i, g in enumerate(table["groups"]):
        chars = json.dumps(g["chars"], separators=(",", ":"))
        sep = "," if i + 1 < len(table["groups"]) else ""
        lines.append(f'    {{"name": {json.dumps(g["name"])}, "split": {json.dumps(g["split"])}, '
                     f'"chars": {chars}}}{sep}')
    lines.append("  ]")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class ClassTable:
    """The checked-in class list: per class its code point, group and font ids; and the splits."""

    code_points: list[int]
    groups: list[str]
    fonts: list[list[int]]
    splits: dict[str, np.ndarray]
    digest: str

    @property
    def class_names(self) -> list[str]:
        """Class names like "Greek/U+03B1"."""
        return [f"{g}/U+{cp:04X}" for g, cp in zip(self.groups, self.code_points)]


def read_class_table(path: Path = TABLE_FILE) -> ClassTable:
    """Read and check the class table; DataError naming the file when it is malformed."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable glyphs class table ({e})") from e
    if raw.get("version") != TABLE_VERSION:
        raise DataError(f"{path}: class table version {raw.get('version')!r}, expected {TABLE_VERSION}")
    names = raw.get("fonts")
    if not isinstance(names, list) or any(n not in FONT_FILES for n in names):
        raise DataError(f"{path}: font list {names!r} names fonts outside {FONT_FILES}")
    if EXCLUDED_FONT in names:
        raise DataError(f"{path}: the class table lists {EXCLUDED_FONT}, which draws placeholder boxes")
    remap = [FONT_FILES.index(n) for n in names]
    cps: list[int] = []
    groups: list[str] = []
    fonts: list[list[int]] = []
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    seen: set[int] = set()
    try:
        for g in raw["groups"]:
            name, split = str(g["name"]), g["split"]
            if split not in splits or "/" in name:
                raise DataError(f"{path}: group {name!r} has split {split!r} (or a '/' in its name)")
            for cp, mask in g["chars"]:
                cp, mask = int(cp), int(mask)
                if cp in seen:
                    raise DataError(f"{path}: character U+{cp:04X} is listed twice")
                seen.add(cp)
                ids = [remap[i] for i in range(len(names)) if mask >> i & 1]
                if len(ids) < int(raw.get("min_fonts", MIN_FONTS)):
                    raise DataError(f"{path}: character U+{cp:04X} lists {len(ids)} fonts, "
                                    f"fewer than {raw.get('min_fonts', MIN_FONTS)}")
                splits[split].append(len(cps))
                cps.append(cp)
                groups.append(name)
                fonts.append(ids)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed glyphs class table ({e!r})") from e
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return ClassTable(cps, groups, fonts, {k: np.asarray(v, dtype=np.int64) for k, v in splits.items()},
                      digest)


# --------------------------------------------------------------------------------------------
# generation and the cache


def cache_dir(root: Path, image_size: int) -> Path:
    """The cache folder of the glyphs at `image_size` under the data folder `root`."""
    return Path(root) / "glyphs" / f"{image_size}px-v{GENERATOR_VERSION}"


def expected_meta(table: ClassTable, image_size: int, fontset: FontSet | None = None) -> dict:
    """The cache meta a glyphs cache must carry to be reused (a mismatch means stale)."""
    import matplotlib

    fontset = fontset or FontSet()
    return {"generator_version": GENERATOR_VERSION, "image_size": int(image_size),
            "matplotlib": matplotlib.__version__, "freetype": _freetype_version(),
            "fonts": fontset.fingerprint(), "table": table.digest}


def generate(table: ClassTable, image_size: int, fontset: FontSet | None = None,
             progress: bool = True) -> ArraySource:
    """Render every class of `table` (in memory). Images: uint8 [n_classes * 20, S, S]."""
    if image_size < 8:
        raise DataError(f"glyphs: image_size {image_size} is too small (need >= 8)")
    fontset = fontset or FontSet()
    n = len(table.code_points)
    images = np.empty((n * N_EXAMPLES, image_size, image_size), dtype=np.uint8)
    names = table.class_names
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"glyphs: rendering {image_size}px", unit="class",
                   file=sys.stderr, leave=False)
    try:
        for c, (cp, fonts) in enumerate(zip(table.code_points, table.fonts)):
            images[c * N_EXAMPLES:(c + 1) * N_EXAMPLES] = render_class(
                fontset, cp, fonts, image_size, label=names[c])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    ids = np.arange(n, dtype=np.int64)
    return ArraySource(
        name="glyphs", images=images, class_start=ids * N_EXAMPLES,
        class_count=np.full(n, N_EXAMPLES, dtype=np.int64), class_names=names,
        splits={k: v.copy() for k, v in table.splits.items()}, groups=list(table.groups),
        meta=expected_meta(table, image_size, fontset),
    )


def _index_state(path: Path, meta: dict) -> str:
    """"missing", "stale" (another format or meta: rebuild) or "ok"; DataError when unreadable."""
    from bench.sources.base import CACHE_FORMAT

    index_file = path / "index.json"
    if not index_file.exists():
        return "missing"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise DataError(f"{index_file}: corrupt glyphs cache index ({e}); delete {path} "
                        f"to rebuild it") from e
    if index.get("format") != CACHE_FORMAT:
        return "stale"  # also format 1: rebuilt to record its content fingerprint
    got = index.get("meta") if isinstance(index.get("meta"), dict) else {}
    return "ok" if all(got.get(k) == v for k, v in meta.items()) else "stale"


def load(root: Path, image_size: int) -> ArraySource:
    """Registry entry: the glyphs at `image_size`, rendered once into `root` and then memory-mapped.

    A missing cache, or one built by another generator, matplotlib, FreeType, font install or
    class table, is (re)built; a cache whose files are unreadable or disagree with their index
    raises DataError naming the file. Images: uint8 [n_classes * 20, image_size, image_size].
    """
    image_size = int(image_size)
    table = read_class_table()
    fontset = FontSet()
    meta = expected_meta(table, image_size, fontset)
    path = cache_dir(Path(root), image_size)
    state = _index_state(path, meta)
    if state != "ok":
        if state == "stale":
            print(f"glyphs: cache {path} was built by another generator, matplotlib or class "
                  f"table; rebuilding it", file=sys.stderr)
            (path / "index.json").unlink()  # an index only ever marks a complete, valid cache
        save_cache(path, generate(table, image_size, fontset))
    source = load_cache(path, expect_meta=meta)
    if source.class_names != table.class_names or source.images.shape[1:] != (image_size, image_size):
        raise DataError(f"{path / 'index.json'}: glyphs cache classes or image shape disagree "
                        f"with {TABLE_FILE.name}; delete {path} to rebuild it")
    return source


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.sources.glyphs --write-table`: (re)create glyphs_classes.json."""
    p = argparse.ArgumentParser(prog="python -m bench.sources.glyphs", description=__doc__.splitlines()[0])
    p.add_argument("--write-table", action="store_true",
                   help=f"recompute the class table from the installed fonts and write {TABLE_FILE}")
    p.add_argument("--out", type=Path, default=TABLE_FILE, help="where --write-table writes")
    args = p.parse_args(argv)
    if not args.write_table:
        p.print_help()
        return 2
    table = build_class_table()
    write_class_table(table, args.out)
    counts = {s: sum(len(g["chars"]) for g in table["groups"] if g["split"] == s)
              for s in ("train", "val", "test")}
    print(f"wrote {args.out}: {sum(counts.values())} classes in {len(table['groups'])} groups, "
          f"{counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

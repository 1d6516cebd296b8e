"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015): 1623 handwritten characters from
50 alphabets, 20 drawers each.

This module holds the project's own compact definition of the dataset (alphabet names and
character counts, the official archives and their md5s) and of its standard splits, written
from their rules rather than copied:

- Vinyals et al. 2016 (the ProtoNets / torchmeta split, the standard for MAML-family papers):
  trainval = the 964 background characters plus the first 236 evaluation characters in sorted
  (alphabet, character) order (Angelic ... Glagolitic, then Gurmukhi character01-41);
  test = the other 423 evaluation characters; val = the background alphabets Armenian, Bengali,
  Early_Aramaic, Hebrew and Mkhedruli_(Georgian); train = trainval minus val (1028/172/423).
  Each character rotated by 0/90/180/270 degrees is its own class (x4).
- Meta-Dataset (Triantafillou et al. 2020) by alphabet: 25 background alphabets train, 5 valid
  (Blackfoot, Ojibwe, Inuktitut, Tagalog, Alphabet_of_the_Magi), the 20 evaluation alphabets
  test (883/81/659 characters). Meta-Dataset does not rotate, so neither does `omniglot-md`.
- `omniglot-small`: the two real subsets published beside the full archives
  (images_background_small1/2.zip, 8 alphabets, 242 characters), split by alphabet (see
  SMALL_SPLIT): a real benchmark that fits in a test run.

Processing: the 105x105 1-bit PNG is converted to grey ("L") and inverted so strokes are high
(255 on 0), then resized to image_size x image_size with PIL's BILINEAR filter (antialiased
when shrinking, as torchmeta and learn2learn do), stored as uint8. Each character image is
stored once; rotated classes rotate at gather time (`ArraySource.class_rot`). With BILINEAR,
rotating the resized image equals resizing the rotated image (the Vinyals order: rotate,
resize, invert) to within one grey level; with LANCZOS it differs by up to ~25 levels, which is
why LANCZOS is not used. Note that MAML's own script (cbfinn/maml
data/omniglot_resized/resize_images.py) asks for LANCZOS on the 1-bit image, but Pillow
resizes mode "1" images with NEAREST whatever filter is asked, so MAML's (and ProtoNets')
28x28 images were binary. The cache records the filter (meta "resample").

Archives and folders in the official layout are read directly (a zip is decoded in place, not
unpacked onto disk): `<top>/<Alphabet>/characterNN/<PPPP>_<DD>.png`, the torchvision layout
(`omniglot-py/images_background/...`) included.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from bench.errors import DataError
from bench.sources.base import ArraySource, load_cache
from bench.sources.cachedir import file_digest, progress, save_cache_dir, try_load_cache

# ---------------------------------------------------------------------------------------------
# The dataset definition
# ---------------------------------------------------------------------------------------------

_RAW = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
# archive name -> (download URL, md5 of the official file)
OMNIGLOT_ARCHIVES: dict[str, tuple[str, str]] = {
    "images_background.zip": (_RAW + "images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation.zip": (_RAW + "images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
}
# The two small real subsets from the same repository (python/images_background_small{1,2}.zip).
SMALL_ARCHIVES: dict[str, tuple[str, str]] = {
    "images_background_small1.zip": (_RAW + "images_background_small1.zip", "e704a628b5459e08445c13499850abc4"),
    "images_background_small2.zip": (_RAW + "images_background_small2.zip", "b75a71a51d3b13f821f212756fe481fd"),
}

# alphabet -> number of characters (character01 .. characterNN)
BACKGROUND: dict[str, int] = {
    "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
    "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46,
    "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14, "Braille": 26, "Burmese_(Myanmar)": 34,
    "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43, "Greek": 24, "Gujarati": 48,
    "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16, "Japanese_(hiragana)": 52,
    "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26, "Malay_(Jawi_-_Arabic)": 40,
    "Mkhedruli_(Georgian)": 41, "N_Ko": 33, "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14,
    "Sanskrit": 42, "Syriac_(Estrangelo)": 23, "Tagalog": 17, "Tifinagh": 55,
}
EVALUATION: dict[str, int] = {
    "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26,
    "Ge_ez": 26, "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47,
    "Manipuri": 40, "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46,
    "Sylheti": 28, "Syriac_(Serto)": 23, "Tengwar": 25, "Tibetan": 42, "ULOG": 26,
}
IMAGES_PER_CHARACTER = 20

VINYALS_VAL = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
VINYALS_EVAL_IN_TRAINVAL = 236
MD_VAL = ("Blackfoot_(Canadian_Aboriginal_Syllabics)", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
          "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Tagalog", "Alphabet_of_the_Magi")

# omniglot-small: train on the alphabets of small1 except Early_Aramaic, held out for validation
# (it is also a Vinyals validation alphabet; Greek and Latin, in both zips, stay in train); test
# on the alphabets only in small2. 114 / 22 / 106 characters = 456 / 88 / 424 rotated classes.
SMALL_SPLIT: dict[str, list[str]] = {
    "train": ["Balinese", "Greek", "Korean", "Latin"],
    "val": ["Early_Aramaic"],
    "test": ["Japanese_(katakana)", "Sanskrit", "Tagalog"],
}

CACHE_VERSION = 1
RESAMPLE = "bilinear"
DEFAULT_SIZE = 28


def character_names(alphabets: Mapping[str, int] | Iterable[str]) -> list[str]:
    """"Alphabet/characterNN" for every character of `alphabets`, in sorted (alphabet, character) order."""
    table = {**BACKGROUND, **EVALUATION}
    counts = alphabets if isinstance(alphabets, Mapping) else {a: table[a] for a in alphabets}
    return [f"{a}/character{i:02d}" for a in sorted(counts) for i in range(1, counts[a] + 1)]


def vinyals_split() -> dict[str, list[str]]:
    """The Vinyals split by its rule: {"train", "val", "test", "trainval"} -> character names."""
    background = character_names(BACKGROUND)
    evaluation = character_names(EVALUATION)
    trainval = background + evaluation[:VINYALS_EVAL_IN_TRAINVAL]
    val = [c for c in background if c.split("/")[0] in VINYALS_VAL]
    val_set = set(val)
    return {"train": [c for c in trainval if c not in val_set], "val": val,
            "test": evaluation[VINYALS_EVAL_IN_TRAINVAL:], "trainval": trainval}


def md_alphabet_split() -> dict[str, list[str]]:
    """Meta-Dataset's Omniglot split by alphabet (25 / 5 / 20)."""
    return {"train": sorted(a for a in BACKGROUND if a not in MD_VAL), "val": list(MD_VAL),
            "test": sorted(EVALUATION)}


def md_split() -> dict[str, list[str]]:
    """Meta-Dataset's Omniglot split as character names (883 / 81 / 659)."""
    return {k: character_names(v) for k, v in md_alphabet_split().items()}


# ---------------------------------------------------------------------------------------------
# Reading archives and folders in the official layout
# ---------------------------------------------------------------------------------------------

_PNG = re.compile(r"(?:^|/)([^/]+)/(character\d+)/([^/]+\.png)$", re.IGNORECASE)
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError)


class _Tree:
    """A zip archive or a folder: files by relative POSIX path, read as bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self.files = {}
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
                for f in filenames:
                    full = Path(dirpath) / f
                    self.files[full.relative_to(path).as_posix()] = full.stat().st_size
        else:
            try:
                self.zip = zipfile.ZipFile(path)
                self.files = {i.filename: i.file_size for i in self.zip.infolist() if not i.is_dir()}
            except _ZIP_ERRORS as e:
                raise DataError(f"{path}: not a readable zip archive (truncated or corrupt: {e})") from e

    def where(self, rel: str) -> str:
        """A path for messages: the file, or archive:member."""
        return f"{self.path}:{rel}" if self.zip is not None else str(self.path / rel)

    def read(self, rel: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(rel)
            return (self.path / rel).read_bytes()
        except _ZIP_ERRORS as e:
            raise DataError(f"{self.where(rel)}: cannot read ({e}); the archive is corrupt or truncated") from e

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


@dataclass
class _Character:
    tree: _Tree
    folder: str  # rel path of the character folder, for messages
    files: list[str]  # rel paths, sorted by file name (drawer order)


def _char_key(name: str) -> tuple[str, int]:
    alphabet, char = name.split("/")
    return alphabet, int(char[len("character"):])


class OmniglotFiles:
    """The characters found in zips and folders in the official layout (a context manager).

    Accepts: a zip (`images_background.zip`, `images_background_small1.zip`, ...); a folder of
    such zips (its `images_*.zip` are opened); an extracted folder at any depth (the
    torchvision `omniglot-py/` layout included). A character found twice (Greek and Latin are in
    both small zips; torchvision keeps the zip beside its extraction) is kept once when both
    copies have the same files, and is an error otherwise. Official archives, recognised by
    name, are checked against their md5 when `check_md5`.

    exclude: names of archives (without .zip) and folders to skip inside a given folder (the
    full build skips the small subsets, the small build the full archives, when a folder holds
    both, as a clone of brendenlake/omniglot does); paths given explicitly are always read.
    """

    def __init__(self, paths: Sequence[Path | str], check_md5: bool = True, exclude: Sequence[str] = ()) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p).expanduser() for p in paths]
        self.exclude = set(exclude)
        self.skipped: list[str] = []
        self.trees: list[_Tree] = []
        self.chars: dict[str, _Character] = {}
        try:
            for path in self.paths:
                self._add(path, check_md5)
        except BaseException:
            self.close()
            raise

    def _add(self, path: Path, check_md5: bool) -> None:
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix.lower() != ".zip":
                raise DataError(f"{path}: not a zip archive or a folder in the Omniglot layout")
            self._add_tree(path, check_md5)
            return
        self._add_tree(path, check_md5)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for f in sorted(filenames):
                if f.lower().endswith(".zip") and f.startswith("images_"):
                    if f[:-4] in self.exclude:
                        self.skipped.append(f)
                    else:
                        self._add_tree(Path(dirpath) / f, check_md5)

    def _add_tree(self, path: Path, check_md5: bool) -> None:
        official = {**OMNIGLOT_ARCHIVES, **SMALL_ARCHIVES}
        if path.is_file() and check_md5 and path.name in official:
            want = official[path.name][1]
            got = file_digest(path, "md5")
            if got != want:
                raise DataError(f"{path}: wrong checksum (md5 {got}, expected {want} for the official "
                                f"{path.name}); the file is corrupt or not the official archive: delete it "
                                f"and download it again")
        tree = _Tree(path)
        self.trees.append(tree)
        found: dict[str, _Character] = {}
        for rel in sorted(tree.files):
            base = rel.rsplit("/", 1)[-1]
            if base.startswith("._") or rel.startswith("__MACOSX/"):
                continue
            if tree.zip is None and self.exclude.intersection(rel.split("/")[:-1]):
                skip = sorted(self.exclude.intersection(rel.split("/")[:-1]))[0] + "/"
                if skip not in self.skipped:
                    self.skipped.append(skip)
                continue
            m = _PNG.search(rel)
            if not m:
                continue
            key = f"{m.group(1)}/{m.group(2)}"
            folder = rel[: -len(m.group(3)) - 1]
            ch = found.setdefault(key, _Character(tree, folder, []))
            if ch.folder != folder:  # the same character twice in one tree: keep both for the check
                other = found.setdefault(key + "\0" + folder, _Character(tree, folder, []))
                other.files.append(rel)
            else:
                ch.files.append(rel)
        for key, ch in found.items():
            ch.files.sort(key=lambda r: r.rsplit("/", 1)[-1])
            key = key.split("\0")[0]
            if key in self.chars:
                self._check_same(key, self.chars[key], ch)
            else:
                self.chars[key] = ch

    @staticmethod
    def _check_same(key: str, a: _Character, b: _Character) -> None:
        def listing(c: _Character) -> list[tuple[str, int]]:
            return [(r.rsplit("/", 1)[-1], c.tree.files[r]) for r in c.files]

        if listing(a) != listing(b):
            raise DataError(f"character {key} is in both {a.tree.where(a.folder)} and {b.tree.where(b.folder)} "
                            f"with different files; pass only one of them")

    def alphabets(self) -> dict[str, int]:
        """Alphabet -> number of characters found."""
        out: dict[str, int] = {}
        for key in self.chars:
            a = key.split("/")[0]
            out[a] = out.get(a, 0) + 1
        return dict(sorted(out.items()))

    def characters_of(self, alphabet: str) -> list[str]:
        """The character names found for `alphabet`, in numeric order."""
        return sorted((k for k in self.chars if k.split("/")[0] == alphabet), key=_char_key)

    def describe(self) -> str:
        text = ", ".join(str(p) for p in self.paths)
        if self.skipped:
            text += f" (skipped {', '.join(self.skipped)}: another dataset)"
        return text

    def close(self) -> None:
        for t in self.trees:
            t.close()

    def __enter__(self) -> "OmniglotFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_png(data: bytes, image_size: int, where: str = "image") -> np.ndarray:
    """One Omniglot PNG -> uint8 [image_size, image_size], strokes high (BILINEAR resize)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            grey = im.convert("L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: unreadable image ({e})") from e
    grey = ImageOps.invert(grey)
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.uint8)


def _decode(files: OmniglotFiles, chars: list[str], image_size: int, images_per_char: int | None,
            show: bool, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode `chars` (in order) -> images uint8 [n, s, s] and per-character counts."""
    counts = np.array([len(files.chars[c].files) for c in chars], dtype=np.int64)
    for c, n in zip(chars, counts):
        if n == 0 or (images_per_char is not None and n != images_per_char):
            ch = files.chars[c]
            raise DataError(f"{ch.tree.where(ch.folder)}: {n} images, expected "
                            f"{images_per_char if images_per_char is not None else 'at least 1'}")
    images = np.empty((int(counts.sum()), image_size, image_size), dtype=np.uint8)
    row = 0
    for c in progress(chars, desc=desc, enabled=show, unit="char"):
        ch = files.chars[c]
        for rel in ch.files:
            images[row] = decode_png(ch.tree.read(rel), image_size, ch.tree.where(rel))
            row += 1
    return images, counts


def _check_split(splits: Mapping[str, Sequence[str]]) -> None:
    seen: dict[str, str] = {}
    for split, alphabets in splits.items():
        for a in alphabets:
            if a in seen:
                raise DataError(f"alphabet {a!r} is in both splits {seen[a]!r} and {split!r}")
            seen[a] = split


def _source_from_files(files: OmniglotFiles, splits: Mapping[str, Sequence[str]], image_size: int,
                       rotations: bool, images_per_char: int | None, name: str, show: bool,
                       expected: Mapping[str, int] | None = None) -> ArraySource:
    _check_split(splits)
    found = files.alphabets()
    missing = [a for alphabets in splits.values() for a in alphabets if a not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"missing alphabets {missing[:5]}{more} in {files.describe()} "
                        f"(found {len(found)}: {sorted(found)[:8]}{' ...' if len(found) > 8 else ''})")
    chars, char_split = [], []
    for split, alphabets in splits.items():
        for a in alphabets:
            names = files.characters_of(a)
            if expected is not None:
                want = [f"{a}/character{i:02d}" for i in range(1, expected[a] + 1)]
                if names != want:
                    extra = sorted(set(names) - set(want), key=_char_key)
                    lack = sorted(set(want) - set(names), key=_char_key)
                    raise DataError(
                        f"split mismatch in {files.describe()}: alphabet {a} has {len(names)} characters, expected "
                        f"{expected[a]}" + (f"; missing {lack[:5]}" if lack else "")
                        + (f"; unexpected {extra[:5]}" if extra else ""))
            chars += names
            char_split += [split] * len(names)
    images, counts = _decode(files, chars, image_size, images_per_char, show, f"decoding {name}")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n_rot = 4 if rotations else 1
    ids = np.arange(len(chars) * n_rot, dtype=np.int64)
    names = [f"{c}/rot{90 * r:03d}" if rotations else c for c in chars for r in range(n_rot)]
    split_arr = np.repeat(np.array(char_split, dtype=object), n_rot)
    return ArraySource(
        name=name, images=images,
        class_start=np.repeat(starts, n_rot), class_count=np.repeat(counts, n_rot),
        class_names=names, splits={s: ids[split_arr == s] for s in splits},
        class_rot=np.tile(np.arange(n_rot, dtype=np.int8), len(chars)) if rotations else None,
        groups=[c.split("/")[0] for c in chars for _ in range(n_rot)],
        meta={"dataset": name, "version": CACHE_VERSION, "image_size": image_size, "resample": RESAMPLE,
              "rotations": rotations, "images_per_char": images_per_char,
              "alphabets": {k: list(v) for k, v in splits.items()},
              "from": [str(p) for p in files.paths]},
    )


def omniglot_from_archives(paths: Sequence[Path | str], splits: Mapping[str, Sequence[str]],
                           image_size: int = DEFAULT_SIZE, rotations: bool = True,
                           images_per_char: int | None = IMAGES_PER_CHARACTER, name: str = "omniglot-custom",
                           show_progress: bool = False, check_md5: bool = True,
                           exclude: Sequence[str] = ()) -> ArraySource:
    """A source from zips or folders in the official Omniglot layout, split by alphabet.

    splits: split name -> alphabet names (e.g. {"train": [...], "val": [...], "test": [...]});
    every listed alphabet must be found, none in two splits; alphabets not listed are ignored.
    rotations: each character x 0/90/180/270 degrees is a class (names "A/characterNN/rot090"),
    images stored once. images_per_char: required images per character (None: any).
    exclude: archive or folder names to skip inside given folders (see OmniglotFiles).
    Classes are ordered by split, then alphabet (as listed), character, rotation; groups are
    alphabets. The result is in memory; `save_cache_dir` writes it to disk.
    """
    with OmniglotFiles(paths, check_md5=check_md5, exclude=exclude) as files:
        return _source_from_files(files, splits, image_size, rotations, images_per_char, name, show_progress)


# ---------------------------------------------------------------------------------------------
# The full dataset: download folder, cache, loaders
# ---------------------------------------------------------------------------------------------

def data_dir(root: Path) -> Path:
    """Where the full Omniglot archives and caches live: ROOT/omniglot."""
    return Path(root) / "omniglot"


def cache_dir(root: Path, image_size: int) -> Path:
    return data_dir(root) / f"cache-{image_size}px"


def cache_meta(image_size: int) -> dict:
    """What a usable full-Omniglot cache must have been built with."""
    return {"dataset": "omniglot", "version": CACHE_VERSION, "image_size": image_size, "resample": RESAMPLE}


def downloaded_archives(root: Path) -> list[Path] | None:
    """The two official archives in ROOT/omniglot, when both are there."""
    paths = [data_dir(root) / name for name in OMNIGLOT_ARCHIVES]
    return paths if all(p.is_file() for p in paths) else None


def _command(dataset: str, root: Path, image_size: int, default: int) -> str:
    size = f" --image-size {image_size}" if image_size != default else ""
    return f"metabench data download {dataset} --root {root}{size}"


def build_cache(paths: Sequence[Path | str], root: Path, image_size: int = DEFAULT_SIZE,
                images_per_char: int | None = IMAGES_PER_CHARACTER, show_progress: bool = False,
                check_md5: bool = True, replace: bool = True) -> Path:
    """Validate and decode the full Omniglot (all 50 alphabets) into ROOT/omniglot/cache-<size>px.

    Every official alphabet must be present with exactly its characters, each with
    `images_per_char` images; an unknown alphabet is an error (wrong folder given).
    The cache holds the 1623 characters unrotated (classes = characters, splits
    "background"/"evaluation"); the loaders derive the Vinyals and Meta-Dataset sources from it.
    """
    exclude = [n[:-4] for n in SMALL_ARCHIVES]
    with OmniglotFiles(paths, check_md5=check_md5, exclude=exclude) as files:
        unknown = [a for a in files.alphabets() if a not in BACKGROUND and a not in EVALUATION]
        if unknown:
            raise DataError(f"{files.describe()}: alphabets {unknown} are not Omniglot alphabets")
        src = _source_from_files(files, {"background": sorted(BACKGROUND), "evaluation": sorted(EVALUATION)},
                                 image_size, False, images_per_char, "omniglot", show_progress,
                                 expected={**BACKGROUND, **EVALUATION})
    path = cache_dir(root, image_size)
    save_cache_dir(path, src, replace=replace)
    return path


def open_cache(root: Path, image_size: int) -> ArraySource | None:
    """The full-Omniglot character cache at `image_size`, or None when not built.

    Raises DataError (with the command that rebuilds it) when a cache is there but unusable.
    """
    path = cache_dir(root, image_size)
    try:
        return try_load_cache(path, cache_meta(image_size))
    except DataError as e:
        raise DataError(f"{e} (rebuild: `{_command('omniglot', root, image_size, DEFAULT_SIZE)}`)") from e


def load_characters(root: Path, image_size: int = DEFAULT_SIZE) -> ArraySource:
    """The 1623 characters (no rotation), from the cache; built from downloaded archives if needed."""
    root = Path(root)
    src = open_cache(root, image_size)
    if src is not None:
        return src
    archives = downloaded_archives(root)
    if archives is None:
        raise DataError(f"Omniglot is not prepared in {root}: "
                        f"run `{_command('omniglot', root, image_size, DEFAULT_SIZE)}` "
                        f"(or add --from PATH to use archives or folders you already have)")
    build_cache(archives, root, image_size, replace=False)
    return load_cache(cache_dir(root, image_size), cache_meta(image_size))


def with_split(chars: ArraySource, split: Mapping[str, Sequence[str]], rotations: bool, name: str,
               split_name: str) -> ArraySource:
    """A source over the characters of `chars` with `split` (split -> character names)."""
    index = {c: i for i, c in enumerate(chars.class_names)}
    lacking = [c for names in split.values() for c in names if c not in index]
    if lacking:
        raise DataError(f"the Omniglot cache ({chars.meta.get('from')}) lacks {len(lacking)} characters of the "
                        f"{split_name} split, e.g. {lacking[:3]}; rebuild it from the official archives")
    n_rot = 4 if rotations else 1
    n = chars.n_classes
    return ArraySource(
        name=name, images=chars.images,
        class_start=np.repeat(chars.class_start, n_rot), class_count=np.repeat(chars.class_count, n_rot),
        class_names=[f"{c}/rot{90 * r:03d}" if rotations else c for c in chars.class_names for r in range(n_rot)],
        splits={s: np.array([index[c] * n_rot + r for c in names for r in range(n_rot)], dtype=np.int64)
                for s, names in split.items()},
        class_rot=np.tile(np.arange(n_rot, dtype=np.int8), n) if rotations else None,
        groups=[c.split("/")[0] for c in chars.class_names for _ in range(n_rot)],
        meta={**chars.meta, "split": split_name, "rotations": rotations},
    )


def load_vinyals(root: Path, image_size: int = DEFAULT_SIZE) -> ArraySource:
    """Registry entry "omniglot": the Vinyals split, 4 rotations per character (4112/688/1692 classes)."""
    split = vinyals_split()
    del split["trainval"]
    return with_split(load_characters(root, image_size), split, True, "omniglot", "vinyals")


def load_md(root: Path, image_size: int = DEFAULT_SIZE) -> ArraySource:
    """Registry entry "omniglot-md": Meta-Dataset's alphabet split 25/5/20, no rotations (883/81/659)."""
    return with_split(load_characters(root, image_size), md_split(), False, "omniglot-md", "meta-dataset")


# ---------------------------------------------------------------------------------------------
# omniglot-small: the two real subsets
# ---------------------------------------------------------------------------------------------

def small_dir(root: Path) -> Path:
    """Where the user may put the two small zips, and where their cache lives: ROOT/omniglot-small."""
    return Path(root) / "omniglot-small"


def small_cache_dir(root: Path, image_size: int) -> Path:
    return small_dir(root) / f"cache-{image_size}px"


def small_cache_meta(image_size: int) -> dict:
    return {"dataset": "omniglot-small", "version": CACHE_VERSION, "image_size": image_size,
            "resample": RESAMPLE, "alphabets": SMALL_SPLIT}


def _repo_shared_data() -> Path:
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def find_small_archives(root: Path | None = None) -> list[Path] | None:
    """The two small zips: from ROOT/omniglot-small/, else $METABENCH_SHARED_DATA(/omniglot),
    else ../shared/data/omniglot beside the current folder or beside the repository."""
    folders = []
    if root is not None:
        folders.append(small_dir(root))
    env = os.environ.get("METABENCH_SHARED_DATA")
    if env:
        folders += [Path(env).expanduser() / "omniglot", Path(env).expanduser()]
    folders += [Path.cwd().parent / "shared" / "data" / "omniglot", _repo_shared_data() / "omniglot"]
    for folder in folders:
        paths = [folder / name for name in SMALL_ARCHIVES]
        if all(p.is_file() for p in paths):
            return paths
    return None


def build_small_cache(paths: Sequence[Path | str], root: Path, image_size: int = DEFAULT_SIZE,
                      show_progress: bool = False, check_md5: bool = True, replace: bool = True) -> Path:
    """Decode the two small subsets with SMALL_SPLIT into ROOT/omniglot-small/cache-<size>px."""
    src = omniglot_from_archives(paths, SMALL_SPLIT, image_size, rotations=True, name="omniglot-small",
                                 show_progress=show_progress, check_md5=check_md5,
                                 exclude=[n[:-4] for n in OMNIGLOT_ARCHIVES])
    path = small_cache_dir(root, image_size)
    save_cache_dir(path, src, replace=replace)
    return path


def open_small_cache(root: Path, image_size: int) -> ArraySource | None:
    try:
        return try_load_cache(small_cache_dir(root, image_size), small_cache_meta(image_size))
    except DataError as e:
        raise DataError(f"{e} (rebuild: `{_command('omniglot-small', root, image_size, DEFAULT_SIZE)}`)") from e


def load_small(root: Path, image_size: int = DEFAULT_SIZE) -> ArraySource:
    """Registry entry "omniglot-small": 242 real characters x 4 rotations, split by SMALL_SPLIT.

    Reads the cache under ROOT/omniglot-small; builds it first (a few seconds) from the two zips
    found by `find_small_archives`.
    """
    root = Path(root)
    src = open_small_cache(root, image_size)
    if src is not None:
        return src
    paths = find_small_archives(root)
    if paths is None:
        raise DataError(
            f"omniglot-small: images_background_small1.zip and images_background_small2.zip not found (looked in "
            f"{small_dir(root)}, $METABENCH_SHARED_DATA, ../shared/data/omniglot); put them in {small_dir(root)} "
            f"(they are in github.com/brendenlake/omniglot under python/) or run "
            f"`{_command('omniglot-small', root, image_size, DEFAULT_SIZE)} --from FOLDER`")
    build_small_cache(paths, root, image_size, replace=False)
    return load_cache(small_cache_dir(root, image_size), small_cache_meta(image_size))

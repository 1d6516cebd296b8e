"""`metabench data`: download, prepare and inspect the real datasets.

    metabench data download omniglot [--root DIR] [--from PATH ...] [--image-size 28]
    metabench data download omniglot-small [--root DIR] [--from PATH ...]
    metabench data prepare miniimagenet --from PATH [--root DIR]
    metabench data prepare meta-dataset --records DIR [--root DIR] [--image-size 84|126] [--workers N]
    metabench data status [--root DIR]

Downloads go to ROOT/<dataset>/ (atomically, md5-checked, with a progress bar); decoded caches
to ROOT/<dataset>/cache-<size>px/. A re-run with a complete cache does nothing (--force
rebuilds). `--from` takes archives or folders the user already has. Every problem with the
input is one DataError naming the file and what is wrong; nothing half-written is left where a
loader looks (an interrupted Meta-Dataset prepare keeps its finished classes in a .partial folder
beside the cache, and the next prepare continues from them).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from bench.errors import DataError
from bench.paths import atomic_path, resolve_root
from bench.registry import Registry

# The dataset modules import torch (through bench.sources); they are imported inside the
# functions so that building the command line stays fast.
OMNIGLOT_DRAWERS = 20  # = bench.sources.omniglot.IMAGES_PER_CHARACTER
MINI_PER_CLASS = 600  # = bench.sources.miniimagenet.PER_CLASS



def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


def fetch(url: str, dest: Path, md5: str | None = None, show_progress: bool = True,
          opener: Callable | None = None, chunk: int = 1 << 16) -> Path:
    """Download `url` to `dest` atomically, checking its length and md5.

    opener: callable(url) -> response (a context manager with .read(n) and .headers);
    urllib.request.urlopen by default (file:// URLs work too). On any failure nothing is left
    at `dest` and a DataError names the URL and what went wrong.
    """
    from bench.sources.cachedir import progress

    dest = Path(dest)
    opener = opener or (lambda u: urllib.request.urlopen(u, timeout=60))
    with atomic_path(dest) as tmp:
        h = hashlib.md5()
        n = 0
        try:
            with opener(url) as resp, open(tmp, "wb") as f:
                length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
                total = int(length) if length is not None and str(length).isdigit() else None
                with progress(total=total, desc=f"downloading {dest.name}", enabled=show_progress, unit="B") as bar:
                    while block := resp.read(chunk):
                        f.write(block)
                        h.update(block)
                        n += len(block)
                        bar.update(len(block))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise DataError(f"{url}: download failed ({e}); nothing was kept") from e
        if total is not None and n != total:
            raise DataError(f"{url}: truncated download ({n} of {total} bytes); nothing was kept, run it again")
        if md5 is not None and h.hexdigest() != md5:
            raise DataError(f"{url}: wrong checksum (md5 {h.hexdigest()}, expected {md5}); nothing was kept")
    return dest


def _fetch_archives(archives: dict[str, tuple[str, str]], folder: Path, show_progress: bool,
                    opener: Callable | None, quiet: bool) -> list[Path]:
    """Each archive in `folder`, downloaded unless already there with the right md5."""
    from bench.sources.cachedir import file_digest

    paths = []
    for name, (url, md5) in archives.items():
        dest = folder / name
        if dest.is_file():
            got = file_digest(dest, "md5")
            if got == md5:
                _say(f"{dest}: present, md5 ok", quiet)
                paths.append(dest)
                continue
            _say(f"{dest}: md5 {got} is not the official {md5}; downloading it again", quiet)
        _say(f"downloading {url}", quiet)
        paths.append(fetch(url, dest, md5, show_progress, opener))
    return paths


def _size(image_size: int | None, default: int) -> int:
    s = default if image_size is None else int(image_size)
    if s < 4:
        raise DataError(f"--image-size must be at least 4 (got {s})")
    return s


def _cached(opener: Callable[[], object], force: bool) -> bool:
    """Whether a complete, current cache is there (a stale or broken one counts as absent)."""
    if force:
        return False
    try:
        return opener() is not None
    except DataError:
        return False


@dataclass(frozen=True)
class Request:
    """What `download` / `prepare` were asked: where, from which files, at which size, how.

    images_per_char (Omniglot's 20 drawers), expected_per_class and require_all_classes
    (miniImageNet's Ravi checks) are relaxed by tests for tiny fixtures.
    """

    root: Path
    from_paths: Sequence[Path | str] = ()
    image_size: int | None = None
    force: bool = False
    show_progress: bool = True
    quiet: bool = False
    opener: Callable | None = None
    images_per_char: int | None = OMNIGLOT_DRAWERS
    expected_per_class: int | None = MINI_PER_CLASS
    require_all_classes: bool = True
    workers: int | None = None


@dataclass(frozen=True)
class Dataset:
    """One dataset `metabench data` knows: build(request) -> cache folder; status(root) -> rows.

    obtain: says why it cannot be downloaded and how to get it (None when it can be downloaded);
    such a dataset needs files the user has.
    """

    build: Callable[[Request], Path]
    status: Callable[[Path], list[dict]]
    obtain: Callable[[], str] | None = None


def _build_once(req: Request, name: str, target: Path, opener: Callable[[], object], build: Callable[[], str]) -> Path:
    """`target` when `opener` finds a complete cache there (unless --force); else run `build`
    (which returns how the cache was made) and say so."""
    if _cached(opener, req.force):
        _say(f"{name}: cache up to date at {target} (--force rebuilds it)", req.quiet)
        return target
    how = build()
    _say(f"{name}: {how}cache written to {target}", req.quiet)
    return target


def _omniglot(req: Request) -> Path:
    from bench.sources import omniglot as omni

    root, s = req.root, _size(req.image_size, omni.DEFAULT_SIZE)

    def build() -> str:
        paths = list(req.from_paths) or _fetch_archives(omni.OMNIGLOT_ARCHIVES, omni.data_dir(root),
                                                        req.show_progress, req.opener, req.quiet)
        omni.build_cache(paths, root, s, images_per_char=req.images_per_char, show_progress=req.show_progress)
        return ""

    return _build_once(req, "omniglot", omni.cache_dir(root, s), lambda: omni.open_cache(root, s), build)


def _omniglot_small(req: Request) -> Path:
    from bench.sources import omniglot as omni

    root, s = req.root, _size(req.image_size, omni.DEFAULT_SIZE)

    def build() -> str:
        paths = list(req.from_paths) or omni.find_small_archives(root) or _fetch_archives(
            omni.SMALL_ARCHIVES, omni.small_dir(root), req.show_progress, req.opener, req.quiet)
        omni.build_small_cache(paths, root, s, show_progress=req.show_progress)
        return ""

    return _build_once(req, "omniglot-small", omni.small_cache_dir(root, s), lambda: omni.open_small_cache(root, s),
                       build)


def _miniimagenet(req: Request) -> Path:
    from bench.sources import miniimagenet as mini

    if len(req.from_paths) != 1:
        raise DataError(f"prepare miniimagenet needs exactly one --from PATH (got {len(req.from_paths)}). {mini.OBTAIN}")
    root, s = req.root, _size(req.image_size, mini.DEFAULT_SIZE)

    def build() -> str:
        fmt, folder = mini.detect(req.from_paths[0])
        _say(f"miniimagenet: reading the {fmt} format from {folder}", req.quiet)
        mini.prepare(req.from_paths[0], root, s, req.expected_per_class, req.require_all_classes, req.show_progress)
        return "validated against the Ravi split, "

    return _build_once(req, "miniimagenet", mini.cache_dir(root, s), lambda: mini.open_cache(root, s), build)


def _meta_dataset(req: Request) -> Path:
    """One cache per source found in the records folder (bench/sources/meta_dataset.py)."""
    from bench.sources import meta_dataset as md

    if len(req.from_paths) != 1:
        raise DataError(f"prepare meta-dataset needs exactly one --records DIR (got {len(req.from_paths)})")
    md.prepare(req.from_paths[0], req.root, _size(req.image_size, md.DEFAULT_SIZE), req.force,
               md.BuildOptions(req.workers, req.show_progress, lambda m: _say(m, req.quiet)))
    return md.md_dir(req.root)


def download(name: str, root: Path | str | None = None, from_paths: Sequence[Path | str] = (),
             image_size: int | None = None, force: bool = False, show_progress: bool = True,
             opener: Callable | None = None, quiet: bool = False,
             images_per_char: int | None = OMNIGLOT_DRAWERS) -> Path:
    """Fetch (or take from `from_paths`), verify and cache dataset `name`; returns the cache folder.

    images_per_char: Omniglot's 20 drawers (tests relax it for tiny fixtures).
    """
    dataset = DATASETS.get(name)
    if dataset.obtain and not from_paths:
        raise DataError(dataset.obtain())
    return dataset.build(Request(resolve_root(root), from_paths, image_size, force, show_progress, quiet, opener,
                                 images_per_char))


def prepare(name: str, root: Path | str | None, from_paths: Sequence[Path | str] = (),
            image_size: int | None = None, force: bool = False, show_progress: bool = True,
            quiet: bool = False, expected_per_class: int | None = MINI_PER_CLASS,
            require_all_classes: bool = True, workers: int | None = None) -> Path:
    """Build dataset `name`'s cache from files the user has; returns the cache folder.

    For miniImageNet `from_paths` holds one path in any accepted format (see
    bench/sources/miniimagenet.py); expected_per_class / require_all_classes relax the Ravi
    checks for test fixtures. Omniglot datasets behave as `download` with --from. workers: decoding
    processes of a Meta-Dataset prepare (None: os.cpu_count()).
    """
    return DATASETS.get(name).build(Request(resolve_root(root), from_paths, image_size, force, show_progress, quiet,
                                            expected_per_class=expected_per_class,
                                            require_all_classes=require_all_classes, workers=workers))


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------

def _caches(folder: Path, open_one: Callable[[int], object]) -> tuple[list[str], list[object]]:
    """Cache sizes found under `folder` ("28px", or "28px (unusable: ...)") and the open ones."""
    out, sources = [], []
    for d in sorted(folder.glob("cache-*px")) if folder.is_dir() else []:
        try:
            size = int(d.name[len("cache-"):-2])
        except ValueError:
            continue
        try:
            src = open_one(size)
        except DataError as e:
            out.append(f"{size}px (unusable: {str(e).split(' (rebuild')[0]})")
            continue
        if src is not None:
            out.append(f"{size}px")
            sources.append(src)
    return out, sources


def _md5_check(paths: list[Path], archives: dict[str, tuple[str, str]]) -> str:
    from bench.sources.cachedir import file_digest

    bad = [p.name for p in paths if file_digest(p, "md5") != archives[p.name][1]]
    return f"md5 MISMATCH: {', '.join(bad)}" if bad else "md5 ok"


def _omniglot_status(root: Path) -> list[dict]:
    from bench.sources import omniglot as omni

    present = [omni.data_dir(root) / n for n in omni.OMNIGLOT_ARCHIVES if (omni.data_dir(root) / n).is_file()]
    cached, srcs = _caches(omni.data_dir(root), lambda s: omni.open_cache(root, s))
    if present:
        found, verified = ", ".join(p.name for p in present), _md5_check(present, omni.OMNIGLOT_ARCHIVES)
    elif srcs:
        found, verified = f"cache built from {', '.join(srcs[0].meta.get('from', []))}", "validated when cached"
    else:
        found, verified = "no", "-"
    return [{"dataset": "omniglot", "found": found, "verified": verified,
             "cached": ", ".join(cached) or "no", "where": str(omni.data_dir(root))}]


def _omniglot_small_status(root: Path) -> list[dict]:
    from bench.sources import omniglot as omni

    small = omni.find_small_archives(root)
    cached, srcs = _caches(omni.small_dir(root), lambda s: omni.open_small_cache(root, s))
    return [{"dataset": "omniglot-small", "found": "yes" if small else ("cache only" if srcs else "no"),
             "verified": (_md5_check(small, omni.SMALL_ARCHIVES) if small
                          else "validated when cached" if srcs else "-"),
             "cached": ", ".join(cached) or "no",
             "where": str(small[0].parent) if small else str(omni.small_dir(root))}]


def _miniimagenet_status(root: Path) -> list[dict]:
    from bench.sources import miniimagenet as mini

    cached, srcs = _caches(mini.data_dir(root), lambda s: mini.open_cache(root, s))
    if srcs:
        src = srcs[0]
        origin = src.meta.get("from", "?")
        found = f"{src.meta.get('format')} at {origin}" + ("" if Path(origin).exists() else " (no longer there)")
        n = sum(len(v) for v in src.splits.values())
        verified = ("Ravi split: 64/16/20 classes x 600" if mini.is_complete(src)
                    else f"partial ({n} classes, relaxed checks)")
        csv_ok = src.meta.get("csv_sha256_ok")
        if csv_ok:
            verified += ", official CSVs" if all(csv_ok.values()) else ", CSVs differ from the official files"
    else:
        found, verified = "no (prepare it from your copy: metabench data prepare miniimagenet --from PATH)", "-"
    return [{"dataset": "miniimagenet", "found": found, "verified": verified,
             "cached": ", ".join(cached) or "no", "where": str(mini.data_dir(root))}]


def _meta_dataset_status(root: Path) -> list[dict]:
    from bench.sources import meta_dataset as md

    return md.status_rows(root)


def _mini_obtain() -> str:
    from bench.sources import miniimagenet as mini

    return mini.OBTAIN


DATASETS: Registry[Dataset] = Registry("dataset", group="metabench.datasets")
DATASETS.add("omniglot", Dataset(_omniglot, _omniglot_status),
             "Omniglot, 50 alphabets, 1623 characters (sources omniglot: Vinyals split; omniglot-md)")
DATASETS.add("omniglot-small", Dataset(_omniglot_small, _omniglot_small_status),
             "the two real Omniglot subsets, 8 alphabets, 242 characters (source omniglot-small)")
DATASETS.add("miniimagenet", Dataset(_miniimagenet, _miniimagenet_status, _mini_obtain),
             "miniImageNet, Ravi split (prepare from your own copy; it cannot be downloaded)")
DATASETS.add("meta-dataset", Dataset(_meta_dataset, _meta_dataset_status,
                                     lambda: "Meta-Dataset cannot be downloaded here: convert the datasets with the "
                                             "official google-research/meta-dataset code, then `metabench data prepare "
                                             "meta-dataset --records DIR`"),
             "Meta-Dataset, every source found in the official converter's TFRecords (--records DIR)")


def status(root: Path | str | None = None) -> list[dict]:
    """One row per dataset (Meta-Dataset: per source): dataset, found, verified, cached, where."""
    root = resolve_root(root)
    return [row for name in DATASETS for row in DATASETS.get(name).status(root)]


def format_status(rows: list[dict]) -> str:
    """The status rows as an aligned text table."""
    cols = ["dataset", "found", "verified", "cached", "disk", "where"]
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(str(r.get(c, "-")).ljust(widths[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def cmd_download(args: argparse.Namespace) -> int:
    download(args.dataset, args.root, args.from_paths, args.image_size, args.force, not args.no_progress)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    prepare(args.dataset, args.root, args.from_paths, args.image_size, args.force, not args.no_progress,
            workers=args.workers)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = resolve_root(args.root)
    print(f"data root: {root}")
    print(format_status(status(root)))
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `data {download,prepare,status}` on an argparse subparsers object."""
    p = subparsers.add_parser("data", help="download, prepare and inspect datasets",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="data_command", required=True)
    names = ", ".join(DATASETS)

    def common(s: argparse.ArgumentParser, from_required: bool) -> None:
        s.add_argument("dataset", help=f"one of: {names}")
        s.add_argument("--root", default=None, help="data folder (default: $METABENCH_ROOT or the per-user cache)")
        s.add_argument("--from", dest="from_paths", action="append", default=[], metavar="PATH",
                       required=from_required, help="archives or folders you already have (repeatable)")
        s.add_argument("--image-size", type=int, default=None,
                       help="decoded size (default: 28 for Omniglot, 84 for miniImageNet)")
        s.add_argument("--force", action="store_true", help="rebuild the cache even when it is complete")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")

    s = sub.add_parser("download", help="fetch, verify and cache a dataset (omniglot, omniglot-small)")
    common(s, False)
    s.set_defaults(func=cmd_download)
    s = sub.add_parser("prepare", help="validate and cache a dataset from files you have (miniimagenet, meta-dataset)")
    common(s, False)
    s.add_argument("--records", dest="from_paths", action="append", metavar="DIR",
                   help="meta-dataset: the official converter's output folder (<DIR>/<source>/dataset_spec.json)")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="meta-dataset: decoding processes (default: the number of CPUs; results do not depend on it)")
    s.set_defaults(func=cmd_prepare)
    s = sub.add_parser("status", help="list each dataset: found, verified, cached, where")
    s.add_argument("--root", default=None, help="data folder (default: $METABENCH_ROOT or the per-user cache)")
    s.set_defaults(func=cmd_status)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.data ...` (the same commands without the `metabench data` prefix)."""
    from bench.errors import MetabenchError

    parser = argparse.ArgumentParser(prog="metabench")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args) or 0)
    except MetabenchError as e:
        print(f"metabench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

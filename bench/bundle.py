"""The submission bundle format: its layout, its integrity (manifest, file safety), and making one.

A bundle is a folder:

```
BUNDLE/
  metadata.json                                  method, registry target, environment, runs
  MANIFEST.json                                  sha256 and size of every other file
  conformance.json                               the conformance suite's report (bench.checks)
  results/<benchmark>/<method>/seed<N>.csv       per-episode rows (bench.results columns)
  results/<benchmark>/<method>/seed<N>.json      run cards, as written by the runner
  results/<benchmark>/<method>/seed<N>.<axis>.csv  evaluation axes the card records (bench.axes)
  checkpoints/<benchmark>/<method>/seed<N>.pt    the selected checkpoint (best.pt) of each run
  code/...                                       optional: the method's source (.py), declared in
                                                 metadata.json "method_source"
```

(`<method>` is the method name made file-safe.) `make_bundle` collects the files of one method
from a results folder and a runs folder, runs the conformance suite on the method and writes the
bundle atomically (built in a temporary folder, renamed at the end). `check_integrity` is the
file-level half of validation: manifest hashes and sizes, no symlinks or special files, no path
traversal, size limits. What the files must say is `bench.validation`; re-running the
checkpoints is `bench.verify`. A bundle is never changed after it is made: the hash of its
manifest (`manifest_sha256`) names its content, and a verification is a record kept apart from it.

CLI: `metabench submit METHOD --results DIR [--runs DIR] [--source PATH] -o BUNDLE` (bundles,
then validates; a bundle that does not validate exits with status 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np

from bench.errors import MetabenchError
from bench.paths import resolve_root

BUNDLE_FORMAT = 1
MANIFEST = "MANIFEST.json"
METADATA = "metadata.json"
RESULTS_DIR = "results"
CHECKPOINTS_DIR = "checkpoints"
CONFORMANCE = "conformance.json"
CODE_DIR = "code"
"""The folder of a bundle's declared method source; put on sys.path only when the code is trusted."""
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".pth", ".sh", ".bash", ".zsh",
                 ".bat", ".cmd", ".ps1", ".exe", ".ipynb", ".egg", ".whl", ".jar", ".js")
"""Files that are code: a bundle may hold them only as its declared method source (.py under code/)."""

MAX_FILE_BYTES = 200 * 2**20
"""Largest accepted file in a bundle (checkpoints included)."""
MAX_TOTAL_BYTES = 2 * 2**30
"""Largest accepted bundle (all files together)."""
MAX_JSON_BYTES = 16 * 2**20
"""Largest accepted JSON file (manifest, metadata, run cards)."""


class SubmissionError(MetabenchError):
    """A bundle cannot be made, or an operation on a bundle failed before checking it."""


# ---------------------------------------------------------------------------------------------
# names, hashes, JSON


def is_bundle(path: Path) -> bool:
    """True when `path` is a folder holding a bundle's metadata.json or MANIFEST.json."""
    path = Path(path)
    return path.is_dir() and ((path / METADATA).is_file() or (path / MANIFEST).is_file())


def file_slug(name: str) -> str:
    """`name` made safe as one path component (letters, digits, '.', '_', '-')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "method"
    return slug[:100]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def environment() -> dict[str, str]:
    """Versions of python, torch and numpy, and the platform."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "machine": platform.machine()}


def json_text(obj: Any) -> str:
    """`obj` as the bundle writes JSON: indented, keys sorted, a final newline."""
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def read_json(folder: Path, rel: str, size: int | None = None) -> Any:
    """The JSON file `rel` of a bundle; SubmissionError (naming `rel`) when too large or not JSON."""
    path = Path(folder) / rel
    size = path.stat().st_size if size is None else size
    if size > MAX_JSON_BYTES:
        raise SubmissionError(f"{rel}: {size} bytes, over the limit of {MAX_JSON_BYTES} for a JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{rel}: not valid JSON ({e})") from e


def manifest_of(folder: Path) -> dict:
    """The manifest of every file under `folder` except MANIFEST.json: {"format", "files": [...]}.

    Each entry: path (relative, '/'-separated), sha256, size.
    """
    files = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        files.append({"path": rel, "sha256": sha256_file(path), "size": path.stat().st_size})
    return {"format": BUNDLE_FORMAT, "files": files}


def manifest_sha256(folder: Path) -> str:
    """The sha256 of a bundle's MANIFEST.json: it names the bundle's whole content (the manifest
    holds the sha256 of every other file). Verification records and the leaderboard key on it."""
    return sha256_file(Path(folder) / MANIFEST)


def unsafe_path(name: Any) -> str | None:
    """Why `name` is not a safe relative path inside a bundle (None when it is safe)."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if "\\" in name or "\x00" in name or any(ord(c) < 32 for c in name):
        return "contains a backslash or control character"
    if name.startswith("/") or PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "contains '..' (path traversal)"
    if any(p in ("", ".") for p in parts):
        return "has an empty or '.' component"
    return None


# ---------------------------------------------------------------------------------------------
# integrity: the files on disk against the manifest


def scan(folder: Path) -> tuple[dict[str, int], list[str]]:
    """The regular files under `folder` (relative path -> size), and the problems found on the way:
    symbolic links (never followed), special files, unsafe names."""
    folder = Path(folder)
    found: dict[str, int] = {}
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = here / name
            rel = path.relative_to(folder).as_posix()
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{rel}: is a symbolic link; bundles may not contain links")
            elif stat.S_ISDIR(st.st_mode):
                continue
            elif not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: is not a regular file")
            elif unsafe_path(rel):
                problems.append(f"{rel!r}: bad file name ({unsafe_path(rel)})")
            else:
                found[rel] = st.st_size
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
    return found, problems


@dataclass
class Integrity:
    """The outcome of `check_integrity`.

    listed: safe paths the manifest lists; intact: those present and matching their size and
    sha256 (their content can be trusted); errors: every problem, with its reason.
    """

    listed: set[str] = field(default_factory=set)
    intact: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def _entry_problem(folder: Path, entry: dict, found: dict[str, int]) -> str | None:
    """Why the listed file of a (safe, first-listed) manifest entry is not intact (None: it is)."""
    name = entry["path"]
    if name == MANIFEST:
        return f"{MANIFEST}: lists itself"
    if name not in found:
        return f"{name}: listed in {MANIFEST} but missing from the bundle"
    size = found[name]
    if size > MAX_FILE_BYTES:
        return f"{name}: {size} bytes, over the per-file limit of {MAX_FILE_BYTES}"
    if entry.get("size") != size:
        return f"{name}: size {size} does not match {MANIFEST} ({entry.get('size')!r})"
    if not isinstance(entry.get("sha256"), str):
        return f"{MANIFEST}: {name} has no sha256"
    if sha256_file(folder / name) != entry["sha256"].lower():
        return f"{name}: sha256 does not match {MANIFEST} (file changed after bundling)"
    return None


def _manifest_entries(folder: Path, found: dict[str, int], out: Integrity) -> list | None:
    """The manifest's list of entries (None, with the reason in `out.errors`, when it has none)."""
    if MANIFEST not in found:
        out.errors.append(f"{MANIFEST} is missing (is this a bundle made by `metabench submit`?)")
        return None
    try:
        manifest = read_json(folder, MANIFEST, found.pop(MANIFEST))
    except SubmissionError as e:
        out.errors.append(str(e))
        return None
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        out.errors.append(f"{MANIFEST}: must be an object with a list 'files'")
        return None
    if manifest.get("format") != BUNDLE_FORMAT:
        out.errors.append(f"{MANIFEST}: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}")
    return entries


def check_integrity(folder: Path) -> Integrity:
    """Compare the files of a bundle folder with its manifest, writing nothing.

    Errors: symlinks, special files and unsafe names (`scan`); a missing or malformed manifest;
    manifest paths that are unsafe, listed twice, or missing; files whose size or sha256 differ
    from the manifest; files not in the manifest; files over MAX_FILE_BYTES; a bundle over
    MAX_TOTAL_BYTES.
    """
    folder = Path(folder)
    found, problems = scan(folder)
    out = Integrity(errors=problems)
    entries = _manifest_entries(folder, found, out)
    if entries is None:
        return out
    total = 0
    for entry in entries:
        if not isinstance(entry, dict):
            out.errors.append(f"{MANIFEST}: entry {entry!r} is not an object")
            continue
        name = entry.get("path")
        why = unsafe_path(name)
        if why:
            out.errors.append(f"{MANIFEST}: path {name!r} {why}")
            continue
        if name in out.listed:
            out.errors.append(f"{MANIFEST}: {name} is listed twice")
            continue
        out.listed.add(name)
        total += found.get(name, 0)  # MANIFEST itself was taken out of `found`
        problem = _entry_problem(folder, entry, found)
        if problem:
            out.errors.append(problem)
        else:
            out.intact.add(name)
    for name in sorted(set(found) - out.listed):
        out.errors.append(f"{name}: not listed in {MANIFEST}")
        total += found[name]
        if found[name] > MAX_FILE_BYTES:
            out.errors.append(f"{name}: {found[name]} bytes, over the per-file limit of {MAX_FILE_BYTES}")
    if total > MAX_TOTAL_BYTES:
        out.errors.append(f"the bundle holds {total} bytes, over the limit of {MAX_TOTAL_BYTES}")
    return out


# ---------------------------------------------------------------------------------------------
# conformance


_CONFORMANCE: dict[str, dict] = {}


def conformance_report(method: str) -> dict:
    """The conformance suite's report on `method` (a registered name or "pkg.module:Class"), as stored
    in a bundle's conformance.json: method, ok, failed (the names of failed checks), excepted, checks
    (check, status, message). Run once per method per process (with one torch thread, like
    `metabench check`); a method that cannot be imported is a MetabenchError."""
    if method not in _CONFORMANCE:
        from baselines.parallel import threads_set
        from bench.checks import run_checks

        with threads_set(1):
            results = run_checks(method)
        _CONFORMANCE[method] = {
            "format": BUNDLE_FORMAT, "method": method, "ok": all(r.ok for r in results),
            "failed": [r.check for r in results if r.status == "failed"],
            "excepted": [r.check for r in results if r.status == "excepted"],
            "checks": [{"check": r.check, "status": r.status, "message": r.message} for r in results],
        }
    return _CONFORMANCE[method]


# ---------------------------------------------------------------------------------------------
# make


def _collect(method: str, results_dir: Path) -> list[tuple[Path, Any, dict]]:
    """(csv path, frame, card) of every run of `method` under results_dir, in (benchmark, seed) order."""
    from bench.results import find_csvs, read_card, read_csv

    runs = []
    others = set()
    for path in find_csvs(results_dir):
        frame = read_csv(path)
        name = str(frame["method"].iloc[0])
        if name != method:
            others.add(name)
            continue
        runs.append((path, frame, read_card(path)))
    if not runs:
        known = f" (methods found: {', '.join(sorted(others))})" if others else ""
        raise SubmissionError(f"{results_dir}: no results of method {method!r}{known}")
    runs.sort(key=lambda r: (str(r[1]["benchmark"].iloc[0]), int(r[1]["seed"].iloc[0])))
    return runs


def _plan_run(csv_path: Path, frame: Any, card: dict, runs_dir: Path, slug: str) -> tuple[list[tuple[Path, str]], dict]:
    """The files of one run ((source, bundle path) pairs, its evaluation-axis files included) and its metadata entry."""
    from bench.results import axis_path

    bench, seed = str(frame["benchmark"].iloc[0]), int(frame["seed"].iloc[0])
    card_path = csv_path.with_suffix(".json")
    if not card:
        raise SubmissionError(f"{card_path}: the run card is missing or empty; a submission needs it "
                              "(hyperparameters and checkpoint)")
    ckpt_name = card.get("checkpoint")
    if not isinstance(ckpt_name, str) or not ckpt_name:
        raise SubmissionError(f"{card_path}: the run card names no checkpoint")
    ckpt = runs_dir / ckpt_name
    if not ckpt.is_file():
        raise SubmissionError(f"{ckpt}: checkpoint of {bench}/seed{seed} not found (named by {card_path} "
                              f"relative to the runs folder {runs_dir}; pass --runs)")
    base = f"{bench}/{slug}/seed{seed}"
    rel = {"csv": f"{RESULTS_DIR}/{base}.csv", "card": f"{RESULTS_DIR}/{base}.json",
           "checkpoint": f"{CHECKPOINTS_DIR}/{base}.pt"}
    files = [(csv_path, rel["csv"]), (card_path, rel["card"]), (ckpt, rel["checkpoint"])]
    axes = {axis: f"{RESULTS_DIR}/{base}.{axis}.csv" for axis in sorted(card.get("axes") or {})}
    files += [(axis_path(csv_path, axis), path) for axis, path in axes.items()]
    for src, _ in files:
        size = src.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SubmissionError(f"{src}: {size} bytes, over the per-file limit of {MAX_FILE_BYTES}")
    entry = {
        "benchmark": bench, "benchmark_version": int(frame["benchmark_version"].iloc[0]), "seed": seed,
        "test_episodes": int(len(frame)), "params": card.get("params"),
        "params_hash": str(frame["params_hash"].iloc[0]), "code_rev": str(frame["code_rev"].iloc[0]),
        **rel, **({"axes": axes} if axes else {}),
    }
    return files, entry


def _method_identity(method: str) -> dict[str, str]:
    """The registry target and the preset papers of `method` (SubmissionError when it cannot be found)."""
    from baselines import registry

    try:
        entry = registry.METHODS.entry(method)
        cls = registry.method_class(method)
    except MetabenchError as e:
        raise SubmissionError(f"method {method!r} is neither registered nor importable: {e}") from e
    return {"target": entry.target,
            "citation": "; ".join(sorted({p.paper for p in cls.PRESETS.values()})) or "user-supplied method"}


def _metadata(method: str, identity: dict[str, str], meta_runs: list[dict]) -> dict:
    """metadata.json of a bundle of `method` (`identity`: its target and citation) with the runs `meta_runs`."""
    from bench import __version__
    from bench.runner import code_rev

    seeds: dict[str, list[int]] = {}
    for r in meta_runs:
        seeds.setdefault(r["benchmark"], []).append(r["seed"])
    return {
        "format": BUNDLE_FORMAT,
        "method": method,
        **identity,
        "code_rev": code_rev(),
        "metabench_version": __version__,
        "environment": environment(),
        "seeds": {b: sorted(s) for b, s in sorted(seeds.items())},
        "runs": meta_runs,
    }


def _source_plan(sources: Iterable[Path]) -> list[tuple[Path, str]]:
    """(file, bundle path) of the method source: each .py file as code/<name>, each folder's .py files
    as code/<folder name>/... (so `import <folder name>.module` finds them under code/)."""
    plan = []
    for src in map(Path, sources):
        if src.is_file() and src.suffix == ".py":
            plan.append((src, f"{CODE_DIR}/{src.name}"))
        elif src.is_dir():
            plan += [(f, f"{CODE_DIR}/{src.name}/{f.relative_to(src).as_posix()}") for f in sorted(src.rglob("*.py"))
                     if "__pycache__" not in f.parts]
        else:
            raise SubmissionError(f"{src}: --source takes .py files or package folders")
    for _, rel in plan:
        why = unsafe_path(rel)
        if why:
            raise SubmissionError(f"{rel}: bad method source path ({why})")
    return plan


def _write(plan: list[tuple[Path, str]], metadata: dict, out: Path) -> None:
    """Copy `plan` and write metadata and manifest into a temporary folder beside `out`; rename it onto `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for src, rel in plan:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        (tmp / METADATA).write_text(json_text(metadata), encoding="utf-8")
        (tmp / CONFORMANCE).write_text(json_text(conformance_report(metadata["base_method"])), encoding="utf-8")
        (tmp / MANIFEST).write_text(json_text(manifest_of(tmp)), encoding="utf-8")
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists() or out.is_symlink():
            raise SubmissionError(f"{out}: appeared while the bundle was built; not overwriting it")
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def make_bundle(method: str, results_dir: Path, runs_dir: Path, out: Path, sources: Iterable[Path] = ()) -> Path:
    """Bundle every result of `method` in `results_dir` with its run cards and checkpoints into `out`.

    Checkpoints are the files named by each card's "checkpoint" field, resolved under `runs_dir`.
    Writes metadata.json (method, registry target, hyperparameters per run, code revision,
    environment, seeds per benchmark, the declared method source), conformance.json (the
    conformance suite run on the method now, `conformance_report`) and MANIFEST.json (sha256 and
    size of every file). `sources`: .py files or package folders of the method, copied under
    code/ and declared as its method source (verify imports them only when trusted).
    The bundle is built in a temporary folder beside `out` and renamed onto `out` at the end;
    `out` must not exist. Returns `out`.
    """
    results_dir, runs_dir, out = Path(results_dir), Path(runs_dir), Path(out)
    if out.exists() or out.is_symlink():
        raise SubmissionError(f"{out}: already exists; give a new folder for the bundle")
    runs = _collect(method, results_dir)
    bases = sorted({str(card.get("base_method") or method) for _, _, card in runs})
    if len(bases) > 1:
        raise SubmissionError(f"{results_dir}: the runs labelled {method!r} come from several methods {bases}")
    identity = _method_identity(bases[0])  # a variant label (METHOD+hash) bundles its base method's code
    plan: list[tuple[Path, str]] = []  # (source path, bundle-relative path)
    meta_runs = []
    seen: dict[tuple[str, int], Path] = {}
    slug = file_slug(method)
    for csv_path, frame, card in runs:
        key = (str(frame["benchmark"].iloc[0]), int(frame["seed"].iloc[0]))
        if key in seen:
            raise SubmissionError(f"{csv_path}: run {key[0]}/seed{key[1]} of {method} also in {seen[key]}")
        seen[key] = csv_path
        files, entry = _plan_run(csv_path, frame, card, runs_dir, slug)
        plan += files
        meta_runs.append(entry)
    code = _source_plan(sources)
    plan += code
    total = sum(src.stat().st_size for src, _ in plan)
    if total > MAX_TOTAL_BYTES:
        raise SubmissionError(f"the bundle would hold {total} bytes, over the limit of {MAX_TOTAL_BYTES}")
    metadata = {**_metadata(method, identity, meta_runs), "base_method": bases[0],
                "method_source": [rel for _, rel in code]}
    _write(plan, metadata, out)
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def print_report(title: str, errors: list[str], warnings: list[str]) -> None:
    """Warnings on stdout; when there are errors, `title` and the errors on stderr."""
    for w in warnings:
        print(f"  warning: {w}")
    if errors:
        print(title, file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    """Make a submission bundle, then validate it."""
    from bench.validation import validate_bundle

    root = resolve_root(args.root)
    runs = Path(args.runs) if args.runs else root / "runs"
    out = make_bundle(args.method, Path(args.results), runs, Path(args.output), [Path(p) for p in args.source])
    meta = json.loads((out / METADATA).read_text(encoding="utf-8"))
    report = json.loads((out / CONFORMANCE).read_text(encoding="utf-8"))
    print(f"bundle: {out} ({len(meta['runs'])} run(s) of {args.method} on "
          f"{', '.join(f'{b} (seeds {s})' for b, s in meta['seeds'].items())}); conformance suite: "
          f"{'passed' if report['ok'] else 'FAILED ' + ', '.join(report['failed'])}")
    v = validate_bundle(out, root, trust_code=True)  # the submitter's own code, just run by the suite
    print_report("the new bundle does not validate:", v.errors, v.warnings)
    return 0 if v.ok else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the `submit` command."""
    s = sub.add_parser("submit", help="bundle a method's results, run cards and checkpoints for submission")
    s.add_argument("method", help="the method name as in the result files")
    s.add_argument("--results", required=True, help="results folder")
    s.add_argument("--runs", default=None, help="checkpoint folder (default: ROOT/runs)")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache)")
    s.add_argument("--source", action="append", default=[], metavar="PATH",
                   help="the method's source: a .py file or package folder copied under code/ (repeatable); "
                        "verify imports it only with --trust-code")
    s.add_argument("-o", "--output", required=True, help="the bundle folder to create")
    s.set_defaults(func=cmd_submit)

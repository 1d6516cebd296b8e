"""Submissions: bundle a method's results, check a bundle, re-run it from its checkpoints.

A bundle is a folder:

```
BUNDLE/
  metadata.json                                  method, registry target, environment, runs
  MANIFEST.json                                  sha256 and size of every other file
  results/<benchmark>/<method>/seed<N>.csv       per-episode rows (bench.results columns)
  results/<benchmark>/<method>/seed<N>.json      run cards, as written by the runner
  checkpoints/<benchmark>/<method>/seed<N>.pt    the selected checkpoint (best.pt) of each run
```

(`<method>` is the method name made file-safe.) Three steps, three functions:

- `make_bundle` collects the files of one method from a results folder and a runs folder and
  writes the bundle atomically (built in a temporary folder, renamed at the end);
- `validate_bundle` checks it without writing anything: file integrity and safety (manifest
  hashes and sizes, no symlinks, no path traversal, size limits), result columns and values,
  benchmark names and versions, the exact set of test episodes and their spec hashes
  (recomputed from the benchmark), and the number of seeds. A bundle can be valid but
  unranked (fewer than `MIN_RANKED_SEEDS` seeds, or fewer test episodes than the benchmark's);
- `verify_bundle` reloads every checkpoint into the method and re-runs a seeded sample of test
  episodes; the per-episode accuracies must equal the submitted ones. On success it marks the
  run cards `"verified": true` (and updates the manifest), which the leaderboard shows as a badge.

CLI: `metabench submit METHOD --results DIR [--runs DIR] -o BUNDLE`, `metabench validate BUNDLE`,
`metabench verify BUNDLE [--episodes K]`; a rejected bundle exits with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from bench.errors import MetabenchError, ResultsError
from bench.paths import atomic_write_text, resolve_root

BUNDLE_FORMAT = 1
MANIFEST = "MANIFEST.json"
METADATA = "metadata.json"
RESULTS_DIR = "results"
CHECKPOINTS_DIR = "checkpoints"

MAX_FILE_BYTES = 200 * 2**20
"""Largest accepted file in a bundle (checkpoints included)."""
MAX_TOTAL_BYTES = 2 * 2**30
"""Largest accepted bundle (all files together)."""
MAX_JSON_BYTES = 16 * 2**20
"""Largest accepted JSON file (manifest, metadata, run cards)."""
MIN_RANKED_SEEDS = 3
"""Training seeds per benchmark a ranked submission needs; fewer are accepted as unranked."""
NONDETERMINISTIC_TOLERANCE = 0.02
"""For methods tagged non-deterministic: largest accepted |mean accuracy difference| in verify."""
RESULT_FORMAT = "%.6g"
"""The float format of result CSVs (bench.results.write_run); verify compares at this precision."""


class SubmissionError(MetabenchError):
    """A bundle cannot be made, or an operation on a bundle failed before checking it."""


@dataclass
class Validation:
    """The outcome of `validate_bundle`.

    ok: the bundle is accepted; ranked: accepted and eligible for ranks (enough seeds, full test
    sets); errors: reasons for rejection; warnings: accepted issues (e.g. why it is unranked).
    """

    ok: bool
    ranked: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Verification:
    """The outcome of `verify_bundle`.

    ok: every checked episode reproduced; checked: (benchmark, seed, episode indices) per run;
    mismatches: dicts with benchmark, seed, episode, submitted and recomputed accuracy;
    marked: the run cards were marked verified.
    """

    ok: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: list[dict] = field(default_factory=list)
    mismatches: list[dict] = field(default_factory=list)
    marked: bool = False


# ---------------------------------------------------------------------------------------------
# helpers


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


def _json_dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


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


def choose_episodes(n: int, k: int, seed: int, benchmark: str, run_seed: int) -> list[int]:
    """A deterministic, seeded choice of min(k, n) distinct episode indices out of 0..n-1, sorted.

    Depends only on (seed, benchmark, run seed), so a verification can be repeated exactly;
    a maintainer may pass a private seed so submitters cannot know which episodes are checked.
    """
    k = max(0, min(int(k), int(n)))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFF, zlib.crc32(benchmark.encode()), int(run_seed) & 0xFFFFFFFF])))
    return sorted(int(i) for i in rng.choice(int(n), size=k, replace=False)) if k else []


def _short(items: list[int], limit: int = 10) -> str:
    text = ", ".join(str(i) for i in items[:limit])
    return f"[{text}{', ...' if len(items) > limit else ''}] ({len(items)} in all)" if len(items) > limit else f"[{text}]"


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


def make_bundle(method: str, results_dir: Path, runs_dir: Path, out: Path) -> Path:
    """Bundle every result of `method` in `results_dir` with its run cards and checkpoints into `out`.

    Checkpoints are the files named by each card's "checkpoint" field, resolved under `runs_dir`.
    Writes metadata.json (method, registry target, hyperparameters per run, code revision,
    environment, seeds per benchmark) and MANIFEST.json (sha256 and size of every file).
    The bundle is built in a temporary folder beside `out` and renamed onto `out` at the end;
    `out` must not exist. Returns `out`.
    """
    from baselines import registry
    from bench import __version__
    from bench.runner import code_rev

    results_dir, runs_dir, out = Path(results_dir), Path(runs_dir), Path(out)
    if out.exists() or out.is_symlink():
        raise SubmissionError(f"{out}: already exists; give a new folder for the bundle")
    try:
        entry = registry.get_entry(method)
    except MetabenchError as e:
        raise SubmissionError(f"method {method!r} is neither registered nor importable: {e}") from e
    runs = _collect(method, results_dir)

    plan = []  # (source path, bundle-relative path)
    meta_runs = []
    seen: dict[tuple[str, int], Path] = {}
    slug = file_slug(method)
    for csv_path, frame, card in runs:
        bench, seed = str(frame["benchmark"].iloc[0]), int(frame["seed"].iloc[0])
        if (bench, seed) in seen:
            raise SubmissionError(f"{csv_path}: run {bench}/seed{seed} of {method} also in {seen[(bench, seed)]}")
        seen[(bench, seed)] = csv_path
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
        plan += [(csv_path, rel["csv"]), (card_path, rel["card"]), (ckpt, rel["checkpoint"])]
        for src, _ in plan[-3:]:
            size = src.stat().st_size
            if size > MAX_FILE_BYTES:
                raise SubmissionError(f"{src}: {size} bytes, over the per-file limit of {MAX_FILE_BYTES}")
        meta_runs.append({
            "benchmark": bench, "benchmark_version": int(frame["benchmark_version"].iloc[0]), "seed": seed,
            "test_episodes": int(len(frame)), "params": card.get("params"),
            "params_hash": str(frame["params_hash"].iloc[0]), "code_rev": str(frame["code_rev"].iloc[0]),
            **rel,
        })
    total = sum(src.stat().st_size for src, _ in plan)
    if total > MAX_TOTAL_BYTES:
        raise SubmissionError(f"the bundle would hold {total} bytes, over the limit of {MAX_TOTAL_BYTES}")

    seeds: dict[str, list[int]] = {}
    for r in meta_runs:
        seeds.setdefault(r["benchmark"], []).append(r["seed"])
    metadata = {
        "format": BUNDLE_FORMAT,
        "method": method,
        "target": entry.target,
        "citation": entry.citation,
        "code_rev": code_rev(),
        "metabench_version": __version__,
        "environment": environment(),
        "seeds": {b: sorted(s) for b, s in sorted(seeds.items())},
        "runs": meta_runs,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for src, rel in plan:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        (tmp / METADATA).write_text(_json_dump(metadata), encoding="utf-8")
        (tmp / MANIFEST).write_text(_json_dump(manifest_of(tmp)), encoding="utf-8")
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists() or out.is_symlink():
            raise SubmissionError(f"{out}: appeared while the bundle was built; not overwriting it")
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# ---------------------------------------------------------------------------------------------
# validate


@dataclass
class _Run:
    """One run of a bundle as checked by validation (used again by verify)."""

    benchmark: str
    seed: int
    csv: Path
    card_path: Path
    card: dict
    frame: Any
    checkpoint: Path | None


class _Checker:
    def __init__(self, bundle: Path, root: Path | None):
        self.bundle = bundle
        self.root = root
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.unranked = False
        self.intact: set[str] = set()  # files listed in the manifest, safe, and matching it
        self.listed: set[str] = set()
        self.runs: list[_Run] = []
        self.sets: dict[str, Any] = {}
        self.metadata: dict = {}

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def warn(self, msg: str, unranked: bool = False) -> None:
        self.warnings.append(msg)
        self.unranked = self.unranked or unranked

    # -- files --------------------------------------------------------------------------------
    def scan(self) -> dict[str, int] | None:
        """Regular files of the bundle (relative path -> size); errors for symlinks and specials."""
        found: dict[str, int] = {}
        for dirpath, dirnames, filenames in os.walk(self.bundle, followlinks=False):
            here = Path(dirpath)
            for name in sorted(dirnames + filenames):
                path = here / name
                rel = path.relative_to(self.bundle).as_posix()
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    self.error(f"{rel}: is a symbolic link; bundles may not contain links")
                elif stat.S_ISDIR(st.st_mode):
                    continue
                elif not stat.S_ISREG(st.st_mode):
                    self.error(f"{rel}: is not a regular file")
                else:
                    if unsafe_path(rel):
                        self.error(f"{rel!r}: bad file name ({unsafe_path(rel)})")
                        continue
                    found[rel] = st.st_size
            dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
        return found

    def read_json(self, rel: str, size: int | None = None) -> Any:
        path = self.bundle / rel
        size = path.stat().st_size if size is None else size
        if size > MAX_JSON_BYTES:
            self.error(f"{rel}: {size} bytes, over the limit of {MAX_JSON_BYTES} for a JSON file")
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            self.error(f"{rel}: not valid JSON ({e})")
            return None

    def check_files(self) -> None:
        found = self.scan()
        if MANIFEST not in found:
            self.error(f"{MANIFEST} is missing (is this a bundle made by `metabench submit`?)")
            return
        manifest = self.read_json(MANIFEST, found.pop(MANIFEST))
        if manifest is None:
            return
        entries = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(entries, list):
            self.error(f"{MANIFEST}: must be an object with a list 'files'")
            return
        if manifest.get("format") != BUNDLE_FORMAT:
            self.error(f"{MANIFEST}: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}")
        total = 0
        for entry in entries:
            if not isinstance(entry, dict):
                self.error(f"{MANIFEST}: entry {entry!r} is not an object")
                continue
            name = entry.get("path")
            why = unsafe_path(name)
            if why:
                self.error(f"{MANIFEST}: path {name!r} {why}")
                continue
            if name in self.listed:
                self.error(f"{MANIFEST}: {name} is listed twice")
                continue
            self.listed.add(name)
            if name == MANIFEST:
                self.error(f"{MANIFEST}: lists itself")
                continue
            if name not in found:
                self.error(f"{name}: listed in {MANIFEST} but missing from the bundle")
                continue
            size = found[name]
            total += size
            if size > MAX_FILE_BYTES:
                self.error(f"{name}: {size} bytes, over the per-file limit of {MAX_FILE_BYTES}")
                continue
            if entry.get("size") != size:
                self.error(f"{name}: size {size} does not match {MANIFEST} ({entry.get('size')!r})")
                continue
            if not isinstance(entry.get("sha256"), str):
                self.error(f"{MANIFEST}: {name} has no sha256")
                continue
            if sha256_file(self.bundle / name) != entry["sha256"].lower():
                self.error(f"{name}: sha256 does not match {MANIFEST} (file changed after bundling)")
                continue
            self.intact.add(name)
        for name in sorted(set(found) - self.listed):
            self.error(f"{name}: not listed in {MANIFEST}")
            total += found[name]
            if found[name] > MAX_FILE_BYTES:
                self.error(f"{name}: {found[name]} bytes, over the per-file limit of {MAX_FILE_BYTES}")
        if total > MAX_TOTAL_BYTES:
            self.error(f"the bundle holds {total} bytes, over the limit of {MAX_TOTAL_BYTES}")

    # -- content ------------------------------------------------------------------------------
    def usable(self, rel: Any, what: str, where: str) -> bool:
        why = unsafe_path(rel)
        if why:
            self.error(f"{where}: {what} path {rel!r} {why}")
            return False
        if rel not in self.listed:
            self.error(f"{where}: {what} {rel} is not in the bundle's {MANIFEST}")
            return False
        return rel in self.intact  # integrity problems were reported already

    def episode_set(self, name: str):
        if name not in self.sets:
            from bench import benchmarks

            try:
                self.sets[name] = benchmarks.load(name, resolve_root(self.root))
            except MetabenchError as e:
                self.error(f"benchmark {name}: cannot load its data to recompute the episode hashes ({e}); "
                           "pass --root with the data folder")
                self.sets[name] = None
        return self.sets[name]

    def check_metadata(self) -> list[dict]:
        if METADATA not in self.listed:
            self.error(f"{METADATA} is missing")
            return []
        if METADATA not in self.intact:
            return []
        meta = self.read_json(METADATA)
        if not isinstance(meta, dict):
            if meta is not None:
                self.error(f"{METADATA}: must be a JSON object")
            return []
        self.metadata = meta
        if meta.get("format") != BUNDLE_FORMAT:
            self.error(f"{METADATA}: format {meta.get('format')!r}, expected {BUNDLE_FORMAT}")
        if not isinstance(meta.get("method"), str) or not meta["method"]:
            self.error(f"{METADATA}: 'method' must be a non-empty string")
        runs = meta.get("runs")
        if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
            self.error(f"{METADATA}: 'runs' must be a non-empty list of objects")
            return []
        referenced = {r.get(k) for r in runs for k in ("csv", "card", "checkpoint")}
        for name in sorted(self.listed):
            if name.endswith((".csv", ".pt")) and name not in referenced:
                self.error(f"{name}: not referenced by any run in {METADATA}")
        return runs

    def check_run(self, i: int, entry: dict) -> None:
        from bench import benchmarks
        from bench.results import read_csv
        from bench.runner import params_hash

        where = f"{METADATA} run {i}"
        csv_rel, card_rel, ckpt_rel = entry.get("csv"), entry.get("card"), entry.get("checkpoint")
        if not csv_rel or not card_rel:
            self.error(f"{where}: needs 'csv' and 'card' paths")
            return
        ok_csv = self.usable(csv_rel, "csv", where)
        ok_card = self.usable(card_rel, "card", where)
        ckpt = None
        if ckpt_rel is None:
            self.warn(f"{where}: no checkpoint, so this run cannot be verified")
        elif self.usable(ckpt_rel, "checkpoint", where):
            ckpt = self.bundle / ckpt_rel
        if not (ok_csv and ok_card):
            return
        if not str(csv_rel).endswith(".csv"):
            self.error(f"{where}: csv path {csv_rel} must end in .csv")
            return
        try:
            frame = read_csv(self.bundle / csv_rel)
        except ResultsError as e:
            self.error(str(e).replace(str(self.bundle) + os.sep, ""))
            return
        card = self.read_json(card_rel)
        if not isinstance(card, dict):
            if card is not None:
                self.error(f"{card_rel}: a run card must be a JSON object")
            return
        bench_name = str(frame["benchmark"].iloc[0])
        seed = int(frame["seed"].iloc[0])
        method = str(frame["method"].iloc[0])
        version = int(frame["benchmark_version"].iloc[0])
        label = f"{csv_rel}"
        if method != self.metadata.get("method"):
            self.error(f"{label}: method {method!r}, but the bundle is for {self.metadata.get('method')!r}")
        for key, value in (("method", method), ("benchmark", bench_name), ("seed", seed),
                           ("benchmark_version", version)):
            if card.get(key) != value:
                self.error(f"{card_rel}: {key} {card.get(key)!r} does not match the results ({value!r})")
        for key, value in (("benchmark", bench_name), ("seed", seed)):
            if entry.get(key) != value:
                self.error(f"{where}: {key} {entry.get(key)!r} does not match {csv_rel} ({value!r})")
        if not isinstance(card.get("params"), dict):
            self.error(f"{card_rel}: needs the hyperparameters ('params')")
        else:
            ph = params_hash(card["params"])
            column = set(frame["params_hash"])
            if card.get("params_hash") != ph or column != {ph}:
                self.error(f"{card_rel}: params_hash does not match its hyperparameters ({ph}; card "
                           f"{card.get('params_hash')!r}, results {sorted(column)})")
        if (frame["split"] != "test").any():
            self.error(f"{label}: split must be 'test' (found {sorted(set(frame['split']))})")
        try:
            bench = benchmarks.get_benchmark(bench_name)
        except MetabenchError:
            self.error(f"{label}: unknown benchmark {bench_name!r} (known: {', '.join(sorted(benchmarks.BENCHMARKS))})")
            return
        if version != bench.version:
            kind = "stale" if version < bench.version else "unknown"
            self.error(f"{label}: {kind} benchmark version {bench_name} v{version}; the current protocol is "
                       f"v{bench.version} (re-run on the current version)")
            return
        for col, expected in (("way", bench.way), ("n_support", bench.way * bench.shot),
                              ("n_query", bench.way * bench.query)):
            bad = frame[frame[col] != expected]
            if len(bad):
                self.error(f"{label}: episode {int(bad['episode'].iloc[0])}: {col} {int(bad[col].iloc[0])}, "
                           f"but {bench_name} has {expected}")
        n_bench = bench.test_episodes
        episodes = sorted(int(e) for e in frame["episode"])
        claimed = card.get("test_episodes")
        n_claim = claimed if isinstance(claimed, int) and not isinstance(claimed, bool) else (max(episodes) + 1)
        beyond = [e for e in episodes if e < 0 or e >= n_bench]
        if beyond:
            self.error(f"{label}: extra test episode(s) {_short(beyond)}: {bench_name} has episodes 0..{n_bench - 1}")
        over_card = [e for e in episodes if n_claim <= e < n_bench]
        if over_card:
            self.error(f"{label}: extra test episode(s) {_short(over_card)} beyond the run card's test_episodes "
                       f"({n_claim})")
        missing = sorted(set(range(min(n_claim, n_bench))) - set(episodes))
        if missing:
            self.error(f"{label}: missing test episode(s) {_short(missing)} (expected 0..{min(n_claim, n_bench) - 1})")
        if n_claim > n_bench:
            self.error(f"{card_rel}: test_episodes {n_claim} exceeds the benchmark's {n_bench}")
        if not (beyond or over_card or missing) and len(episodes) < n_bench:
            self.warn(f"{label}: {len(episodes)} of {bench_name}'s {n_bench} test episodes: accepted, but unranked "
                      "(a ranked submission scores every test episode)", unranked=True)
        es = self.episode_set(bench_name)
        if es is not None:
            bad = []
            for ep, h in zip(frame["episode"].tolist(), frame["episode_hash"].tolist()):
                if 0 <= int(ep) < n_bench:
                    expected = es.describe("test", int(ep)).hash
                    if h != expected:
                        bad.append((int(ep), h, expected))
            if bad:
                ep, got, exp = bad[0]
                self.error(f"{label}: episode hash mismatch at episode(s) {_short([b[0] for b in bad])} (episode {ep}: "
                           f"{got}, expected {exp}): not the benchmark's test episodes")
        self.runs.append(_Run(bench_name, seed, self.bundle / csv_rel, self.bundle / card_rel, card, frame, ckpt))

    def check_seeds(self) -> None:
        seeds: dict[str, list[int]] = {}
        for run in self.runs:
            if run.seed in seeds.get(run.benchmark, []):
                self.error(f"{run.benchmark}: seed {run.seed} appears in two runs")
            seeds.setdefault(run.benchmark, []).append(run.seed)
        declared = self.metadata.get("seeds")
        if isinstance(declared, dict) and len(self.runs) == len(self.metadata.get("runs") or []):
            for b, s in seeds.items():
                if sorted(declared.get(b) or []) != sorted(s):
                    self.error(f"{METADATA}: seeds of {b} {declared.get(b)!r} do not match the runs ({sorted(s)})")
        for b, s in sorted(seeds.items()):
            if len(set(s)) < MIN_RANKED_SEEDS:
                self.warn(f"{b}: {len(set(s))} training seed(s); a ranked submission needs at least "
                          f"{MIN_RANKED_SEEDS}: accepted, but unranked", unranked=True)


def _validate(path: Path, root: Path | None) -> _Checker:
    bundle = Path(path)
    checker = _Checker(bundle, root)
    if bundle.is_symlink():
        checker.error(f"{bundle}: the bundle folder is a symbolic link")
        return checker
    if not bundle.is_dir():
        checker.error(f"{bundle}: not a folder")
        return checker
    checker.check_files()
    runs = checker.check_metadata()
    for i, entry in enumerate(runs):
        checker.check_run(i, entry)
    if checker.runs:
        checker.check_seeds()
    return checker


def validate_bundle(path: Path, root: Path | None = None) -> Validation:
    """Check a bundle without writing anything; `root` is the data folder (for the episode hashes).

    Rejects (errors): files changed after bundling (manifest sha256 or size), files not in the
    manifest, unsafe names ('..', absolute paths), symlinks, files over MAX_FILE_BYTES or a
    bundle over MAX_TOTAL_BYTES, malformed results (columns, NaN, out-of-range values: see
    bench.results.validate_frame), unknown benchmarks, stale benchmark versions, missing or extra
    test episodes, episode hashes that differ from the benchmark's, cards that disagree with
    their results. Accepts but marks unranked (warnings): fewer than MIN_RANKED_SEEDS seeds on a
    benchmark, or a contiguous prefix 0..n-1 of the test episodes shorter than the benchmark's.
    """
    checker = _validate(path, root)
    ok = not checker.errors
    return Validation(ok=ok, ranked=ok and not checker.unranked, errors=checker.errors,
                      warnings=checker.warnings)


# ---------------------------------------------------------------------------------------------
# verify


def _rounded(x: float) -> float:
    return float(RESULT_FORMAT % x)


def verify_bundle(path: Path, root: Path | None = None, episodes: int = 20, *, seed: int = 0,
                  mark: bool = True) -> Verification:
    """Re-run `episodes` test episodes of every run from its checkpoint; require the same accuracies.

    The bundle must validate first. For each run the method is built with the card's
    hyperparameters (registry.make), the checkpoint is loaded with torch.load(weights_only=True),
    and a seeded choice of episodes (`choose_episodes(n, episodes, seed, ...)`) is evaluated.
    Accuracies must equal the submitted ones at the precision of the result files; for methods
    tagged non-deterministic, per-episode differences are warnings and the mean over the
    checked episodes must agree within NONDETERMINISTIC_TOLERANCE. With `mark` and on success,
    every run card in the bundle gets `"verified": true` and a `"verification"` record, and the
    manifest is updated (all writes atomic). Nothing is written on failure.
    """
    import torch

    from baselines import registry
    from bench import benchmarks
    from bench.runner import code_rev, params_hash

    bundle = Path(path)
    checker = _validate(bundle, root)
    result = Verification(ok=False)
    if checker.errors:
        result.errors = ["the bundle does not validate:"] + checker.errors
        return result
    result.warnings += checker.warnings
    for run in checker.runs:
        label = f"{run.benchmark}/seed{run.seed}"
        if run.checkpoint is None:
            result.errors.append(f"{label}: no checkpoint in the bundle; cannot verify")
            continue
        bench = benchmarks.get_benchmark(run.benchmark)
        es = checker.sets[run.benchmark]
        params = {k: v for k, v in run.card["params"].items() if k != "seed"}
        try:
            learner = registry.make(run.card["method"], bench.family, bench.way, run.seed, **params)
            learner.setup(bench.task_info(es))
        except Exception as e:  # noqa: BLE001 - a submitted method may fail in any way
            result.errors.append(f"{label}: cannot build the method: {type(e).__name__}: {e}")
            continue
        rel = run.checkpoint.relative_to(bundle).as_posix()
        try:
            ckpt = torch.load(run.checkpoint, weights_only=True, map_location="cpu")
            state = ckpt["learner"] if isinstance(ckpt, dict) and "learner" in ckpt else ckpt
            learner.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - any failure to load is a verification failure
            result.errors.append(f"{label}: checkpoint {rel} cannot be loaded into {run.card['method']}: "
                                 f"{type(e).__name__}: {e}")
            continue
        ph = params_hash(learner.params())
        if ph != run.card.get("params_hash"):
            result.errors.append(f"{label}: the rebuilt method has params_hash {ph}, the card "
                                 f"{run.card.get('params_hash')!r}")
            continue
        frame = run.frame.set_index("episode")
        chosen = choose_episodes(len(frame), episodes, seed, run.benchmark, run.seed)
        chosen = [int(sorted(frame.index)[i]) for i in chosen]
        deterministic = bool(learner.tags.deterministic)
        diffs = []
        mismatched = []
        try:
            recomputed_rows = {i: learner.evaluate([es.episode("test", i)])[0] for i in chosen}
        except Exception as e:  # noqa: BLE001
            result.errors.append(f"{label}: re-running the test episodes failed: {type(e).__name__}: {e}")
            continue
        for i in chosen:
            r = recomputed_rows[i]
            submitted = float(frame.loc[i, "accuracy"])
            recomputed = float(r["accuracy"])
            diffs.append(recomputed - submitted)
            if _rounded(recomputed) != submitted:
                mismatched.append({"benchmark": run.benchmark, "seed": run.seed, "episode": i,
                                   "submitted": submitted, "recomputed": recomputed})
            elif not math.isclose(_rounded(float(r["loss"])), float(frame.loc[i, "loss"]), rel_tol=1e-3, abs_tol=1e-5):
                result.warnings.append(f"{label}: episode {i}: loss {r['loss']:.6g} differs from the submitted "
                                       f"{float(frame.loc[i, 'loss']):.6g} (accuracy matches)")
        result.checked.append({"benchmark": run.benchmark, "seed": run.seed, "episodes": chosen})
        if not mismatched:
            continue
        eps = [m["episode"] for m in mismatched]
        first = mismatched[0]
        text = (f"{label}: accuracy differs on {len(eps)} of {len(chosen)} checked episode(s) {_short(eps)} "
                f"(episode {first['episode']}: submitted {first['submitted']:.6g}, re-run {first['recomputed']:.6g})")
        if deterministic:
            result.mismatches += mismatched
            result.errors.append(text)
        elif abs(float(np.mean(diffs))) > NONDETERMINISTIC_TOLERANCE:
            result.mismatches += mismatched
            result.errors.append(text + f"; mean difference {np.mean(diffs):+.4f} exceeds "
                                        f"{NONDETERMINISTIC_TOLERANCE} for a non-deterministic method")
        else:
            result.warnings.append(text + " (non-deterministic method; mean within tolerance)")
    result.ok = not result.errors
    if result.ok and mark:
        _mark_verified(bundle, checker, result, {"episodes_per_run": int(episodes), "seed": int(seed),
                                                 "code_rev": code_rev(), "torch_version": torch.__version__})
        result.marked = True
    return result


def _mark_verified(bundle: Path, checker: _Checker, result: Verification, record: dict) -> None:
    """Set "verified": true (and the verification record) in every run card; update the manifest."""
    checked = {(c["benchmark"], c["seed"]): c["episodes"] for c in result.checked}
    for run in checker.runs:
        card = dict(run.card)
        card["verified"] = True
        card["verification"] = {**record, "episodes": checked[(run.benchmark, run.seed)]}
        atomic_write_text(run.card_path, json.dumps(card, indent=1, sort_keys=True))
    manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    for entry in manifest["files"]:
        p = bundle / entry["path"]
        if p.suffix == ".json":
            entry["sha256"], entry["size"] = sha256_file(p), p.stat().st_size
    atomic_write_text(bundle / MANIFEST, _json_dump(manifest))
    for p in [bundle / MANIFEST, *(r.card_path for r in checker.runs)]:
        p.chmod(0o644)


# ---------------------------------------------------------------------------------------------
# CLI


def _report(title: str, errors: list[str], warnings: list[str]) -> None:
    for w in warnings:
        print(f"  warning: {w}")
    if errors:
        print(title, file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    """Make a submission bundle."""
    root = resolve_root(args.root)
    runs = Path(args.runs) if args.runs else root / "runs"
    out = make_bundle(args.method, Path(args.results), runs, Path(args.output))
    meta = json.loads((out / METADATA).read_text(encoding="utf-8"))
    print(f"bundle: {out} ({len(meta['runs'])} run(s) of {args.method} on "
          f"{', '.join(f'{b} (seeds {s})' for b, s in meta['seeds'].items())})")
    v = validate_bundle(out, root)
    _report("the new bundle does not validate:", v.errors, v.warnings)
    return 0 if v.ok else 1


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a submission bundle."""
    v = validate_bundle(Path(args.bundle), resolve_root(args.root))
    _report(f"rejected: {args.bundle}: {len(v.errors)} problem(s)", v.errors, v.warnings)
    if v.ok:
        print(f"valid: {args.bundle} ({'ranked' if v.ranked else 'unranked'})")
    return 0 if v.ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a submission bundle by re-running test episodes from its checkpoints."""
    r = verify_bundle(Path(args.bundle), resolve_root(args.root), args.episodes, seed=args.seed,
                      mark=not args.no_mark)
    _report(f"verification failed: {args.bundle}", r.errors, r.warnings)
    if r.ok:
        n = sum(len(c["episodes"]) for c in r.checked)
        print(f"verified: {args.bundle} ({n} episode(s) in {len(r.checked)} run(s) reproduced"
              f"{'; run cards marked verified' if r.marked else ''})")
    return 0 if r.ok else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the `submit`, `validate` and `verify` commands."""
    s = sub.add_parser("submit", help="bundle a method's results, run cards and checkpoints for submission")
    s.add_argument("method", help="the method name as in the result files")
    s.add_argument("--results", required=True, help="results folder")
    s.add_argument("--runs", default=None, help="checkpoint folder (default: ROOT/runs)")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache)")
    s.add_argument("-o", "--output", required=True, help="the bundle folder to create")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("validate", help="check a submission bundle (files, columns, episodes, versions, seeds)")
    s.add_argument("bundle")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache)")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("verify", help="re-run test episodes from a bundle's checkpoints and mark it verified")
    s.add_argument("bundle")
    s.add_argument("--episodes", type=int, default=20, help="test episodes re-run per run (default 20)")
    s.add_argument("--seed", type=int, default=0, help="seed of the choice of episodes")
    s.add_argument("--no-mark", action="store_true", help="do not mark the run cards verified")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache)")
    s.set_defaults(func=cmd_verify)

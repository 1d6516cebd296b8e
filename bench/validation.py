"""Validation of a submission bundle: the rules its files must keep, each with a clear reason.

`validate_bundle(path, root)` checks a bundle (bench.bundle) without writing anything. It runs
the rules of `RULES` in order, like the conformance checks of bench.checks: each rule is a small
function registered with `@rule`, reading and filling a `Bundle` context and reporting every
problem it finds as an error (rejected) or a warning (accepted; some make the bundle unranked).
A run that a rule cannot read further (an unreadable CSV, an unknown benchmark, ...) is dropped
from the later rules, so one problem is reported once, not again by every rule after it.

    v = validate_bundle(Path("bundle"), root)   # Validation(ok, ranked, errors, warnings)
    print(", ".join(RULES))                     # the rule names, in order

A bundle can be valid but unranked: fewer than `MIN_RANKED_SEEDS` seeds on a benchmark, fewer
test episodes than the benchmark's, or a method that fails the conformance suite (re-run here;
the suite's report is `Validation.conformance`).

Validation writes nothing, anywhere: episode hashes are recomputed from episode descriptions,
which need a source's class split and per-class counts but no pixels (`describe_loader`); a
source that cannot give them without building its data cache is reported, not built.

Code: validation imports a bundle's method (to re-run the conformance suite) only when it is a
registered or installed method (baselines.registry.METHODS, entry points included), or with
`trust_code`; code files in a bundle must be its declared method source.

CLI: `metabench validate BUNDLE [--root DIR] [--trust-code]`; a rejected bundle exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np

from bench.bundle import (BUNDLE_FORMAT, CODE_DIR, CODE_SUFFIXES, CONFORMANCE, MANIFEST, METADATA, SubmissionError,
                          check_integrity, conformance_report, manifest_sha256, print_report, read_json, unsafe_path)
from bench.errors import DataError, MetabenchError, ResultsError
from bench.paths import resolve_root
from bench.registry import Registry

MIN_RANKED_SEEDS = 3
"""Training seeds per benchmark a ranked submission needs; fewer are accepted as unranked."""


@dataclass
class Validation:
    """The outcome of `validate_bundle`.

    ok: the bundle is accepted; ranked: accepted and eligible for ranks (enough seeds, full test
    sets); errors: reasons for rejection; warnings: accepted issues (e.g. why it is unranked);
    failed: the errors by the rule that reported them.
    """

    ok: bool
    ranked: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failed: dict[str, list[str]] = field(default_factory=dict)
    conformance: dict | None = None
    """The conformance suite re-run here (`bench.bundle.conformance_report`); None when not re-run."""
    manifest_sha256: str = ""


@dataclass(frozen=True)
class MethodCode:
    """Where the code of a bundle's method comes from.

    name: what the harness builds (a registered name, or "pkg.module:Class"); target: the
    "pkg.module:Class" that is imported; registered: a registered or installed method, whose code
    is this installation's; bundled: an unregistered method whose module is in the bundle's code/.
    """

    name: str
    target: str
    registered: bool
    bundled: bool = False

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    def describe(self) -> str:
        """What importing the method runs, in words."""
        if self.registered:
            return f"method {self.name!r}: registered, imports {self.target} (this installation's code)"
        where = "the bundle's code/ folder" if self.bundled else "this Python environment"
        return f"method {self.name!r}: not registered or installed, imports module {self.module!r} from {where}"

    def untrusted(self, trust_code: bool) -> str | None:
        """Why the method may not be imported (None: it may)."""
        if self.registered or trust_code:
            return None
        return (f"{self.describe()}; importing it runs that code: install the method's package "
                "(entry point metabench.methods), or pass --trust-code if you trust it")


@dataclass
class Run:
    """One run of a bundle (one entry of metadata.json's "runs"), filled in as the rules read it.

    checkpoint: its file in the bundle (None when absent or not intact); frame: the results
    table (bench.results columns); card: the run card; bench: the Benchmark, once known and
    current; dropped: a rule could not read it further, so later rules skip it; benchmark,
    seed, method, version: what its results say (once read).
    """

    index: int
    entry: dict
    csv_rel: str
    card_rel: str
    checkpoint: Path | None = None
    frame: Any = None
    card: dict = field(default_factory=dict)
    bench: Any = None
    dropped: bool = False
    benchmark: str = ""
    seed: int = 0
    method: str = ""
    version: int = 0

    @property
    def where(self) -> str:
        """The run's place in metadata.json, for messages."""
        return f"{METADATA} run {self.index}"


@dataclass
class Bundle:
    """What the rules know of a bundle so far, and what they found.

    path: the bundle folder; root: the data folder (for the episode hashes); listed / intact:
    manifest paths, and those whose files match it; metadata: metadata.json; entries: its runs;
    runs: the runs whose files are listed, read further by later rules; sets: EpisodeSets by
    benchmark name (None where the data cannot be loaded); errors / warnings; unranked;
    stopped: a rule found the bundle unreadable, so no later rule runs; failed: the errors by
    rule; rule: the name of the rule running now (what `error` files its message under).
    """

    path: Path
    root: Path | None = None
    listed: set[str] = field(default_factory=set)
    intact: set[str] = field(default_factory=set)
    metadata: dict = field(default_factory=dict)
    entries: list[dict] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    sets: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unranked: bool = False
    stopped: bool = False
    failed: dict[str, list[str]] = field(default_factory=dict)
    rule: str = ""
    trust_code: bool = False
    conformance: dict | None = None

    def error(self, msg: str) -> None:
        """Reject the bundle for `msg`."""
        self.errors.append(msg)
        self.failed.setdefault(self.rule, []).append(msg)

    def warn(self, msg: str, unranked: bool = False) -> None:
        """Accept the bundle with a warning; with `unranked`, it is not eligible for ranks."""
        self.warnings.append(msg)
        self.unranked = self.unranked or unranked

    def stop(self, msg: str) -> None:
        """Reject the bundle for `msg`, and run no further rule."""
        self.error(msg)
        self.stopped = True

    def drop(self, run: Run, msg: str | None = None) -> None:
        """Reject the bundle for `msg` (None: reported already), and skip `run` in later rules."""
        if msg is not None:
            self.error(msg)
        run.dropped = True

    def live(self) -> list[Run]:
        """The runs no rule has dropped."""
        return [r for r in self.runs if not r.dropped]

    def read_json(self, rel: str) -> Any:
        """The JSON file `rel` of the bundle (None, with an error, when too large or not JSON)."""
        try:
            return read_json(self.path, rel)
        except SubmissionError as e:
            self.error(str(e))
            return None

    def usable(self, rel: Any, what: str, where: str) -> bool:
        """True when `rel` is a safe path listed in the manifest whose file is intact."""
        why = unsafe_path(rel)
        if why:
            self.error(f"{where}: {what} path {rel!r} {why}")
            return False
        if rel not in self.listed:
            self.error(f"{where}: {what} {rel} is not in the bundle's {MANIFEST}")
            return False
        return rel in self.intact  # integrity problems were reported already

    def episode_set(self, name: str) -> Any:
        """The EpisodeSet of benchmark `name` for describing episodes, read from the data root without
        pixels or writes (`describe_loader`); None, with an error, when it cannot be described."""
        if name not in self.sets:
            from bench import benchmarks

            try:
                self.sets[name] = benchmarks.load(name, resolve_root(self.root), loader=describe_loader)
            except MetabenchError as e:
                self.error(f"benchmark {name}: cannot recompute its episode hashes: {e}")
                self.sets[name] = None
        return self.sets[name]

    def method_code(self) -> MethodCode | None:
        """Where the bundle's method comes from (None, with an error, when its runs name several methods)."""
        from baselines.registry import METHODS

        names = sorted({str(r.card.get("base_method") or r.card.get("method") or "") for r in self.live()} - {""})
        if not names:
            names = [str(self.metadata.get("base_method") or self.metadata.get("method") or "")]
        if len(names) > 1:
            self.error(f"the runs come from several methods {names}; a bundle holds one method's runs")
            return None
        name = names[0]
        if name in METHODS:
            return MethodCode(name, str(METHODS.entry(name).target), True)
        target = name if ":" in name else str(self.metadata.get("target") or name)
        declared = self.metadata.get("method_source") or []
        bundled = any(str(p).startswith(f"{CODE_DIR}/") for p in declared if isinstance(p, str))
        return MethodCode(target, target, False, bundled)

    @contextlib.contextmanager
    def importable(self, code: MethodCode) -> Iterator[None]:
        """While inside, a bundled method's code/ folder is on sys.path (only ever for trusted code)."""
        folder = str(self.path.resolve() / CODE_DIR)
        added = code.bundled and not code.registered and folder not in sys.path
        if added:
            sys.path.insert(0, folder)
        bytecode = sys.dont_write_bytecode
        sys.dont_write_bytecode = True  # importing must not write __pycache__ into the bundle
        try:
            yield
        finally:
            sys.dont_write_bytecode = bytecode
            if added:
                sys.path.remove(folder)


# ---------------------------------------------------------------------------------------------
# episode descriptions without pixels or writes


def _glyphs_classes(root: Path, image_size: int) -> Any:
    """The glyphs source without pixels: its classes, splits and counts are the checked-in class table."""
    from bench.sources import glyphs
    from bench.sources.base import ArraySource

    table = glyphs.read_class_table()
    ids = np.arange(len(table.code_points), dtype=np.int64)
    return ArraySource(name="glyphs", images=np.zeros((0, image_size, image_size), dtype=np.uint8),
                       class_start=ids * glyphs.N_EXAMPLES,
                       class_count=np.full(len(ids), glyphs.N_EXAMPLES, dtype=np.int64),
                       class_names=table.class_names, splits={k: v.copy() for k, v in table.splits.items()},
                       groups=list(table.groups), meta={"describe_only": True})


def _omniglot_cached(root: Path, image_size: int) -> bool:
    from bench.sources import omniglot

    return omniglot.open_cache(root, image_size) is not None


def _omniglot_small_cached(root: Path, image_size: int) -> bool:
    from bench.sources import omniglot

    return omniglot.open_small_cache(root, image_size) is not None


def _md_omniglot_small_cached(root: Path, image_size: int) -> bool:
    from bench.sources import meta_dataset

    return (meta_dataset.source_cache(root, "omniglot_small", image_size) / "index.json").is_file()


DESCRIBERS: dict[str, Callable[[Path, int], Any]] = {"glyphs": _glyphs_classes}
"""Sources described without their loader (which would render or decode a cache)."""
BUILT_ON_LOAD: dict[str, Callable[[Path, int], bool]] = {
    "omniglot": _omniglot_cached, "omniglot-md": _omniglot_cached, "omniglot-small": _omniglot_small_cached,
    "md-omniglot-small": _md_omniglot_small_cached,
}
"""Sources whose loader builds their cache when it is missing: name -> "the cache is there" (then the
loader only reads it). Every other built-in loader only reads (synthetic is in memory; miniimagenet
and the official Meta-Dataset sources refuse when not prepared)."""


def describe_loader(name: str, root: Path, image_size: int) -> Any:
    """A source loader for describing episodes (class splits and counts) that writes nothing.

    The glyphs come from their class table (no rendering); a source whose loader would build a
    missing cache is loaded only when the cache is there, else DataError says how to prepare it.
    """
    from bench.sources import get_source

    if name in DESCRIBERS:
        return DESCRIBERS[name](Path(root), image_size)
    prepared = BUILT_ON_LOAD.get(name)
    if prepared is not None and not prepared(Path(root), image_size):
        raise DataError(f"source {name!r} is not prepared at {image_size}px in {root}, and describing its episodes "
                        "needs its decoded class table; validation writes no data cache: prepare it first "
                        "(`metabench data status` says how) or pass --root with a data folder that has it")
    return get_source(name, Path(root), image_size)


def short_list(items: list[int], limit: int = 10) -> str:
    """`items` for a message: all of them, or the first `limit` and how many in all."""
    text = ", ".join(str(i) for i in items[:limit])
    return f"[{text}, ...] ({len(items)} in all)" if len(items) > limit else f"[{text}]"


# ---------------------------------------------------------------------------------------------
# the rules, in the order they run

Rule = Callable[[Bundle], None]
RULES: Registry[Rule] = Registry("validation rule")


def rule(fn: Rule) -> Rule:
    """Register `fn` as the next validation rule (its name, and its docstring's first line as what it requires)."""
    RULES.add(fn.__name__, fn, (fn.__doc__ or "").split("\n")[0])
    return fn


@rule
def bundle_is_a_folder(b: Bundle) -> None:
    """The bundle is a folder, not a symbolic link or a file."""
    if b.path.is_symlink():
        b.stop(f"{b.path}: the bundle folder is a symbolic link")
    elif not b.path.is_dir():
        b.stop(f"{b.path}: not a folder")


@rule
def files_match_manifest(b: Bundle) -> None:
    """Every file is regular, safely named, listed in MANIFEST.json with its size and sha256; size limits hold."""
    found = check_integrity(b.path)
    b.listed, b.intact = found.listed, found.intact
    for msg in found.errors:
        b.error(msg)


@rule
def metadata_is_well_formed(b: Bundle) -> None:
    """metadata.json is a JSON object of this format naming the method and a non-empty list of runs."""
    if METADATA not in b.listed:
        b.error(f"{METADATA} is missing")
        return
    if METADATA not in b.intact:
        return  # files_match_manifest said why
    meta = b.read_json(METADATA)
    if not isinstance(meta, dict):
        if meta is not None:
            b.error(f"{METADATA}: must be a JSON object")
        return
    b.metadata = meta
    if meta.get("format") != BUNDLE_FORMAT:
        b.error(f"{METADATA}: format {meta.get('format')!r}, expected {BUNDLE_FORMAT}")
    if not isinstance(meta.get("method"), str) or not meta["method"]:
        b.error(f"{METADATA}: 'method' must be a non-empty string")
    runs = meta.get("runs")
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        b.error(f"{METADATA}: 'runs' must be a non-empty list of objects")
        return
    b.entries = runs


def _listed_run(b: Bundle, index: int, entry: dict) -> Run | None:
    """The run of metadata entry `index` when its csv and card are usable (else None, with the reasons)."""
    run = Run(index, entry, entry.get("csv"), entry.get("card"))
    if not run.csv_rel or not run.card_rel:
        b.error(f"{run.where}: needs 'csv' and 'card' paths")
        return None
    ok_csv = b.usable(run.csv_rel, "csv", run.where)
    ok_card = b.usable(run.card_rel, "card", run.where)
    ckpt_rel = entry.get("checkpoint")
    if ckpt_rel is None:
        b.warn(f"{run.where}: no checkpoint, so this run cannot be verified")
    elif b.usable(ckpt_rel, "checkpoint", run.where):
        run.checkpoint = b.path / ckpt_rel
    if not (ok_csv and ok_card):
        return None
    if not str(run.csv_rel).endswith(".csv"):
        b.error(f"{run.where}: csv path {run.csv_rel} must end in .csv")
        return None
    return run


@rule
def run_files_are_listed(b: Bundle) -> None:
    """Each run names its csv, card and checkpoint by safe listed paths; every csv and checkpoint is a run's."""
    if not b.entries:
        return
    referenced = {r.get(k) for r in b.entries for k in ("csv", "card", "checkpoint")}
    referenced |= {v for r in b.entries if isinstance(r.get("axes"), dict) for v in r["axes"].values()}
    for name in sorted(b.listed):
        if name.endswith((".csv", ".pt")) and name not in referenced:
            b.error(f"{name}: not referenced by any run in {METADATA}")
    for i, entry in enumerate(b.entries):
        run = _listed_run(b, i, entry)
        if run is not None:
            b.runs.append(run)


@rule
def code_files_are_declared(b: Bundle) -> None:
    """Code files (.py, .so, .pth, ...) appear only as the method source metadata.json declares: .py files under code/."""
    declared = b.metadata.get("method_source", [])
    if not isinstance(declared, list) or not all(isinstance(p, str) for p in declared):
        b.error(f"{METADATA}: 'method_source' must be a list of paths")
        declared = []
    sources = [rel for rel in declared if rel.startswith(f"{CODE_DIR}/") and rel.endswith(".py")]
    for rel in declared:
        if rel not in sources:
            b.error(f"{METADATA}: method source {rel!r} must be a .py file under {CODE_DIR}/")
        else:
            b.usable(rel, "method source", METADATA)  # unsafe or unlisted paths are errors
    for name in sorted(b.listed):
        if name.lower().endswith(CODE_SUFFIXES) and name not in sources:
            b.error(f"{name}: a code file the bundle does not declare as its method source ({METADATA} "
                    "'method_source'); a bundle carries code only as its declared method source")


@rule
def results_columns_are_valid(b: Bundle) -> None:
    """Each run's CSV has the result columns, with values of the right types and ranges (bench.results)."""
    from bench.results import read_csv

    for run in b.live():
        try:
            run.frame = read_csv(b.path / run.csv_rel)
        except ResultsError as e:
            b.drop(run, str(e).replace(str(b.path) + os.sep, ""))
            continue
        first = run.frame.iloc[0]
        run.benchmark, run.method = str(first["benchmark"]), str(first["method"])
        run.seed, run.version = int(first["seed"]), int(first["benchmark_version"])


@rule
def card_matches_results(b: Bundle) -> None:
    """Each run card is a JSON object agreeing with its results (method, benchmark, seed, version), as does metadata."""
    for run in b.live():
        card = b.read_json(run.card_rel)
        if not isinstance(card, dict):
            b.drop(run, f"{run.card_rel}: a run card must be a JSON object" if card is not None else None)
            continue
        run.card = card
        if run.method != b.metadata.get("method"):
            b.error(f"{run.csv_rel}: method {run.method!r}, but the bundle is for {b.metadata.get('method')!r}")
        for key, value in (("method", run.method), ("benchmark", run.benchmark), ("seed", run.seed),
                           ("benchmark_version", run.version)):
            if card.get(key) != value:
                b.error(f"{run.card_rel}: {key} {card.get(key)!r} does not match the results ({value!r})")
        for key, value in (("benchmark", run.benchmark), ("seed", run.seed)):
            if run.entry.get(key) != value:
                b.error(f"{run.where}: {key} {run.entry.get(key)!r} does not match {run.csv_rel} ({value!r})")


@rule
def params_hash_matches(b: Bundle) -> None:
    """Each run card holds its hyperparameters, and their hash is the card's and the results' params_hash."""
    from bench.runner import params_hash

    for run in b.live():
        if not isinstance(run.card.get("params"), dict):
            b.error(f"{run.card_rel}: needs the hyperparameters ('params')")
            continue
        ph = params_hash(run.card["params"])
        column = set(run.frame["params_hash"])
        if run.card.get("params_hash") != ph or column != {ph}:
            b.error(f"{run.card_rel}: params_hash does not match its hyperparameters ({ph}; card "
                    f"{run.card.get('params_hash')!r}, results {sorted(column)})")


@rule
def rows_are_test_episodes(b: Bundle) -> None:
    """Every result row is from the test split."""
    for run in b.live():
        if (run.frame["split"] != "test").any():
            b.error(f"{run.csv_rel}: split must be 'test' (found {sorted(set(run.frame['split']))})")


@rule
def benchmark_is_known_and_current(b: Bundle) -> None:
    """Each run's benchmark is registered, at the version the results were made on."""
    from bench import benchmarks

    for run in b.live():
        try:  # a registered or installed name only: a bundle's "pkg.module:NAME" or .toml path is never loaded
            if run.benchmark not in benchmarks.BENCHMARKS:
                raise MetabenchError(run.benchmark)
            bench = benchmarks.get_benchmark(run.benchmark)
        except MetabenchError:
            b.drop(run, f"{run.csv_rel}: unknown benchmark {run.benchmark!r} "
                        f"(known: {', '.join(sorted(benchmarks.BENCHMARKS.names()))})")
            continue
        if run.version != bench.version:
            kind = "stale" if run.version < bench.version else "unknown"
            b.drop(run, f"{run.csv_rel}: {kind} benchmark version {run.benchmark} v{run.version}; the current "
                        f"protocol is v{bench.version} (re-run on the current version)")
            continue
        run.bench = bench


@rule
def rows_fit_the_protocol(b: Bundle) -> None:
    """Every row's way, n_support and n_query can come from the benchmark's protocol (fixed or variable-way)."""
    for run in b.live():
        rows = run.frame[["episode", "way", "n_support", "n_query"]].itertuples(index=False)
        for ep, way, n_support, n_query in rows:
            why = run.bench.protocol.row_problem(int(way), int(n_support), int(n_query))
            if why:
                b.error(f"{run.csv_rel}: episode {int(ep)}: {why}")
                break


@rule
def test_episodes_are_complete(b: Bundle) -> None:
    """Each run scores exactly the test episodes 0..n-1 its card claims, within the benchmark's (fewer: unranked)."""
    for run in b.live():
        label, name, n_bench = run.csv_rel, run.benchmark, run.bench.test_episodes
        episodes = sorted(int(e) for e in run.frame["episode"])
        claimed = run.card.get("test_episodes")
        n_claim = claimed if isinstance(claimed, int) and not isinstance(claimed, bool) else (max(episodes) + 1)
        beyond = [e for e in episodes if e < 0 or e >= n_bench]
        if beyond:
            b.error(f"{label}: extra test episode(s) {short_list(beyond)}: {name} has episodes 0..{n_bench - 1}")
        over_card = [e for e in episodes if n_claim <= e < n_bench]
        if over_card:
            b.error(f"{label}: extra test episode(s) {short_list(over_card)} beyond the run card's test_episodes "
                    f"({n_claim})")
        missing = sorted(set(range(min(n_claim, n_bench))) - set(episodes))
        if missing:
            b.error(f"{label}: missing test episode(s) {short_list(missing)} (expected 0..{min(n_claim, n_bench) - 1})")
        if n_claim > n_bench:
            b.error(f"{run.card_rel}: test_episodes {n_claim} exceeds the benchmark's {n_bench}")
        if not (beyond or over_card or missing) and len(episodes) < n_bench:
            b.warn(f"{label}: {len(episodes)} of {name}'s {n_bench} test episodes: accepted, but unranked "
                   "(a ranked submission scores every test episode)", unranked=True)


@rule
def episode_hashes_match(b: Bundle) -> None:
    """Every row's episode_hash is that of the benchmark's test episode of its index (recomputed from the data)."""
    for run in b.live():
        es = b.episode_set(run.benchmark)
        if es is None:
            continue
        bad = []
        for ep, h in zip(run.frame["episode"].tolist(), run.frame["episode_hash"].tolist()):
            if 0 <= int(ep) < run.bench.test_episodes:
                expected = es.describe("test", int(ep)).hash
                if h != expected:
                    bad.append((int(ep), h, expected))
        if bad:
            ep, got, exp = bad[0]
            b.error(f"{run.csv_rel}: episode hash mismatch at episode(s) {short_list([x[0] for x in bad])} "
                    f"(episode {ep}: {got}, expected {exp}): not the benchmark's test episodes")


@rule
def axis_files_match_results(b: Bundle) -> None:
    """Each evaluation-axis file a run card records is in the bundle, is the file the card hashes, and covers
    exactly the run's episodes (same hashes; the first `axis_episodes` of them when the card limits the axes);
    permutations are the episode hash's, perm 0 the main accuracy."""
    from bench.results import AXIS_COLUMNS, read_axis

    for run in b.live():
        recorded = run.card.get("axes") or {}
        if not isinstance(recorded, dict) or set(recorded) - set(AXIS_COLUMNS):
            b.error(f"{run.card_rel}: 'axes' must map axes among {sorted(AXIS_COLUMNS)} to their files")
            continue
        listed = run.entry.get("axes") or {}
        main = run.frame.set_index("episode")
        limit = run.card.get("axis_episodes")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            b.error(f"{run.card_rel}: 'axis_episodes' must be a whole number from 1, not {limit!r}")
            continue
        covered = main if limit is None else main[main.index < limit]
        for axis in sorted(recorded):
            rel = str(PurePosixPath(run.csv_rel).with_suffix(f".{axis}.csv"))
            if listed.get(axis) != rel:
                b.error(f"{run.where}: its card records a {axis} axis, but 'axes' does not list {rel}")
            if not b.usable(rel, f"{axis} axis", run.where):
                continue
            try:
                table = read_axis(b.path / run.csv_rel, axis)
            except ResultsError as e:
                b.error(str(e).replace(str(b.path) + os.sep, ""))
                continue
            pairs = set(zip(table["episode"], table["episode_hash"]))
            if pairs != set(zip(covered.index, covered["episode_hash"])):
                b.error(f"{rel}: its episodes (and hashes) are not those of {run.csv_rel}"
                        + ("" if limit is None else f" below episode {limit} (the card's axis_episodes)"))
                continue
            if axis == "perms":
                _check_permutations(b, rel, table, main)


def _check_permutations(b: Bundle, rel: str, table: Any, main: Any) -> None:
    """Permutations of each episode are those its hash draws; perm 0 (the identity) has the main accuracy."""
    from bench.axes import label_permutations, labels_text

    for episode, rows in table.groupby("episode", sort=True):
        expected = [labels_text(p) for p in label_permutations(str(rows["episode_hash"].iloc[0]),
                                                                int(main.loc[episode, "way"]), len(rows))]
        if rows["labels"].tolist() != expected:
            b.error(f"{rel}: episode {episode}: permutations {rows['labels'].tolist()} are not the ones its hash "
                    f"draws ({expected})")
            return
        if float(rows["accuracy"].iloc[0]) != float(main.loc[episode, "accuracy"]):
            b.error(f"{rel}: episode {episode}: the identity's accuracy {rows['accuracy'].iloc[0]} is not the "
                    f"main result's {main.loc[episode, 'accuracy']}")
            return


@rule
def seeds_are_distinct_and_enough(b: Bundle) -> None:
    """No benchmark repeats a seed; metadata.json lists the runs' seeds; MIN_RANKED_SEEDS each (fewer: unranked)."""
    runs = b.live()
    if not runs:
        return
    seeds: dict[str, list[int]] = {}
    for run in runs:
        if run.seed in seeds.get(run.benchmark, []):
            b.error(f"{run.benchmark}: seed {run.seed} appears in two runs")
        seeds.setdefault(run.benchmark, []).append(run.seed)
    declared = b.metadata.get("seeds")
    if isinstance(declared, dict) and len(runs) == len(b.metadata.get("runs") or []):
        for name, s in seeds.items():
            if sorted(declared.get(name) or []) != sorted(s):
                b.error(f"{METADATA}: seeds of {name} {declared.get(name)!r} do not match the runs ({sorted(s)})")
    for name, s in sorted(seeds.items()):
        if len(set(s)) < MIN_RANKED_SEEDS:
            b.warn(f"{name}: {len(set(s))} training seed(s); a ranked submission needs at least "
                   f"{MIN_RANKED_SEEDS}: accepted, but unranked", unranked=True)


@rule
def data_fingerprints_agree(b: Bundle) -> None:
    """Runs of one benchmark were made on the same data (the cache fingerprints in their cards)."""
    from bench.results import fingerprint_conflicts

    for message in fingerprint_conflicts((r.card_rel, r.card) for r in b.runs if isinstance(r.card, dict)):
        b.error(message)


def _submitted_conformance(b: Bundle) -> dict | None:
    """The bundle's conformance.json (None when absent or unreadable, with a warning or an error)."""
    if CONFORMANCE not in b.listed:
        b.warn(f"{CONFORMANCE} is missing: the bundle was made before submissions carried the conformance "
               "report (the suite is re-run here either way)")
        return None
    if CONFORMANCE not in b.intact:
        return None  # files_match_manifest said why
    report = b.read_json(CONFORMANCE)
    if report is None:
        return None
    if not (isinstance(report, dict) and isinstance(report.get("ok"), bool) and isinstance(report.get("checks"), list)):
        b.error(f"{CONFORMANCE}: not a conformance report (a JSON object with 'ok' and 'checks')")
        return None
    return report


@rule
def method_conforms(b: Bundle) -> None:
    """The method passes the conformance suite (bench.checks), re-run here on trusted code (failing: unranked)."""
    submitted = _submitted_conformance(b)
    if b.errors or not b.live():
        return  # rejected already: no reason to import and run the method
    code = b.method_code()
    if code is None:
        return
    why = code.untrusted(b.trust_code)
    if why:
        b.warn(f"the conformance suite was not re-run: {why}: accepted, but unranked", unranked=True)
        return
    try:
        with b.importable(code):
            report = conformance_report(code.name)
    except MetabenchError as e:
        b.error(f"cannot import the method to re-run the conformance suite: {e}")
        return
    b.conformance = report
    if not report["ok"]:
        b.warn(f"method {code.name!r} fails the conformance suite (bench.checks): {', '.join(report['failed'])}: "
               "accepted, but unranked", unranked=True)
    if submitted is not None and submitted["ok"] != report["ok"]:
        b.warn(f"{CONFORMANCE} says the suite {'passed' if submitted['ok'] else 'failed'}, but it "
               f"{'passes' if report['ok'] else 'fails'} when re-run here")


# ---------------------------------------------------------------------------------------------
# running the rules


def validate(path: Path, root: Path | None = None, trust_code: bool = False) -> Bundle:
    """Run every rule of RULES in order on the bundle at `path`; the context they filled in.

    trust_code: import an unregistered method (to re-run the conformance suite). bench.verify
    reuses the context (the runs read, the method's code).
    """
    b = Bundle(Path(path), root, trust_code=trust_code)
    for name in RULES:
        b.rule = name
        RULES.get(name)(b)
        if b.stopped:
            break
    b.rule = ""
    return b


def validate_bundle(path: Path, root: Path | None = None, trust_code: bool = False) -> Validation:
    """Check a bundle without writing anything; `root` is the data folder (for the episode hashes).

    Rejects (errors): files changed after bundling (manifest sha256 or size), files not in the
    manifest, unsafe names ('..', absolute paths), symlinks, files over MAX_FILE_BYTES or a
    bundle over MAX_TOTAL_BYTES (bench.bundle), malformed results (columns, NaN, out-of-range
    values: see bench.results.validate_frame), unknown benchmarks, stale benchmark versions,
    rows that the benchmark's protocol cannot produce, missing or extra test episodes, episode
    hashes that differ from the benchmark's, cards that disagree with their results. Accepts but
    marks unranked (warnings): fewer than MIN_RANKED_SEEDS seeds on a benchmark, or a contiguous
    prefix 0..n-1 of the test episodes shorter than the benchmark's, or a method that fails the
    conformance suite (or whose suite could not be re-run: an unregistered method without
    `trust_code`). Code files other than the declared method source are rejected. The rules: `RULES`.
    """
    b = validate(path, root, trust_code)
    ok = not b.errors
    sha = manifest_sha256(b.path) if (b.path / MANIFEST).is_file() and not b.path.is_symlink() else ""
    return Validation(ok=ok, ranked=ok and not b.unranked, errors=b.errors, warnings=b.warnings, failed=b.failed,
                      conformance=b.conformance, manifest_sha256=sha)


# ---------------------------------------------------------------------------------------------
# CLI


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a submission bundle."""
    v = validate_bundle(Path(args.bundle), resolve_root(args.root), args.trust_code)
    print_report(f"rejected: {args.bundle}: {len(v.errors)} problem(s)", v.errors, v.warnings)
    if v.ok:
        suite = ("conformance suite passed" if v.conformance and v.conformance["ok"] else
                 "conformance suite FAILED" if v.conformance else "conformance suite not re-run")
        print(f"valid: {args.bundle} ({'ranked' if v.ranked else 'unranked'}; {suite})")
    return 0 if v.ok else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the `validate` command."""
    s = sub.add_parser("validate", help="check a submission bundle (files, columns, episodes, versions, seeds, "
                                        "conformance); writes nothing")
    s.add_argument("bundle", help="the bundle folder")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache); read, never written")
    s.add_argument("--trust-code", action="store_true",
                   help="import an unregistered method (the bundle's code/ or this environment) to re-run the "
                        "conformance suite; without it only registered or installed methods are imported")
    s.set_defaults(func=cmd_validate)

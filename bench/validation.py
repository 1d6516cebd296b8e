"""Validation of a submission bundle: the rules its files must keep, each with a clear reason.

`validate_bundle(path, root)` checks a bundle (bench.bundle) without writing anything. It runs
the rules of `RULES` in order, like the conformance checks of bench.checks: each rule is a small
function registered with `@rule`, reading and filling a `Bundle` context and reporting every
problem it finds as an error (rejected) or a warning (accepted; some make the bundle unranked).
A run that a rule cannot read further (an unreadable CSV, an unknown benchmark, ...) is dropped
from the later rules, so one problem is reported once, not again by every rule after it.

    v = validate_bundle(Path("bundle"), root)   # Validation(ok, ranked, errors, warnings)
    print(", ".join(RULES))                     # the rule names, in order

A bundle can be valid but unranked: fewer than `MIN_RANKED_SEEDS` seeds on a benchmark, or
fewer test episodes than the benchmark's.

CLI: `metabench validate BUNDLE [--root DIR]`; a rejected bundle exits with status 1.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.bundle import (BUNDLE_FORMAT, MANIFEST, METADATA, SubmissionError, check_integrity, print_report,
                          read_json, unsafe_path)
from bench.errors import MetabenchError, ResultsError
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
        """The EpisodeSet of benchmark `name` on the data root (None, with an error, when it cannot load)."""
        if name not in self.sets:
            from bench import benchmarks

            try:
                self.sets[name] = benchmarks.load(name, resolve_root(self.root))
            except MetabenchError as e:
                self.error(f"benchmark {name}: cannot load its data to recompute the episode hashes ({e}); "
                           "pass --root with the data folder")
                self.sets[name] = None
        return self.sets[name]


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
    for name in sorted(b.listed):
        if name.endswith((".csv", ".pt")) and name not in referenced:
            b.error(f"{name}: not referenced by any run in {METADATA}")
    for i, entry in enumerate(b.entries):
        run = _listed_run(b, i, entry)
        if run is not None:
            b.runs.append(run)


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
        try:
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


# ---------------------------------------------------------------------------------------------
# running the rules


def validate(path: Path, root: Path | None = None) -> Bundle:
    """Run every rule of RULES in order on the bundle at `path`; the context they filled in.

    bench.verify reuses it (the runs read, the loaded episode sets).
    """
    b = Bundle(Path(path), root)
    for name in RULES:
        b.rule = name
        RULES.get(name)(b)
        if b.stopped:
            break
    b.rule = ""
    return b


def validate_bundle(path: Path, root: Path | None = None) -> Validation:
    """Check a bundle without writing anything; `root` is the data folder (for the episode hashes).

    Rejects (errors): files changed after bundling (manifest sha256 or size), files not in the
    manifest, unsafe names ('..', absolute paths), symlinks, files over MAX_FILE_BYTES or a
    bundle over MAX_TOTAL_BYTES (bench.bundle), malformed results (columns, NaN, out-of-range
    values: see bench.results.validate_frame), unknown benchmarks, stale benchmark versions,
    rows that the benchmark's protocol cannot produce, missing or extra test episodes, episode
    hashes that differ from the benchmark's, cards that disagree with their results. Accepts but
    marks unranked (warnings): fewer than MIN_RANKED_SEEDS seeds on a benchmark, or a contiguous
    prefix 0..n-1 of the test episodes shorter than the benchmark's. The rules: `RULES`.
    """
    b = validate(path, root)
    ok = not b.errors
    return Validation(ok=ok, ranked=ok and not b.unranked, errors=b.errors, warnings=b.warnings, failed=b.failed)


# ---------------------------------------------------------------------------------------------
# CLI


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a submission bundle."""
    v = validate_bundle(Path(args.bundle), resolve_root(args.root))
    print_report(f"rejected: {args.bundle}: {len(v.errors)} problem(s)", v.errors, v.warnings)
    if v.ok:
        print(f"valid: {args.bundle} ({'ranked' if v.ranked else 'unranked'})")
    return 0 if v.ok else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the `validate` command."""
    s = sub.add_parser("validate", help="check a submission bundle (files, columns, episodes, versions, seeds)")
    s.add_argument("bundle")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache)")
    s.set_defaults(func=cmd_validate)

"""Result files: one CSV row per (run, test episode), plus a JSON run card beside each CSV.

Layout of a results folder: `<dir>/<benchmark>/<method>/seed<N>.csv` and `seed<N>.json`.
`read_results` validates everything it reads and names the file and row of any problem.

A CSV and its card are one pair: the card records the CSV's sha256 (`csv_sha256`), and
`write_run` replaces a pair in three steps (stage both as `.next`, keep the previous pair as
`.prev` hard links, rename both into place), so a writer killed at any point leaves either the
previous pair or the new one readable: `read_csv` / `read_card` read the pair whose hashes
agree (the `.prev` pair while a replacement is half done) and refuse a torn pair.

Evaluation axes (bench.axes) are plain CSV files beside the pair, `seed<N>.<axis>.csv` (`AXIS_COLUMNS`),
written in the same transaction (before the CSV and card are renamed into place); the card records each
one's file name and sha256 under "axes", and `read_axis` reads the copy (current or `.prev`) that its card
names. A run without them (older runs, or an axis switched off) simply has none.
"""

from __future__ import annotations

from collections import Counter
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from bench.errors import ResultsError
from bench.paths import atomic_write_text

COLUMNS = [
    "benchmark", "benchmark_version", "split", "episode", "episode_hash", "method", "params_hash",
    "seed", "code_rev", "device", "way", "shot", "n_support", "n_query", "inner_steps_test", "accuracy", "loss",
    "adapt_seconds", "adapt_batch", "fit_episodes", "fit_seconds",
]
"""The columns of a result file. shot: support examples per class of the benchmark's protocol (0 when it
varies per episode, as in Meta-Dataset); inner_steps_test: the run's test-time inner steps (-1 for a method
without them); adapt_seconds: adaptation plus prediction time of the episode, measured alone when
adapt_batch is 1, else the time of the adapt_many call that adapted adapt_batch episodes together,
divided by them."""
ADDED_COLUMNS = ("shot", "inner_steps_test", "adapt_batch")
"""Columns added after the first result files were written: files without them are read with them
filled in (`fill_added_columns`)."""
INT_COLUMNS = ["benchmark_version", "episode", "seed", "way", "shot", "n_support", "n_query", "inner_steps_test",
               "adapt_batch", "fit_episodes"]
FLOAT_COLUMNS = ["accuracy", "loss", "adapt_seconds", "fit_seconds"]
STR_COLUMNS = ["benchmark", "split", "episode_hash", "method", "params_hash", "code_rev", "device"]
AXIS_COLUMNS = {
    "steps": ["episode", "episode_hash", "step", "accuracy", "loss"],
    "perms": ["episode", "episode_hash", "perm", "labels", "accuracy"],
}
"""The evaluation-axis files beside a result CSV and their columns: "steps", the query accuracy and loss
after each test-time inner step (bench.axes); "perms", the accuracy of each label permutation of each
test episode (perm 0 is the identity, `labels` the new label of each class, "2-0-1-4-3")."""
OLD_EVAL_CHUNK = 32
"""Episodes adapted together by every method when files without adapt_batch were written."""


def run_paths(results_dir: Path, benchmark: str, method: str, seed: int) -> tuple[Path, Path]:
    """(csv path, run-card json path) of one run inside a results folder."""
    base = Path(results_dir) / benchmark / method
    return base / f"seed{seed}.csv", base / f"seed{seed}.json"


def csv_text(frame: pd.DataFrame) -> str:
    """A table as result files write it (no index, floats as %.6g)."""
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.6g")
    return buf.getvalue()


def axis_path(csv_path: Path, axis: str) -> Path:
    """The file of evaluation axis `axis` beside a result CSV: seed<N>.<axis>.csv."""
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}.{axis}.csv")


def write_run(results_dir: Path, rows: list[Mapping[str, Any]], card: Mapping[str, Any],
              axes: Mapping[str, list[Mapping[str, Any]]] | None = None) -> Path:
    """Write one run's rows and card as one pair (see the module docstring); returns the CSV path.

    Rows are validated first; the card gets `csv_sha256`. Staged files of a killed earlier write
    are replaced. axes: rows of evaluation axes (AXIS_COLUMNS names), written beside the pair in the
    same transaction, their file names and hashes in the card's "axes".
    """
    first = rows[0]
    csv_path, card_path = run_paths(results_dir, first["benchmark"], first["method"], int(first["seed"]))
    frame = fill_added_columns(pd.DataFrame(list(rows)), card)
    validate_frame(frame, str(csv_path))
    text = csv_text(frame[COLUMNS])
    staged = {}
    for axis, axis_rows in (axes or {}).items():
        path = axis_path(csv_path, axis)
        axis_frame = validate_axis(pd.DataFrame(list(axis_rows), columns=AXIS_COLUMNS[axis]), axis, str(path))
        staged[path] = csv_text(axis_frame)
    card = {**card, "csv_sha256": hashlib.sha256(text.encode()).hexdigest()}
    if staged:
        card["axes"] = {axis: {"file": path.name, "sha256": hashlib.sha256(t.encode()).hexdigest()}
                        for axis, (path, t) in zip(axes, staged.items())}
    staged |= {csv_path: text, card_path: json.dumps(card, indent=1, sort_keys=True)}
    for path, content in staged.items():
        atomic_write_text(_side(path, "next"), content)
    if csv_path.exists() and card_path.exists() and _pair_ok(csv_path, card_path):
        for path in staged:  # the previous pair stays readable until the new one is complete
            prev = _side(path, "prev")
            prev.unlink(missing_ok=True)
            if path.exists():
                os.link(path, prev)
    for path in staged:
        os.replace(_side(path, "next"), path)
    for path in staged:
        _side(path, "prev").unlink(missing_ok=True)
    return csv_path


def _side(path: Path, kind: str) -> Path:
    """The staged ("next") or previous ("prev") copy of a result file."""
    return path.with_name(f"{path.name}.{kind}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pair_ok(csv_path: Path, card_path: Path) -> bool:
    """True when the card is absent, records no CSV hash (older cards), or records this CSV's hash."""
    if not card_path.exists():
        return True
    try:
        recorded = json.loads(card_path.read_text(encoding="utf-8")).get("csv_sha256")
    except (ValueError, AttributeError):
        return True  # a malformed card is reported by read_card
    return recorded is None or (csv_path.exists() and recorded == _sha256(csv_path))


def committed_pair(csv_path: Path) -> tuple[Path, Path]:
    """The (csv, card) files to read for a result CSV: the pair itself, or its previous pair while a
    replacement is half done; ResultsError for a torn pair (a CSV with another run's card)."""
    csv_path = Path(csv_path)
    card_path = csv_path.with_suffix(".json")
    if _pair_ok(csv_path, card_path):
        return csv_path, card_path
    prev_csv, prev_card = _side(csv_path, "prev"), _side(card_path, "prev")
    if prev_csv.exists() and prev_card.exists() and _pair_ok(prev_csv, prev_card):
        return prev_csv, prev_card
    raise ResultsError(f"{csv_path}: its run card {card_path.name} records another CSV (csv_sha256): a write was "
                       "interrupted; re-run the same command to complete it")


def protocol_shot(protocol: Any) -> int:
    """Support examples per class of a benchmark protocol: its `shot`, a fixed Meta-Dataset
    `config.num_support`, else 0 (the shot varies per episode)."""
    for value in (getattr(protocol, "shot", None), getattr(getattr(protocol, "config", None), "num_support", None)):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def inner_steps_of(params: Mapping[str, Any]) -> int:
    """A run's test-time inner steps from its hyperparameters (inner_steps_test, else inner_steps; -1 without)."""
    value = params.get("inner_steps_test", params.get("inner_steps"))
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else -1


def _filled_shot(frame: pd.DataFrame) -> Any:
    """`shot` for a file without it: the registered benchmark's protocol, else n_support / way when
    that is whole on every row, else 0."""
    from bench.errors import MetabenchError

    try:
        from bench.benchmarks import get_benchmark

        return protocol_shot(get_benchmark(str(frame["benchmark"].iloc[0])).protocol)
    except (MetabenchError, KeyError, IndexError):
        pass
    way = pd.to_numeric(frame["way"], errors="coerce")
    support = pd.to_numeric(frame["n_support"], errors="coerce")
    whole = (way > 0).all() and ((support % way) == 0).all()
    return (support // way).astype("Int64") if whole else 0


def _old_chunk_sizes(frame: pd.DataFrame) -> Any:
    """`adapt_batch` of a file without it: the runner adapted episodes 0..n-1 OLD_EVAL_CHUNK at a time."""
    episode = pd.to_numeric(frame["episode"], errors="coerce").fillna(0).astype(int)
    n = len(frame)
    return (n - (episode // OLD_EVAL_CHUNK) * OLD_EVAL_CHUNK).clip(lower=1, upper=OLD_EVAL_CHUNK)


def fill_added_columns(frame: pd.DataFrame, card: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """`frame` with the ADDED_COLUMNS it lacks filled in (a file written before they existed).

    shot: see `_filled_shot`; inner_steps_test: the run card's, else -1; adapt_batch: the chunk of
    OLD_EVAL_CHUNK episodes each row was adapted in. A frame that has them is returned unchanged.
    """
    missing = [c for c in ADDED_COLUMNS if c not in frame.columns]
    if not missing or frame.empty or not {"way", "n_support", "episode", "benchmark"} <= set(frame.columns):
        return frame
    frame = frame.copy()
    if "shot" in missing:
        frame["shot"] = _filled_shot(frame)
    if "inner_steps_test" in missing:
        steps = (card or {}).get("inner_steps_test")
        frame["inner_steps_test"] = steps if isinstance(steps, int) and not isinstance(steps, bool) else -1
    if "adapt_batch" in missing:
        frame["adapt_batch"] = _old_chunk_sizes(frame)
    return frame


def validate_frame(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check columns, types and ranges of a results table; raise ResultsError naming `where`.

    Returns the table with typed columns.
    """
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ResultsError(f"{where}: missing column(s) {missing}; a results file needs {COLUMNS}")
    extra = [c for c in frame.columns if c not in COLUMNS]
    if extra:
        raise ResultsError(f"{where}: unexpected column(s) {extra}")
    if frame.empty:
        raise ResultsError(f"{where}: no rows")
    frame = frame.copy()
    for col in INT_COLUMNS + FLOAT_COLUMNS:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values.isna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise ResultsError(f"{where}: row {row + 2}: column {col!r} is empty, NaN or not a number "
                               f"({frame[col].iloc[row]!r})")
        if not values.map(math.isfinite).all():
            row = int((~values.map(math.isfinite)).to_numpy().nonzero()[0][0])
            raise ResultsError(f"{where}: row {row + 2}: column {col!r} is not finite ({values.iloc[row]!r})")
        if col in INT_COLUMNS:
            if not (values == values.round()).all():
                row = int((values != values.round()).to_numpy().nonzero()[0][0])
                raise ResultsError(f"{where}: row {row + 2}: column {col!r} must be an integer ({values.iloc[row]!r})")
            values = values.astype("int64")
        frame[col] = values
    for col in STR_COLUMNS:
        if frame[col].isna().any():
            row = int(frame[col].isna().to_numpy().nonzero()[0][0])
            raise ResultsError(f"{where}: row {row + 2}: column {col!r} is empty")
        frame[col] = frame[col].astype(str)
    acc = frame["accuracy"]
    if ((acc < 0) | (acc > 1)).any():
        row = int(((acc < 0) | (acc > 1)).to_numpy().nonzero()[0][0])
        raise ResultsError(f"{where}: row {row + 2}: accuracy {acc.iloc[row]} is outside [0, 1]")
    for col in ("way", "n_support", "n_query"):
        if (frame[col] < 1).any():
            row = int((frame[col] < 1).to_numpy().nonzero()[0][0])
            raise ResultsError(f"{where}: row {row + 2}: {col} must be at least 1")
    for col in ("benchmark", "method", "seed", "split"):
        if frame[col].nunique() != 1:
            raise ResultsError(f"{where}: one file holds one run, but column {col!r} has values "
                               f"{sorted(map(str, frame[col].unique()))}")
    versions = frame.groupby("benchmark")["benchmark_version"].nunique()
    if (versions > 1).any():
        raise ResultsError(f"{where}: mixed benchmark versions {sorted(frame['benchmark_version'].unique().tolist())}")
    if (frame["episode"] < 0).any():
        row = int((frame["episode"] < 0).to_numpy().nonzero()[0][0])
        raise ResultsError(f"{where}: row {row + 2}: episode {int(frame['episode'].iloc[row])} is negative")
    dup = frame["episode"].duplicated()
    if dup.any():
        raise ResultsError(f"{where}: episode {int(frame['episode'][dup].iloc[0])} appears twice")
    return frame[COLUMNS]


def read_csv(path: Path) -> pd.DataFrame:
    """Read and validate one result CSV."""
    path = Path(path)
    source = committed_pair(path)[0] if path.suffix == ".csv" else path
    try:
        frame = pd.read_csv(source, dtype={c: str for c in STR_COLUMNS}, keep_default_na=True)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise ResultsError(f"{path}: not a readable CSV ({e})") from e
    if any(c not in frame.columns for c in ADDED_COLUMNS):
        card = read_card(path) if path.suffix == ".csv" and path.with_suffix(".json").exists() else {}
        frame = fill_added_columns(frame, card)
    return validate_frame(frame, str(path))


def read_card(csv_path: Path) -> dict:
    """The run card beside a result CSV ({} when absent); raise ResultsError if malformed."""
    card_path = committed_pair(Path(csv_path))[1]
    if not card_path.exists():
        return {}
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ResultsError(f"{card_path}: malformed run card ({e})") from e
    if not isinstance(card, dict):
        raise ResultsError(f"{card_path}: a run card must be a JSON object")
    return card


def run_budget(card: Mapping[str, Any]) -> int | None:
    """The outer-step budget of a run: the steps it was given (its card's "steps"), else the steps it
    fitted; None without a card."""
    for key in ("steps", "fit_steps"):
        if isinstance(card.get(key), int) and not isinstance(card.get(key), bool):
            return int(card[key])
    return None


def board_budgets(budgets: Mapping[tuple[str, str], int | None]) -> dict[str, int | None]:
    """Per benchmark, the budget of the board: the one most of its methods share (ties: the smaller; None
    when no row has a known budget). budgets: (benchmark, method) -> that row's budget (`run_budget`).
    A row with another known budget (`other_budget`) is compared apart, never ranked against the board."""
    counts: dict[str, Counter] = {}
    for (bench, _), budget in budgets.items():
        known = counts.setdefault(bench, Counter())
        if budget is not None:
            known[budget] += 1
    return {b: min(c, key=lambda v: (-c[v], v)) if c else None for b, c in counts.items()}


def other_budget(budget: int | None, board: int | None) -> bool:
    """A row's budget is another than its board's (a row or board without a known budget is not)."""
    return budget is not None and board is not None and budget != board


def row_budgets(runs: Iterable[tuple[str, str, Mapping[str, Any]]]) -> dict[tuple[str, str], int | None]:
    """(benchmark, method) -> the budget of each row, from its runs' (benchmark, method, card): the largest
    of its seeds' when they differ, None when no card says."""
    out: dict[tuple[str, str], int | None] = {}
    for bench, method, card in runs:
        budget, had = run_budget(card), out.get((bench, method))
        out[(bench, method)] = budget if had is None else max(had, budget or 0)
    return out


def read_budgets(results_dir: Path) -> dict[tuple[str, str], int | None]:
    """`row_budgets` of a results folder, read from its run cards."""
    cards = [(path, read_card(path)) for path in find_csvs(results_dir)]
    return row_budgets((str(c.get("benchmark", p.parent.parent.name)), str(c.get("method", p.parent.name)), c)
                       for p, c in cards)


def outputs_csvs(path: Path) -> list[Path]:
    """The result CSVs of a run's output: the CSV itself, or the members' CSVs a suite card lists
    (bench.runner.write_outputs: paths relative to the results folder, two levels above the card)."""
    path = Path(path)
    if path.suffix != ".json":
        return [path]
    try:
        csvs = json.loads(path.read_text(encoding="utf-8"))["csvs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResultsError(f"{path}: not a suite run card with the members' CSVs ({e})") from e
    return [path.parent.parent.parent / rel for rel in csvs.values()]


def find_csvs(results_dir: Path) -> list[Path]:
    """All result CSVs under a results folder, sorted (not the evaluation-axis files beside them)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ResultsError(f"{results_dir}: results folder not found")
    return sorted(p for p in results_dir.rglob("*.csv") if not is_axis_file(p))


def is_axis_file(path: Path) -> bool:
    """True for an evaluation-axis file (seed<N>.<axis>.csv)."""
    return any(Path(path).name.endswith(f".{axis}.csv") for axis in AXIS_COLUMNS)


def validate_axis(frame: pd.DataFrame, axis: str, where: str) -> pd.DataFrame:
    """Check the columns, types and ranges of an evaluation-axis table; raise ResultsError naming `where`.

    Returns the table with typed columns, sorted by episode and step (or perm)."""
    columns = AXIS_COLUMNS[axis]
    if list(frame.columns) != columns:
        raise ResultsError(f"{where}: columns {list(frame.columns)}; a {axis} file has {columns}")
    if frame.empty:
        raise ResultsError(f"{where}: no rows")
    frame = frame.copy()
    for col in columns:
        if col in ("episode_hash", "labels"):
            if frame[col].isna().any():
                raise ResultsError(f"{where}: row {int(frame[col].isna().to_numpy().nonzero()[0][0]) + 2}: "
                                   f"column {col!r} is empty")
            frame[col] = frame[col].astype(str)
            continue
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values.isna() | ~values.map(lambda v: math.isfinite(v) if v == v else False)
        if col in ("episode", "step", "perm"):
            bad |= (values != values.round()) | (values < 0)
        if col == "accuracy":
            bad |= (values < 0) | (values > 1)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise ResultsError(f"{where}: row {row + 2}: column {col!r} has a bad value ({frame[col].iloc[row]!r})")
        frame[col] = values.astype("int64") if col in ("episode", "step", "perm") else values.astype(float)
    key = ["episode", columns[2]]
    dup = frame.duplicated(key)
    if dup.any():
        row = frame[dup].iloc[0]
        raise ResultsError(f"{where}: episode {int(row['episode'])}, {key[1]} {row[key[1]]} appears twice")
    return frame.sort_values(key, kind="mergesort").reset_index(drop=True)


def read_axis(csv_path: Path, axis: str) -> pd.DataFrame | None:
    """Evaluation axis `axis` of the run of a result CSV (validated), or None when its card records none.

    Reads the copy (current or `.prev`) whose sha256 is the one the committed card records; ResultsError
    when neither is (a torn or edited file)."""
    if axis not in AXIS_COLUMNS:
        raise ResultsError(f"unknown evaluation axis {axis!r}; known: {', '.join(AXIS_COLUMNS)}")
    entry = (read_card(csv_path).get("axes") or {}).get(axis)
    if entry is None:
        return None
    path = Path(csv_path).with_name(str(entry.get("file", "")))
    if path.name != axis_path(csv_path, axis).name:
        raise ResultsError(f"{csv_path.with_suffix('.json')}: its {axis} file is named {path.name!r}, expected "
                           f"{axis_path(csv_path, axis).name!r}")
    for candidate in (path, _side(path, "prev")):
        if candidate.exists() and _sha256(candidate) == entry.get("sha256"):
            try:
                frame = pd.read_csv(candidate, dtype={"episode_hash": str, "labels": str})
            except (OSError, ValueError, pd.errors.ParserError) as e:
                raise ResultsError(f"{path}: not a readable CSV ({e})") from e
            return validate_axis(frame, axis, str(path))
    raise ResultsError(f"{path}: missing, or not the file its run card records (sha256); the run's {axis} "
                       "axis cannot be read")


def read_results(results_dir: Path) -> pd.DataFrame:
    """Read and validate every result CSV in a folder into one table.

    Also checks across files: one benchmark has one version everywhere, and runs of the same
    benchmark were scored on the same episodes (identical episode hashes).
    """
    paths = find_csvs(results_dir)
    if not paths:
        raise ResultsError(f"{results_dir}: no result CSVs found")
    frames = [read_csv(p) for p in paths]
    return check_consistent(frames, [str(p) for p in paths])


def check_consistent(frames: Iterable[pd.DataFrame], names: Iterable[str]) -> pd.DataFrame:
    """Concatenate runs, requiring one version and one episode set (by hash) per benchmark."""
    seen: dict[str, tuple[str, int, dict[int, str]]] = {}
    frames = list(frames)
    for frame, name in zip(frames, names):
        bench = frame["benchmark"].iloc[0]
        version = int(frame["benchmark_version"].iloc[0])
        hashes = dict(zip(frame["episode"].tolist(), frame["episode_hash"].tolist()))
        if bench not in seen:
            seen[bench] = (name, version, hashes)
            continue
        first, v0, h0 = seen[bench]
        if version != v0:
            raise ResultsError(f"{name}: benchmark {bench} version {version}, but {first} has version {v0} "
                               "(mixed benchmark versions)")
        for ep, h in hashes.items():
            if ep in h0 and h0[ep] != h:
                raise ResultsError(f"{name}: episode {ep} of {bench} has hash {h}, but {first} has {h0[ep]} "
                                   "(not the same test episodes)")
    return pd.concat(frames, ignore_index=True)


def fingerprint_conflicts(cards: Iterable[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """Runs of one benchmark whose cards record other data (cache content fingerprints) for a source.

    cards: (label, run card) pairs. Cards without `data_fingerprints` (older runs) are not compared.
    Returns one message per conflict (empty: the runs were made on the same data).
    """
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    out = []
    for label, card in cards:
        for source, fp in (card.get("data_fingerprints") or {}).items():
            key = (str(card.get("benchmark")), str(source))
            if key not in seen:
                seen[key] = (label, str(fp))
            elif seen[key][1] != str(fp):
                out.append(f"{label}: ran {key[0]} on {source} data with fingerprint {fp}, but {seen[key][0]} "
                           f"on data with fingerprint {seen[key][1]} (another or a modified cache): not comparable")
    return out

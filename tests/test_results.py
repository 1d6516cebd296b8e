"""Result files: writing, reading, and a clear error for every kind of malformed file."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.errors import ResultsError
from bench.results import COLUMNS, read_csv, read_results, run_paths, write_run


def make_rows(method="maml", seed=0, n=5, bench="synthetic-5w1s", version=1, hashes=None):
    return [{"benchmark": bench, "benchmark_version": version, "split": "test", "episode": i,
             "episode_hash": (hashes or [f"h{j:03d}" for j in range(n)])[i], "method": method,
             "params_hash": "p", "seed": seed, "code_rev": "abc", "device": "cpu", "way": 5,
             "n_support": 5, "n_query": 75, "accuracy": 0.2 * (i % 5), "loss": 1.0,
             "adapt_seconds": 0.01, "fit_episodes": 10, "fit_seconds": 1.5} for i in range(n)]


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_roundtrip(tmp_path):
    path = write_run(tmp_path, make_rows(), {"method": "maml"})
    assert path == run_paths(tmp_path, "synthetic-5w1s", "maml", 0)[0]
    frame = read_results(tmp_path)
    assert list(frame.columns) == COLUMNS and len(frame) == 5
    assert frame["accuracy"].tolist() == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("mutate, message", [
    (lambda r: [{k: v for k, v in x.items() if k != "accuracy"} for x in r], "missing column"),
    (lambda r: [x | {"extra": 1} for x in r], "unexpected column"),
    (lambda r: [x | ({"accuracy": float("nan")} if x["episode"] == 2 else {}) for x in r], "row 4: column 'accuracy'"),
    (lambda r: [x | ({"accuracy": 1.5} if x["episode"] == 1 else {}) for x in r], "outside \\[0, 1\\]"),
    (lambda r: [x | ({"accuracy": -0.1} if x["episode"] == 1 else {}) for x in r], "outside \\[0, 1\\]"),
    (lambda r: [x | ({"way": "five"} if x["episode"] == 0 else {}) for x in r], "column 'way'"),
    (lambda r: [x | ({"episode": 1.5} if x["episode"] == 0 else {}) for x in r], "must be an integer"),
    (lambda r: [x | ({"benchmark_version": 2} if x["episode"] == 0 else {}) for x in r], "mixed benchmark versions"),
    (lambda r: [x | ({"method": "other"} if x["episode"] == 0 else {}) for x in r], "one file holds one run"),
    (lambda r: r + [r[0]], "appears twice"),
    (lambda r: [x | {"fit_seconds": float("inf")} for x in r], "not finite"),
    (lambda r: r[:0], "no rows|not a readable CSV"),
])
def test_malformed_files_name_file_and_problem(tmp_path, mutate, message):
    path = write_csv(tmp_path / "b" / "m" / "seed0.csv", mutate(make_rows()))
    with pytest.raises(ResultsError, match=message) as info:
        read_csv(path)
    assert str(path) in str(info.value)


def test_not_a_csv(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"\x00\x01garbage\n\"unterminated")
    with pytest.raises(ResultsError, match=str(path)):
        read_csv(path)


def test_mixed_versions_across_files(tmp_path):
    write_run(tmp_path, make_rows("a"), {})
    write_run(tmp_path, make_rows("b", version=2), {})
    with pytest.raises(ResultsError, match="mixed benchmark versions"):
        read_results(tmp_path)


def test_different_episodes_across_files(tmp_path):
    write_run(tmp_path, make_rows("a"), {})
    write_run(tmp_path, make_rows("b", hashes=[f"x{j}" for j in range(5)]), {})
    with pytest.raises(ResultsError, match="not the same test episodes"):
        read_results(tmp_path)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(ResultsError, match="not found"):
        read_results(tmp_path / "nope")
    with pytest.raises(ResultsError, match="no result CSVs"):
        read_results(tmp_path)


def test_invalid_rows_are_not_written(tmp_path):
    rows = make_rows()
    rows[0]["accuracy"] = 2.0
    with pytest.raises(ResultsError):
        write_run(tmp_path, rows, {})
    assert not list(tmp_path.rglob("*.csv"))

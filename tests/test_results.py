"""Result files: writing, reading, and a clear error for every kind of malformed file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bench.errors import ResultsError
from bench.results import ADDED_COLUMNS, COLUMNS, read_csv, read_results, run_paths, write_run


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


# ---------------------------------------------------------------------------------------------
# the columns added later (shot, inner_steps_test, adapt_batch): old files stay readable


REPO = Path(__file__).resolve().parents[1]


def test_old_files_without_the_added_columns_are_read_with_them_filled(tmp_path):
    old = [{k: v for k, v in r.items() if k not in ADDED_COLUMNS} for r in make_rows(n=40)]
    path = write_csv(tmp_path / "synthetic-5w1s" / "maml" / "seed0.csv", old)
    (tmp_path / "synthetic-5w1s" / "maml" / "seed0.json").write_text(json.dumps({"inner_steps_test": 10}))
    frame = read_csv(path)
    assert list(frame.columns) == COLUMNS
    assert set(frame["shot"]) == {1}  # the registered synthetic-5w1s protocol
    assert set(frame["inner_steps_test"]) == {10}  # from the run card
    assert frame["adapt_batch"].tolist() == [32] * 32 + [8] * 8  # the old evaluation chunks of 32
    (tmp_path / "synthetic-5w1s" / "maml" / "seed0.json").unlink()
    assert set(read_csv(path)["inner_steps_test"]) == {-1}  # unknown without a card


def test_unregistered_benchmark_shot_comes_from_the_rows(tmp_path):
    old = [{k: v for k, v in r.items() if k not in ADDED_COLUMNS} for r in make_rows(bench="mine-5w5s")]
    frame = read_csv(write_csv(tmp_path / "x" / "m" / "seed0.csv", old))
    assert set(frame["shot"]) == {1}  # n_support 5 / way 5


def test_reference_zoo_files_read_with_the_new_columns():
    frame = read_results(REPO / "results" / "zoo")
    assert list(frame.columns) == COLUMNS and len(frame) >= 600
    assert set(frame["shot"]) == {1} and (frame["adapt_batch"] >= 1).all()
    card = json.loads((REPO / "results/zoo/omniglot-small-5w1s/maml/seed0.json").read_text())
    assert set(frame.loc[frame["method"] == "maml", "inner_steps_test"]) == {card["inner_steps_test"]}


def test_new_files_carry_the_added_columns(tmp_path):
    rows = [r | {"shot": 1, "inner_steps_test": 3, "adapt_batch": 1} for r in make_rows()]
    frame = read_csv(write_run(tmp_path, rows, {}))
    assert frame["inner_steps_test"].tolist() == [3] * 5 and frame["adapt_batch"].tolist() == [1] * 5
    header = (tmp_path / "synthetic-5w1s" / "maml" / "seed0.csv").read_text().splitlines()[0]
    assert header.split(",") == COLUMNS


def test_adapt_seconds_is_per_episode_unless_episodes_are_adapted_together(synthetic_set):
    from baselines.chance import Chance
    from baselines.maml import FOMAML

    eps = synthetic_set.episodes("test", 34)
    alone = Chance().setup(synthetic_set.task_info()).evaluate(eps)
    assert [r["adapt_batch"] for r in alone] == [1] * 34  # the default adapt_many: timed one by one
    assert len({r["adapt_seconds"] for r in alone}) > 1
    together = FOMAML(hidden=4, inner_steps_test=1).setup(synthetic_set.task_info()).evaluate(eps)
    assert [r["adapt_batch"] for r in together] == [32] * 32 + [2] * 2  # its own task-batched adapt_many
    assert len({r["adapt_seconds"] for r in together[:32]}) == 1

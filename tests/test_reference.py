"""results/reference, the committed reference board: every run is a cell of its GRID.toml, its files are
intact, its rows are the benchmarks' hashed test episodes, and the README shows what `metabench table` prints.
results/reference-pending (the finished cells of a benchmark whose column is not complete yet) is held to the
same checks against the same GRID.toml."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from bench import grid
from bench.cli import main
from bench.results import find_csvs, read_axis, read_card, read_csv, read_results

REPO = Path(__file__).resolve().parents[1]
REF = REPO / "results" / "reference"
PENDING = REPO / "results" / "reference-pending"
FOLDERS = pytest.mark.parametrize("folder", [REF, PENDING], ids=["reference", "pending"])
README_START, README_END = "<!-- reference-table:start -->", "<!-- reference-table:end -->"


def committed_runs(folder: Path = REF) -> list[tuple[Path, dict]]:
    return [(csv, read_card(csv)) for csv in find_csvs(folder)] if folder.is_dir() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@FOLDERS
def test_every_run_is_a_cell_of_the_grid_file_with_its_settings(folder):
    spec = grid.spec_from(grid.load_grid_file(REF / "GRID.toml"))
    cells = {(c.label or c.method, c.benchmark, c.seed): c for c in spec.cells}
    assert len(cells) == len(spec.cells)
    for csv, card in committed_runs(folder):
        key = (card["method"], card["benchmark"], card["seed"])
        assert key in cells, f"{csv}: not a cell of results/reference/GRID.toml"
        cell = cells[key]
        cfg = grid.cell_config(cell, spec)
        assert (card["base_method"], card["overrides"], card["steps"]) == (cell.method, cell.overrides, cell.steps), csv
        assert card["val_episodes"] == cfg.val_episodes and card.get("axis_episodes") == cfg.axis_episodes, csv
        assert [c["step"] for c in card["curve"]] == list(range(0, cell.steps + 1, cfg.chunk)), csv


@FOLDERS
def test_committed_files_are_whole_and_the_pairs_their_cards_record(folder):
    runs = committed_runs(folder)
    if not runs:
        pytest.skip(f"no runs committed in {folder.name} yet")
    leftovers = [p for p in folder.rglob("*") if p.suffix in (".next", ".prev", ".tmp") or p.name.startswith(".")]
    assert not leftovers, f"half-written files: {leftovers[:3]}"
    frame = read_results(folder)  # columns, types, one version and one set of episode hashes per benchmark
    assert set(frame["split"]) == {"test"}
    for csv, card in runs:
        assert card["csv_sha256"] == sha256(csv), csv
        rows = read_csv(csv)
        assert len(rows) == card["test_episodes"] and sorted(rows["episode"]) == list(range(card["test_episodes"]))
        for axis, entry in (card.get("axes") or {}).items():
            path = csv.with_suffix(f".{axis}.csv")
            assert entry["sha256"] == sha256(path), path
            table = read_axis(csv, axis)
            assert set(table["episode"]) == set(range(min(card["test_episodes"], card.get("axis_episodes") or 10**9)))


@pytest.mark.slow
@FOLDERS
def test_every_row_is_the_benchmarks_hashed_test_episode(folder, shared_data, data_root, tmp_path_factory):
    from bench.benchmarks import load
    from bench.sources import meta_dataset as md

    frame = read_results(folder) if committed_runs(folder) else None
    if frame is None:
        pytest.skip(f"no runs committed in {folder.name} yet")
    for bench, rows in frame.groupby("benchmark"):
        root = data_root
        if bench.startswith("md-"):
            root = tmp_path_factory.mktemp("md-root")
            md.prepare(shared_data / "meta_dataset" / "omniglot_small", root, 84,
                       opts=md.BuildOptions(workers=1, show_progress=False, say=lambda _: None))
        es = load(str(bench), root)
        pairs = set(zip(rows["episode"].astype(int), rows["episode_hash"]))
        wrong = [(i, h) for i, h in sorted(pairs) if es.describe("test", i).hash != h]
        assert not wrong, f"{bench}: rows whose episode hash is not the benchmark's: {wrong[:3]}"


def test_the_readme_shows_the_table_metabench_table_prints(capsys):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert README_START in text and README_END in text
    shown = text.split(README_START, 1)[1].split(README_END, 1)[0].strip("\n")
    assert main(["table", str(REF)]) == 0
    printed = capsys.readouterr().out.strip("\n")
    assert shown == printed, "README.md's reference table is stale: run scripts/reference_table.py"
    assert re.search(r"metabench grid results/reference/GRID\.toml", text)

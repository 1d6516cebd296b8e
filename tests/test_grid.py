"""`metabench grid`: cells are runs; local processes and a real Ray cluster give the same numbers as
sequential runs; failures are retried or reported; a finished grid does nothing."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from bench import grid
from bench.cli import main
from bench.results import find_csvs, read_csv
from bench.runner import RunConfig, RunDirs, run

REPO = Path(__file__).resolve().parent.parent
TINY = dict(meta_batch=2, hidden=4, inner_steps_test=1)
NUMBERS = ["episode", "episode_hash", "accuracy", "loss", "params_hash", "fit_episodes"]

KILLER = '''
import os
from dataclasses import dataclass
from typing import ClassVar
from baselines.maml import FOMAML


@dataclass
class KillOnce(FOMAML):
    """First-order MAML whose process dies once, in its second outer step (test-only)."""

    PARALLEL_TASKS: ClassVar[bool] = True
    TASK_BATCHED: ClassVar[bool] = True

    def outer_step(self, batch):
        marker = os.environ["KILL_MARKER"]
        if self.fit_steps == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(17)
        super().outer_step(batch)
'''


def spec_for(tmp: Path, methods: list[str], seeds: str = "0-1", **extra) -> grid.GridSpec:
    fields = {"methods": methods, "benchmarks": ["synthetic-5w1s"], "seeds": seeds, "steps": 3, "chunk": 1,
              "val_episodes": 2, "test_episodes": 6, "set": TINY, "results": str(tmp / "results"),
              "runs": str(tmp / "runs"), "root": str(tmp / "root"), "threads": 1, **extra}
    return grid.spec_from(fields)


def numbers(results: Path) -> pd.DataFrame:
    frames = [read_csv(p) for p in find_csvs(results)]  # (not the evaluation-axis files beside them)
    return pd.concat(frames).sort_values(["method", "seed", "episode"])[["method", "seed", *NUMBERS]].reset_index(drop=True)


@pytest.fixture()
def killer(tmp_path, monkeypatch):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "killer_method.py").write_text(textwrap.dedent(KILLER))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "mods"), str(REPO)]))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setenv("KILL_MARKER", str(tmp_path / "killed-once"))
    return tmp_path / "killed-once"


def sequential(tmp: Path, methods: list[str]) -> pd.DataFrame:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dirs = RunDirs(tmp / "root", tmp / "results", tmp / "runs")
        for m in methods:
            for seed in (0, 1):
                run(RunConfig(m, "synthetic-5w1s", seed, 3, chunk=1, val_episodes=2, test_episodes=6,
                              overrides=dict(TINY)), dirs, progress=False)
    finally:
        torch.set_num_threads(before)
    return numbers(tmp / "results")


@pytest.mark.slow
def test_local_grid_equals_sequential_runs_and_survives_a_killed_worker(tmp_path, killer):
    spec = spec_for(tmp_path / "grid", ["fomaml", "killer_method:KillOnce"], workers=2)
    outcomes = grid.run_grid(spec, quiet=True)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert killer.exists()  # the KillOnce cell died once and was retried, resuming from its checkpoint
    assert max(o.attempts for o in outcomes) == 2
    got = numbers(tmp_path / "grid" / "results")
    want = sequential(tmp_path / "seq", ["fomaml", "killer_method:KillOnce"])
    got["method"] = got["method"].str.replace("killer_method_KillOnce", "K").str.split("+").str[0]
    want["method"] = want["method"].str.replace("killer_method_KillOnce", "K").str.split("+").str[0]
    pd.testing.assert_frame_equal(got, want)

    # a finished grid does no training: no checkpoint is written, nothing changes
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "grid").rglob("*") if p.is_file()}
    again = grid.run_grid(spec, quiet=True)
    assert all(o.ok and o.attempts == 0 for o in again)  # skipped by the driver: no worker process started
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "grid").rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.slow
def test_ray_cluster_grid_equals_local_and_retries_a_dead_worker(tmp_path, killer, monkeypatch):
    """A real local Ray cluster (started by the grid's ray.init, shut down after it)."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_DISABLE_USAGE_STATS", "1")
    spec = spec_for(tmp_path / "ray", ["fomaml", "killer_method:KillOnce"])
    outcomes = grid.run_grid(spec, use_ray=True, quiet=True)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert killer.exists()  # Ray retried the task whose worker died
    local = spec_for(tmp_path / "local", ["fomaml", "killer_method:KillOnce"], workers=2)
    assert all(o.ok for o in grid.run_grid(local, quiet=True))
    pd.testing.assert_frame_equal(numbers(tmp_path / "ray" / "results"), numbers(tmp_path / "local" / "results"))
    assert not (tmp_path / "ray" / "runs" / ".ray-results-unused").exists()  # results only on the driver


def test_a_bad_cell_is_reported_and_the_others_finish(tmp_path, capsys):
    args = ["grid", "--methods", "fomaml,chance", "--benchmarks", "synthetic-5w1s", "--seeds", "0", "--steps", "1",
            "--chunk", "1", "--val-episodes", "2", "--test-episodes", "4", "--set", "hidden=4",
            "--set", "meta_batch=1", "--results", str(tmp_path / "res"), "--runs", str(tmp_path / "runs"),
            "--root", str(tmp_path / "root"), "--threads", "1", "--retries", "0", "--quiet", "--no-site"]
    assert main(args) == 1  # chance has no hidden/meta_batch hyperparameters: its cell fails
    err = capsys.readouterr().err
    assert "1 cell(s) failed" in err and "chance" in err and "has no hyperparameter" in err
    assert list((tmp_path / "res" / "synthetic-5w1s").iterdir())[0].name.startswith("fomaml+")


def test_seeds_and_grid_files(tmp_path):
    assert grid.parse_seeds("0-2") == [0, 1, 2] and grid.parse_seeds("0,3,5") == [0, 3, 5]
    assert grid.parse_seeds([4]) == [4]
    with pytest.raises(grid.MetabenchError, match="not a seed"):
        grid.parse_seeds("a-b")
    path = tmp_path / "GRID.toml"
    path.write_text(textwrap.dedent("""
        methods = ["maml", "fomaml"]
        benchmarks = ["synthetic-5w1s", "glyphs-5w1s"]
        seeds = "0-1"
        steps = 10
        results = "out"
        [benchmark_steps]
        "glyphs-5w1s" = 20
        [set]
        hidden = 8
        [method_set.maml]
        hidden = 16
        [label]
        maml = "maml-small"
        [[part]]
        methods = ["maml"]
        benchmarks = ["glyphs-5w1s"]
        seeds = [3]
        steps = 300
        chunk = 100
        patience = 2
        label = {maml = "maml-long"}
        method_set = {maml = {hidden = 32}}
        [[part]]
        benchmarks = ["omniglot-small-5w1s"]
        seeds = "0"
        axis_episodes = 50
        fused = true
        method_set = {fomaml = {meta_batch = 2}}
    """))
    spec = grid.spec_from(grid.load_grid_file(path))
    assert len(spec.cells) == 11 and spec.results == tmp_path / "out"
    maml_glyphs = [c for c in spec.cells[:8] if c.method == "maml" and c.benchmark == "glyphs-5w1s"]
    assert {c.steps for c in maml_glyphs} == {20} and maml_glyphs[0].overrides == {"hidden": 16}
    assert maml_glyphs[0].label == "maml-small"
    long = spec.cells[8]
    assert (long.method, long.benchmark, long.seed, long.steps, long.label) == ("maml", "glyphs-5w1s", 3, 300,
                                                                                "maml-long")
    cfg = grid.cell_config(long, spec)
    assert (cfg.chunk, cfg.patience, cfg.overrides) == (100, 2, {"hidden": 32})  # the part's method_set replaces
    args = grid.run_args_cli(long, spec)
    assert args[args.index("--chunk") + 1] == "100" and args[args.index("--patience") + 1] == "2"
    part2 = {c.method: c for c in spec.cells[9:]}
    assert set(part2) == {"maml", "fomaml"} and {c.benchmark for c in part2.values()} == {"omniglot-small-5w1s"}
    assert part2["maml"].steps == 10 and part2["maml"].label == "maml-small"  # the grid's steps and label
    assert part2["maml"].overrides == {"hidden": 16} and part2["fomaml"].overrides == {"hidden": 8, "meta_batch": 2}
    assert grid.cell_config(part2["maml"], spec).axis_episodes == 50 and spec.cells[0].run_args == {}
    assert grid.cell_config(part2["maml"], spec).fused and not grid.cell_config(long, spec).fused
    assert "--fused" in grid.run_args_cli(part2["maml"], spec) and "--fused" not in args
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    assert grid.SWITCHES == {k: defaults[k] for k in grid.SWITCHES}  # the flags given are the non-defaults
    off = grid.run_args_cli(dataclasses.replace(part2["maml"], run_args={"step_curve": False, "flops": True}), spec)
    assert "--no-step-curve" in off and "--no-flops" not in off and "--flops" not in off
    path.write_text('methods = ["maml"]\nbenchmarks = ["synthetic-5w1s"]\n[[part]]\nfused = "yes"\n')
    with pytest.raises(grid.MetabenchError, match=r"GRID.toml: \[\[part\]\] number 1: fused must be true or false, "
                                                  "not 'yes'"):
        grid.load_grid_file(path)
    path.write_text('methods = ["maml"]\nbenchmarks = ["synthetic-5w1s"]\nresult = "x"\n')
    with pytest.raises(grid.MetabenchError, match="unknown key"):
        grid.load_grid_file(path)
    path.write_text('methods = ["maml"]\nbenchmarks = ["synthetic-5w1s"]\n[[part]]\nmethod = "maml"\n')
    with pytest.raises(grid.MetabenchError, match=r"GRID.toml: \[\[part\]\] number 1: unknown key\(s\) \['method'\]"):
        grid.load_grid_file(path)
    path.write_text('methods = ["maml"]\nbenchmarks = ["synthetic-5w1s"]\nresults = "o"\n[[part]]\nsteps = 3\n')
    with pytest.raises(grid.MetabenchError, match="two cells of the grid write the same results: maml synthetic-5w1s "
                                                  "seed 0 .steps None. and maml synthetic-5w1s seed 0 .steps 3.; give"):
        grid.spec_from(grid.load_grid_file(path))


def test_workers_times_threads_never_exceed_the_cores(monkeypatch):
    monkeypatch.setattr("bench.runner.available_cores", lambda: 4)
    spec = grid.GridSpec(tuple(grid.Cell("maml", "synthetic-5w1s", s) for s in range(9)), Path("r"), Path("u"),
                         Path("o"))
    assert grid.slots(spec) == (4, 1)
    assert grid.slots(grid.GridSpec(spec.cells, spec.results, spec.runs, spec.root, workers=2)) == (2, 2)
    assert grid.slots(grid.GridSpec(spec.cells, spec.results, spec.runs, spec.root, workers=2, threads=8)) == (2, 2)


def test_benchmark_files_of_every_part_are_relative_to_the_grid_file(tmp_path):
    path = tmp_path / "sub" / "GRID.toml"
    path.parent.mkdir()
    path.write_text(textwrap.dedent("""
        methods = ["maml"]
        benchmarks = ["a.toml"]
        [[part]]
        benchmarks = ["b.toml", "glyphs-5w1s"]
        [[part]]
        benchmarks = ["c.toml"]
        flops = false
    """))
    data = grid.load_grid_file(path)
    assert data["benchmarks"] == [str(tmp_path / "sub" / "a.toml")]
    assert [p["benchmarks"] for p in data["part"]] == [[str(tmp_path / "sub" / "b.toml"), "glyphs-5w1s"],
                                                       [str(tmp_path / "sub" / "c.toml")]]
    path.write_text('methods = ["maml"]\nbenchmarks = ["glyphs-5w1s"]\nstep_curve = 1\n')
    with pytest.raises(grid.MetabenchError, match=r"GRID.toml: step_curve must be true or false, not 1"):
        grid.load_grid_file(path)


def test_the_command_line_picks_cells_of_a_grid_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "GRID.toml"
    path.write_text(textwrap.dedent("""
        methods = ["maml", "fomaml"]
        benchmarks = ["synthetic-5w1s", "glyphs-5w1s"]
        seeds = "0-2"
        results = "out"
        [[part]]
        methods = ["maml"]
        benchmarks = ["glyphs-5w1s"]
        seeds = "0"
        steps = 300
        label = {maml = "maml-long"}
        [[part]]
        methods = ["fomaml"]
        benchmarks = ["b.toml"]
        seeds = "1"
        steps = 7
        chunk = 7
    """))
    spec = grid.spec_from(grid.load_grid_file(path))
    assert len(spec.cells) == 14

    def pick(**chosen):
        return grid.pick_cells(spec, path, {"methods": None, "benchmarks": None, "seeds": None, **chosen}).cells

    assert pick() == spec.cells
    long = pick(methods="maml-long")  # a labelled cell by its row name, with its part's settings
    assert [(c.method, c.benchmark, c.seed, c.steps) for c in long] == [("maml", "glyphs-5w1s", 0, 300)]
    assert {(c.benchmark, c.seed) for c in pick(methods="maml")} == {(b, s) for b in ("synthetic-5w1s", "glyphs-5w1s")
                                                                     for s in (0, 1, 2)}
    monkeypatch.chdir(tmp_path)  # a benchmark file given relative to where the command runs
    [part2] = pick(benchmarks="b.toml")
    assert (part2.method, part2.seed, part2.steps, part2.run_args) == ("fomaml", 1, 7, {"chunk": 7})
    assert [(c.method, c.seed) for c in pick(methods="fomaml,maml", benchmarks="glyphs-5w1s", seeds="1-2")] == [
        ("maml", 1), ("maml", 2), ("fomaml", 1), ("fomaml", 2)]
    with pytest.raises(grid.MetabenchError, match=r"GRID.toml: --methods: no cell of this grid has 'anil' \(it has "
                                                  r"fomaml, maml, maml-long\)"):
        pick(methods="maml,anil")
    with pytest.raises(grid.MetabenchError, match=r"GRID.toml: --seeds: no cell of this grid has 5"):
        pick(seeds="5")
    with pytest.raises(grid.MetabenchError, match="no cell of this grid has all of the --methods, --benchmarks and "):
        pick(methods="maml-long", seeds="1")
    from bench.cli import build_parser

    args = build_parser().parse_args(["grid", str(path), "--benchmarks", "b.toml", "--chunk", "2", "--test-episodes",
                                      "4"])
    [cell] = grid.grid_spec(args).cells  # the run flags given win over the part's own chunk
    assert cell.run_args == {"chunk": 2, "test_episodes": 4} and grid.cell_config(cell, spec).chunk == 2
    flags = build_parser().parse_args(["grid", "--methods", "maml", "--benchmarks", "glyphs-5w1s", "--results", "r"])
    assert [c.seed for c in grid.grid_spec(flags).cells] == [0]  # without a file: seed 0 unless --seeds
    for flags in (["--steps", "5"], ["--set", "hidden=4"]):
        assert main(["grid", str(path), "--methods", "maml", *flags]) == 2
        assert "GRID.toml: the grid file sets each cell's steps and hyperparameters" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written
    path.write_text('methods = ["chance", "fomaml"]\nbenchmarks = ["synthetic-5w1s"]\nseeds = "0-1"\nresults = "out"\n'
                    'runs = "runs"\nroot = "root"\ntest_episodes = 4\n')
    assert main(["grid", str(path), "--methods", "chance", "--seeds", "1", "--quiet", "--no-site"]) == 0
    assert "1 of 1 cells done" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out" / "synthetic-5w1s").glob("*/seed*.json")] == ["seed1.json"]
    assert main(["grid", str(path), "--methods", "chance", "--quiet", "--no-site"]) == 0
    assert "1 of 2 cells already finished: skipped" in capsys.readouterr().out

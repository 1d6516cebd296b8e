"""The command line: ls, run, leaderboard, errors with suggestions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.cli import main


def test_ls(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "maml" in out and "glyphs-5w1s" in out and "synthetic" in out


def test_unknown_names_suggest(capsys):
    assert main(["run", "mamll", "synthetic-5w1s", "--root", "/tmp/none"]) == 2
    assert "Did you mean 'maml'" in capsys.readouterr().err
    assert main(["run", "maml", "glyphs-5w1", "--root", "/tmp/none"]) == 2
    assert "Did you mean 'glyphs-5w1s'" in capsys.readouterr().err


def test_run_then_leaderboard(tmp_path, capsys):
    res = tmp_path / "res"
    args = ["--steps", "2", "--chunk", "1", "--val-episodes", "3", "--test-episodes", "5", "--results", str(res),
            "--runs", str(tmp_path / "runs"), "--root", str(tmp_path / "root"),
            "--set", "meta_batch=2", "--set", "hidden=8", "--set", "inner_steps_test=1", "--label", "fomaml"]
    assert main(["run", "fomaml", "synthetic-5w1s", *args]) == 0
    assert main(["run", "chance", "synthetic-5w1s", *args[:-8]]) == 0
    assert (res / "synthetic-5w1s" / "fomaml" / "seed0.csv").exists()
    out = tmp_path / "site" / "index.html"
    assert main(["leaderboard", str(res), "-o", str(out)]) == 0
    html = out.read_text()
    assert "fomaml" in html and "chance" in html


def test_bad_override_is_a_clear_error(capsys):
    assert main(["run", "maml", "synthetic-5w1s", "--set", "inner_lr", "--root", "/tmp/none"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_python_dash_m_bench():
    out = subprocess.run([sys.executable, "-m", "bench", "ls"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "benchmarks:" in out.stdout


def test_every_flag_of_every_command_has_help():
    import argparse

    from bench.cli import build_parser

    def walk(parser: argparse.ArgumentParser, where: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield where, action

    missing = [f"{where} {'/'.join(a.option_strings) or a.dest}" for where, a in walk(build_parser(), "metabench")
               if not a.help]
    assert not missing, missing


def test_demo_trains_tests_and_builds_the_page(tmp_path, capsys, monkeypatch):
    """The README's first command, at a tiny budget: three methods, their CSVs, axes on the first
    DEMO_AXIS_EPISODES test episodes only, and the page."""
    import pandas as pd

    from bench import cli

    tiny = dict(meta_batch=2, hidden=8, inner_steps_test=1)
    monkeypatch.setattr(cli, "DEMO_BENCHMARK", "synthetic-5w1s")
    monkeypatch.setattr(cli, "DEMO_VAL_EPISODES", 3)
    monkeypatch.setattr(cli, "DEMO_AXIS_EPISODES", 4)
    monkeypatch.setattr(cli, "DEMO_PLAN", {m: dict(steps=2, chunk=1, overrides=o) for m, o in
                                           [("maml", tiny), ("fomaml", tiny), ("finetune", dict(hidden=8))]})
    assert main(["demo", "--out", str(tmp_path / "demo"), "--root", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    res = tmp_path / "demo" / "results" / "synthetic-5w1s"
    for method in ("maml", "fomaml", "finetune"):
        assert len(pd.read_csv(res / method / "seed0.csv")) == 50
        assert any(line.split()[:1] == [method] and "(50 test episodes)" in line for line in out.splitlines())
    steps = pd.read_csv(res / "maml" / "seed0.steps.csv")
    assert sorted(steps["episode"].unique()) == [0, 1, 2, 3]
    assert (tmp_path / "demo" / "site" / "index.html").exists()

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

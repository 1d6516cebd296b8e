"""What a researcher reads: `compare`, `table`, the lines of `run` (progress, summary, preset note), and the
command line itself (--version, --help, one-line errors, commands that write no data)."""

from __future__ import annotations

import argparse
import io
import re

import numpy as np
import pandas as pd
import pytest
import torch

from bench import runner, stats
from bench.cli import build_parser, main
from bench.report import compare_table, format_table, main_table, preset_note
from bench.results import read_results, write_run
from bench.runner import RunConfig, RunDirs, run

BENCH = "toy-5w1s"


def rows(bench, method, seed, accs):
    return [{"benchmark": bench, "benchmark_version": 1, "split": "test", "episode": i, "episode_hash": f"h{i:03d}",
             "method": method, "params_hash": "p", "seed": seed, "code_rev": "r", "device": "cpu", "way": 5,
             "n_support": 5, "n_query": 75, "accuracy": float(a), "loss": 1.0, "adapt_seconds": 0.01,
             "fit_episodes": 10, "fit_seconds": 2.0} for i, a in enumerate(accs)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(3)
    base = rng.uniform(0.3, 0.9, 60)
    for seed in (0, 1, 2):
        for method, shift in (("maml", 0.0), ("my_method", 0.05), ("chance", -0.3)):
            write_run(root, rows(BENCH, method, seed, np.clip(base + shift + rng.normal(0, 0.01, 60), 0, 1)), {})
        write_run(root, rows("other-5w5s", "maml", seed, np.clip(base - 0.1, 0, 1)), {})
    return root


def test_compare_is_the_paired_statistic_on_identical_episodes(results, capsys):
    frame = read_results(results)
    table = compare_table(frame, "my_method", "maml")
    assert table["benchmark"].tolist() == [BENCH]  # the only benchmark both have
    expected = stats.paired(frame, BENCH, "my_method", "maml")
    row = table.iloc[0]
    assert row["diff"] == pytest.approx(expected.diff) and row["p_value"] == pytest.approx(expected.p_value)
    assert row["n"] == 60 and row["seeds_a"] == 3 and 0.04 < row["diff"] < 0.06 and row["ci_low"] > 0
    assert main(["compare", str(results), "my_method", "maml", "--benchmark", BENCH]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(rf"{BENCH}: my_method - maml = \+\d\.\d\d points, paired bootstrap 95% CI \[\+\d\.\d\d, "
                        r"\+\d\.\d\d\], Wilcoxon p = \S+, n = 60 paired episodes \(seeds: my_method 3, maml 3\)\n", out)


@pytest.mark.parametrize("argv, message", [
    (["maml", "nope"], "no results of method 'nope' (methods: chance, maml, my_method)"),
    (["maml", "chance", "--benchmark", "nowhere"], "no results on benchmark 'nowhere'"),
])
def test_compare_errors_are_one_line(results, capsys, argv, message):
    assert main(["compare", str(results), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_table_formats(results, tmp_path, capsys):
    benchmarks, table = main_table(read_results(results))
    assert benchmarks == ["other-5w5s", BENCH] and [r["method"] for r in table][0] == "my_method"
    md = format_table(benchmarks, table, "md")
    assert md.splitlines()[0] == f"| Method | other-5w5s | {BENCH} | Avg. rank |"
    assert re.search(r"\| my_method \| — \| \*\*\d+\.\d\d ± \d\.\d\d\*\* \| 1\.00 \|", md)
    latex = format_table(benchmarks, table, "latex")
    assert r"\toprule" in latex and r"my\_method" in latex and r"\textbf{$" in latex and r"\pm" in latex
    csv = pd.read_csv(io.StringIO(format_table(benchmarks, table, "csv")))
    assert list(csv.columns)[:5] == ["method", "other-5w5s mean", "other-5w5s ci95", "other-5w5s rank", "other-5w5s seeds"]
    assert csv.loc[csv["method"] == "my_method", f"{BENCH} rank"].item() == 1
    out = tmp_path / "table.tex"
    assert main(["table", str(results), "--format", "latex", "-o", str(out)]) == 0
    assert out.read_text().startswith(r"\begin{tabular}")  # -o honours the file name
    assert main(["table", str(results)]) == 0
    assert capsys.readouterr().out.startswith("| Method |")


def test_table_lists_a_long_budget_apart_and_ranks_the_board_without_it(tmp_path, capsys):
    rng = np.random.default_rng(5)
    base = rng.uniform(0.3, 0.8, 40)
    for seed in (0, 1, 2):
        for method, shift in (("maml", 0.0), ("fomaml", -0.05), ("protonet", 0.02)):
            write_run(tmp_path, rows(BENCH, method, seed, np.clip(base + shift, 0, 1)), {"steps": 200})
    write_run(tmp_path, rows(BENCH, "maml-long", 0, np.clip(base + 0.15, 0, 1)), {"steps": 3000})
    assert main(["table", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    main_part, other = out.split("Other budgets (not ranked against the table above):")
    assert "maml-long" not in main_part and re.search(r"\| protonet \| \*\*\d", main_part)  # the best at 200 steps
    assert re.search(r"\| maml-long \| toy-5w1s \| 3000 \(table: 200\) \| \d+\.\d\d ± \d\.\d\d \| 1 \|", other)
    assert main(["table", str(tmp_path), "--format", "latex"]) == 0
    assert r"maml-long & toy-5w1s & 3000 &" in capsys.readouterr().out
    assert main(["table", str(tmp_path), "--format", "csv"]) == 0
    assert "maml-long" not in capsys.readouterr().out  # the CSV is the board's table


# ---------------------------------------------------------------------------------------------
# run: progress every outer step and during validation, --quiet, the summary, the preset note


TINY = dict(meta_batch=2, hidden=8, inner_steps_test=1)


class Bar:
    """Records what the runner's progress bars are told."""

    made: list["Bar"] = []

    def __init__(self, *args, total=None, initial=0, desc=None, disable=False, **kwargs):
        self.total, self.desc, self.disable, self.updates = total, desc, disable, []
        Bar.made.append(self)

    def update(self, n=1):
        self.updates.append(n)

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_progress_moves_every_outer_step_and_during_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "tqdm", Bar)
    Bar.made = []
    cfg = RunConfig("fomaml", "synthetic-5w1s", 0, steps=4, chunk=2, val_episodes=40, test_episodes=5, overrides=TINY,
                    label="fomaml")
    run(cfg, RunDirs(tmp_path / "root", tmp_path / "res", tmp_path / "runs"))
    fit = [b for b in Bar.made if b.desc and b.desc.startswith("fit")]
    val = [b for b in Bar.made if b.desc and b.desc.startswith("validate")]
    assert len(fit) == 1 and fit[0].updates == [1, 1, 1, 1]  # every outer step
    assert len(val) == 3 and all(b.total == 40 and b.updates == [32, 8] for b in val)  # step 0, 2, 4
    Bar.made = []
    run(cfg, RunDirs(tmp_path / "root", tmp_path / "res2", tmp_path / "runs2"), progress=False)
    assert all(b.disable or b.desc is None for b in Bar.made)


def test_fitting_one_step_at_a_time_is_fitting_all_at_once(synthetic_set):
    from baselines.maml import FOMAML

    whole = FOMAML(**TINY).setup(synthetic_set.task_info())
    whole.fit(synthetic_set.stream("train"), 4)
    steps = FOMAML(**TINY).setup(synthetic_set.task_info())
    for _ in range(4):
        steps.fit(synthetic_set.stream("train", start=steps.fit_episodes), 1)
    a, b = whole.state_dict(), steps.state_dict()
    assert all(torch.equal(a["meta"][k], b["meta"][k]) for k in a["meta"])


def test_run_prints_its_summary_and_quiet_means_quiet(tmp_path, capsys):
    args = ["run", "fomaml", "synthetic-5w1s", "--steps", "2", "--chunk", "1", "--val-episodes", "3",
            "--test-episodes", "10", "--results", str(tmp_path / "res"), "--runs", str(tmp_path / "runs"),
            "--root", str(tmp_path / "root"), "--label", "fomaml", "--quiet"]
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    assert main([*args, *sets]) == 0
    captured = capsys.readouterr()
    assert "fit fomaml" not in captured.err and "validate" not in captured.err
    lines = captured.out.splitlines()
    assert re.fullmatch(r"fomaml on synthetic-5w1s, seed 0: \d+\.\d\d% ± \d+\.\d\d% \(95% CI over 10 test episodes\)",
                        lines[0])
    assert "1 seed so far" in lines[1] and "for 2 outer steps" in lines[2]
    assert lines[-1] == f"results: {tmp_path / 'res' / 'synthetic-5w1s' / 'fomaml' / 'seed0.csv'}"  # last: grid reads it
    assert f"checkpoint: {tmp_path / 'runs'}" in captured.out and "run card: " in captured.out
    assert main([*args, *sets, "--seed", "1"]) == 0
    assert "2 seeds of fomaml here" in capsys.readouterr().out


def test_a_run_without_steps_says_what_the_preset_means(tmp_path):
    cfg = RunConfig("fomaml", "synthetic-5w1s", 0, overrides=TINY, label="fomaml")
    note = preset_note(cfg, RunDirs(tmp_path / "root", tmp_path / "res", tmp_path / "runs"))
    steps = runner.plan(cfg, RunDirs(tmp_path, tmp_path, tmp_path)).steps  # the preset's own count
    assert re.fullmatch(rf"no --steps: the fomaml preset for synthetic-5w1s means {steps} outer steps \(Finn.*\); at "
                        r"\S+ s per step here, fitting takes about [\d.]+ (s|min|h) \(plus validation and testing\)", note)
    assert not (tmp_path / "runs").exists()  # timed on a throwaway learner: no checkpoint, no results
    assert preset_note(RunConfig("fomaml", "synthetic-5w1s", 0, steps=5), RunDirs(tmp_path, tmp_path, tmp_path)) is None


# ---------------------------------------------------------------------------------------------
# the command line


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == "metabench 0.1.0"


UNDOCUMENTED = {("perf", "--allocators")}  # bench/perf.py: its owner adds the help text


def _commands(parser, prefix=""):
    """Every (sub)command's parser by its name ("data prepare", ...)."""
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, p in a.choices.items():
                out[(prefix + " " + name).strip()] = p
                out.update(_commands(p, prefix + " " + name))
    return out


def test_every_flag_has_help_and_help_shows_defaults():
    parser = build_parser()
    commands = _commands(parser)
    missing = [(name, a.option_strings[0] if a.option_strings else a.dest) for name, p in commands.items()
               for a in p._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert set(missing) <= UNDOCUMENTED, missing
    text = " ".join(commands["run"].format_help().split())
    assert "(default: 100)" in text and "(default: results)" in text  # --chunk, --results
    assert "(default: cpu)" in text and text.count("default:") >= 5
    assert "(default: 20)" in " ".join(commands["verify"].format_help().split())
    assert all(p.formatter_class.__name__ == "HelpFormatter" for p in commands.values())
    assert "{compare,table}" not in parser.format_help() and "compare" in parser.format_help()


def test_read_only_commands_write_no_data(tmp_path, monkeypatch, capsys):
    root = tmp_path / "cache"
    monkeypatch.setenv("METABENCH_ROOT", str(root))
    assert main(["ls"]) == 0
    assert main(["check", "chance"]) == 0
    capsys.readouterr()
    assert not root.exists()

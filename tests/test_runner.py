"""Runs: checkpoints, validation selection, resume-equals-uninterrupted, result rows."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import bench.runner as runner
from bench.results import COLUMNS, read_card, read_csv
from bench.runner import RunConfig, RunDirs, run

CFG = RunConfig("fomaml", "synthetic-5w1s", seed=3, steps=6, chunk=2, val_episodes=6, test_episodes=12,
                overrides=dict(meta_batch=2, inner_steps_test=2, hidden=8), label="fomaml")
TIMING = ["adapt_seconds", "fit_seconds", "code_rev"]


def dirs_in(path):
    return RunDirs(path / "root", path / "results", path / "runs")


class Killed(Exception):
    pass


def test_run_writes_one_row_per_test_episode_and_a_card(tmp_path):
    path = run(CFG, dirs_in(tmp_path), progress=False)
    frame = read_csv(path)
    assert list(frame.columns) == COLUMNS
    assert frame["episode"].tolist() == list(range(12))
    assert set(frame["method"]) == {"fomaml"} and set(frame["seed"]) == {3}
    card = read_card(path)
    assert card["tags"]["order"] == "first" and card["tags"]["bn_mode"] == "transductive"
    assert [p["step"] for p in card["curve"]] == [0, 2, 4, 6]
    best = max(card["curve"], key=lambda p: p["val_accuracy"])
    assert card["selected_step"] == best["step"]
    assert card["params"]["meta_batch"] == 2 and card["backbone"] == "conv4-8"


@pytest.mark.parametrize("kill_at", ["fit", "test"])
def test_killed_run_resumes_to_identical_results(tmp_path, monkeypatch, kill_at):
    whole = read_csv(run(CFG, dirs_in(tmp_path / "whole"), progress=False))

    calls = {"n": 0}
    if kill_at == "fit":
        original = runner.mean_accuracy

        def dying(learner, episodes, *rest):
            calls["n"] += 1
            if calls["n"] == 3:  # during the second chunk's validation, after its fit
                raise Killed()
            return original(learner, episodes, *rest)

        monkeypatch.setattr(runner, "mean_accuracy", dying)
    else:
        original = runner.write_run

        def dying(*args, **kwargs):
            raise Killed()

        monkeypatch.setattr(runner, "write_run", dying)
    with pytest.raises(Killed):
        run(CFG, dirs_in(tmp_path / "killed"), progress=False)
    monkeypatch.undo()
    assert not list((tmp_path / "killed").rglob("*.csv"))
    resumed = read_csv(run(CFG, dirs_in(tmp_path / "killed"), progress=False))
    pd.testing.assert_frame_equal(whole.drop(columns=TIMING), resumed.drop(columns=TIMING))
    a = read_card(run(CFG, dirs_in(tmp_path / "whole"), progress=False))
    b = read_card(resumed_path := runner.run_paths(tmp_path / "killed" / "results", "synthetic-5w1s", "fomaml", 3)[0])
    assert [p["val_accuracy"] for p in a["curve"]] == [p["val_accuracy"] for p in b["curve"]]
    assert resumed_path.exists()


def test_restart_moves_the_old_checkpoints_aside(tmp_path):
    d = dirs_in(tmp_path)
    first = read_csv(run(CFG, d, progress=False))
    folder = runner.run_dir(CFG, d, runner.build(CFG, d.root)[0])
    ckpt = torch.load(folder / "last.pt", weights_only=True)
    assert ckpt["learner"]["fit_steps"] == 6
    (folder / "marker").write_text("x")
    again = read_csv(run(CFG, d, restart=True, progress=False))
    assert not (folder / "marker").exists()
    (aside,) = folder.parent.glob(folder.name + ".old-*")
    assert (aside / "marker").read_text() == "x" and (aside / "last.pt").exists()  # nothing deleted
    pd.testing.assert_frame_equal(first.drop(columns=TIMING), again.drop(columns=TIMING))


def test_checkpoints_load_with_weights_only(tmp_path):
    d = dirs_in(tmp_path)
    run(CFG, d, progress=False)
    for pt in d.runs.rglob("*.pt"):
        state = torch.load(pt, weights_only=True)
        assert "learner" in state
    done = next(d.runs.rglob("done.json"))
    assert json.loads(done.read_text())["csv"].endswith("seed3.csv")


def test_more_steps_later_continue_the_same_run(tmp_path):
    """Asking for 6 steps after a 4-step run continues it: the same as asking for 6 at once."""
    short = RunConfig(**{**CFG.__dict__, "steps": 4})
    d = dirs_in(tmp_path / "a")
    run(short, d, progress=False)
    extended = read_csv(run(CFG, d, progress=False))
    whole = read_csv(run(CFG, dirs_in(tmp_path / "b"), progress=False))
    pd.testing.assert_frame_equal(whole.drop(columns=TIMING), extended.drop(columns=TIMING))
    with pytest.raises(runner.MetabenchError, match="beyond the 4 steps"):
        run(short, d, progress=False)


def test_plateau_rule():
    curve = [{"val_accuracy": a} for a in (0.2, 0.5, 0.4, 0.5)]
    assert runner.plateaued(curve, 2) and not runner.plateaued(curve, 3) and not runner.plateaued(curve, None)
    assert not runner.plateaued(curve + [{"val_accuracy": 0.6}], 2)


def test_patience_stops_early(tmp_path, monkeypatch):
    values = iter([0.5, 0.6, 0.55, 0.55, 0.9, 0.9])
    monkeypatch.setattr(runner, "mean_accuracy", lambda learner, episodes, *rest: next(values))
    cfg = RunConfig(**{**CFG.__dict__, "steps": 10, "chunk": 1, "patience": 2})
    card = read_card(run(cfg, dirs_in(tmp_path), progress=False))
    assert [p["step"] for p in card["curve"]] == [0, 1, 2, 3]
    assert card["selected_step"] == 1 and card["fit_steps"] == 3


def test_schedule_length_follows_the_run(tmp_path):
    """Reptile's annealing schedule (total_steps) is set to the run's length unless overridden."""
    cfg = RunConfig("reptile", "synthetic-5w1s", steps=7)
    learner, _ = runner.build(cfg, tmp_path)
    assert learner.total_steps == 7
    learner, _ = runner.build(RunConfig("reptile", "synthetic-5w1s", steps=7, overrides={"total_steps": 99}), tmp_path)
    assert learner.total_steps == 99


def test_unknown_method_fails_before_any_data_is_built(tmp_path):
    from bench.errors import MetabenchError

    root = tmp_path / "root"
    with pytest.raises(MetabenchError, match="unknown method 'nope'"):
        run(RunConfig("nope", "glyphs-5w1s", 0, 1), RunDirs(root, tmp_path / "results", root / "runs"))
    assert not root.exists()


def test_a_checkpoint_narrower_than_the_benchmark_names_max_way(tmp_path):
    """A benchmark redefined wider under the same name and version: the old checkpoint is refused."""
    import dataclasses

    from bench.benchmarks import SYNTHETIC
    from bench.errors import MetabenchError
    from bench.sampling import FixedEpisodes

    small = dict(meta_batch=1, hidden=4, inner_steps_test=1)
    narrow = dataclasses.replace(SYNTHETIC, protocol=FixedEpisodes(3, 1, 2))
    run(RunConfig("fomaml", narrow, steps=1, chunk=1, val_episodes=2, test_episodes=2, overrides=small),
        dirs_in(tmp_path), progress=False)
    wide = dataclasses.replace(SYNTHETIC, protocol=FixedEpisodes(5, 1, 2))
    with pytest.raises(MetabenchError, match="max_way=3.*synthetic-5w1s has episodes of up to 5 ways"):
        run(RunConfig("fomaml", wide, steps=2, chunk=1, val_episodes=2, test_episodes=2, overrides=small),
            dirs_in(tmp_path), progress=False)


# --- run identity and safety -----------------------------------------------------------------------
SMALL = dict(meta_batch=2, inner_steps_test=1, hidden=4)


def small_cfg(**kw):
    return RunConfig(**{**dict(method="fomaml", benchmark="synthetic-5w1s", seed=0, steps=2, chunk=1, val_episodes=2,
                               test_episodes=4, overrides=dict(SMALL)), **kw})


def snapshot(*folders):
    return {p: p.read_bytes() for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()}


def test_overrides_give_variant_labels_and_separate_files(tmp_path):
    d = dirs_in(tmp_path)
    a = run(small_cfg(), d, progress=False)
    b = run(small_cfg(overrides={**SMALL, "inner_lr": 0.05}), d, progress=False)
    assert a != b and a.parent.name.startswith("fomaml+") and b.parent.name.startswith("fomaml+")
    card = read_card(b)
    assert card["base_method"] == "fomaml" and card["overrides"]["inner_lr"] == 0.05
    assert set(read_csv(b)["method"]) == {b.parent.name} and card["method"] == b.parent.name
    plain = run(RunConfig("chance", "synthetic-5w1s", 0, 0, val_episodes=2, test_episodes=4), d, progress=False)
    assert plain.parent.name == "chance"  # no overrides: the method's own name


def test_a_clash_of_identities_is_an_error_naming_both_hashes_and_changes_nothing(tmp_path):
    d = dirs_in(tmp_path)
    run(small_cfg(label="mine"), d, progress=False)
    before = snapshot(d.results, d.runs)
    other = small_cfg(label="mine", overrides={**SMALL, "inner_lr": 0.05})
    with pytest.raises(runner.MetabenchError, match="params_hash .* this run has params_hash") as e:
        run(other, d, progress=False)
    first = read_card(d.results / "synthetic-5w1s" / "mine" / "seed0.csv")["params_hash"]
    assert first in str(e.value) and "--overwrite" in str(e.value)
    assert snapshot(d.results, d.runs) == before
    path = run(other, d, overwrite=True, progress=False)
    assert read_card(path)["params_hash"] != first and read_card(path)["overrides"]["inner_lr"] == 0.05


def test_rerunning_a_finished_run_does_nothing_and_an_interrupted_one_continues(tmp_path, capsys):
    d = dirs_in(tmp_path)
    run(small_cfg(), d)
    before = snapshot(d.results, d.runs)
    run(small_cfg(), d)
    assert "already finished" in capsys.readouterr().err and snapshot(d.results, d.runs) == before


def test_a_second_writer_of_the_same_run_fails_cleanly_and_the_results_equal_a_single_run(tmp_path, monkeypatch):
    """Force the interleaving that lost results before: B starts while A holds the run."""
    d = dirs_in(tmp_path)
    real_execute = runner.execute
    outcome = {}

    def a_then_b(p, dirs, progress=True):
        if "b" not in outcome:
            outcome["b"] = "running"
            try:
                run(small_cfg(), d, progress=False)  # B: the same identity while A holds the lock
            except runner.MetabenchError as e:
                outcome["b"] = str(e)
        return real_execute(p, dirs, progress)

    monkeypatch.setattr(runner, "execute", a_then_b)
    a = read_csv(run(small_cfg(), d, progress=False))
    assert "in progress in pid" in outcome["b"]
    single = read_csv(run(small_cfg(), dirs_in(tmp_path / "single"), progress=False))
    pd.testing.assert_frame_equal(a.drop(columns=TIMING), single.drop(columns=TIMING))


@pytest.mark.parametrize("kill_after", [1, 2, 3, 4])
def test_a_write_killed_between_csv_and_card_leaves_a_whole_pair(tmp_path, monkeypatch, kill_after):
    """write_run's renames are interrupted after `kill_after` file operations: readers see the old pair
    or the new one, never a CSV with another run's card."""
    import os

    import bench.results as results

    d = dirs_in(tmp_path)
    old_path = run(small_cfg(label="x"), d, progress=False)
    old = (read_csv(old_path), read_card(old_path))
    calls = {"n": 0}
    real_replace = os.replace

    def dying_replace(src, dst):
        calls["n"] += 1
        if calls["n"] > kill_after:
            raise Killed()
        return real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", dying_replace)
    with pytest.raises(Killed):
        run(small_cfg(label="x", overrides={**SMALL, "inner_lr": 0.05}), d, overwrite=True, progress=False)
    monkeypatch.setattr(results.os, "replace", real_replace)
    frame, card = read_csv(old_path), read_card(old_path)
    is_old = frame.equals(old[0]) and card["params_hash"] == old[1]["params_hash"]
    is_new = card["overrides"].get("inner_lr") == 0.05 and set(frame["params_hash"]) == {card["params_hash"]}
    assert is_old or is_new
    assert set(frame["params_hash"]) == {card["params_hash"]}


def test_cuda_without_cuda_is_one_clear_error_and_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = dirs_in(tmp_path)
    with pytest.raises(runner.MetabenchError, match="no CUDA device"):
        run(small_cfg(device="cuda"), d, progress=False)
    assert not tmp_path.joinpath("results").exists() and not tmp_path.joinpath("runs").exists()
    with pytest.raises(runner.MetabenchError, match="use cpu, cuda, cuda:N or auto"):
        runner.resolve_device("gpu")
    assert runner.resolve_device("auto").type == "cpu"


def test_device_says_when_the_fused_kernel_ran(monkeypatch):
    from baselines import fused

    monkeypatch.setenv("METABENCH_FUSED", "0")
    assert not runner.device_name().endswith("-fused")
    monkeypatch.setenv("METABENCH_FUSED", "1")
    monkeypatch.setattr(fused, "available", lambda: True)
    assert runner.device_name().endswith("t-fused")
    monkeypatch.setattr(fused, "available", lambda: False)  # no compiler: the unfused ops ran
    assert not runner.device_name().endswith("-fused")


def test_made_with_reads_what_device_name_writes(monkeypatch):
    from baselines import fused

    monkeypatch.setattr(fused, "available", lambda: True)
    for on in (False, True):
        monkeypatch.setenv("METABENCH_FUSED", str(int(on)))
        assert runner.made_with(runner.device_name()) == (on, torch.get_num_threads())
    assert runner.made_with("cpu-aarch64-16t-fused") == (True, 16)
    assert runner.made_with("cuda-NVIDIA_H200") == (False, None) and runner.made_with("other") == (False, None)


def test_a_run_resumes_only_in_the_arithmetic_it_was_trained_in(tmp_path, monkeypatch):
    """The fused kernel gives the same numbers only up to rounding: a run trained without it does not continue
    with it (nor the other way round), which would make a run no uninterrupted one makes."""
    from baselines import fused

    monkeypatch.setenv("METABENCH_FUSED", "0")
    short = RunConfig(**{**CFG.__dict__, "steps": 4})
    run(short, dirs_in(tmp_path), progress=False)
    folder = next((tmp_path / "runs").rglob("last.pt")).parent
    assert runner.load_checkpoint(folder / "last.pt")["arithmetic"] == "cpu"
    monkeypatch.setattr(fused, "available", lambda: True)
    for name in ("applies", "stem_applies", "conv_applies"):  # switched on, but runs the unfused ops here
        monkeypatch.setattr(fused, name, lambda *a: False)
    longer = RunConfig(**{**CFG.__dict__, "steps": 6, "fused": True})
    before = (folder / "last.pt").read_bytes()
    with pytest.raises(runner.MetabenchError, match=r"last\.pt: the run so far was trained as 'cpu' and this process "
                                                    r"would continue it as 'cpu-fused'.*--restart"):
        run(longer, dirs_in(tmp_path), progress=False)
    assert (folder / "last.pt").read_bytes() == before  # nothing lost
    run(RunConfig(**{**CFG.__dict__, "steps": 6}), dirs_in(tmp_path), progress=False)  # as it was made: continues
    assert runner.load_checkpoint(folder / "last.pt")["learner"]["fit_steps"] == 6


def test_a_fused_run_switches_the_kernel_on_for_its_work_only(tmp_path, monkeypatch):
    from baselines import fused

    seen = []
    monkeypatch.setenv("METABENCH_FUSED", "0")
    monkeypatch.setattr(fused, "available", lambda: True)  # (chance runs no convolution: nothing is built)
    monkeypatch.setattr(runner, "device_name", lambda device=None: seen.append(fused.enabled()) or "cpu-test")
    from bench.cli import main

    assert main(["run", "chance", "synthetic-5w1s", "--steps", "2", "--val-episodes", "2", "--test-episodes", "4",
                 "--root", str(tmp_path / "root"), "--results", str(tmp_path / "results"), "--runs",
                 str(tmp_path / "runs"), "--quiet", "--fused"]) == 0
    assert seen and all(seen) and not fused.enabled()
    run(small_cfg(method="chance", overrides={}, label="plain"), dirs_in(tmp_path), progress=False)
    assert seen[-1] is False

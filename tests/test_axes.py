"""The evaluation axes (bench/axes.py): hand-computed per-step and permutation accuracies of a toy method, the
permutation draws, the invariance check, FLOP counts of a tiny Conv-4 against a hand count, the axis files
beside a result pair, and a run with the axes on and off."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import pytest
import torch

from baselines.core import GradientLearner, Params, inner_loop
from baselines.maml import FOMAML
from bench import axes
from bench.api import Episode, TaskInfo
from bench.checks import run_checks
from bench.errors import ResultsError
from bench.results import axis_path, find_csvs, read_axis, read_card, read_csv, write_run

WAY, K, PER_CLASS = 5, 3, 2  # the toy's test steps K


@dataclass
class ShiftToy(GradientLearner):
    """Every inner step adds 1 to a scalar `shift`; a query whose pixels all equal v / 100 is predicted as the
    class nearest v - shift. With the query of class y at v = y + K, it is right at step K (accuracy 1), and
    off by K - s classes at step s (clipped to 0..way-1: right only for the last class before K, the first
    after). It ignores the labels, so relabelling the classes moves its accuracy: it claims invariance anyway,
    falsely, for the conformance check to catch."""

    inner_steps_test: int = K
    STEP_TRACE: ClassVar[bool] = True
    LABEL_PERMUTATION_INVARIANT: ClassVar[bool] = True

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        return {"shift": torch.zeros(())}

    def forward(self, p, x, way=None):
        v = x.mean(dim=(1, 2, 3)) * 100
        return -(v[:, None] - p["shift"] - torch.arange(way, dtype=x.dtype)[None, :]) ** 2

    def task_loss(self, ep: Episode) -> torch.Tensor:
        return self.meta["shift"] * 0.0

    def adapt_params(self, support_x, support_y) -> Params:
        return inner_loop(lambda p, x, y: -p["shift"], {"shift": self.meta["shift"]}, ["shift"],
                          (support_x, support_y), self.inner_steps_test, 1.0, first_order=True)


def toy_episode(index: int = 0) -> Episode:
    """5-way, one support image and PER_CLASS query images per class; query class y has pixels (y + K) / 100."""
    y = torch.arange(WAY).repeat_interleave(PER_CLASS)
    query = ((y + K).float() / 100).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    return Episode(torch.zeros(WAY, 1, 28, 28), torch.arange(WAY), query, y, tuple(range(10, 10 + WAY)), "test",
                   index, f"{index + 1:016x}")


def ready_toy() -> ShiftToy:
    return ShiftToy().setup(TaskInfo((1, 28, 28), WAY, 20))


def test_toy_step_curve_is_hand_computed_and_leaves_the_main_number():
    toy, ep = ready_toy(), toy_episode()
    plain, = toy.evaluate([ep])
    traced, = toy.evaluate([ep], steps_upto=axes.steps_upto(toy))
    assert plain["accuracy"] == traced["accuracy"] == 1.0 and plain["loss"] == traced["loss"]
    curve = {s: acc for s, acc, _ in traced["steps"]}
    assert curve == {s: (1.0 if s == K else 1 / WAY) for s in range(2 * K + 1)}
    rows = axes.step_rows(0, ep.spec_hash, traced)
    assert [r["step"] for r in rows] == list(range(2 * K + 1))


def test_a_method_without_an_inner_loop_reports_one_point():
    from baselines.chance import Chance

    m = Chance().setup(TaskInfo((1, 28, 28), WAY, 20))
    r, = m.evaluate([toy_episode()], steps_upto=axes.steps_upto(m))
    assert r["steps"] == [(0, r["accuracy"], r["loss"])]


def test_label_permutations_are_drawn_from_the_hash():
    perms = axes.label_permutations("00ab12cd34ef5678", 5, 4)
    assert perms[0] == (0, 1, 2, 3, 4) and len(set(perms)) == 4
    assert all(sorted(p) == list(range(5)) for p in perms)
    assert perms == axes.label_permutations("00ab12cd34ef5678", 5, 4)  # the same on every call and worker
    assert perms != axes.label_permutations("ffab12cd34ef5678", 5, 4)
    assert len(axes.label_permutations("00ab12cd34ef5678", 2, 4)) == 2  # at most way! of them


def test_permuted_episode_relabels_classes_consistently():
    ep = toy_episode()
    p = (2, 0, 1, 4, 3)
    q = axes.permuted(ep, p)
    assert q.support_y.tolist() == [2, 0, 1, 4, 3] and q.query_y.tolist() == [2, 2, 0, 0, 1, 1, 4, 4, 3, 3]
    assert all(q.classes[p[c]] == ep.classes[c] for c in range(WAY))  # a class keeps its absolute id


def test_toy_permutation_accuracy_is_its_fixed_points_and_the_summary_reads_them():
    toy, eps = ready_toy(), [toy_episode(0), toy_episode(1)]
    rows = axes.permutation_rows(toy, eps, [1.0, 1.0], 4)
    for r in rows:
        perm = [int(c) for c in r["labels"].split("-")]
        assert r["accuracy"] == pytest.approx(sum(perm[c] == c for c in range(WAY)) / WAY)
    table = pd.DataFrame(rows)
    summary = axes.permutation_summary([("toy", 0, table)]).iloc[0]
    spreads = table.groupby("episode")["accuracy"].agg(lambda a: a.max() - a.min())
    assert summary["spread"] == pytest.approx(spreads.mean()) and summary["spread"] > 0
    by_perm = table.groupby("perm")["accuracy"].mean()
    assert summary["gap"] == pytest.approx(by_perm.max() - by_perm.min())
    assert summary["identity"] == 1.0 and summary["n_perms"] == 4


def test_invariance_check_fails_on_a_label_dependent_method_and_passes_on_protonet():
    result, = run_checks(ShiftToy, only=["check_label_permutation_invariance"])
    assert result.status == "failed" and "LABEL_PERMUTATION_INVARIANT" in result.message
    result, = run_checks("protonet", only=["check_label_permutation_invariance"])
    assert result.status == "passed"
    result, = run_checks("maml", only=["check_label_permutation_invariance"])
    assert result.status == "n/a"


def test_invariance_flag_is_not_inherited():
    from baselines.baselinepp import BaselinePP
    from baselines.finetune import Finetune

    assert Finetune.LABEL_PERMUTATION_INVARIANT and not BaselinePP.LABEL_PERMUTATION_INVARIANT


def test_the_step_curve_check_passes_on_the_toy():
    result, = run_checks(ShiftToy, only=["check_step_curve"])
    assert result.status == "passed", result.message


# --- FLOPs ------------------------------------------------------------------------------------------------
HIDDEN, SIZE, NQ = 4, 16, 10


def conv4_flops(n: int, way: int = WAY) -> tuple[int, int]:
    """(forward FLOPs of Conv-4 on n images, FLOPs of its first convolution): 2 multiply-adds per weight use."""
    convs = [2 * n * HIDDEN * c_in * 9 * size * size for c_in, size in ((1, SIZE), (HIDDEN, SIZE // 2),
                                                                         (HIDDEN, SIZE // 4), (HIDDEN, SIZE // 8))]
    return sum(convs) + 2 * n * HIDDEN * way, convs[0]


def tiny_episode(gen: torch.Generator, index: int) -> Episode:
    y = torch.arange(WAY)
    return Episode(torch.rand(WAY, 1, SIZE, SIZE, generator=gen), y, torch.rand(NQ, 1, SIZE, SIZE, generator=gen),
                   y.repeat_interleave(NQ // WAY), tuple(range(WAY)), "train", index, f"{index:016x}")


def test_flops_of_a_tiny_conv4_equal_a_hand_count():
    """First-order MAML, hidden 4, 16 px: an inner step is a forward pass and its backward (twice the
    forward, less the first convolution's input gradient, which nothing needs); adaptation adds the
    query's forward pass; an outer step per task adds the query's forward and backward."""
    gen = torch.Generator().manual_seed(0)
    eps = [tiny_episode(gen, i) for i in range(6)]
    m = FOMAML(hidden=HIDDEN, meta_batch=2, inner_steps=1, inner_steps_test=3, task_batch=2)
    m.setup(TaskInfo((1, SIZE, SIZE), WAY, WAY))
    before = {k: v.clone() for k, v in m.meta.items()}
    counted = axes.count_flops(m, iter(eps), eps[5])
    assert all(torch.equal(before[k], m.meta[k]) for k in before)  # counted on a copy
    f_s, c0_s = conv4_flops(WAY)
    f_q, c0_q = conv4_flops(NQ)
    step = 3 * f_s - c0_s
    assert counted["adaptation"] == 3 * step + f_q
    assert counted["outer_step"] == 2 * (1 * step + 3 * f_q - c0_q)


# --- files ------------------------------------------------------------------------------------------------
def result_rows(n: int = 3) -> list[dict]:
    return [{"benchmark": "toy", "benchmark_version": 1, "split": "test", "episode": i, "episode_hash": f"{i:016x}",
             "method": "m", "params_hash": "p", "seed": 0, "code_rev": "r", "device": "cpu", "way": 5, "shot": 1,
             "n_support": 5, "n_query": 10, "inner_steps_test": 1, "accuracy": 0.5, "loss": 1.0, "adapt_seconds": 0.1,
             "adapt_batch": 1, "fit_episodes": 0, "fit_seconds": 0.0} for i in range(n)]


def axis_rows(n: int = 3) -> dict[str, list[dict]]:
    return {"steps": [{"episode": i, "episode_hash": f"{i:016x}", "step": s, "accuracy": 0.2 * s, "loss": 1.0}
                      for i in range(n) for s in range(3)],
            "perms": [{"episode": i, "episode_hash": f"{i:016x}", "perm": 0, "labels": "0-1-2-3-4", "accuracy": 0.5}
                      for i in range(n)]}


def test_axis_files_are_written_with_the_pair_and_read_back(tmp_path):
    plain = write_run(tmp_path / "a", result_rows(), {"method": "m"})
    csv = write_run(tmp_path / "b", result_rows(), {"method": "m"}, axis_rows())
    assert plain.read_bytes() == csv.read_bytes()  # the main CSV does not change
    assert find_csvs(tmp_path / "b") == [csv]  # axis files are not result CSVs
    assert read_card(csv)["axes"]["steps"]["file"] == "seed0.steps.csv"
    steps = read_axis(csv, "steps")
    assert steps["step"].tolist() == [0, 1, 2] * 3 and read_axis(plain, "steps") is None
    axis_path(csv, "perms").write_text(axis_path(csv, "perms").read_text().replace("0.5", "0.75"))
    with pytest.raises(ResultsError, match="seed0.perms.csv: missing, or not the file its run card records"):
        read_axis(csv, "perms")


def test_bad_axis_rows_are_one_clear_error(tmp_path):
    bad = axis_rows()
    bad["steps"][1]["accuracy"] = 1.5
    with pytest.raises(ResultsError, match=r"seed0.steps.csv: row 3: column 'accuracy' has a bad value"):
        write_run(tmp_path, result_rows(), {"method": "m"}, bad)


def test_equal_budget_reads_the_validation_curve():
    curve = lambda accs: [{"step": 50 * i, "val_accuracy": a} for i, a in enumerate(accs)]  # noqa: E731
    cards = [("cheap", {"flops": {"outer_step": 10}, "fit_steps": 100, "curve": curve([0.2, 0.5, 0.4])}),
             ("dear", {"flops": {"outer_step": 40}, "fit_steps": 100, "curve": curve([0.2, 0.6, 0.9])}),
             ("chance", {"flops": {"outer_step": 0}, "fit_steps": 0, "curve": curve([0.2])})]
    budget, table = axes.equal_budget(cards)
    assert budget == 1000  # the cheapest run that trained: 10 FLOPs x 100 steps
    rows = table.set_index("method")
    assert rows.loc["cheap", "val_accuracy"] == 0.5 and rows.loc["cheap", "step"] == 50  # best within budget
    assert rows.loc["dear", "val_accuracy"] == 0.2 and rows.loc["dear", "step"] == 0  # 25 steps: only step 0
    assert rows.loc["dear", "full_val_accuracy"] == 0.9 and "chance" not in rows.index


# --- a run ------------------------------------------------------------------------------------------------
TIMING = ["adapt_seconds", "fit_seconds", "code_rev"]


@pytest.mark.slow
def test_a_run_writes_the_axes_and_switching_them_off_changes_no_result(tmp_path):
    from bench.runner import RunConfig, RunDirs, run

    cfg = dict(method="maml", benchmark="synthetic-5w1s", steps=2, chunk=1, val_episodes=2, test_episodes=6,
               overrides=dict(hidden=8, meta_batch=2, inner_steps_test=2), label="maml")
    on = run(RunConfig(**cfg), RunDirs(tmp_path, tmp_path / "on", tmp_path / "runs-on"), progress=False)
    off = run(RunConfig(**cfg, step_curve=False, permutations=0, flops=False),
              RunDirs(tmp_path, tmp_path / "off", tmp_path / "runs-off"), progress=False)
    pd.testing.assert_frame_equal(read_csv(on).drop(columns=TIMING), read_csv(off).drop(columns=TIMING))
    card = read_card(on)
    assert set(card["axes"]) == {"steps", "perms"} and card["flops"]["outer_step"] > 0
    assert "axes" not in read_card(off) and "flops" not in read_card(off)
    steps, perms, main = read_axis(on, "steps"), read_axis(on, "perms"), read_csv(on).set_index("episode")
    assert sorted(set(steps["step"])) == [0, 1, 2, 3, 4]
    at_test = steps[steps["step"] == 2].set_index("episode")["accuracy"]
    assert (at_test == main["accuracy"]).all()
    identity = perms[perms["perm"] == 0].set_index("episode")["accuracy"]
    assert (identity == main["accuracy"]).all() and len(perms) == 4 * 6


def test_axis_episodes_limits_the_axes_to_the_first_episodes_and_changes_no_result(tmp_path):
    from bench.runner import RunConfig, RunDirs, run

    cfg = dict(method="maml", benchmark="synthetic-5w1s", steps=2, chunk=1, val_episodes=2, test_episodes=6,
               overrides=dict(hidden=8, meta_batch=2, inner_steps_test=2), label="maml")
    some = run(RunConfig(**cfg, axis_episodes=4), RunDirs(tmp_path, tmp_path / "some", tmp_path / "runs-some"),
               progress=False)
    off = run(RunConfig(**cfg, step_curve=False, permutations=0, flops=False),
              RunDirs(tmp_path, tmp_path / "off", tmp_path / "runs-off"), progress=False)
    same = [*TIMING, "adapt_batch"]  # the first 4 episodes are adapted as a batch of their own
    pd.testing.assert_frame_equal(read_csv(some).drop(columns=same), read_csv(off).drop(columns=same))
    assert read_card(some)["axis_episodes"] == 4
    steps, perms = read_axis(some, "steps"), read_axis(some, "perms")
    assert sorted(set(steps["episode"])) == sorted(set(perms["episode"])) == [0, 1, 2, 3]
    main = read_csv(some).set_index("episode")["accuracy"]
    assert (steps[steps["step"] == 2].set_index("episode")["accuracy"] == main[:4]).all()


@pytest.mark.slow
def test_a_bundle_with_axes_on_the_first_episodes_validates_and_verifies(tmp_path):
    from bench.bundle import make_bundle
    from bench.runner import RunConfig, RunDirs, run
    from bench.validation import validate_bundle
    from bench.verify import verify_bundle

    dirs = RunDirs(tmp_path / "root", tmp_path / "results", tmp_path / "runs")
    run(RunConfig("fomaml", "synthetic-5w1s", 0, steps=2, chunk=1, val_episodes=2, label="fomaml", axis_episodes=5,
                  overrides=dict(meta_batch=2, hidden=8, inner_steps_test=1)), dirs, progress=False)
    bundle = make_bundle("fomaml", dirs.results, dirs.runs, tmp_path / "bundle")
    v = validate_bundle(bundle)
    assert v.ok, v.errors
    r = verify_bundle(bundle, episodes="all", seed=3)
    assert r.ok, r.errors
    _rewrite_axis(bundle, "steps", lambda f: f[f["episode"] != 3])
    v = validate_bundle(bundle)
    assert any("below episode 5 (the card's axis_episodes)" in e for e in v.failed["axis_files_match_results"])


# --- submit / validate / verify ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def axis_bundle(tmp_path_factory) -> "Path":
    """A bundle of one tiny fomaml run with every axis on (accepted, unranked: one seed)."""
    from bench.bundle import make_bundle
    from bench.runner import RunConfig, RunDirs, run

    base = tmp_path_factory.mktemp("axis-bundle")
    dirs = RunDirs(base / "root", base / "results", base / "runs")
    run(RunConfig("fomaml", "synthetic-5w1s", 0, steps=2, chunk=1, val_episodes=2, label="fomaml",
                  overrides=dict(meta_batch=2, hidden=8, inner_steps_test=1)), dirs, progress=False)
    return make_bundle("fomaml", dirs.results, dirs.runs, base / "bundle")


def copied(bundle, tmp_path):
    import shutil

    shutil.copytree(bundle, tmp_path / "b")
    return tmp_path / "b"


@pytest.mark.slow
def test_a_bundle_carries_validates_and_verifies_its_axes(axis_bundle, tmp_path):
    from bench.validation import validate_bundle
    from bench.verify import verify_bundle

    rel = "results/synthetic-5w1s/fomaml/seed0"
    assert (axis_bundle / f"{rel}.steps.csv").is_file() and (axis_bundle / f"{rel}.perms.csv").is_file()
    v = validate_bundle(axis_bundle)
    assert v.ok, v.errors
    r = verify_bundle(axis_bundle, episodes=5, seed=3)
    assert r.ok, r.errors


def _rewrite_axis(bundle, axis: str, fn) -> None:
    """Change an axis file and the sha256 its card records (as a submitter rewriting both would); reseal."""
    import hashlib
    import json

    from bundlefixtures import reseal

    path = bundle / f"results/synthetic-5w1s/fomaml/seed0.{axis}.csv"
    frame = fn(pd.read_csv(path, dtype={"episode_hash": str, "labels": str}))
    frame.to_csv(path, index=False)
    card_path = path.parent / "seed0.json"
    card = json.loads(card_path.read_text())
    card["axes"][axis]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    card_path.write_text(json.dumps(card))
    reseal(bundle)


@pytest.mark.slow
def test_validation_rejects_axis_files_of_other_episodes_or_permutations(axis_bundle, tmp_path):
    from bench.validation import validate_bundle

    b = copied(axis_bundle, tmp_path)
    _rewrite_axis(b, "perms", lambda f: f.assign(labels=f["labels"].where(f["perm"] != 1, "4-3-2-1-0")))
    v = validate_bundle(b)
    assert not v.ok and any("are not the ones its hash draws" in e for e in v.failed["axis_files_match_results"])
    b = copied(axis_bundle, tmp_path / "2")
    _rewrite_axis(b, "steps", lambda f: f[f["episode"] != 3])
    v = validate_bundle(b)
    assert not v.ok and any("its episodes (and hashes) are not those" in e for e in v.failed["axis_files_match_results"])


@pytest.mark.slow
def test_verify_catches_a_changed_step_accuracy(axis_bundle, tmp_path):
    from bench.verify import verify_bundle

    b = copied(axis_bundle, tmp_path)
    _rewrite_axis(b, "steps", lambda f: f.assign(accuracy=f["accuracy"].where(f["step"] != 0, 0.99)))
    r = verify_bundle(b, episodes="all", seed=0)
    assert not r.ok and any("the steps axis differs" in e for e in r.errors)


# --- methods that record their own curve (adapt_recorded): MAML++, Reptile, Mixture, MeTAL, LEO ---------------
OWN_T = 2
"""Their test steps here (LEO: 1 latent + 1 fine-tuning step)."""
OWN_CURVE = {
    "mamlpp": (dict(inner_steps=OWN_T), lambda s: dict(inner_steps=s)),
    "reptile": (dict(inner_steps_test=OWN_T, eval_batch=3), lambda s: dict(inner_steps_test=s)),
    "mixture": (dict(inner_steps=OWN_T, inner_steps_test=OWN_T), lambda s: dict(inner_steps_test=s)),
    "metal": (dict(inner_steps=OWN_T, inner_steps_test=OWN_T), lambda s: dict(inner_steps_test=s)),
    "leo": (dict(inner_steps=1, finetune_steps=OWN_T - 1, n_latents=4, finetune_lr=0.5),
            lambda s: dict(inner_steps=min(s, 1), finetune_steps=max(0, s - 1))),
}
"""Per method: its hyperparameters here, and those that make s test steps its own count."""


def own_curve_learner(name: str, values: dict) -> "MetaLearner":
    from baselines.registry import method_class

    return method_class(name)(hidden=HIDDEN, seed=3, **values).setup(TaskInfo((1, SIZE, SIZE), WAY, 10))


@pytest.mark.parametrize("name", sorted(OWN_CURVE))
def test_an_own_curve_has_every_step_and_each_point_is_the_method_run_with_that_many_steps(name):
    """Steps 0..2T; the point at T is the main number (accuracy and loss, exactly), and the point at every s
    is exactly the main number of the same initialisation configured with s test steps (for the steps past
    T: the documented continuation, last lr/BN row, same mini-batch stream, last loss network, more
    fine-tuning; MAML++ needs >= 1 step, so its step 0 is checked against the unadapted row-0 prediction)."""
    base, with_steps = OWN_CURVE[name]
    gen = torch.Generator().manual_seed(0)
    eps = [tiny_episode(gen, i) for i in range(2)]
    m = own_curve_learner(name, base)
    assert m.test_steps == OWN_T
    plain, traced = m.evaluate(eps), m.evaluate(eps, steps_upto=axes.steps_upto(m))
    for a, b in zip(plain, traced):
        points = {s: (acc, loss) for s, acc, loss in b["steps"]}
        assert sorted(points) == list(range(2 * OWN_T + 1))
        assert (a["accuracy"], a["loss"]) == (b["accuracy"], b["loss"]) == points[OWN_T]
    for s in range(2 * OWN_T + 1):
        if name == "mamlpp" and s == 0:
            with torch.no_grad():
                logits = [m.forward_step(m.meta, ep.query_x, 0, WAY) for ep in eps]
            losses = [torch.nn.functional.cross_entropy(lg.double(), ep.query_y).item() for lg, ep in zip(logits, eps)]
        else:
            losses = [r["loss"] for r in own_curve_learner(name, {**base, **with_steps(s)}).evaluate(eps)]
        assert [dict((t, loss) for t, _, loss in r["steps"])[s] for r in traced] == losses, f"step {s}"

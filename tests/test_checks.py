"""The conformance suite: every registered method passes every check (declared exceptions
aside), and deliberately broken methods fail the right check with a useful message."""

from __future__ import annotations

import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pytest
import torch

from bench import checks
from bench.api import Tags
from bench.checks import format_report, run_checks
from bench.errors import MetabenchError
from baselines.maml import MAML
from baselines.registry import METHODS


pytestmark = pytest.mark.usefixtures("one_thread")


# --- every registered method passes every check ----------------------------------------------
@pytest.mark.parametrize("method,check", [(m, c) for m in METHODS for c in checks.CHECKS],
                         ids=[f"{m}-{c}" for m in METHODS for c in checks.CHECKS])
def test_registered_method_passes(method, check):
    (result,) = run_checks(method, only=[check])
    assert result.ok, format_report([result])


def test_every_registered_method_learns_or_declares_why_not():
    """check_learns is never silently skipped: it runs, and only `chance` declares an exception."""
    declared = {m for m in METHODS
                if "check_learns" in (checks.make_subject(m).exceptions or {})}
    assert declared == {"chance"}


# --- deliberately broken methods --------------------------------------------------------------
@dataclass
class SmallMAML(MAML):
    """MAML as the checks build it (the base of the broken variants below)."""


@dataclass
class MutatingMAML(SmallMAML):
    """Adapts in place: the inner loop writes into the meta-parameters."""

    def adapt_params(self, support_x, support_y):
        fast = super().adapt_params(support_x, support_y)
        with torch.no_grad():
            self.meta["head.bias"].copy_(fast["head.bias"])
        return fast


@dataclass
class ExcusedMutatingMAML(MutatingMAML):
    CHECK_EXCEPTIONS = {"check_adapt_leaves_meta_untouched": "known bug #12: adapt writes the head bias back"}


@dataclass
class ForgetfulMAML(SmallMAML):
    """Rebuilds its Adam optimizer at every fit call: fit(a) + fit(b) != fit(a + b)."""

    def fit(self, episodes, steps):
        if self.info is not None:
            self.optimizer = self.make_optimizer()
        return super().fit(episodes, steps)


@dataclass
class NoRngStateMAML(SmallMAML):
    """Subsamples query sets with its generator but does not save the generator's state."""

    def task_loss(self, ep):
        keep = torch.randperm(len(ep.query_y), generator=self.gen)[: max(1, len(ep.query_y) // 2)]
        ep = type(ep)(ep.support_x, ep.support_y, ep.query_x[keep], ep.query_y[keep], ep.classes, ep.split,
                      ep.index, ep.spec_hash)
        return super().task_loss(ep)

    def state_dict(self):
        return {k: v for k, v in super().state_dict().items() if k != "rng"}

    def load_state_dict(self, state):
        return super().load_state_dict({**state, "rng": torch.Generator().get_state()})


@dataclass
class SecretlyTransductiveMAML(SmallMAML):
    """Claims per-query predictions but normalizes with the query batch's statistics."""

    @property
    def tags(self):
        return Tags(bn_mode="inductive", order="second", transductive=False, variable_way=True)


@dataclass
class BadTagsMAML(SmallMAML):
    @property
    def tags(self):
        return Tags(bn_mode="batch", order="second", transductive=True)


@dataclass
class InconsistentTagsMAML(SmallMAML):
    @property
    def tags(self):
        return Tags(bn_mode="transductive", order="second", transductive=False)


@dataclass
class EagerMAML(SmallMAML):
    """Builds a tensor in the constructor."""

    def __post_init__(self):
        self.scale = torch.ones(1)


@dataclass
class GlobalRngMAML(SmallMAML):
    """Initialises its head from the global RNG."""

    def init_meta(self, info, gen):
        p = super().init_meta(info, gen)
        p["head.weight"] = torch.randn(p["head.weight"].shape) * 0.01
        return p


@dataclass
class NumpyStateMAML(SmallMAML):
    def state_dict(self):
        return {**super().state_dict(), "history": np.zeros(3)}


@dataclass
class WideLogitsMAML(SmallMAML):
    """Returns logits for max_way classes instead of the episode's way."""

    def adapt(self, support_x, support_y):
        fast = self.adapt_params(support_x, support_y)
        return lambda q: self.forward({k: v.detach() for k, v in fast.items()}, q).detach()


@dataclass
class NoDefaultHyper(SmallMAML):
    """A hyperparameter without a default: not constructible as NoDefaultHyper()."""

    widths: int = field(kw_only=True)


@dataclass
class TensorHyper(SmallMAML):
    """A hyperparameter that is a tensor, not a primitive."""

    scale: object = field(default_factory=lambda: torch.ones(1))


@dataclass
class UnknownExceptionMAML(SmallMAML):
    CHECK_EXCEPTIONS = {"check_everything_is_fine": "typo in the check name"}


@dataclass
class NeedlessExceptionMAML(SmallMAML):
    CHECK_EXCEPTIONS = {"check_tags": "thought the tags were odd"}


@dataclass
class StubbornMAML(SmallMAML):
    """fit does nothing (a broken outer step)."""

    def outer_step(self, batch):
        pass


@dataclass
class ShuffledManyMAML(SmallMAML):
    """adapt_many returns the predictors in reverse order."""

    def adapt_many(self, supports):
        return super().adapt_many(supports)[::-1]


@dataclass
class ConcurrencySensitiveMAML(SmallMAML):
    """task_loss records how many tasks ran at once (a deterministic stand-in for any race on
    shared state) while claiming PARALLEL_TASKS."""

    PARALLEL_TASKS: ClassVar[bool] = True

    def setup(self, info):
        self.active, self.most_active, self.lock = 0, 0, threading.Lock()
        return super().setup(info)

    def task_loss(self, ep):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(0.2)
        loss = super().task_loss(ep)
        with self.lock:
            self.active -= 1
        return loss

    def state_dict(self):
        return {**super().state_dict(), "most_active": self.most_active}


@dataclass
class ConcurrencySensitiveAdaptMAML(SmallMAML):
    """Its task-batched inner loop at test time depends on how many slices ran at once (a deterministic stand-in
    for any race on shared state) while claiming TASK_BATCHED."""

    TASK_BATCHED: ClassVar[bool] = True

    def setup(self, info):
        self.active, self.most_active, self.lock = 0, 0, threading.Lock()
        return super().setup(info)

    def inner_tasks(self, start, data, steps, first_order):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(0.2)
        with self.lock:
            self.active -= 1
        shifted = {k: v + 0.01 * self.most_active for k, v in start.items()}
        return super().inner_tasks(shifted, data, steps, first_order)


BROKEN = [
    (ConcurrencySensitiveMAML, "check_fit_worker_independent", ["1 and 3 workers reach different states",
                                                                "most_active", "PARALLEL_TASKS = False"]),
    (ConcurrencySensitiveAdaptMAML, "check_evaluate_worker_independent",
     ["evaluating with 1 and 3 task workers gives different rows", "only read shared state"]),
    (ShuffledManyMAML, "check_adapt_many", ["support set 0: adapt_many's predictions differ from adapt's"]),
    (MutatingMAML, "check_adapt_leaves_meta_untouched", ["must never change the meta-parameters", "head.bias"]),
    (ForgetfulMAML, "check_fit_resumable", ["fit(a) then fit(b) must equal fit(a + b)", "optimizer"]),
    (ForgetfulMAML, "check_resume_from_state_dict", ["resumed from state_dict()"]),
    (NoRngStateMAML, "check_resume_from_state_dict", ["RNG state"]),
    (SecretlyTransductiveMAML, "check_query_independence", ["independently of the others", "transductive=True"]),
    (BadTagsMAML, "check_tags", ["bn_mode must be one of", "'batch'"]),
    (InconsistentTagsMAML, "check_tags", ["Tags.transductive must be True"]),
    (EagerMAML, "check_init_stores_only", ["only store hyperparameters", "scale"]),
    (GlobalRngMAML, "check_setup_seeded", ["global random number generator"]),
    (NumpyStateMAML, "check_state_dict_weights_only", ["state['history'] is a numpy.ndarray", "weights_only=True"]),
    (WideLogitsMAML, "check_adapt_shapes", ["2-way 1-shot: logits must have shape [n_query, way] = [6, 2], got [6, 5]"]),
    (NoDefaultHyper, "check_hyperparameters", ["needs a default", "widths"]),
    (TensorHyper, "check_hyperparameters", ["must be primitives", "'scale': 'Tensor'"]),
    (UnknownExceptionMAML, "check_exception_declarations", ["check_everything_is_fine"]),
    (StubbornMAML, "check_learns", ["must clearly improve test accuracy"]),
]


@pytest.mark.parametrize("cls,check,phrases", BROKEN, ids=[f"{c.__name__}-{k}" for c, k, _ in BROKEN])
def test_broken_method_fails_the_right_check(cls, check, phrases):
    (result,) = run_checks(cls, only=[check])
    assert result.status == "failed", format_report([result])
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_broken_methods_pass_the_checks_they_do_not_break():
    """The failures above are specific: the same classes pass unrelated checks."""
    assert run_checks(MutatingMAML, only=["check_fit_resumable"])[0].status == "passed"
    assert run_checks(ForgetfulMAML, only=["check_adapt_leaves_meta_untouched"])[0].status == "passed"
    assert run_checks(NoRngStateMAML, only=["check_fit_resumable"])[0].status == "passed"
    assert run_checks(SmallMAML, only=["check_query_independence"])[0].status == "n/a"


def test_declared_exception_is_reported_not_hidden():
    results = run_checks(ExcusedMutatingMAML, only=["check_tags", "check_adapt_leaves_meta_untouched"])
    tags, mutate = results
    assert tags.status == "passed"
    assert mutate.status == "excepted" and mutate.ok
    assert mutate.message.startswith("excepted: known bug #12: adapt writes the head bias back")
    assert "must never change the meta-parameters" in mutate.message  # the failure is still shown
    report = format_report(results)
    assert "excepted" in report and "known bug #12" in report and report.splitlines()[-1].startswith("OK")


def test_needless_exception_is_flagged_on_pass():
    (r,) = run_checks(NeedlessExceptionMAML, only=["check_tags"])
    assert r.status == "passed" and "declared exception no longer needed" in r.message


def test_chance_declares_its_exceptions():
    results = {r.check: r for r in run_checks("chance")}
    assert results["check_learns"].status == "excepted"
    assert "learns nothing" in results["check_learns"].message
    assert all(r.ok for r in results.values())


def test_report_format_and_failure_verdict():
    results = run_checks(MutatingMAML, only=["check_interface", "check_adapt_leaves_meta_untouched"])
    report = format_report(results)
    lines = report.splitlines()
    assert lines[0].startswith("conformance checks of") and lines[0].endswith("MutatingMAML:")
    assert any(line.split()[:2] == ["passed", "check_interface"] for line in lines)
    assert any(line.split()[:2] == ["failed", "check_adapt_leaves_meta_untouched"] for line in lines)
    assert lines[-1].startswith("FAILED: 1 passed, 1 failed")


def test_crash_inside_a_method_is_a_failure_with_its_location():
    @dataclass
    class Crashing(SmallMAML):
        def adapt(self, support_x, support_y):
            raise ValueError("boom")

    (r,) = run_checks(Crashing, only=["check_adapt_shapes"])
    assert r.status == "failed" and "raised ValueError: boom" in r.message and "test_checks.py" in r.message


def test_targets_by_name_and_by_import_path():
    by_path = run_checks("baselines.maml:MAML", only=["check_tags"])[0]
    assert by_path.status == "passed" and by_path.method == "baselines.maml:MAML"
    with pytest.raises(MetabenchError, match="unknown checks"):
        run_checks("maml", only=["check_nothing"])
    with pytest.raises(MetabenchError, match="Did you mean 'maml'"):
        run_checks("mamll")


def test_check_params_merge_along_the_class_hierarchy():
    from baselines.metasgd import MetaSGD
    from baselines.reptile import Reptile

    assert checks.check_params(MAML) == {"hidden": 16, "meta_batch": 2, "outer_lr": 0.01, "inner_steps_test": 3}
    assert checks.check_params(MetaSGD)["inner_steps_test"] == 1  # the subclass's own CHECK_PARAMS win
    assert checks.check_params(Reptile)["outer_lr"] == 1.0


def test_cli_check_exit_codes(tmp_path, monkeypatch, capsys):
    from bench.cli import main

    module = tmp_path / "my_broken_method.py"
    module.write_text(textwrap.dedent("""
        from dataclasses import dataclass, field
        import torch
        from baselines.maml import MAML

        @dataclass
        class Mutating(MAML):
            def adapt_params(self, support_x, support_y):
                fast = super().adapt_params(support_x, support_y)
                with torch.no_grad():
                    self.meta["head.bias"].add_(1.0)
                return fast
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", "my_broken_method:Mutating", "--only", "check_adapt_leaves_meta_untouched"]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "my_broken_method:Mutating" in out
    assert main(["check", "chance", "--only", "check_tags", "--only", "check_learns"]) == 0
    out = capsys.readouterr().out
    assert "excepted" in out and out.strip().splitlines()[-1].startswith("OK")


# --- the pytest helper for a method author's own CI ------------------------------------------------
@checks.parametrize_with_checks(["chance"])
def test_parametrize_with_checks_runs_the_suite(method, check):
    check()


def test_parametrize_with_checks_fails_a_broken_method():
    mark = checks.parametrize_with_checks([MutatingMAML])
    cases = dict(zip(mark.kwargs["ids"], (c[1] for c in mark.args[1])))
    assert len(cases) == len(checks.CHECKS)
    with pytest.raises(AssertionError, match="check_adapt_leaves_meta_untouched"):
        cases["MutatingMAML-check_adapt_leaves_meta_untouched"]()

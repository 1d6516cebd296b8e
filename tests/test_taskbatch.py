"""The task-batched fast path (baselines/taskbatch.py) computes what the per-task reference computes:
forward values and second-order meta-gradients in float64, adaptation, and several float32
meta-iterations of every method that takes the fast path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.api import Episode
from baselines.anil import ANIL
from baselines.boil import BOIL
from baselines.cavia import CAVIA
from baselines.core import GradientLearner, conv4_forward, conv4_init
from baselines.maml import MAML
from baselines.metasgd import MetaSGD
from baselines.taskbatch import conv4_forward_tasks, same_shapes, stack_episodes, stack_params

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"maml": (MAML, {}), "fomaml": (MAML, {"first_order": True}), "anil": (ANIL, {}), "boil": (BOIL, {}),
        "metasgd": (MetaSGD, {})}


def batch(synthetic_set, n: int = 3) -> list[Episode]:
    stream = synthetic_set.stream("train")
    return [next(stream) for _ in range(n)]


def make(cls, synthetic_set, **kw):
    params = dict(meta_batch=3, hidden=8, seed=3, inner_steps=2, task_batch=3) | kw
    return cls(**params).setup(synthetic_set.task_info())


def double(m) -> None:
    m.meta = {k: v.detach().double().requires_grad_(True) for k, v in m.meta.items()}


def double_batch(eps: list[Episode]) -> list[Episode]:
    return [Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y, e.classes, e.split, e.index,
                    e.spec_hash) for e in eps]


def meta_grads(m, eps: list[Episode], fast_path: bool) -> dict[str, torch.Tensor]:
    """Gradient of the mean query loss w.r.t. m.meta, through the fast path or the per-task loop."""
    m.optimizer = torch.optim.SGD(list(m.meta.values()), lr=0.0)
    (MAML.outer_step if fast_path else GradientLearner.outer_step)(m, eps)
    return {k: v.grad.clone() for k, v in m.meta.items() if v.grad is not None}


def test_forward_matches_per_task_in_float64():
    g = torch.Generator().manual_seed(0)
    ps = [{k: v.double() for k, v in conv4_init(g, 1, 6, 5, 28).items()} for _ in range(3)]
    x = torch.rand(3, 7, 1, 28, 28, generator=g, dtype=torch.float64)
    stacked = {k: torch.stack([p[k] for p in ps]) for k in ps[0]}
    out = conv4_forward_tasks(stacked, x, 4)
    assert out.shape == (3, 7, 4)
    for t in range(3):
        torch.testing.assert_close(out[t], conv4_forward(ps[t], x[t], 4), rtol=1e-12, atol=1e-12)


def test_stack_params_sums_gradients_over_tasks():
    w = torch.randn(4, 3, requires_grad=True)
    stack_params({"w": w}, 5)["w"].sum().backward()
    torch.testing.assert_close(w.grad, torch.full((4, 3), 5.0))


@pytest.mark.parametrize("name", list(FAST))
def test_meta_gradient_matches_per_task_in_float64(synthetic_set, name):
    cls, kw = FAST[name]
    eps = double_batch(batch(synthetic_set))
    ref, fast = make(cls, synthetic_set, **kw), make(cls, synthetic_set, **kw)
    double(ref), double(fast)
    assert fast.TASK_BATCHED and same_shapes(eps)
    g_ref, g_fast = meta_grads(ref, eps, False), meta_grads(fast, eps, True)
    assert set(g_ref) == set(g_fast)
    for k in g_ref:
        torch.testing.assert_close(g_fast[k], g_ref[k], rtol=1e-9, atol=1e-12, msg=f"{name}: {k}")


@pytest.mark.parametrize("name", list(FAST))
def test_training_matches_per_task_over_several_float32_steps(synthetic_set, name):
    """Three float32 meta-iterations (1 inner step, as MAML's Omniglot 5-way setting) through the
    fast path and through the per-task loop agree with each other to 1e-5 and stay within 3e-4 of
    the float64 per-task trajectory: the paths differ by float32 summation order only.

    SGD as the outer optimizer: Adam's first steps divide gradients by their own magnitude, so
    coordinates whose true gradient is 0 (conv biases before batch norm) move by +-lr on round-off
    in either path. This tiny Conv-4 (8 filters, batch-norm statistics over 5 values in the last
    block) is ill-conditioned: with 2 inner steps at lr 0.4 the float32 per-task loop drifts ~1e-2
    from float64 within 3 steps. ANIL's drift here is 1.2e-4 for both paths (1.6e-7 when batch
    norm runs in NCHW): torch's channels-last batch norm sums its statistics less accurately
    (tests/test_core.py); MAML, FOMAML, BOIL and Meta-SGD stay within 1e-6.
    """
    cls, kw = FAST[name]
    eps = batch(synthetic_set, 9)
    runs = [make(cls, synthetic_set, **(kw | {"inner_steps": 1})) for _ in range(3)]
    truth, ref, fast = runs
    double(truth)
    for m in runs:
        m.optimizer = torch.optim.SGD(list(m.meta.values()), lr=0.05)
    for i in range(0, 9, 3):
        GradientLearner.outer_step(truth, double_batch(eps[i:i + 3]))
        GradientLearner.outer_step(ref, eps[i:i + 3])
        fast.outer_step(eps[i:i + 3])
    for k in truth.meta:
        for label, m in (("fast path", fast), ("per-task loop", ref)):
            torch.testing.assert_close(m.meta[k].double(), truth.meta[k].detach(), rtol=0, atol=3e-4,
                                       msg=lambda msg: f"{name} {label} {k}: {msg}")
        torch.testing.assert_close(fast.meta[k], ref.meta[k], rtol=0, atol=1e-5,
                                   msg=lambda msg: f"{name} fast path vs per-task loop {k}: {msg}")


@pytest.mark.parametrize("name", list(FAST))
def test_adapt_many_matches_adapt(synthetic_set, name):
    cls, kw = FAST[name]
    m = make(cls, synthetic_set, **kw)
    eps = batch(synthetic_set, 4)
    many = m.adapt_many([(ep.support_x, ep.support_y) for ep in eps])
    for predictor, ep in zip(many, eps):
        torch.testing.assert_close(predictor(ep.query_x), m.adapt(ep.support_x, ep.support_y)(ep.query_x),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task_batch", [1, 2])
def test_task_chunks_give_the_same_meta_gradient(synthetic_set, task_batch):
    """task_batch=2 on 3 tasks (chunks of 2 + 1) and task_batch=1 (the per-task loop) agree with one chunk."""
    eps = double_batch(batch(synthetic_set))
    whole, chunked = make(MAML, synthetic_set), make(MAML, synthetic_set, task_batch=task_batch)
    double(whole), double(chunked)
    g_whole, g_chunked = meta_grads(whole, eps, True), meta_grads(chunked, eps, True)
    for k in g_whole:
        torch.testing.assert_close(g_chunked[k], g_whole[k], rtol=1e-9, atol=1e-12)


def test_methods_with_their_own_computation_use_the_per_task_loop(synthetic_set):
    eps = batch(synthetic_set)
    assert same_shapes(eps) and not CAVIA.TASK_BATCHED and MAML.TASK_BATCHED


def test_unequal_shapes_fall_back_to_the_per_task_loop(synthetic_set):
    eps = batch(synthetic_set, 2)
    short = eps[1]
    eps[1] = Episode(short.support_x[:-1], short.support_y[:-1], short.query_x, short.query_y, short.classes,
                     short.split, short.index, short.spec_hash)
    assert not same_shapes(eps)
    m, ref = make(MAML, synthetic_set), make(MAML, synthetic_set)
    m.outer_step(eps)
    GradientLearner.outer_step(ref, eps)
    for k in m.meta:
        assert torch.equal(m.meta[k], ref.meta[k])


def test_stack_episodes_shapes(synthetic_set):
    eps = batch(synthetic_set)
    sx, sy, qx, qy = stack_episodes(eps)
    assert sx.shape == (3, *eps[0].support_x.shape) and sy.shape == (3, len(eps[0].support_y))
    assert qx.shape == (3, *eps[0].query_x.shape) and qy.shape == (3, len(eps[0].query_y))
    assert F.one_hot(sy).sum() == sy.numel()

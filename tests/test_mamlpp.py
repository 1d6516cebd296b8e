"""MAML++ (baselines/mamlpp.py): the multi-step-loss meta-gradient against a plain-autograd reference
in float64 (second- and first-order phases), the MSL / cosine / derivative-order schedules and their
resumption, per-step batch-norm statistics, and adaptation with exactly `inner_steps` steps."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from bench.api import Episode, TaskInfo
from baselines import fused, registry
from baselines.mamlpp import MAMLpp, cosine_lr, msl_weights

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3  # inner steps of the small gradient-test network
IMAGE = 16  # 16 -> 8 -> 4 -> 2 -> 1 through the four max-pools


def small(**kw) -> MAMLpp:
    """A 3-filter MAML++ on 1x16x16 images, 3 inner steps, 1 outer step per epoch, set up."""
    params = dict(hidden=3, inner_steps=STEPS, meta_batch=2, epoch_steps=1, total_epochs=10, msl_epochs=4,
                  first_order_epochs=2, inner_lr=0.1, seed=3) | kw
    return MAMLpp(**params).setup(TaskInfo((1, IMAGE, IMAGE), 4, 10))


def as_float64_with_distinct_rows(m: MAMLpp) -> None:
    """Float64 meta-parameters whose per-step BN rows and learning rates differ from step to step."""
    gen = torch.Generator().manual_seed(11)
    meta = {}
    for k, v in m.meta.items():
        v = v.detach().double()
        if k.startswith("bn") and k.endswith("weight"):
            v = v + 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
        elif k.startswith("bn"):
            v = v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
        elif k.startswith("lr."):
            v = v + 0.05 * torch.rand(v.shape, generator=gen, dtype=torch.float64)
        meta[k] = v.requires_grad_(True)
    m.meta = meta


def random_episode(way: int = 3, shot: int = 2, query: int = 2, seed: int = 0) -> Episode:
    gen = torch.Generator().manual_seed(seed)
    sx = torch.rand(way * shot, 1, IMAGE, IMAGE, generator=gen, dtype=torch.float64)
    qx = torch.rand(way * query, 1, IMAGE, IMAGE, generator=gen, dtype=torch.float64)
    sy, qy = torch.arange(way).repeat_interleave(shot), torch.arange(way).repeat_interleave(query)
    return Episode(sx, sy, qx, qy, tuple(range(way)), "train", 0, "x")


# --- a plain-autograd reference: torch's own batch norm, torch.autograd.grad ---------------------
def ref_forward(p: dict, x: torch.Tensor, step: int, way: int) -> torch.Tensor:
    for i in range(4):
        x = F.conv2d(x, p[f"conv{i}.weight"], p[f"conv{i}.bias"], padding=1)
        x = F.batch_norm(x, None, None, p[f"bn{i}.weight"][step], p[f"bn{i}.bias"][step], training=True, eps=1e-5)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p["head.weight"][:way], p["head.bias"][:way])


def ref_inner(p: dict, x: torch.Tensor, y: torch.Tensor, step: int, create_graph: bool) -> dict:
    """One step theta - lr[name][step] * grad on the conv and head tensors."""
    names = [k for k in p if k.startswith(("conv", "head"))]
    loss = F.cross_entropy(ref_forward(p, x, step, int(y.max()) + 1), y)
    grads = torch.autograd.grad(loss, [p[n] for n in names], create_graph=create_graph)
    return {**p, **{n: p[n] - p["lr." + n][step] * g for n, g in zip(names, grads)}}


def ref_task_loss(p: dict, ep: Episode, weights: list[float], create_graph: bool) -> torch.Tensor:
    fast, total = dict(p), 0.0
    for step, w in enumerate(weights):
        fast = ref_inner(fast, ep.support_x, ep.support_y, step, create_graph)
        total = total + w * F.cross_entropy(ref_forward(fast, ep.query_x, step, ep.way), ep.query_y)
    return total


# (outer steps done, second order?, MSL weights written out from the reference formula for N=3, 4 MSL epochs)
PHASES = [
    (1, False, [1 / 4, 1 / 4, 1 / 2]),  # epoch 1: first order (first_order_epochs=2), MSL annealing
    (3, True, [1 / 12, 1 / 12, 5 / 6]),  # epoch 3: second order, last MSL epoch
    (5, True, [0.0, 0.0, 1.0]),  # epoch 5: second order, MSL over: the last step only
]


@pytest.mark.parametrize("fit_steps,second,weights", PHASES, ids=["first-order-msl", "second-order-msl", "last-step"])
def test_meta_gradient_matches_plain_autograd(fit_steps, second, weights):
    m = small()
    as_float64_with_distinct_rows(m)
    m.fit_steps = fit_steps
    assert m.second_order() is second
    assert m.loss_weights() == pytest.approx(weights, abs=1e-15)
    ep = random_episode()
    keys = list(m.meta)
    got = torch.autograd.grad(m.task_loss(ep), [m.meta[k] for k in keys])
    want = torch.autograd.grad(ref_task_loss(m.meta, ep, weights, create_graph=second), [m.meta[k] for k in keys])
    for k, g, w in zip(keys, got, want):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12), (k, (g - w).abs().max().item())
    grads = dict(zip(keys, got))
    # every meta-learned kind of parameter gets a gradient: per-step BN rows and per-step lrs included
    used_steps = [s for s, w in enumerate(weights) if w > 0]
    for s in used_steps:
        assert grads["bn0.weight"][s].abs().sum() > 0 and grads["lr.conv1.weight"][s].abs() > 0, s
    # the multi-step loss reaches the BN row of every step it weights
    if len(used_steps) == 1:  # only the last step's query loss: earlier BN rows only through 2nd order
        assert bool(grads["bn3.bias"][:-1].abs().sum() > 0) is second


@pytest.mark.skipif(not fused.available(), reason="the fused kernel did not build")
@pytest.mark.parametrize("fit_steps,second,weights", PHASES[:2], ids=["first-order-msl", "second-order-msl"])
def test_fused_kernel_gives_the_unfused_meta_gradient_and_statistics(fit_steps, second, weights, monkeypatch):
    """With the switch on every block runs the kernel with its step's batch-norm row (float64: the same
    meta-gradient up to rounding) and the tracked per-step statistics are the unfused ones."""
    calls = []
    kernel = fused.bn_pool_relu
    monkeypatch.setattr(fused, "bn_pool_relu", lambda *a: calls.append(1) or kernel(*a))
    runs = []
    for on in (False, True):
        m = small()
        as_float64_with_distinct_rows(m)
        m.bn_stats = {k: v.double() for k, v in m.bn_stats.items()}
        m.fit_steps = fit_steps
        keys = list(m.meta)
        with fused.fused(on):
            grads = torch.autograd.grad(m.task_loss(random_episode()), [m.meta[k] for k in keys])
        runs.append((dict(zip(keys, grads)), m.bn_stats))
        assert len(calls) == (4 * 2 * STEPS if on else 0)  # 4 blocks x (support + query pass) x steps
    (want, want_stats), (got, got_stats) = runs
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11, msg=k)
    for k in want_stats:
        torch.testing.assert_close(got_stats[k], want_stats[k], rtol=1e-12, atol=1e-12, msg=k)
    assert not torch.equal(want_stats["bn1.running_var"][1], torch.ones(3, dtype=torch.float64))  # it tracked


def test_first_order_phase_detaches_second_order_terms():
    """Same parameters and weights: the first-order phase gives the detached-inner-gradient meta-gradient,
    which differs from the second-order one (so the phase really switches the derivative order)."""
    ep = random_episode(seed=1)
    grads = {}
    for fit_steps in (1, 2):  # epochs 1 (first order) and 2 (second order)
        m = small(msl_epochs=0)  # last step only, so both epochs use identical loss weights
        as_float64_with_distinct_rows(m)
        m.fit_steps = fit_steps
        keys = list(m.meta)
        grads[m.second_order()] = dict(zip(keys, torch.autograd.grad(m.task_loss(ep), [m.meta[k] for k in keys])))
        detached = torch.autograd.grad(ref_task_loss(m.meta, ep, [0.0, 0.0, 1.0], create_graph=False),
                                       [m.meta[k] for k in keys])
        if not m.second_order():
            for k, w in zip(keys, detached):
                assert torch.allclose(grads[False][k], w, rtol=1e-9, atol=1e-12), k
    diff = (grads[True]["conv0.weight"] - grads[False]["conv0.weight"]).abs().max().item()
    assert diff > 1e-6
    # first order: earlier BN rows get no gradient from the last step's query loss
    assert grads[False]["bn3.bias"][:-1].abs().sum() == 0 and grads[True]["bn3.bias"][:-1].abs().sum() > 0


# --- schedules ------------------------------------------------------------------------------
def test_msl_weights_anneal_from_uniform_to_last_step():
    for steps in (1, 2, 5):
        for msl_epochs in (1, 10, 50):
            prev = None
            for epoch in range(msl_epochs + 3):
                w = msl_weights(steps, msl_epochs, epoch)
                assert len(w) == steps and math.isclose(sum(w), 1.0, abs_tol=1e-12), (steps, msl_epochs, epoch)
                if epoch == 0:
                    assert w == pytest.approx([1 / steps] * steps)
                if epoch >= msl_epochs:
                    assert w == [0.0] * (steps - 1) + [1.0]
                elif prev is not None:  # non-final weights fall (to the 0.03/N floor), the final one grows
                    assert all(a <= b for a, b in zip(w[:-1], prev[:-1])) and w[-1] >= prev[-1]
                    assert min(w[:-1], default=1.0) >= 0.03 / steps - 1e-15
                prev = w
    # the reference's numbers: 5 steps, 10 MSL epochs, epoch 9 -> 0.02 each and 0.92; the floor at epoch 40 of 50
    assert msl_weights(5, 10, 9) == pytest.approx([0.02] * 4 + [0.92])
    assert msl_weights(5, 50, 49) == pytest.approx([0.006] * 4 + [0.976])


def test_cosine_lr_closed_form():
    assert cosine_lr(1e-3, 1e-5, 0, 100) == 1e-3
    assert cosine_lr(1e-3, 1e-5, 50, 100) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine_lr(1e-3, 1e-5, 100, 100) == pytest.approx(1e-5)
    assert cosine_lr(1e-3, 1e-5, 150, 100) == pytest.approx(1e-5)  # held at the minimum past the schedule
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=1e-5)
    for _ in range(37):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(1e-3, 1e-5, 37, 100), rel=1e-9)


def save_load(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_state(a: dict, b: dict, path: str = "state") -> None:
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_schedules_switch_at_the_right_outer_steps_and_survive_resume(synthetic_set):
    """2 outer steps per epoch, cosine over 4 epochs, MSL for 2 epochs, first order for 1 epoch."""
    kw = dict(hidden=4, inner_steps=2, meta_batch=1, epoch_steps=2, total_epochs=4, msl_epochs=2,
              first_order_epochs=1, outer_lr=0.01, min_outer_lr=0.001, seed=0)
    info = synthetic_set.task_info()
    m = MAMLpp(**kw).setup(info)
    stream = synthetic_set.stream("train")
    seen = []
    for step in range(10):
        order, weights = m.second_order(), m.loss_weights()
        m.fit(stream, 1)
        seen.append((m.epoch, order, weights, m.optimizer.param_groups[0]["lr"]))
    epochs_of_steps = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for step, (_, order, weights, lr) in enumerate(seen):
        e = epochs_of_steps[step]
        assert order is (e >= 1), step
        assert weights == (msl_weights(2, 2, e) if e < 2 else [0.0, 1.0]), step
        assert lr == pytest.approx(0.001 + 0.009 * (1 + math.cos(math.pi * min(e, 4) / 4)) / 2), step
    assert seen[0][2] == [0.5, 0.5] and seen[2][2] == pytest.approx([0.25, 0.75])

    # resumed across the derivative-order switch and the end of MSL: identical to an uninterrupted run
    whole = MAMLpp(**kw).setup(info).fit(synthetic_set.stream("train"), 6)
    first = MAMLpp(**kw).setup(info).fit(synthetic_set.stream("train"), 3)
    resumed = MAMLpp(**kw).load_state_dict(save_load(first.state_dict()))
    assert (resumed.epoch, resumed.second_order(), resumed.current_outer_lr()) == \
           (first.epoch, first.second_order(), first.current_outer_lr())
    resumed.fit(synthetic_set.stream("train", start=resumed.fit_episodes), 3)
    assert_same_state(whole.state_dict(), resumed.state_dict())


# --- batch-norm statistics, adaptation ------------------------------------------------------------
def test_per_step_running_statistics_follow_batch_norm_and_never_predict(synthetic_set):
    m = small(hidden=4)
    x = 30 * torch.rand(6, 1, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))  # large variance
    rm, rv = torch.zeros(4), torch.ones(4)
    h = F.conv2d(x, m.meta["conv0.weight"].detach(), m.meta["conv0.bias"].detach(), padding=1)
    F.batch_norm(h, rm, rv, training=True, momentum=0.1)  # torch's own running-statistics update
    m.forward_step(m.meta, x, 1, track=True)
    assert torch.allclose(m.bn_stats["bn0.running_mean"][1], rm, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m.bn_stats["bn0.running_var"][1], rv, rtol=1e-5, atol=0)  # unbiased, like torch
    assert torch.equal(m.bn_stats["bn0.running_mean"][0], torch.zeros(4))  # other steps untouched

    ep = random_episode(seed=2)
    ep = Episode(ep.support_x.float(), ep.support_y, ep.query_x.float(), ep.query_y, ep.classes, "test", 0, "x")
    before = {k: v.clone() for k, v in m.bn_stats.items()}
    a = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert all(torch.equal(before[k], m.bn_stats[k]) for k in before)  # adapt does not track
    for v in m.bn_stats.values():
        v.add_(5.0)
    assert torch.equal(a, m.adapt(ep.support_x, ep.support_y)(ep.query_x))  # transductive: stats unused
    m.fit(iter([ep] * 4), 1)
    assert not torch.equal(m.bn_stats["bn2.running_var"], before["bn2.running_var"] + 5.0)  # fit tracks
    names = {f"bn{i}.running_{s}" for i in range(4) for s in ("mean", "var")}
    assert set(save_load(m.state_dict())["bn_stats"]) == names


def test_adapt_uses_exactly_inner_steps_steps():
    m = small()
    as_float64_with_distinct_rows(m)
    assert "inner_steps_test" not in m.params()
    steps_taken = []
    inner = m.inner_update

    def counting(p, x, y, step, first_order, track=False):
        steps_taken.append((step, first_order, track))
        return inner(p, x, y, step, first_order, track)

    m.inner_update = counting
    ep = random_episode(seed=3)
    logits = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert steps_taken == [(s, True, False) for s in range(STEPS)]
    fast = dict(m.meta)
    for s in range(STEPS):
        fast = ref_inner(fast, ep.support_x, ep.support_y, s, create_graph=False)
    want = ref_forward(fast, ep.query_x, STEPS - 1, ep.way)  # the prediction uses the last step's BN row
    assert torch.allclose(logits, want.detach(), rtol=1e-9, atol=1e-12)


def test_tags_validation_and_registry():
    assert MAMLpp().tags.order == "second" and MAMLpp().tags.bn_mode == "transductive"
    assert MAMLpp(first_order_epochs=100, total_epochs=100).tags.order == "first"
    with pytest.raises(ValueError, match="inner_steps must be >= 1"):
        small(inner_steps=0)
    for key in ("omniglot-5w", "omniglot-20w", "miniimagenet"):
        p = registry.preset("mamlpp", key)
        d = p.values
        assert d["inner_steps"] == 5 and d["msl_epochs"] in (10, 15)
        assert p.steps == d["epoch_steps"] * d["total_epochs"] == 50000
    assert registry.preset("mamlpp", "miniimagenet").values["hidden"] == 48

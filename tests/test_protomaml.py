"""protomaml: the per-task head starts at W = 2c, b = -||c||^2 of the support prototypes, works for
any way, and the (first-order) meta-gradient reaches the body also through the prototypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.api import Episode
from bench.checks import episode_set
from baselines.core import conv4_features
from baselines.protomaml import ProtoMAML, proto_head
from baselines.protonet import prototypes, squared_distances
from test_zoo import to_double  # tests/ is on sys.path (pytest's rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")


def small(synthetic_set, **kw) -> ProtoMAML:
    params = dict(hidden=8, meta_batch=2, inner_lr=0.1, inner_steps=2, inner_steps_test=3, seed=1) | kw
    return ProtoMAML(**params).setup(synthetic_set.task_info())


def test_head_init_is_twice_the_prototypes_and_minus_their_squared_norms(synthetic_set):
    m = small(synthetic_set)
    assert not any(k.startswith("head.") for k in m.meta)  # no meta-learned head
    ep = episode_set(3, 2, 3).episode("train", 4)
    start = m.initial_params(ep.support_x, ep.support_y)
    feats = conv4_features(m.meta, ep.support_x)
    for k in range(3):
        c = feats[ep.support_y == k].mean(0)
        assert torch.allclose(start["head.weight"][k], 2 * c, atol=1e-6)
        assert torch.allclose(start["head.bias"][k], -(c * c).sum(), atol=1e-5)
    assert start["head.weight"].shape[0] == 3


def test_without_inner_steps_predictions_are_the_prototypical_networks(synthetic_set):
    m = small(synthetic_set, inner_steps_test=0).fit(synthetic_set.stream("train"), 1)
    ep = synthetic_set.episode("test", 0)
    logits = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    body = {k: v.detach() for k, v in m.meta.items()}
    with torch.no_grad():
        c = prototypes(conv4_features(body, ep.support_x), ep.support_y, ep.way)
        neg_dist = -squared_distances(conv4_features(body, ep.query_x), c)
    # 2c.f - |c|^2 = -|f - c|^2 + |f|^2: equal up to a per-query constant, so equal softmax
    assert torch.allclose(F.softmax(logits, 1), F.softmax(neg_dist, 1), atol=1e-5)
    assert torch.allclose(proto_head(c)["head.bias"], -(c ** 2).sum(1))


def test_variable_way_episodes_train_and_adapt(synthetic_set):
    m = small(synthetic_set)
    mixed = iter([episode_set(w, 1, 3).episode("train", i) for i, w in enumerate([2, 5, 3, 4, 5, 2])])
    m.fit(mixed, 3)
    assert m.fit_episodes == 6
    for way in (2, 3, 4, 5):
        ep = episode_set(way, 2, 3).episode("test", way)
        out = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
        assert out.shape == (len(ep.query_y), way) and torch.isfinite(out).all()


def reference_grads(m: ProtoMAML, ep: Episode, detach_init: bool) -> list[torch.Tensor]:
    """Plain autograd: prototype head from the body, inner steps on everything, query loss.

    The inner gradients are partial derivatives, the head an independent parameter (the head
    init depends on the body, so autograd.grad w.r.t. the body itself would add that path too):
    they are taken w.r.t. zero perturbations added to each parameter."""
    c = prototypes(conv4_features(m.meta, ep.support_x), ep.support_y, ep.way)
    w0, b0 = 2 * c, -(c ** 2).sum(1)
    if detach_init:
        w0, b0 = w0.detach().requires_grad_(True), b0.detach().requires_grad_(True)
    p = {**m.meta, "head.weight": w0, "head.bias": b0}
    for _ in range(m.inner_steps):
        eps = {k: torch.zeros_like(v, requires_grad=True) for k, v in p.items()}
        loss = F.cross_entropy(m.forward({k: p[k] + eps[k] for k in p}, ep.support_x, ep.way), ep.support_y)
        gs = torch.autograd.grad(loss, list(eps.values()), create_graph=not m.first_order)
        p = {k: v - m.inner_lr * (g.detach() if m.first_order else g) for (k, v), g in zip(p.items(), gs)}
    outer = F.cross_entropy(m.forward(p, ep.query_x, ep.way), ep.query_y)
    return list(torch.autograd.grad(outer, list(m.meta.values())))


@pytest.mark.parametrize("first_order", [True, False], ids=["first", "second"])
def test_meta_gradient_matches_autograd_reference_float64(synthetic_set, first_order):
    m = small(synthetic_set, first_order=first_order)
    ep = to_double(m, episode_set(4, 2, 3).episode("train", 1))
    got = torch.autograd.grad(m.task_loss(ep), list(m.meta.values()))
    ref = reference_grads(m, ep, detach_init=False)
    for k, g, r in zip(m.meta, got, ref):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-11), (k, (g - r).abs().max().item())


def test_meta_gradient_reaches_the_body_through_the_prototypes(synthetic_set):
    m = small(synthetic_set)
    ep = to_double(m, synthetic_set.episode("train", 0))
    got = torch.autograd.grad(m.task_loss(ep), list(m.meta.values()))
    without = reference_grads(m, ep, detach_init=True)  # FOMAML's identity path only
    for k, g, w in zip(m.meta, got, without):
        if k.startswith("conv") and k.endswith(".bias"):
            continue  # a conv bias before batch norm gets no gradient on any path (the mean is subtracted)
        assert (g - w).abs().max() > 1e-6, f"{k}: no gradient through the prototype head init"


def test_outer_learning_rate_step_decay(synthetic_set):
    m = small(synthetic_set, outer_lr=1e-3, outer_lr_decay=0.5, outer_lr_decay_every=2, meta_batch=1)
    stream = synthetic_set.stream("train")
    seen = []
    for _ in range(5):
        m.fit(stream, 1)
        seen.append(m.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])

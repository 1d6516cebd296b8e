"""MeTAL: the task-adaptive learned inner loss, its meta-gradient, and its use of the unlabelled queries.

The float64 meta-gradient (of every Conv-4, loss-network and adapter parameter) is compared with a
plain-autograd reference that transcribes the reference code's net_forward / LossAdapter
(baiksung/MeTAL) on its own, with create_graph=True through the inner steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.api import Episode
from baselines import registry
from baselines.metal import MeTAL
from test_zoo import small as small_learner, to_double as as_double  # tests/ is on sys.path

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTED = [f"conv{i}.{t}" for i in range(4) for t in ("weight", "bias")] + ["head.weight", "head.bias"]


def small(synthetic_set, **kw) -> MeTAL:
    return small_learner(MeTAL, synthetic_set, **(dict(inner_steps=2, inner_lr=0.3) | kw))


def perceptron(x, w1, b1, w2, b2):
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)


def task_adapted(meta, name, state):
    """LossAdapter + StepLossAdapter: (1 + multiplier_bias[i] * m_i) * W_i + offset_bias[i] * o_i."""
    a, net = f"adapter.{name}.", f"loss.{name}."
    out = perceptron(state, meta[a + "w1"], meta[a + "b1"], meta[a + "w2"], meta[a + "b2"])
    multiplier, offset = torch.chunk(out, chunks=2, dim=-1)
    return [(1 + meta[a + "scale"][i] * multiplier[i]) * meta[net + t] + meta[a + "shift"][i] * offset[i]
            for i, t in enumerate(("w1", "b1", "w2", "b2"))]


def normalised(t):
    return (t - t.mean()) / (t.std() + 1e-12)


def reference_inner_loss(m, p, ep, step, use_query):
    """net_forward with meta_loss_weights (5-way: no padding): support CE + support and query learned losses."""
    n = len(ep.support_y)
    preds = m.forward(p, torch.cat((ep.support_x, ep.query_x)) if use_query else ep.support_x)
    support_preds, query_preds = preds[:n], preds[n:]
    support_loss = F.cross_entropy(support_preds, ep.support_y)
    support_task_state = torch.stack([support_loss] + [p[k].mean() for k in ADAPTED])
    weights = task_adapted(m.meta, f"support{step}", normalised(support_task_state))
    support_y = torch.zeros(support_preds.shape, dtype=support_preds.dtype)
    support_y[torch.arange(n), ep.support_y] = 1
    rows = torch.cat((support_task_state.view(1, -1).expand(n, -1), support_preds, support_y), -1)
    loss = support_loss + perceptron(normalised(rows), *weights).mean()
    if use_query:
        out_prob = F.log_softmax(query_preds, dim=-1)
        instance_entropy = torch.sum(torch.exp(out_prob) * out_prob, dim=-1)
        query_task_state = torch.stack([p[k].mean() for k in ADAPTED])
        rows = normalised(torch.cat((query_task_state.view(1, -1).expand(len(query_preds), -1), query_preds,
                                     instance_entropy.view(-1, 1)), -1))
        loss = loss + perceptron(rows, *task_adapted(m.meta, f"query{step}", rows.mean(0))).mean()
    return loss


def reference_grads(m: MeTAL, ep: Episode):
    p = dict(m.meta)
    for step in range(m.inner_steps):
        loss = reference_inner_loss(m, p, ep, step, m.use_query)
        gs = torch.autograd.grad(loss, [p[k] for k in ADAPTED], create_graph=not m.first_order)
        p = {**p, **{k: p[k] - m.inner_lr * (g.detach() if m.first_order else g) for k, g in zip(ADAPTED, gs)}}
    n = len(ep.support_y)
    logits = m.forward(p, torch.cat((ep.support_x, ep.query_x)))[n:] if m.use_query else m.forward(p, ep.query_x)
    return torch.autograd.grad(F.cross_entropy(logits, ep.query_y), list(m.meta.values()), allow_unused=True)


@pytest.mark.parametrize("use_query", [True, False], ids=["transductive", "support-only"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_meta_gradient_matches_autograd_reference_float64(synthetic_set, first_order, use_query):
    m = small(synthetic_set, first_order=first_order, use_query=use_query)
    m.fit(synthetic_set.stream("train"), 1)  # adapter scales and shifts leave zero: the modulation is live
    ep = as_double(m, synthetic_set.episode("train", 5))
    got = torch.autograd.grad(m.task_loss(ep), list(m.meta.values()), allow_unused=True)
    ref = reference_grads(m, ep)
    checked = 0
    for k, g, r in zip(m.meta, got, ref):
        g = torch.zeros_like(m.meta[k]) if g is None else g
        r = torch.zeros_like(m.meta[k]) if r is None else r
        assert torch.allclose(g, r, rtol=1e-7, atol=1e-10), (k, (g - r).abs().max().item())
        checked += bool(r.abs().max() > 0)
    names = [k for k, r in zip(m.meta, ref) if r is not None and r.abs().max() > 0]
    # the learned losses act on the meta-gradient only through the inner gradients: nothing when first order
    assert any(k.startswith("loss.support") for k in names) == any(k.startswith("adapter.") for k in names) \
        == (not first_order)
    assert any(k.startswith("loss.query") for k in names) == (use_query and not first_order)
    assert checked >= 14


def test_adapter_starts_as_the_identity_and_its_scales_get_meta_gradients(synthetic_set):
    m = small(synthetic_set)
    assert all(m.meta[f"adapter.{s}{j}.{t}"].abs().sum() == 0
               for s in ("support", "query") for j in range(2) for t in ("scale", "shift"))
    rows, state = torch.randn(4, 21), torch.randn(11)
    plain = perceptron(rows, *(m.meta[f"loss.support0.{t}"] for t in ("w1", "b1", "w2", "b2"))).mean()
    assert torch.equal(m.learned_loss(m.meta, "support0", state, rows), plain)
    ep = synthetic_set.episode("train", 0)
    grads = dict(zip(m.meta, torch.autograd.grad(m.task_loss(ep), list(m.meta.values()), allow_unused=True)))
    assert grads["adapter.support0.scale"][0].abs() > 0 and grads["adapter.query1.shift"].abs().min() > 0
    assert grads["adapter.support0.w1"].abs().max() == 0  # behind the zero scales and shifts at first


def test_queries_enter_the_adaptation_only_when_transductive(synthetic_set):
    ep = synthetic_set.episode("test", 2)
    support = (ep.support_x, ep.support_y)
    other = synthetic_set.episode("test", 3).query_x
    for use_query in (True, False):
        m = small(synthetic_set, use_query=use_query)
        a, b = (m.inner(m.meta, support, q if use_query else None, 2, True) for q in (ep.query_x, other))
        assert any(not torch.equal(a[k], b[k]) for k in a) == use_query
    # transductive: a query's prediction depends on the other queries (never on their labels)
    m = small(synthetic_set)
    predict = m.adapt(*support)
    with torch.no_grad():
        full, part = predict(ep.query_x), predict(ep.query_x[:5])
    assert not torch.allclose(full[:5], part, atol=1e-4)
    assert m.tags.transductive


def test_a_predictor_adapts_a_snapshot_of_the_meta_parameters(synthetic_set):
    m = small(synthetic_set)
    ep = synthetic_set.episode("test", 0)
    predict = m.adapt(ep.support_x, ep.support_y)
    with torch.no_grad():
        before = predict(ep.query_x)
    m.fit(synthetic_set.stream("train"), 1)
    with torch.no_grad():
        assert torch.equal(predict(ep.query_x), before)
        assert not torch.equal(m.adapt(ep.support_x, ep.support_y)(ep.query_x), before)


def test_more_test_steps_than_loss_networks_reuse_the_last(synthetic_set):
    m = small(synthetic_set, inner_steps=2, inner_steps_test=4)
    assert not any(k.startswith(("loss.support2", "adapter.query2")) for k in m.meta)
    ep = synthetic_set.episode("test", 1)
    with torch.no_grad():
        four = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
        m.inner_steps_test = 2
        two = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert four.shape == two.shape == (25, 5) and not torch.equal(four, two)


def test_presets_follow_the_released_config():
    mini = registry.preset("metal", "miniimagenet")
    assert mini.values == dict(inner_lr=0.01, inner_steps=5, inner_steps_test=5, meta_batch=2, outer_lr=1e-3,
                               hidden=48)
    assert mini.steps == 50000 and mini.repository == "baiksung/MeTAL" and mini.file.endswith("MeTAL.json")
    for key in ("omniglot-5w", "omniglot-20w"):
        p = registry.preset("metal", key)
        assert p.values["inner_steps"] == p.values["inner_steps_test"] and "our choice" in p.note

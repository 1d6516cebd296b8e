"""Mixture of initial conditions: support-loss assignment (never query labels), gradient only to the
assigned component, K = 1 is MAML exactly, assignment counts survive state_dict round trips."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from bench.api import Episode
from baselines.core import episode_loss, inner_loop
from baselines.maml import MAML
from baselines.mixture import Mixture

pytestmark = pytest.mark.usefixtures("one_thread")


def small(synthetic_set, cls=Mixture, **kw):
    params = dict(meta_batch=2, hidden=8, inner_steps_test=3, seed=1) | ({"n_components": 3} if cls is Mixture else {})
    return cls(**(params | kw)).setup(synthetic_set.task_info())


def support_losses(m: Mixture, ep: Episode) -> torch.Tensor:
    """Post-adaptation support loss of every component, computed independently of Mixture.assign."""
    out = []
    for j in range(m.n_components):
        start = {k.split(".", 1)[1]: v.detach() for k, v in m.meta.items() if k.startswith(f"c{j}.")}
        fast = inner_loop(episode_loss(m.forward), start, list(start), (ep.support_x, ep.support_y),
                          m.inner_steps, m.inner_lr, first_order=True)
        out.append(F.cross_entropy(m.forward(fast, ep.support_x, ep.way), ep.support_y))
    return torch.stack(out).detach()


def with_query_labels(ep: Episode, query_y: torch.Tensor) -> Episode:
    return Episode(ep.support_x, ep.support_y, ep.query_x, query_y, ep.classes, ep.split, ep.index, ep.spec_hash)


def overwrite_component(m: Mixture, j: int, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in params.items():
            m.meta[f"c{j}.{k}"].copy_(v)


def test_components_are_independent_draws_and_component_zero_is_mamls_init(synthetic_set):
    m, maml = small(synthetic_set), small(synthetic_set, MAML)
    assert len(m.meta) == 3 * len(maml.meta)
    assert all(torch.equal(m.component(0)[k], maml.meta[k]) for k in maml.meta)
    assert not torch.equal(m.component(1)["conv0.weight"], m.component(2)["conv0.weight"])
    assert m.assign_counts.tolist() == [0, 0, 0]


def test_assignment_is_the_lowest_support_loss_and_ignores_the_query_set(synthetic_set):
    m = small(synthetic_set)
    for i in range(4):
        ep = synthetic_set.episode("train", i)
        j, _, losses = m.assign(ep.support_x, ep.support_y)
        ref = support_losses(m, ep)
        assert torch.allclose(losses, ref) and j == int(ref.argmin())
    # make component 2 the best fit for this support set: it must win, whatever the query labels say
    ep = synthetic_set.episode("train", 7)
    start = {k: v.detach() for k, v in m.component(2).items()}
    fitted = inner_loop(episode_loss(m.forward), start, list(start), (ep.support_x, ep.support_y), 20, m.inner_lr,
                        first_order=True)
    overwrite_component(m, 2, fitted)
    assert int(support_losses(m, ep).argmin()) == 2
    for query_y in (ep.query_y, ep.query_y.flip(0), torch.zeros_like(ep.query_y)):
        before = m.assign_counts.clone()
        m.task_loss(with_query_labels(ep, query_y))
        assert (m.assign_counts - before).tolist() == [0, 0, 1]
    # ties go to the lowest index: components 1 and 2 identical and best
    overwrite_component(m, 1, fitted)
    assert m.assign(ep.support_x, ep.support_y)[0] == 1


def test_only_the_assigned_component_receives_gradient(synthetic_set):
    m = small(synthetic_set)
    ep = synthetic_set.episode("train", 3)
    j, _, _ = m.assign(ep.support_x, ep.support_y)
    m.task_loss(ep).backward()
    for k, v in m.meta.items():
        if k.startswith(f"c{j}."):
            assert v.grad is not None and v.grad.abs().sum() > 0, k
        else:
            assert v.grad is None, k
    # a whole outer step: components that won no task of the batch keep their values exactly
    m = small(synthetic_set, meta_batch=1)
    ep = synthetic_set.episode("train", 0)
    j, _, _ = m.assign(ep.support_x, ep.support_y)
    before = {k: v.detach().clone() for k, v in m.meta.items()}
    m.fit(iter([ep]), 1)
    for k, v in m.meta.items():
        assert torch.equal(v, before[k]) != k.startswith(f"c{j}."), k


def double(m, episodes: list[Episode]) -> list[Episode]:
    """Move a method to float64 (meta-parameters and optimizer) and its episodes with it."""
    m.meta = {k: v.detach().double().requires_grad_(True) for k, v in m.meta.items()}
    m.optimizer = m.make_optimizer()
    return [Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y, e.classes, e.split, e.index,
                    e.spec_hash) for e in episodes]


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_one_component_is_maml_exactly(synthetic_set, first_order):
    """Same initialisation, same meta-gradient (float64; bitwise equality is not promised across different
    allocation patterns), same adapted predictions."""
    mix = small(synthetic_set, n_components=1, first_order=first_order)
    maml = small(synthetic_set, MAML, first_order=first_order)
    assert [k[3:] for k in mix.meta] == list(maml.meta)
    assert all(torch.equal(mix.meta["c0." + k], v) for k, v in maml.meta.items())
    batch = synthetic_set.episodes("train", 2)
    mix_batch, maml_batch = double(mix, batch), double(maml, batch)
    mix.fit(iter(mix_batch), 1)
    maml.fit(iter(maml_batch), 1)
    for k, v in maml.meta.items():
        assert torch.allclose(mix.meta["c0." + k].grad, v.grad, rtol=1e-10, atol=1e-14), k
    test = double(mix, [synthetic_set.episode("test", 0)])[0]
    double(maml, [])
    assert torch.allclose(mix.adapt(test.support_x, test.support_y)(test.query_x),
                          maml.adapt(test.support_x, test.support_y)(test.query_x), rtol=1e-10, atol=1e-12)


def test_adapt_uses_the_same_assignment_rule(synthetic_set):
    m = small(synthetic_set, inner_steps_test=4)
    m.fit(synthetic_set.stream("train"), 2)
    counts = m.assign_counts.clone()
    for i in range(3):
        ep = synthetic_set.episode("test", i)
        j = int(support_losses(m, ep).argmin())
        start = {k: v.detach() for k, v in m.component(j).items()}
        fast = inner_loop(episode_loss(m.forward), start, list(start), (ep.support_x, ep.support_y), 4, m.inner_lr,
                          first_order=True)
        got = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
        assert torch.allclose(got, m.forward(fast, ep.query_x, ep.way).detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(m.assign_counts, counts)  # adapting does not count


def test_state_round_trip_keeps_counts_and_resumes_exactly(synthetic_set):
    a = small(synthetic_set)
    a.fit(synthetic_set.stream("train"), 4)
    b = small(synthetic_set)
    b.fit(synthetic_set.stream("train"), 2)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    c = Mixture(**b.params()).load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(c.assign_counts, b.assign_counts) and int(c.assign_counts.sum()) == c.fit_episodes == 4
    c.fit(synthetic_set.stream("train", start=c.fit_episodes), 2)
    assert torch.equal(a.assign_counts, c.assign_counts) and int(a.assign_counts.sum()) == 8
    assert all(torch.equal(a.meta[k], c.meta[k]) for k in a.meta)

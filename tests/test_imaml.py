"""iMAML: conjugate gradient, the implicit meta-gradient against dense solves and finite differences
(float64), the detached proximal inner loop, and the outer step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian
from torch.func import grad

from baselines.core import episode_loss, inner_loop
from baselines.imaml import IMAML, conjugate_gradient, flatten, proximal_loss, unflatten
from test_zoo import to_double  # tests/ is on sys.path (pytest's rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class TinyIMAML(IMAML):
    """iMAML on a smooth one-hidden-layer tanh network over 7x7 average-pooled images (335 parameters):
    small enough for a dense Hessian, smooth enough that gradient descent solves the proximal inner
    problem to machine precision."""

    def init_meta(self, info, gen):
        return {"w1": torch.randn(6, 49, generator=gen) * 0.3, "b1": torch.zeros(6),
                "head.weight": torch.randn(info.max_way, 6, generator=gen) * 0.5,
                "head.bias": torch.zeros(info.max_way)}

    def forward(self, p, x, way=None):
        h = torch.tanh(F.linear(F.avg_pool2d(x, 4).flatten(1), p["w1"], p["b1"]))
        w, b = p["head.weight"], p["head.bias"]
        if way is not None:
            w, b = w[:way], b[:way]
        return F.linear(h, w, b)


def dense_implicit_gradient(m, phi, ep):
    """(I + H / lam)^{-1} grad L_query(phi) with the full support-loss Hessian and torch.linalg.solve;
    also returns I + H / lam [n, n]."""
    keys = list(phi)
    support = lambda v: episode_loss(m.forward)(unflatten(v, phi, keys), ep.support_x, ep.support_y)  # noqa: E731
    h = hessian(support, flatten(phi, keys))  # plain autograd, row by row
    g_query = grad(lambda p: F.cross_entropy(m.forward(p, ep.query_x, ep.way), ep.query_y))(phi)
    a = torch.eye(len(h), dtype=h.dtype) + h / m.lam
    return torch.linalg.solve(a, flatten(g_query, keys)), a


def test_conjugate_gradient_solves_an_spd_system():
    gen = torch.Generator().manual_seed(0)
    n = 30
    q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = q @ q.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(a, b)
    errors = []
    for steps in (1, 5, 15, n):
        x = conjugate_gradient(lambda v: a @ v, b, steps)
        e = x - exact
        errors.append(float(e @ a @ e))  # CG minimises the A-norm error over a growing Krylov space
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-3  # one step is far from the solution ...
    x = conjugate_gradient(lambda v: a @ v, b, 2 * n)  # ... n steps solve it (early stop on the residual after)
    assert torch.allclose(x, exact, rtol=1e-9, atol=1e-10), (x - exact).abs().max().item()
    assert torch.equal(conjugate_gradient(lambda v: a @ v, torch.zeros(n, dtype=torch.float64), 5),
                       torch.zeros(n, dtype=torch.float64))


def test_conjugate_gradient_stops_at_non_positive_curvature():
    a = torch.diag(torch.tensor([1.0, -3.0], dtype=torch.float64))
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.equal(conjugate_gradient(lambda v: a @ v, b, 5), b)  # first step: the H = 0 solution
    b = torch.tensor([1.0, 0.1], dtype=torch.float64)
    a = torch.tensor([[1.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, 5)
    assert torch.equal(x, conjugate_gradient(lambda v: a @ v, b, 1))  # one step, then negative curvature: stop
    assert not torch.allclose(x, torch.linalg.solve(a, b)) and not torch.equal(x, b)


def test_implicit_gradient_is_exact_at_the_inner_optimum_float64(synthetic_set):
    """Inner problem solved to machine precision: CG (with enough steps) equals the dense solve, and the
    dense solve equals the finite-difference derivative of theta -> L_query(phi*(theta))."""
    info = synthetic_set.task_info()
    m = TinyIMAML(seed=3, inner_lr=0.1, inner_steps=600, lam=2.0, cg_steps=400).setup(info)
    ep = to_double(m, synthetic_set.episode("train", 0))
    theta = {k: v.detach() for k, v in m.meta.items()}
    keys = list(theta)
    phi = m.solve_inner(ep.support_x, ep.support_y, m.inner_steps, m.lam)
    prox = proximal_loss(episode_loss(m.forward), theta, m.lam)
    stationarity = grad(lambda p: prox(p, ep.support_x, ep.support_y))(phi)
    assert flatten(stationarity, keys).norm() < 1e-12
    dense, a = dense_implicit_gradient(m, phi, ep)
    assert torch.linalg.eigvalsh(a).min() > 0  # at a minimum of the proximal problem: I + H / lam is SPD
    cg = flatten(m.implicit_gradient(phi, (ep.support_x, ep.support_y), (ep.query_x, ep.query_y)), keys)
    assert torch.allclose(cg, dense, rtol=1e-9, atol=1e-11), (cg - dense).abs().max().item()
    assert torch.allclose(flatten(m.meta_gradient(ep), keys), cg, rtol=1e-12, atol=1e-15)

    def outer(t: torch.Tensor) -> float:
        m.meta = unflatten(t, theta, keys)
        p = m.solve_inner(ep.support_x, ep.support_y, m.inner_steps, m.lam)
        return F.cross_entropy(m.forward(p, ep.query_x, ep.way), ep.query_y).item()

    d = torch.randn(len(cg), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t0, eps = flatten(theta, keys), 1e-5
    fd = (outer(t0 + eps * d) - outer(t0 - eps * d)) / (2 * eps)
    assert abs(fd - float(dense @ d)) < 1e-7 * max(1.0, abs(fd)), (fd, float(dense @ d))
    g_query = grad(lambda p: F.cross_entropy(m.forward(p, ep.query_x, ep.way), ep.query_y))(phi)
    assert abs(fd - float(flatten(g_query, keys) @ d)) > 1e-3  # the first-order shortcut would be wrong


def test_cg_hessian_vector_products_on_conv4_match_the_dense_hessian_float64(synthetic_set):
    """The real backbone (Conv-4, batch norm, max-pool): CG with HVPs equals the dense solve."""
    info = synthetic_set.task_info()
    m = IMAML(hidden=2, seed=0, inner_lr=0.1, lam=50.0, cg_steps=400).setup(info)
    ep = to_double(m, synthetic_set.episode("train", 1))
    phi = m.solve_inner(ep.support_x, ep.support_y, 3, m.lam)
    dense, a = dense_implicit_gradient(m, phi, ep)
    assert torch.linalg.eigvalsh(a).min() > 0
    cg = flatten(m.implicit_gradient(phi, (ep.support_x, ep.support_y), (ep.query_x, ep.query_y)), list(phi))
    assert torch.allclose(cg, dense, rtol=1e-8, atol=1e-10), (cg - dense).abs().max().item()
    h_only = flatten(grad(lambda p: F.cross_entropy(m.forward(p, ep.query_x, ep.way), ep.query_y))(phi), list(phi))
    assert not torch.allclose(cg, h_only, atol=1e-6)  # the Hessian term matters


def test_inner_loop_is_detached_proximal_gradient_descent(synthetic_set):
    m = IMAML(hidden=4, seed=0, inner_lr=0.1, lam=2.0).setup(synthetic_set.task_info())
    ep = synthetic_set.episode("train", 2)
    phi = m.solve_inner(ep.support_x, ep.support_y, 2, m.lam)
    assert all(not v.requires_grad and v.grad_fn is None for v in phi.values())  # no inner trajectory in any graph
    theta = {k: v.detach() for k, v in m.meta.items()}
    loss = episode_loss(m.forward)
    g0 = grad(loss)(theta, ep.support_x, ep.support_y)
    phi1 = {k: theta[k] - 0.1 * g0[k] for k in theta}  # the proximal term has zero gradient at theta
    g1 = grad(loss)(phi1, ep.support_x, ep.support_y)
    phi2 = {k: phi1[k] - 0.1 * (g1[k] + 2.0 * (phi1[k] - theta[k])) for k in theta}
    for k in theta:
        assert torch.allclose(phi[k], phi2[k], rtol=1e-5, atol=1e-6), k
    # lam_test = 0 (the reference's evaluation): plain gradient descent, MAML's first-order inner loop
    plain = m.solve_inner(ep.support_x, ep.support_y, 3, 0.0)
    ref = inner_loop(loss, theta, list(theta), (ep.support_x, ep.support_y), 3, 0.1, first_order=True)
    assert all(torch.allclose(plain[k], ref[k], rtol=1e-6, atol=1e-7) for k in theta)


def test_outer_step_applies_the_mean_implicit_gradient(synthetic_set):
    m = IMAML(hidden=4, seed=0, meta_batch=2, inner_steps=3).setup(synthetic_set.task_info())
    batch = synthetic_set.episodes("train", 2)
    grads = [m.meta_gradient(ep) for ep in batch]
    before = {k: v.detach().clone() for k, v in m.meta.items()}
    m.fit(iter(batch), 1)
    for k, v in m.meta.items():
        assert torch.allclose(v.grad, (grads[0][k] + grads[1][k]) / 2, rtol=1e-6, atol=1e-9), k
    assert any(not torch.equal(before[k], m.meta[k]) for k in before)
    assert m.optimizer.defaults["eps"] == m.adam_eps == 1e-3


def test_adapt_uses_lam_test_and_leaves_meta_untouched(synthetic_set):
    m = IMAML(hidden=4, seed=0, inner_steps_test=4).setup(synthetic_set.task_info())
    ep = synthetic_set.episode("test", 0)
    before = {k: v.detach().clone() for k, v in m.meta.items()}
    logits = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    want = m.forward(m.solve_inner(ep.support_x, ep.support_y, 4, m.lam_test), ep.query_x, ep.way)
    assert torch.allclose(logits, want.detach(), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(before[k], m.meta[k]) for k in before)
    m.lam_test = m.lam
    assert not torch.allclose(m.adapt(ep.support_x, ep.support_y)(ep.query_x), logits, atol=1e-4)

"""The functional core: Conv-4, fused batch norm, memory layouts, the inner loop, second-order terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.api import new_generator
import baselines.core as core
from baselines.core import (batch_norm, batch_norm_explicit, conv4_forward, conv4_init, conv_layout, episode_loss,
                            higher_order, inner_loop)


def tiny_task(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    params = {k: v.to(dtype).requires_grad_(True) for k, v in conv4_init(gen, 1, 8, 5, 28).items()}
    x = torch.rand(10, 1, 28, 28, generator=gen, dtype=dtype)
    y = torch.arange(5).repeat(2)
    qx = torch.rand(15, 1, 28, 28, generator=gen, dtype=dtype)
    qy = torch.arange(5).repeat(3)
    return params, x, y, qx, qy


def reference_meta_grad(params, x, y, qx, qy, steps, lr):
    """MAML meta-gradient with plain autograd and create_graph=True (the textbook reference)."""
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(conv4_forward(fast, x), y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
    outer = F.cross_entropy(conv4_forward(fast, qx), qy)
    return torch.autograd.grad(outer, list(params.values()))


def func_meta_grad(params, x, y, qx, qy, steps, lr, first_order):
    fast = inner_loop(episode_loss(conv4_forward), params, list(params), (x, y), steps, lr, first_order)
    outer = F.cross_entropy(conv4_forward(fast, qx), qy)
    return torch.autograd.grad(outer, list(params.values()))


def test_batch_norm_uses_batch_statistics():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 5 + 2
    out = batch_norm(x, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    ref = F.batch_norm(x, None, None, training=True, eps=1e-5)
    assert torch.allclose(out, ref, atol=1e-10)


def test_fused_and_explicit_batch_norm_agree_in_float64():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 5 + 2
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(batch_norm(x, w, b), batch_norm_explicit(x, w, b), rtol=1e-12, atol=1e-12)


def test_fused_batch_norm_second_order_meta_gradient_equals_the_explicit_formula(monkeypatch):
    """The fast path's fused batch norm through torch.func.grad (second order) gives the meta-gradient
    of the explicit mean/variance formula under plain autograd, to float64 precision."""
    params, x, y, qx, qy = tiny_task()
    got = func_meta_grad(params, x, y, qx, qy, steps=2, lr=0.3, first_order=False)
    monkeypatch.setattr(core, "batch_norm", batch_norm_explicit)
    ref = reference_meta_grad(params, x, y, qx, qy, steps=2, lr=0.3)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def strictly_channels_last(x: torch.Tensor) -> bool:
    """Channels innermost in memory (is_contiguous says True for both layouts when C == 1)."""
    return x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)


def test_conv_layout_is_channels_last_with_the_same_values():
    for c in (1, 3):
        x = torch.rand(4, c, 6, 6)
        y = conv_layout(x)
        assert strictly_channels_last(y) and torch.equal(y, x)
        assert strictly_channels_last(F.conv2d(y, torch.randn(5, c, 3, 3), padding=1))  # convs follow it
        with higher_order():
            assert conv_layout(x) is x
        assert not strictly_channels_last(x)


def test_higher_order_is_scoped_and_nests():
    x = torch.rand(2, 3, 4, 4)
    with higher_order():
        with higher_order(False):
            assert strictly_channels_last(conv_layout(x))
        assert conv_layout(x) is x
    assert strictly_channels_last(conv_layout(x))


def test_layouts_compute_the_same_function_in_float64():
    """conv4_forward and its second-order meta-gradient are the same in NCHW and channels-last
    (the layout changes memory order only); the reference above runs its support passes in
    channels-last, inner_loop runs them in NCHW, and they agree to 1e-9 as well."""
    params, x, y, qx, qy = tiny_task()
    cl = conv4_forward(params, qx)
    with higher_order():
        nchw = conv4_forward(params, qx)
    torch.testing.assert_close(cl, nchw, rtol=1e-12, atol=1e-12)


def test_channels_last_float32_round_off_is_bounded():
    """torch's channels-last CPU batch norm sums its statistics less accurately than the NCHW
    kernel (relative error of 1/std ~3e-6 vs ~7e-8 on 75x64x28x28): logits stay within 1e-4 of
    float64 either way, so training is unaffected (it is float32 round-off, not a different
    function)."""
    params, _, _, qx, _ = tiny_task()
    truth = conv4_forward(params, qx)
    p32 = {k: v.detach().float() for k, v in params.items()}
    for ctx in (higher_order(False), higher_order(True)):
        with ctx:
            got = conv4_forward(p32, qx.float()).double()
        assert (got - truth).abs().max() < 1e-4 * truth.abs().max()


def test_conv4_shapes():
    p = conv4_init(new_generator(0), 3, 32, 5, 84)
    assert p["head.weight"].shape == (5, 32 * 5 * 5)
    assert conv4_forward(p, torch.rand(7, 3, 84, 84)).shape == (7, 5)
    assert conv4_forward(p, torch.rand(7, 3, 84, 84), way=3).shape == (7, 3)


def test_second_order_meta_gradient_matches_autograd_reference_float64():
    params, x, y, qx, qy = tiny_task()
    ref = reference_meta_grad(params, x, y, qx, qy, steps=2, lr=0.3)
    got = func_meta_grad(params, x, y, qx, qy, steps=2, lr=0.3, first_order=False)
    for r, g in zip(ref, got):
        assert torch.allclose(r, g, rtol=1e-9, atol=1e-12)


def test_second_order_terms_are_present():
    """First- and second-order meta-gradients differ by more than rounding: the Hessian terms are there."""
    params, x, y, qx, qy = tiny_task()
    second = func_meta_grad(params, x, y, qx, qy, steps=1, lr=0.4, first_order=False)
    first = func_meta_grad(params, x, y, qx, qy, steps=1, lr=0.4, first_order=True)
    rel = max(((s - f).norm() / s.norm()).item() for s, f in zip(second, first) if s.norm() > 0)
    assert rel > 1e-3


def test_first_order_equals_query_gradient_at_adapted_params():
    params, x, y, qx, qy = tiny_task()
    fast = inner_loop(episode_loss(conv4_forward), params, list(params), (x, y), 1, 0.4, first_order=True)
    detached = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    direct = torch.autograd.grad(F.cross_entropy(conv4_forward(detached, qx), qy), list(detached.values()))
    got = func_meta_grad(params, x, y, qx, qy, steps=1, lr=0.4, first_order=True)
    for d, g in zip(direct, got):
        assert torch.allclose(d, g, rtol=1e-9, atol=1e-12)


def test_inner_loop_only_touches_given_keys():
    params, x, y, _, _ = tiny_task()
    fast = inner_loop(episode_loss(conv4_forward), params, ["head.weight", "head.bias"], (x, y), 3, 0.5)
    for k in params:
        same = torch.equal(fast[k], params[k])
        assert same == (k not in ("head.weight", "head.bias"))


def textbook_conv4_forward(p, x, way=None):
    """Conv-4 in the textbook order, conv -> batch norm -> ReLU -> max-pool (conv4_features pools before
    the ReLU: the same function, with a quarter of the ReLU work)."""
    x = conv_layout(x)
    for i in range(4):
        x = F.max_pool2d(F.relu(batch_norm(F.conv2d(x, p[f"conv{i}.weight"], p[f"conv{i}.bias"], 1, 1),
                                           p[f"bn{i}.weight"], p[f"bn{i}.bias"])), 2)
    return F.linear(x.flatten(1), p["head.weight"][:way], p["head.bias"][:way])


def test_pooling_before_the_relu_gives_bitwise_the_textbook_meta_gradient():
    """max and a monotone activation commute, and their gradients route through the same maxima:
    float32 logits and first- and second-order meta-gradients are bitwise those of the textbook order."""
    params, x, y, qx, qy = tiny_task(torch.float32)
    for first_order in (True, False):
        grads = []
        for forward in (conv4_forward, textbook_conv4_forward):
            fast = inner_loop(episode_loss(forward), params, list(params), (x, y), 2, 0.4, first_order)
            grads.append(torch.autograd.grad(F.cross_entropy(forward(fast, qx), qy), list(params.values())))
        assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(conv4_forward(params, qx), textbook_conv4_forward(params, qx))


def test_activation_and_max_pool_commute_through_the_double_backward():
    """The swaps in the ResNets too: leaky ReLU before 2x2 pooling (ResNet-12) and ReLU before the
    overlapping 3x3 stride-2 pooling (ResNet-18's stem); values, gradients and gradients of gradients
    are bitwise equal, with ties and all-negative windows in the input."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 3, (4, 8, 12, 12), generator=gen).float().requires_grad_(True)
    cases = [(lambda h: F.leaky_relu(h, 0.1), lambda h: F.max_pool2d(h, 2)),
             (F.relu, lambda h: F.max_pool2d(h, 3, 2, padding=1)), (F.relu, lambda h: F.max_pool2d(h, 2))]
    for act, pool in cases:
        outs = []
        for f in (lambda h: act(pool(h)), lambda h: pool(act(h))):
            y = f(x * x.sum((2, 3), keepdim=True))  # a smooth function before the pair: second derivatives exist
            g = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)[0]
            outs.append((y, g, torch.autograd.grad(g.pow(2).sum(), x)[0]))
        assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_max_pool2_is_torchs_max_pool_bit_for_bit_at_every_order():
    """`max_pool2` (an NCHW map pooled in channels-last) against F.max_pool2d(x, 2): values, layout, the first
    maximum of a tied window, NaN, odd sizes, and gradients of orders 1 to 3, in float32 and float64."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        for shape in [(3, 5, 8, 8), (2, 4, 7, 9), (1, 2, 3, 3)]:
            base = torch.randint(-3, 3, shape, generator=gen).to(dtype)  # many tied windows
            base[0, 1, 0, 1] = float("nan")
            for pool in (core.max_pool2, lambda h: F.max_pool2d(h, 2)):
                x = base.clone().requires_grad_(True)
                h = x * x.sum((2, 3), keepdim=True)  # smooth before the pool: its second derivatives exist
                y = pool(h)
                g1 = torch.autograd.grad((y.nan_to_num() ** 3).sum(), x, create_graph=True)[0]
                g2 = torch.autograd.grad((g1.nan_to_num() ** 2).sum(), x, create_graph=True)[0]
                g3 = torch.autograd.grad(g2.nan_to_num().sum(), x)[0]
                if pool is core.max_pool2:
                    mine = (y, g1, g2, g3)
                else:
                    theirs = (y, g1, g2, g3)
            for a, b in zip(mine, theirs):
                assert a.stride() == b.stride() and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
                assert torch.equal(a.isnan(), b.isnan())
    channels_last = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert core.max_pool2(channels_last).is_contiguous(memory_format=torch.channels_last)  # torch's own kernel


def test_max_pool2_under_vmap_is_torchs_own():
    """Under a torch.func transform (no memory format can be queried there) `max_pool2` is F.max_pool2d."""
    x = torch.randn(3, 2, 4, 6, 6)
    assert torch.equal(torch.func.vmap(core.max_pool2)(x), torch.func.vmap(lambda h: F.max_pool2d(h, 2))(x))

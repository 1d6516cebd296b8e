"""MT-nets: the meta-gradient matches plain autograd through the masked inner loop (float64, second
and first order; T, the mask logits and batch norm included); masked rows get no inner update and
T is never adapted; the straight-through masks are Bernoulli(sigmoid(logit)) samples whose
gradient is the Gumbel-softmax's; with T = I the network is Conv-4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.api import Episode
from baselines import registry
from baselines.core import conv4_forward
from baselines.mtnet import ADAPTED, LAYERS, MTNet, straight_through_mask, support_seed
from test_zoo import to_double  # tests/ is on sys.path (pytest's rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")


def small(synthetic_set, **kw) -> MTNet:
    params = dict(meta_batch=2, hidden=8, inner_lr=0.3, inner_steps=2, inner_steps_test=2, seed=1) | kw
    return MTNet(**params).setup(synthetic_set.task_info())


def reference_masks(m: MTNet, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """make_shared_mask of yoonholee/MT-net maml.py, per layer in LAYERS order from the same generator."""
    out = {}
    for layer in LAYERS:
        logits = m.meta[f"M.{layer}"]
        u = torch.rand((len(logits), 2), generator=gen, dtype=logits.dtype)
        y = torch.stack([logits, torch.zeros_like(logits)], 1) - torch.log(-torch.log(u + 1e-20) + 1e-20)
        soft = torch.softmax(y / m.temperature, dim=1)
        hard = (soft == soft.max(1, keepdim=True).values).to(soft.dtype)
        out[layer] = ((hard - soft).detach() + soft)[:, 0]
    return out


def reference_grads(m: MTNet, ep: Episode) -> list[torch.Tensor | None]:
    """Plain autograd: W <- W - lr * M * dL/dW on the layers' weights and biases, T and batch norm fixed."""
    masks = reference_masks(m, m.task_generator(ep))
    p = dict(m.meta)
    for _ in range(m.inner_steps):
        loss = F.cross_entropy(m.forward(p, ep.support_x, ep.way), ep.support_y)
        keys = [k for k in p if k.split(".")[0] in LAYERS and k.split(".")[1] in ("weight", "bias")]
        gs = torch.autograd.grad(loss, [p[k] for k in keys], create_graph=not m.first_order)
        for k, g in zip(keys, gs):
            mask = masks[k.split(".")[0]]
            mask = mask.view(-1, *([1] * (p[k].dim() - 1)))
            p[k] = p[k] - m.inner_lr * mask * (g.detach() if m.first_order else g)
    outer = F.cross_entropy(m.forward(p, ep.query_x, ep.way), ep.query_y)
    return list(torch.autograd.grad(outer, list(m.meta.values()), allow_unused=True))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_meta_gradient_matches_autograd_reference_float64(synthetic_set, first_order):
    m = small(synthetic_set, first_order=first_order, logit_init=0.3)
    ep = to_double(m, synthetic_set.episode("train", 0))
    got = torch.autograd.grad(m.task_loss(ep), list(m.meta.values()), allow_unused=True)
    ref = reference_grads(m, ep)
    for k, g, r in zip(m.meta, got, ref):
        g = torch.zeros_like(m.meta[k]) if g is None else g
        r = torch.zeros_like(m.meta[k]) if r is None else r
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-11), (k, (g - r).abs().max().item())
    grads = dict(zip(m.meta, got))
    assert all(grads[f"T.{layer}"].abs().max() > 0 for layer in LAYERS)  # T is meta-learned
    if not first_order:
        # the mask logits learn through the inner step (straight-through)
        assert any(grads[f"M.{layer}"].abs().max() > 0 for layer in LAYERS)


def test_second_order_differs_from_first_order(synthetic_set):
    s = small(synthetic_set, inner_steps=1).fit(synthetic_set.stream("train"), 1)
    f = small(synthetic_set, inner_steps=1, first_order=True).fit(synthetic_set.stream("train"), 1)
    assert max((s.meta[k] - f.meta[k]).abs().max().item() for k in s.meta) > 0
    assert (s.tags.order, f.tags.order) == ("second", "first")


def test_masked_rows_get_no_inner_update_and_t_is_not_adapted(synthetic_set):
    m = small(synthetic_set, inner_steps_test=3)
    frozen_rows = {"conv1": [0, 2, 5], "conv3": [1], "head": [0, 3]}
    with torch.no_grad():
        for layer in LAYERS:
            m.meta[f"M.{layer}"].fill_(60.0)  # sigmoid ~ 1: update
            for r in frozen_rows.get(layer, []):
                m.meta[f"M.{layer}"][r] = -60.0  # sigmoid ~ 0: keep
    ep = synthetic_set.episode("test", 0)
    fast = {k: v.detach() for k, v in m.adapt_params(ep.support_x, ep.support_y).items()}
    for k in m.meta:
        if k not in ADAPTED:
            assert torch.equal(fast[k], m.meta[k]), k  # T, mask logits and batch norm are never adapted
    for layer in ("conv1", "conv3", "head"):
        w = m.meta[f"{layer}.weight"]
        changed = [r for r in range(w.shape[0]) if not torch.equal(fast[f"{layer}.weight"][r], w[r])]
        if layer == "head":  # only the episode's `way` rows are used, so only they can move
            changed_expected = [r for r in range(ep.way) if r not in frozen_rows[layer]]
        else:
            changed_expected = [r for r in range(w.shape[0]) if r not in frozen_rows[layer]]
        assert changed == changed_expected, layer
        for r in frozen_rows[layer]:
            assert torch.equal(fast[f"{layer}.bias"][r], m.meta[f"{layer}.bias"][r])
    # all masks closed: adaptation changes nothing
    with torch.no_grad():
        for layer in LAYERS:
            m.meta[f"M.{layer}"].fill_(-60.0)
    fast = m.adapt_params(ep.support_x, ep.support_y)
    assert all(torch.equal(fast[k].detach(), m.meta[k]) for k in m.meta)


def test_straight_through_mask_is_a_bernoulli_sample_with_the_relaxed_gradient():
    logits = torch.tensor([1.0, -0.5, 0.0], requires_grad=True)
    draws = torch.stack([straight_through_mask(logits, torch.Generator().manual_seed(i), 1.0) for i in range(4000)])
    assert set(draws.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(draws.detach().mean(0), torch.sigmoid(logits.detach()), atol=0.03)
    # gradient: that of the soft sample sigmoid((logit + g0 - g1) / temperature)
    gen = torch.Generator().manual_seed(3)
    mask = straight_through_mask(logits, gen, 0.5)
    (g,) = torch.autograd.grad((mask * torch.tensor([1.0, 2.0, 3.0])).sum(), [logits])
    u = torch.rand((3, 2), generator=torch.Generator().manual_seed(3))
    gumbel = -torch.log(-torch.log(u + 1e-20) + 1e-20)
    soft = torch.sigmoid((logits.detach() + gumbel[:, 0] - gumbel[:, 1]) / 0.5)
    assert torch.allclose(g, torch.tensor([1.0, 2.0, 3.0]) * soft * (1 - soft) / 0.5, atol=1e-6)
    assert torch.equal(mask.detach(), (logits.detach() + gumbel[:, 0] > gumbel[:, 1]).float())


def test_identity_t_gives_conv4_and_t_transforms_each_layer(synthetic_set):
    m = small(synthetic_set)
    for layer in LAYERS:
        rows = m.meta[f"{layer}.weight"].shape[0]
        assert torch.equal(m.meta[f"T.{layer}"], torch.eye(rows))
        assert torch.equal(m.meta[f"M.{layer}"], torch.zeros(rows))
    x = synthetic_set.episode("train", 0).support_x
    with torch.no_grad():
        assert torch.allclose(m.forward(m.meta, x, 5), conv4_forward(m.meta, x, 5), atol=1e-5)
        p = {k: v.detach().clone() for k, v in m.meta.items()}
        p["T.head"] = torch.diag(torch.arange(1.0, 6.0))
        assert torch.allclose(m.forward(p, x, 5), conv4_forward(m.meta, x, 5) * torch.arange(1.0, 6.0), atol=1e-5)


def test_masks_are_drawn_per_task_and_per_test_support_set(synthetic_set):
    m = small(synthetic_set)
    a, b = synthetic_set.episode("train", 0), synthetic_set.episode("train", 1)
    draw = lambda gen: torch.cat([v.flatten() for k, v in m.masked_lrs(gen).items() if k.endswith(".bias")])
    assert not torch.equal(draw(m.task_generator(a)), draw(m.task_generator(b)))
    assert torch.equal(draw(m.task_generator(a)), draw(m.task_generator(a)))
    assert support_seed(a.support_x, a.support_y) != support_seed(b.support_x, b.support_y)
    assert support_seed(a.support_x, a.support_y) == support_seed(a.support_x.clone(), a.support_y.clone())


def test_registry_presets_follow_the_reference():
    def values(key):
        return registry.preset("mt-net", key).values

    assert (values("omniglot-5w")["inner_lr"], values("omniglot-5w")["meta_batch"]) == (0.4, 32)
    assert (values("omniglot-20w")["inner_lr"], values("omniglot-20w")["inner_steps"]) == (0.1, 1)
    mini = values("miniimagenet")
    assert (mini["inner_lr"], mini["inner_steps"], mini["hidden"], mini["grad_clip"]) == (0.01, 5, 32, 10.0)
    assert registry.preset("mt-net", "miniimagenet").steps == 60000
    assert all(v["inner_steps_test"] == 10 and v["temperature"] == 1.0 for v in map(values, ("omniglot-5w",
                                                                                               "miniimagenet")))

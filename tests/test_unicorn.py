"""UNICORN-MAML: one shared head vector, its summed meta-gradient, and label-permutation invariance.

The float64 meta-gradient is compared with a plain-autograd reference in which every class's head
row is its own leaf copy of the vector (create_graph=True through the inner steps): the vector's
gradient must be the sum of the rows' gradients. Permuting the support labels must permute the
logits' columns and nothing else; MAML, whose head rows are meta-learned separately, is shown
not to be invariant on the same episode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.api import Episode
from baselines import registry
from baselines.maml import MAML
from baselines.unicorn import UnicornMAML
from test_zoo import small, to_double as as_double  # tests/ is on sys.path (pytest's rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")

PERM = torch.tensor([2, 0, 4, 1, 3])  # class c of the episode is relabelled PERM[c]


def reference_grads(m: UnicornMAML, ep: Episode) -> dict[str, torch.Tensor]:
    """The outer-loss gradient with plain autograd: body leaves plus one leaf copy of the head vector per
    class, `m.inner_steps` plain gradient steps on all of them, query CE / temperature; the vector's
    gradient is the sum over its copies."""
    body = {k: v.detach().clone().requires_grad_(True) for k, v in m.meta.items() if not k.startswith("head.")}
    rows_w = [m.meta["head.weight"].detach().clone().requires_grad_(True) for _ in range(ep.way)]
    rows_b = [m.meta["head.bias"].detach().clone().requires_grad_(True) for _ in range(ep.way)]
    leaves = list(body.values()) + rows_w + rows_b
    p = {**body, "head.weight": torch.cat(rows_w), "head.bias": torch.cat(rows_b)}
    for _ in range(m.inner_steps):
        loss = F.cross_entropy(m.forward(p, ep.support_x), ep.support_y)
        gs = torch.autograd.grad(loss, list(p.values()), create_graph=not m.first_order)
        p = {k: v - m.inner_lr * (g.detach() if m.first_order else g) for (k, v), g in zip(p.items(), gs)}
    outer = F.cross_entropy(m.forward(p, ep.query_x) / m.temperature, ep.query_y)
    grads = dict(zip([*body, *(f"w{c}" for c in range(ep.way)), *(f"b{c}" for c in range(ep.way))],
                     torch.autograd.grad(outer, leaves)))
    return {**{k: grads[k] for k in body},
            "head.weight": sum(grads[f"w{c}"] for c in range(ep.way)),
            "head.bias": sum(grads[f"b{c}"] for c in range(ep.way))}


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_meta_gradient_matches_autograd_reference_float64(synthetic_set, first_order):
    m = small(UnicornMAML, synthetic_set, inner_steps=3, inner_lr=0.3, temperature=0.5, first_order=first_order)
    ep = as_double(m, synthetic_set.episode("train", 0))
    assert m.meta["head.weight"].shape[0] == 1 and m.meta["head.bias"].shape == (1,)
    got = dict(zip(m.meta, torch.autograd.grad(m.task_loss(ep), list(m.meta.values()), allow_unused=True)))
    ref = reference_grads(m, ep)
    for k in m.meta:
        g = torch.zeros_like(m.meta[k]) if got[k] is None else got[k]
        assert torch.allclose(g, ref[k], rtol=1e-8, atol=1e-11), (k, (g - ref[k]).abs().max().item())
    assert ref["head.weight"].abs().max() > 0  # the vector does get a meta-gradient


def relabelled(ep: Episode) -> Episode:
    """ep with its support labels permuted by PERM (queries and their labels likewise)."""
    return Episode(ep.support_x, PERM[ep.support_y], ep.query_x, PERM[ep.query_y], ep.classes, ep.split, ep.index,
                   ep.spec_hash)


def logits_both_ways(m, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits adapted to ep, those adapted to the relabelled ep with their columns put back in ep's order)."""
    a = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    b = m.adapt(ep.support_x, PERM[ep.support_y])(ep.query_x)
    return a, b[:, PERM]


def test_label_permutation_permutes_the_logits_and_nothing_else_maml_does_not(synthetic_set):
    """Adapting to relabelled support classes gives the same predictions with permuted columns:
    to float64 round-off for UNICORN-MAML (body and head rows adapt identically, rows permuted),
    far from it for MAML (its N head rows start apart)."""
    stream = synthetic_set.stream("train")
    unicorn = small(UnicornMAML, synthetic_set, inner_steps_test=5).fit(stream, 2)
    maml = small(MAML, synthetic_set, inner_steps_test=5).fit(synthetic_set.stream("train"), 2)
    ep = synthetic_set.episode("test", 3)
    ep = as_double(unicorn, ep)
    as_double(maml, ep)

    a, b = logits_both_ways(unicorn, ep)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max().item()
    fast = unicorn.adapt_params(ep.support_x, ep.support_y)
    moved = unicorn.adapt_params(ep.support_x, PERM[ep.support_y])
    for k in fast:
        want = fast[k] if not k.startswith("head.") else fast[k][torch.argsort(PERM)]
        assert torch.allclose(moved[k], want, rtol=1e-10, atol=1e-12), k
    # the relabelled episode is scored identically
    rows = unicorn.evaluate([ep, relabelled(ep)])
    assert rows[0]["accuracy"] == rows[1]["accuracy"] and rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-9)

    a, b = logits_both_ways(maml, ep)
    assert (a - b).abs().max() > 1e-2, "MAML's head rows differ, so relabelling must change its adaptation"


def test_float32_permutation_invariance_up_to_round_off(synthetic_set):
    m = small(UnicornMAML, synthetic_set, inner_steps_test=10, inner_lr=0.1).fit(synthetic_set.stream("train"), 2)
    ep = synthetic_set.episode("test", 5)
    a, b = logits_both_ways(m, ep)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * (1 + a.abs().max().item()))
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_temperature_divides_the_query_logits_only(synthetic_set):
    ep = synthetic_set.episode("test", 0)
    plain = small(UnicornMAML, synthetic_set, inner_steps_test=2)
    hot = small(UnicornMAML, synthetic_set, inner_steps_test=2, temperature=0.5)
    a, b = (m.adapt(ep.support_x, ep.support_y)(ep.query_x) for m in (plain, hot))
    assert torch.allclose(b, 2 * a, rtol=1e-6, atol=1e-6)  # same inner loop (untempered support loss)


def test_presets_train_and_test_with_many_inner_steps():
    for key in ("omniglot-5w", "omniglot-20w", "miniimagenet"):
        p = registry.preset("unicorn-maml", key)
        assert p.values["inner_steps"] == p.values["inner_steps_test"] >= 10, key
        assert p.paper.startswith("Ye, Chao") and p.repository == "Han-Jia/UNICORN-MAML" and p.note
    mini = registry.preset("unicorn-maml", "miniimagenet").values
    assert (mini["inner_lr"], mini["inner_steps"], mini["temperature"], mini["first_order"]) == (0.1, 20, 0.5, True)
    assert registry.preset("unicorn-maml", "miniimagenet").steps == 10000
    assert UnicornMAML.PARALLEL_TASKS and not UnicornMAML.TASK_BATCHED  # its head init is not MAML's

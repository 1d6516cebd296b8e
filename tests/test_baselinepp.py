"""baseline++: logits are scaled cosines between L2-normalised features and class weight vectors, in
pre-training (scale by the number of classes, as CloserLookFewShot's distLinear) and in the per-task
head; everything else is finetune's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines import registry
from baselines.baselinepp import BaselinePP, cosine_logits
from baselines.core import conv4_features

pytestmark = pytest.mark.usefixtures("one_thread")


def small(synthetic_set, **kw) -> BaselinePP:
    return BaselinePP(**(dict(hidden=8, meta_batch=2, seed=0) | kw)).setup(synthetic_set.task_info())


def test_cosine_logits_by_hand():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 6, generator=g, dtype=torch.float64)
    got = cosine_logits(feats, weight, 2.0)
    for i in range(4):
        for k in range(3):
            cos = (feats[i] @ weight[k]) / (feats[i].norm() * weight[k].norm())
            assert torch.isclose(got[i, k], 2.0 * cos, rtol=1e-4)
    # invariant to the norms of features and weight vectors (up to the 1e-5 in the denominators)
    scaled = cosine_logits(feats * torch.tensor([[3.0], [0.5], [7.0], [2.0]], dtype=torch.float64), weight * 4.0, 2.0)
    assert torch.allclose(scaled, got, rtol=1e-4)
    assert got.abs().max() <= 2.0


def test_scale_follows_the_number_of_classes():
    m = BaselinePP()
    assert (m.scale(5), m.scale(200), m.scale(201), m.scale(4112)) == (2.0, 2.0, 10.0, 10.0)


@pytest.mark.parametrize("many_classes,scale", [(200, 2.0), (10, 10.0)])
def test_pretraining_logits_are_scaled_cosines_over_all_classes(synthetic_set, many_classes, scale):
    m = small(synthetic_set, many_classes=many_classes)
    assert "head.bias" not in m.meta and m.meta["head.weight"].shape[0] == synthetic_set.source.n_classes
    x = synthetic_set.episode("train", 0).support_x
    with torch.no_grad():
        got = m.forward(m.meta, x)
        want = scale * F.cosine_similarity(conv4_features(m.meta, x).unsqueeze(1), m.meta["head.weight"].unsqueeze(0),
                                           dim=-1)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)  # up to the 1e-5 added to the norms


def test_per_task_head_is_a_scaled_cosine_classifier_fitted_on_the_support(synthetic_set):
    m = small(synthetic_set, hidden=16).fit(synthetic_set.stream("train"), 20)
    ep = synthetic_set.episode("test", 0)
    head = m.new_head(ep.way, 16)
    assert set(head) == {"weight"} and torch.equal(head["weight"], m.new_head(ep.way, 16)["weight"])
    logits = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert logits.abs().max() <= m.scale(ep.way) + 1e-6  # scale 2 times a cosine
    support = m.adapt(ep.support_x, ep.support_y)(ep.support_x)
    assert (support.argmax(1) == ep.support_y).all()  # the fitted head separates its support set


def test_pretraining_learns_and_adapt_leaves_the_backbone_untouched(synthetic_set):
    m = small(synthetic_set, hidden=16)
    ep = synthetic_set.episode("train", 0)
    first = m.task_loss(ep).item()
    m.fit(synthetic_set.stream("train"), 30)
    assert m.task_loss(ep).item() < first
    before = {k: v.clone() for k, v in m.meta.items()}
    acc = np.mean([r["accuracy"] for r in m.evaluate(synthetic_set.episodes("test", 20))])
    assert all(torch.equal(v, before[k]) for k, v in m.meta.items())
    assert acc > 0.5  # chance is 0.2


def test_registry_is_finetunes_recipe_with_the_cosine_scales():
    pp, ft = registry.preset("baseline++", "omniglot-5w").values, registry.preset("finetune", "omniglot-5w").values
    assert {k: pp[k] for k in ft} == ft
    assert (pp["scale_factor"], pp["scale_factor_many"], pp["many_classes"]) == (2.0, 10.0, 200)

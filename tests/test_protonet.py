"""protonet: logits are negative squared distances to class-mean prototypes; higher-way training
tasks are merged stream episodes; Adam's learning rate halves on schedule; no test-time gradients."""

from __future__ import annotations

import pytest
import torch

from baselines import registry
from baselines.core import conv4_features
from baselines.protonet import ProtoNet, merge_episodes, prototypes, squared_distances
from bench.checks import episode_set

pytestmark = pytest.mark.usefixtures("one_thread")


def small(synthetic_set, **kw) -> ProtoNet:
    return ProtoNet(**(dict(hidden=8, seed=1) | kw)).setup(synthetic_set.task_info())


def test_logits_are_negative_squared_distances_to_prototypes_by_hand(synthetic_set):
    m = small(synthetic_set).fit(synthetic_set.stream("train"), 2)
    ep = episode_set(5, 3, 4).episode("test", 2)  # 3-shot: prototypes are real means
    got = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    body = {k: v.detach() for k, v in m.meta.items()}
    with torch.no_grad():
        fs, fq = conv4_features(body, ep.support_x), conv4_features(body, ep.query_x)
    want = torch.empty(len(fq), ep.way)
    for k in range(ep.way):
        members = [fs[i] for i in range(len(fs)) if int(ep.support_y[i]) == k]
        c = sum(members) / len(members)
        for q in range(len(fq)):
            want[q, k] = -sum((fq[q, j] - c[j]) ** 2 for j in range(fq.shape[1]))
    assert got.shape == (len(ep.query_y), ep.way)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_prototypes_are_class_means_with_unequal_shots():
    feats = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([2, 0, 2, 1, 2, 0])
    c = prototypes(feats, labels, 3)
    for k in range(3):
        assert torch.allclose(c[k], feats[labels == k].mean(0))
    d = squared_distances(feats, c)
    assert torch.allclose(d, torch.cdist(feats, c) ** 2)


def test_meta_parameters_are_the_body_only_and_tags_say_no_inner_loop(synthetic_set):
    m = small(synthetic_set)
    assert m.meta and not any(k.startswith("head.") for k in m.meta)
    assert m.tags.order == "none"


def test_merge_episodes_keeps_distinct_classes_with_their_images(synthetic_set):
    a, b = synthetic_set.episode("train", 0), synthetic_set.episode("train", 1)
    merged = merge_episodes([a, b, a])  # the repeated episode adds nothing
    want = list(a.classes) + [c for c in b.classes if c not in a.classes]
    assert list(merged.classes) == want and merged.way == len(want)
    for rel, cls in enumerate(merged.classes):
        src = a if cls in a.classes else b
        j = src.classes.index(cls)
        assert torch.equal(merged.support_x[merged.support_y == rel], src.support_x[src.support_y == j])
        assert torch.equal(merged.query_x[merged.query_y == rel], src.query_x[src.query_y == j])
    assert merge_episodes([a]) is a


def test_each_update_trains_on_one_merged_higher_way_task(synthetic_set):
    m = small(synthetic_set, episodes_per_task=3, meta_batch=2)
    m.fit(synthetic_set.stream("train"), 2)
    assert m.fit_episodes == 2 * 2 * 3
    # the update is a step on the mean loss of the merged tasks. Compared with SGD: Adam's first
    # step moves every coordinate by ~lr whatever its gradient's size, and the last block's
    # batch-norm bias has true gradient 0 (distances ignore a per-channel shift), so Adam would
    # turn summation-order round-off there into +-lr.
    ref = small(synthetic_set)
    ref.optimizer = torch.optim.SGD(list(ref.meta.values()), lr=1e-3)
    eps = synthetic_set.episodes("train", 6)
    ref.optimizer.zero_grad()
    loss = sum(ref.task_loss(merge_episodes(eps[i:i + 3])) for i in (0, 3)) / 2
    loss.backward()
    ref.optimizer.step()
    one = small(synthetic_set, episodes_per_task=3, meta_batch=2)
    one.optimizer = torch.optim.SGD(list(one.meta.values()), lr=1e-3)
    one.fit(synthetic_set.stream("train"), 1)
    for k in ref.meta:
        assert torch.allclose(one.meta[k], ref.meta[k], atol=1e-8), k
    assert any(not torch.equal(one.meta[k], small(synthetic_set).meta[k]) for k in ref.meta)  # it moved


def test_learning_rate_halves_every_lr_decay_every_updates(synthetic_set):
    m = small(synthetic_set, lr_decay_every=2)
    stream = synthetic_set.stream("train")
    seen = []
    for _ in range(5):
        m.fit(stream, 1)
        seen.append(m.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])


def test_registry_trains_omniglot_with_60_way_tasks():
    assert registry.preset("protonet", "omniglot-5w").values["episodes_per_task"] * 5 == 60
    assert registry.preset("protonet", "omniglot-20w").values["episodes_per_task"] * 20 == 60
    assert registry.preset("protonet", "miniimagenet").values["episodes_per_task"] * 5 == 30

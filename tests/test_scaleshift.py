"""scale-shift: phase 1 pre-trains the body only, phase 2 freezes it and moves only the scale/shift
and head-init meta-parameters; the split is a step count, and resuming across it is exact; the
phase-2 meta-gradient matches plain autograd through the head's inner loop (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.api import Episode
from bench.checks import first_difference, save_load
from baselines import registry
from baselines.core import conv4_features
from baselines.scaleshift import HEAD_KEYS, ScaleShift, body_keys, scale_shift, ss_keys

pytestmark = pytest.mark.usefixtures("one_thread")


def small(synthetic_set, **kw) -> ScaleShift:
    params = dict(hidden=8, pretrain_steps=3, pretrain_batch=2, meta_batch=2, inner_steps=5, inner_steps_test=5,
                  inner_lr=0.1, outer_lr=0.01, head_lr=0.01, seed=1) | kw
    return ScaleShift(**params).setup(synthetic_set.task_info())


def snapshot(m: ScaleShift) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.meta.items()}


def moved(a: dict, b: dict, keys: list[str]) -> set[str]:
    return {k for k in keys if not torch.equal(a[k], b[k])}


def test_scale_shift_modulates_each_conv_and_starts_at_identity(synthetic_set):
    m = small(synthetic_set)
    for i in range(4):
        assert m.meta[f"ss{i}.scale"].shape == (*m.meta[f"conv{i}.weight"].shape[:2], 1, 1)
        assert m.meta[f"ss{i}.shift"].shape == m.meta[f"conv{i}.bias"].shape
    x = synthetic_set.episode("train", 0).support_x
    with torch.no_grad():
        assert torch.equal(m.features(m.meta, x), conv4_features(m.meta, x))  # scale 1, shift 0
        p = {k: v.detach().clone() for k, v in m.meta.items()}
        p["ss1.scale"] = torch.rand(p["ss1.scale"].shape, generator=torch.Generator().manual_seed(0)) + 0.5
        p["ss2.shift"] = torch.full_like(p["ss2.shift"], 0.3)
        mod = scale_shift(p)
        for i in range(4):
            assert torch.equal(mod[f"conv{i}.weight"], p[f"conv{i}.weight"] * p[f"ss{i}.scale"])
            assert torch.equal(mod[f"conv{i}.bias"], p[f"conv{i}.bias"] + p[f"ss{i}.shift"])
        assert not torch.allclose(m.features(p, x), conv4_features(p, x))


def test_phase_one_pretrains_the_body_and_phase_two_moves_only_ss_and_head(synthetic_set):
    m = small(synthetic_set)
    keys = list(m.meta)
    body = body_keys(m.meta) + ["pre.weight", "pre.bias"]
    meta = ss_keys(m.meta) + list(HEAD_KEYS)
    start = snapshot(m)
    stream = synthetic_set.stream("train")
    m.fit(stream, 3)  # phase 1
    after1 = snapshot(m)
    assert moved(start, after1, keys) <= set(body)
    assert {"conv0.weight", "bn0.weight", "pre.weight", "pre.bias"} <= moved(start, after1, keys)
    m.fit(stream, 4)  # phase 2
    after2 = snapshot(m)
    assert not moved(after1, after2, body), "phase 2 changed the pre-trained backbone"
    assert moved(after1, after2, keys) <= set(meta)
    assert {"ss0.scale", "ss3.scale", "head.weight", "head.bias"} <= moved(after1, after2, keys)
    assert m.fit_episodes == 3 * 2 + 4 * 2  # pretrain_batch, then meta_batch episodes per step


@pytest.mark.parametrize("first", [1, 2, 3, 4])
def test_fit_in_two_calls_equals_one_call_across_the_phase_boundary(synthetic_set, first):
    whole = small(synthetic_set, pretrain_steps=2).fit(synthetic_set.stream("train"), 5)
    parts = small(synthetic_set, pretrain_steps=2)
    stream = synthetic_set.stream("train")
    parts.fit(stream, first)
    parts.fit(stream, 5 - first)
    assert first_difference(whole.state_dict(), parts.state_dict()) is None
    resumed = small(synthetic_set, pretrain_steps=2).fit(synthetic_set.stream("train"), first)
    fresh = ScaleShift(**resumed.params()).load_state_dict(save_load(resumed.state_dict()))
    fresh.fit(synthetic_set.stream("train", fresh.fit_episodes), 5 - first)
    assert first_difference(whole.state_dict(), fresh.state_dict()) is None


def test_learning_rates_follow_both_schedules(synthetic_set):
    m = small(synthetic_set, pretrain_steps=4, pretrain_lr=0.1, pretrain_lr_decay=0.2, pretrain_lr_decay_every=2,
              outer_lr=1e-4, head_lr=1e-3, meta_lr_decay=0.5, meta_lr_decay_every=2)
    stream = synthetic_set.stream("train")
    pre, ss, head = [], [], []
    for _ in range(4):
        m.fit(stream, 1)
        pre.append(m.optimizer.param_groups[0]["lr"])
    for _ in range(3):
        m.fit(stream, 1)
        ss.append(m.meta_optimizer.param_groups[0]["lr"])
        head.append(m.meta_optimizer.param_groups[1]["lr"])
    assert pre == pytest.approx([0.1, 0.1, 0.02, 0.02])
    assert ss == pytest.approx([1e-4, 1e-4, 5e-5]) and head == pytest.approx([1e-3, 1e-3, 5e-4])


def reference_grads(m: ScaleShift, ep: Episode) -> list[torch.Tensor | None]:
    """Plain autograd: SS-modulated frozen body, `inner_steps` SGD steps on the head, query loss."""
    p = {k: (v.detach() if k in body_keys(m.meta) else v) for k, v in m.meta.items()}
    mod = dict(p)
    for i in range(4):
        mod[f"conv{i}.weight"] = p[f"conv{i}.weight"] * p[f"ss{i}.scale"]
        mod[f"conv{i}.bias"] = p[f"conv{i}.bias"] + p[f"ss{i}.shift"]
    fs, fq = conv4_features(mod, ep.support_x), conv4_features(mod, ep.query_x)
    w, b = p["head.weight"], p["head.bias"]
    for _ in range(m.inner_steps):
        loss = F.cross_entropy(fs @ w[:ep.way].T + b[:ep.way], ep.support_y)
        gw, gb = torch.autograd.grad(loss, [w, b], create_graph=not m.first_order)
        if m.first_order:
            gw, gb = gw.detach(), gb.detach()
        w, b = w - m.inner_lr * gw, b - m.inner_lr * gb
    outer = F.cross_entropy(fq @ w[:ep.way].T + b[:ep.way], ep.query_y)
    return list(torch.autograd.grad(outer, list(m.meta.values()), allow_unused=True))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_phase_two_meta_gradient_matches_autograd_reference_float64(synthetic_set, first_order):
    m = small(synthetic_set, pretrain_steps=0, first_order=first_order)
    m.meta = {k: v.detach().double().requires_grad_(True) for k, v in m.meta.items()}
    ep = synthetic_set.episode("train", 0)
    ep = Episode(ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y, ep.classes, ep.split,
                 ep.index, ep.spec_hash)
    got = torch.autograd.grad(m.task_loss(ep), list(m.meta.values()), allow_unused=True)
    ref = reference_grads(m, ep)
    for k, g, r in zip(m.meta, got, ref):
        if k in body_keys(m.meta) or k.startswith("pre."):
            assert g is None and r is None, k  # frozen body, unused pre-training classifier
            continue
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-11), (k, (g - r).abs().max().item())
    assert any(g.abs().max() > 1e-6 for k, g in zip(m.meta, got) if k.endswith(".scale"))


def test_registry_splits_the_paper_protocol():
    p = registry.preset("scale-shift", "miniimagenet")
    d = p.values
    assert (p.values["pretrain_steps"], p.steps) == (30000, 40000)
    assert (d["inner_lr"], d["inner_steps"], d["outer_lr"], d["head_lr"], d["meta_batch"]) == (0.01, 50, 1e-4, 1e-3, 1)

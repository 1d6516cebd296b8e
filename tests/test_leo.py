"""LEO: the phase-2 meta-gradient matches a plain-autograd reimplementation of the reference code's
computation (float64, second and first order); the regularisers on hand-checkable cases; the
first inner loop adapts the codes (the weights are their decoding), the second the weights;
phase 1 pre-trains only the backbone and phase 2 moves only LEO's parameters; clipping and the
non-finite fallback of the reference's outer step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.api import Episode
from bench.checks import first_difference, save_load
from baselines import registry
from baselines.core import conv4_features
from baselines.leo import LEO, REGULARISED, class_mean, clip_gradients, embed, gaussian, is_backbone, orthogonality
from test_zoo import to_double  # tests/ is on sys.path (pytest's rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")


def small(synthetic_set, **kw) -> LEO:
    params = dict(hidden=8, n_latents=6, meta_batch=2, pretrain_steps=0, pretrain_batch=2, inner_steps=2,
                  finetune_steps=2, inner_lr=0.5, finetune_lr=0.3, dropout=0.3, kl_weight=0.5, encoder_penalty=0.7,
                  l2_penalty=0.01, orthogonality_penalty=0.2, outer_lr=0.01, seed=1) | kw
    return LEO(**params).setup(synthetic_set.task_info())


def reference_loss(m: LEO, ep: Episode) -> torch.Tensor:
    """LEO's meta-training loss of one task written out from google-deepmind/leo model.py, with plain
    autograd (create_graph) in both inner loops and the same draws from the task's generator."""
    p, gen = m.meta, m.task_generator(ep)
    with torch.no_grad():
        fs = F.normalize(conv4_features(p, ep.support_x), dim=-1)
        fq = F.normalize(conv4_features(p, ep.query_x), dim=-1)
    y, n = ep.support_y, len(ep.support_y)
    classes = [torch.nonzero(y == c).flatten() for c in range(ep.way)]

    def drop(x):
        keep = torch.rand(x.shape, generator=gen, dtype=x.dtype) >= m.dropout
        return x * keep / (1 - m.dropout)

    def sample(params, offset):
        mean, raw = params.chunk(2, dim=-1)
        std = torch.clamp_min(torch.exp(raw) - 1 + offset, 1e-10)
        s = mean + std * torch.randn(mean.shape, generator=gen, dtype=mean.dtype)
        prior = torch.distributions.Normal(torch.zeros_like(s), torch.ones_like(s))
        return s, (torch.distributions.Normal(mean, std).log_prob(s) - prior.log_prob(s)).mean()

    def per_class(rows):  # [n, k] -> [way, k]
        return torch.stack([rows[idx].mean(0) for idx in classes])

    def loss_of(w, x, labels):
        return F.cross_entropy(drop(x) @ per_class(w).T, labels)

    z = drop(fs) @ p["enc.weight"]
    rel = []
    for i in range(n):
        h = torch.stack([torch.cat([z[i], z[j]]) for j in range(n)])
        h = F.relu(h @ p["rel0.weight"])
        h = F.relu(h @ p["rel1.weight"])
        rel.append((h @ p["rel2.weight"]).mean(0))
    codes = per_class(torch.stack(rel))[y]  # each example carries its class's parameters
    start, kl = sample(codes, 0.0)
    offset = math.sqrt(2.0 / (p["enc.weight"].shape[0] + ep.way))
    latents = start
    for _ in range(m.inner_steps):
        loss = loss_of(sample(latents @ p["dec.weight"], offset)[0], fs, y)
        (g,) = torch.autograd.grad(loss, [latents], create_graph=not m.first_order)
        latents = latents - p["lr.latent"] * (g.detach() if m.first_order else g)
    w = sample(latents @ p["dec.weight"], offset)[0]
    for _ in range(m.finetune_steps):
        (g,) = torch.autograd.grad(loss_of(w, fs, y), [w], create_graph=not m.first_order)
        w = w - p["lr.finetune"] * (g.detach() if m.first_order else g)
    outer = F.cross_entropy(drop(fq) @ per_class(w).T, ep.query_y)
    encoder = ((latents.detach() - start) ** 2).mean()
    l2 = sum((p[k] ** 2).sum() / 2 for k in REGULARISED)
    dec = p["dec.weight"]
    cos = F.cosine_similarity(dec.unsqueeze(1), dec.unsqueeze(0), dim=-1)
    orth = ((cos - torch.eye(len(dec), dtype=dec.dtype)) ** 2).mean()
    return (outer + m.kl_weight * kl + m.encoder_penalty * encoder + m.l2_penalty * l2
            + m.orthogonality_penalty * orth)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_meta_gradient_matches_autograd_reference_float64(synthetic_set, first_order):
    m = small(synthetic_set, first_order=first_order)
    ep = to_double(m, synthetic_set.episode("train", 3))
    got_loss = m.task_loss(ep)
    ref_loss = reference_loss(m, ep)
    assert torch.allclose(got_loss, ref_loss, rtol=1e-10)
    got = torch.autograd.grad(got_loss, list(m.meta.values()), allow_unused=True)
    ref = torch.autograd.grad(ref_loss, list(m.meta.values()), allow_unused=True)
    for k, g, r in zip(m.meta, got, ref):
        if is_backbone(k):
            assert g is None and r is None, k  # the frozen backbone and the unused pre-training classifier
            continue
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-11), (k, (g - r).abs().max().item())
        assert g.abs().max() > 0, k


def test_second_order_differs_from_first_order(synthetic_set):
    s = small(synthetic_set).fit(synthetic_set.stream("train"), 1)
    f = small(synthetic_set, first_order=True).fit(synthetic_set.stream("train"), 1)
    assert any(not torch.equal(s.meta[k], f.meta[k]) for k in ("enc.weight", "dec.weight", "lr.latent"))
    assert (s.tags.order, f.tags.order) == ("second", "first")


# --- the regularisers ------------------------------------------------------------------------
def test_orthogonality_penalty_hand_values():
    assert orthogonality(torch.tensor([[1.0, 0.0], [1.0, 1.0]])).item() == pytest.approx(0.25)  # cos 1/sqrt(2)
    assert orthogonality(torch.tensor([[2.0, 0.0, 0.0], [0.0, -3.0, 0.0]])).item() == pytest.approx(0.0)
    assert orthogonality(torch.full((4, 6), 0.5)).item() == pytest.approx(1 - 1 / 4)  # identical rows


def test_l2_and_orthogonality_regularisation_value(synthetic_set):
    m = small(synthetic_set, l2_penalty=0.01, orthogonality_penalty=0.2)
    p = {k: (torch.full_like(v, 0.5) if k in REGULARISED else v.detach()) for k, v in m.meta.items()}
    elements = sum(p[k].numel() for k in REGULARISED)
    nz = m.n_latents
    assert m.regularisation(p).item() == pytest.approx(0.01 * 0.25 * elements / 2 + 0.2 * (1 - 1 / nz))


def test_gaussian_sample_and_kl_hand_values():
    gen = torch.Generator().manual_seed(0)
    params = torch.cat([torch.zeros(3, 4), torch.full((3, 4), math.log(2.0))], dim=1)  # mean 0, std e^raw - 1 = 1
    sample, kl = gaussian(params, 0.0, gen)
    assert sample.shape == (3, 4) and kl.item() == pytest.approx(0.0, abs=1e-7)  # q is the prior
    # raw 0: std is the offset; KL estimate = mean(log N(s; m, .25) - log N(s; 0, 1))
    params = torch.cat([torch.ones(2, 3), torch.zeros(2, 3)], dim=1)
    eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    sample, kl = gaussian(params, 0.25, torch.Generator().manual_seed(5))
    assert torch.allclose(sample, 1 + 0.25 * eps)
    want = (-0.5 * eps ** 2 - math.log(0.25) + 0.5 * (1 + 0.25 * eps) ** 2).mean()
    assert kl.item() == pytest.approx(want.item(), rel=1e-5)
    # a scale below zero is floored at 1e-10; without a generator: the mean, no KL
    params = torch.cat([torch.full((1, 2), 0.7), torch.full((1, 2), -5.0)], dim=1)
    sample, _ = gaussian(params, 0.0, torch.Generator().manual_seed(1))
    assert torch.allclose(sample, torch.full((1, 2), 0.7), atol=1e-9)
    mean, kl = gaussian(params, 0.0, None)
    assert torch.equal(mean, torch.full((1, 2), 0.7)) and kl.item() == 0


def test_kl_and_encoder_penalty_enter_the_loss_with_their_weights(synthetic_set):
    ep = synthetic_set.episode("train", 2)
    base = small(synthetic_set, kl_weight=0.0, encoder_penalty=0.0)
    with torch.no_grad():
        feats = embed(base.meta, ep.support_x)
    out = base.leo(base.meta, (feats, ep.support_y), base.task_generator(ep), False)
    encoder = (out["adapted"] - out["latents"]).pow(2).mean()
    assert encoder > 0 and out["kl"] != 0
    with_kl = small(synthetic_set, kl_weight=0.4, encoder_penalty=0.0)
    with_enc = small(synthetic_set, kl_weight=0.0, encoder_penalty=3.0)
    zero = base.task_loss(ep)
    assert (with_kl.task_loss(ep) - zero).item() == pytest.approx(0.4 * out["kl"].item(), rel=1e-4)
    assert (with_enc.task_loss(ep) - zero).item() == pytest.approx(3.0 * encoder.item(), rel=1e-4)
    # no latent step: the adapted codes are the encoder's, the penalty vanishes
    still = small(synthetic_set, inner_steps=0)
    out = still.leo(still.meta, (feats, ep.support_y), still.task_generator(ep), False)
    assert torch.equal(out["adapted"], out["latents"])


# --- the two inner loops ---------------------------------------------------------------------
def test_first_inner_loop_adapts_the_codes_and_the_second_the_weights(synthetic_set):
    ep = synthetic_set.episode("test", 0)
    m = small(synthetic_set, finetune_steps=0)
    p = {k: v.detach() for k, v in m.meta.items()}
    with torch.no_grad():
        feats = embed(p, ep.support_x)
    onehot = F.one_hot(ep.support_y, ep.way).float()
    d = feats.shape[1]
    out = m.leo(p, (feats, ep.support_y), None, True)
    assert not torch.allclose(out["adapted"], out["latents"])
    # every example carries its class's code (the mean at test)
    for c in range(ep.way):
        rows = out["latents"][ep.support_y == c]
        assert torch.allclose(rows, rows[:1].expand_as(rows))
    # no fine-tuning: the classifier is exactly the decoding (Gaussian mean) of the adapted codes
    assert torch.allclose(out["classifier"], class_mean((out["adapted"] @ p["dec.weight"])[:, :d], onehot), atol=1e-6)
    # no latent step: the codes stay, and fine-tuning moves the weights off the decoder's output
    m2 = small(synthetic_set, inner_steps=0, finetune_steps=3)
    out2 = m2.leo(p, (feats, ep.support_y), None, True)
    assert torch.equal(out2["adapted"], out2["latents"])
    decoded = class_mean((out2["latents"] @ p["dec.weight"])[:, :d], onehot)
    assert not torch.allclose(out2["classifier"], decoded)
    # both learning rates are per dimension and meta-parameters
    assert m.meta["lr.latent"].shape == (m.n_latents,) and m.meta["lr.finetune"].shape == (d,)


def test_predictor_uses_normalised_features_and_the_adapted_classifier(synthetic_set):
    m = small(synthetic_set)
    ep = synthetic_set.episode("test", 1)
    fast = m.adapt_params(ep.support_x, ep.support_y)
    assert fast["classifier"].shape == (ep.way, 8)
    assert torch.allclose(embed(m.meta, ep.query_x).norm(dim=1), torch.ones(len(ep.query_y)))
    logits = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert torch.allclose(logits, embed(m.meta, ep.query_x).detach() @ fast["classifier"].detach().T, atol=1e-6)


# --- phases, outer step ----------------------------------------------------------------------
def test_phase_one_pretrains_the_backbone_and_phase_two_moves_only_leo(synthetic_set):
    m = small(synthetic_set, pretrain_steps=2)
    keys = list(m.meta)
    backbone = [k for k in keys if is_backbone(k)]
    before = {k: v.detach().clone() for k, v in m.meta.items()}
    stream = synthetic_set.stream("train")
    m.fit(stream, 2)
    after1 = {k: v.detach().clone() for k, v in m.meta.items()}
    assert {k for k in keys if not torch.equal(before[k], after1[k])} <= set(backbone)
    assert {"conv0.weight", "pre.weight"} <= {k for k in keys if not torch.equal(before[k], after1[k])}
    m.fit(stream, 2)
    moved = {k for k in keys if not torch.equal(after1[k], m.meta[k])}
    assert moved == {k for k in keys if not is_backbone(k)}
    assert m.fit_episodes == 2 * 2 + 2 * 2


def test_fit_in_two_calls_equals_one_call_across_the_phase_boundary(synthetic_set):
    whole = small(synthetic_set, pretrain_steps=2).fit(synthetic_set.stream("train"), 4)
    parts = small(synthetic_set, pretrain_steps=2).fit(synthetic_set.stream("train"), 1)
    fresh = LEO(**parts.params()).load_state_dict(save_load(parts.state_dict()))
    fresh.fit(synthetic_set.stream("train", fresh.fit_episodes), 3)
    assert first_difference(whole.state_dict(), fresh.state_dict()) is None


def test_clip_gradients_by_value_then_norm():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([0.5, -0.05, 0.0])
    clip_gradients([p], 0.1, 0.1)
    want = torch.tensor([0.1, -0.05, 0.0])
    assert torch.allclose(p.grad, want * 0.1 / want.norm())
    q = torch.zeros(2, requires_grad=True)
    q.grad = torch.tensor([0.03, 0.04])  # inside both limits: unchanged
    clip_gradients([q], 0.1, 0.1)
    assert torch.allclose(q.grad, torch.tensor([0.03, 0.04]))


def test_non_finite_meta_gradient_falls_back_to_the_l2_pull(synthetic_set, monkeypatch):
    m = small(synthetic_set, grad_clip=0.0, grad_norm_clip=0.0)
    seen = {}

    def nan_grads(batch):
        for v in m.meta.values():
            v.grad = torch.full_like(v, float("nan"))

    def capture():
        seen.update({k: v.grad.clone() for k, v in m.meta.items() if v.grad is not None})

    monkeypatch.setattr(m, "backward_tasks", nan_grads)
    monkeypatch.setattr(m.optimizer, "step", capture)
    m.outer_step([synthetic_set.episode("train", 0)])
    for k in REGULARISED:
        assert torch.allclose(seen[k], 1e-4 * m.meta[k].detach())
    assert torch.equal(seen["lr.latent"], torch.zeros_like(m.meta["lr.latent"]))


def test_task_draws_depend_on_step_and_episode_only(synthetic_set):
    m = small(synthetic_set)
    ep = synthetic_set.episode("train", 4)
    assert m.task_loss(ep).item() == m.task_loss(ep).item()
    first = m.task_loss(ep).item()
    m.fit_steps = 7
    assert m.task_loss(ep).item() != first


def test_registry_presets_follow_the_reference():
    p = registry.preset("leo", "miniimagenet")
    v = p.values
    assert (v["outer_lr"], v["kl_weight"], v["orthogonality_penalty"], v["dropout"]) == (2.739071e-4, 0.756143,
                                                                                        0.188103, 0.307651)
    assert (v["n_latents"], v["inner_steps"], v["finetune_steps"], v["inner_lr"], v["finetune_lr"]) == (64, 5, 5, 1.0,
                                                                                                      0.001)
    assert (v["meta_batch"], v["grad_clip"], v["grad_norm_clip"], p.steps - v["pretrain_steps"]) == (12, 0.1, 0.1,
                                                                                                   100000)
    assert p.repository == "google-deepmind/leo" and "our choice" in registry.preset("leo", "omniglot-5w").note

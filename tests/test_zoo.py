"""The method zoo, part 1: what makes each method itself (Reptile, Meta-SGD, ANIL, BOIL, CAVIA).

Meta-gradients of the MAML variants are compared in float64 with a textbook autograd reference
(create_graph=True), per task; Reptile's interpolation, annealing, inner Adam and
non-transductive prediction are checked against their definitions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.api import Episode
from baselines import registry
from baselines.anil import ANIL
from baselines.boil import BOIL
from baselines.cavia import CAVIA
from baselines.maml import MAML
from baselines.metasgd import LR_PREFIX, MetaSGD
from baselines.reptile import Reptile


pytestmark = pytest.mark.usefixtures("one_thread")


def small(cls, synthetic_set, **kw):
    params = dict(meta_batch=2, hidden=8, seed=1) | kw
    return cls(**params).setup(synthetic_set.task_info())


def to_double(m, ep: Episode) -> Episode:
    m.meta = {k: v.detach().double().requires_grad_(True) for k, v in m.meta.items()}
    return Episode(ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y, ep.classes, ep.split,
                   ep.index, ep.spec_hash)


def reference_grads(m, ep, keys, lr_of, start):
    """Outer-loss gradient w.r.t. m.meta with plain autograd through `m.inner_steps` inner steps."""
    p = dict(start)
    for _ in range(m.inner_steps):
        loss = F.cross_entropy(m.forward(p, ep.support_x, ep.way), ep.support_y)
        gs = torch.autograd.grad(loss, [p[k] for k in keys], create_graph=not m.first_order)
        p = {**p, **{k: p[k] - lr_of(k) * (g.detach() if m.first_order else g) for k, g in zip(keys, gs)}}
    outer = F.cross_entropy(m.forward(p, ep.query_x, ep.way), ep.query_y)
    return torch.autograd.grad(outer, list(m.meta.values()), allow_unused=True)


VARIANTS = {
    "anil": (ANIL, lambda m: (["head.weight", "head.bias"], lambda k: m.inner_lr, dict(m.meta))),
    "boil": (BOIL, lambda m: ([k for k in m.meta if not k.startswith("head.")], lambda k: m.inner_lr, dict(m.meta))),
    "metasgd": (MetaSGD, lambda m: ([k for k in m.meta if not k.startswith(LR_PREFIX)],
                                    lambda k: m.meta[LR_PREFIX + k], dict(m.meta))),
    "cavia": (CAVIA, lambda m: (["context"], lambda k: m.inner_lr,
                                {**m.meta, "context": torch.zeros(m.n_context, dtype=torch.float64, requires_grad=True)})),
}


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_meta_gradient_matches_autograd_reference_float64(synthetic_set, name, first_order):
    cls, spec = VARIANTS[name]
    m = small(cls, synthetic_set, inner_steps=2, inner_lr=0.3, first_order=first_order,
              **({"n_context": 6} if cls is CAVIA else {}))
    ep = to_double(m, synthetic_set.episode("train", 0))
    keys, lr_of, start = spec(m)
    got = torch.autograd.grad(m.task_loss(ep), list(m.meta.values()), allow_unused=True)
    ref = reference_grads(m, ep, keys, lr_of, start)
    for k, g, r in zip(m.meta, got, ref):
        g = torch.zeros_like(m.meta[k]) if g is None else g
        r = torch.zeros_like(m.meta[k]) if r is None else r
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-11), (name, k, (g - r).abs().max().item())


@pytest.mark.parametrize("cls", [ANIL, BOIL, MetaSGD, CAVIA])
def test_second_order_differs_from_first_order(synthetic_set, cls):
    kw = dict(inner_steps=1, **({"n_context": 6} if cls is CAVIA else {}))
    s = small(cls, synthetic_set, **kw).fit(synthetic_set.stream("train"), 1)
    f = small(cls, synthetic_set, first_order=True, **kw).fit(synthetic_set.stream("train"), 1)
    assert max((s.meta[k] - f.meta[k]).abs().max().item() for k in s.meta) > 0
    assert s.tags.order == "second" and f.tags.order == "first"


def adapted(m, ep):
    return {k: v.detach() for k, v in m.adapt_params(ep.support_x, ep.support_y).items()}


def test_anil_adapts_only_the_head_and_boil_only_the_body(synthetic_set):
    ep = synthetic_set.episode("test", 0)
    a = small(ANIL, synthetic_set, inner_steps_test=2)
    fast = adapted(a, ep)
    assert [k for k in a.meta if not torch.equal(fast[k], a.meta[k])] == ["head.weight", "head.bias"]
    b = small(BOIL, synthetic_set)
    fast = adapted(b, ep)
    changed = {k for k in b.meta if not torch.equal(fast[k], b.meta[k])}
    assert changed == {k for k in b.meta if not k.startswith("head.")}
    assert (b.inner_lr, b.inner_steps, b.inner_steps_test) == (0.5, 1, 1)  # the paper's miniImageNet values


def test_metasgd_learning_rates_are_per_parameter_and_meta_learned(synthetic_set):
    m = small(MetaSGD, synthetic_set, inner_lr=0.2)
    lrs = {k: v for k, v in m.meta.items() if k.startswith(LR_PREFIX)}
    assert set(lrs) == {LR_PREFIX + k for k in m.meta if not k.startswith(LR_PREFIX)}
    for k, v in lrs.items():
        assert v.shape == m.meta[k[len(LR_PREFIX):]].shape
        assert 0.1 <= v.min() and v.max() <= 0.3 and v.std() > 0  # U[0.2 * 0.5, 0.2 * 1.5]
    before = {k: v.detach().clone() for k, v in lrs.items()}
    m.fit(synthetic_set.stream("train"), 2)
    # (conv biases feed a batch norm, so their gradient, and their rate's meta-gradient, is zero)
    assert all(not torch.equal(before[k], m.meta[k]) for k in before if not k.endswith(".bias") or "bn" in k)
    # zero learning rates: one step changes nothing
    with torch.no_grad():
        for k in lrs:
            m.meta[k].zero_()
    ep = synthetic_set.episode("test", 0)
    fast = adapted(m, ep)
    assert all(torch.equal(fast[k], m.meta[k]) for k in m.meta)


def test_cavia_adapts_only_a_fresh_context(synthetic_set):
    m = small(CAVIA, synthetic_set, n_context=10)
    assert "context" not in m.meta and m.meta["film.weight"].shape == (16, 10)
    ep = synthetic_set.episode("test", 0)
    fast = adapted(m, ep)
    assert all(torch.equal(fast[k], m.meta[k]) for k in m.meta)
    assert fast["context"].shape == (10,) and fast["context"].abs().sum() > 0
    # the context starts at zero every time: adapting twice gives the same context
    assert torch.equal(adapted(m, ep)["context"], fast["context"])
    # a zero context leaves the forward pass equal to FiLM with the layer's bias alone
    x = ep.query_x
    assert torch.equal(m.forward(m.meta, x, 5), m.forward({**m.meta, "context": torch.zeros(10)}, x, 5))


def test_cavia_outer_lr_decays_by_steps(synthetic_set):
    m = small(CAVIA, synthetic_set, n_context=4, outer_lr=0.01, outer_lr_decay=0.5, outer_lr_decay_every=2)
    lrs = []
    for _ in range(5):
        m.fit(synthetic_set.stream("train", start=m.fit_episodes), 1)
        lrs.append(m.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])


# --- Reptile --------------------------------------------------------------------------------
def test_reptile_outer_step_is_interpolation_towards_the_adapted_weights(synthetic_set):
    """meta_batch 1, eps 1: the new meta-parameters are exactly the task's adapted weights."""
    m = small(Reptile, synthetic_set, meta_batch=1, inner_steps=3, inner_lr=0.01, outer_lr=1.0, total_steps=10**9)
    ep = synthetic_set.episode("train", 0)
    gen = torch.Generator()
    gen.set_state(m.gen.get_state())
    x, y = torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])
    want, _ = m.inner_adam(x, y, ep.way, m.inner_batch, m.inner_steps, m.inner_state, gen)
    m.fit(iter([ep]), 1)
    for k in m.meta:
        assert torch.allclose(m.meta[k], want[k], atol=1e-6), k


def test_reptile_meta_step_is_annealed_linearly(synthetic_set):
    m = small(Reptile, synthetic_set, outer_lr=1.0, outer_lr_final=0.2, total_steps=4)
    seen = []
    for _ in range(6):
        seen.append(m.meta_step_size())
        m.fit_steps += 1
    assert seen == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])


def test_reptile_inner_adam_has_beta1_zero_and_keeps_its_state(synthetic_set):
    m = small(Reptile, synthetic_set, meta_batch=2, inner_steps=3, inner_batch=4)
    assert m.inner_state["t"] == 0
    m.fit(synthetic_set.stream("train"), 1)
    assert m.inner_state["t"] == 2 * 3  # carried across the tasks of the meta-batch, as the reference
    assert all(v.abs().sum() > 0 for v in m.inner_state["v"].values())
    # one step from zero state, beta1 = 0: w - lr * sqrt(1 - b2) * g / (|g| sqrt(1 - b2) + eps) ~ w - lr * sign(g)
    m2 = small(Reptile, synthetic_set, inner_lr=0.001)
    ep = synthetic_set.episode("test", 0)
    fast, state = m2.inner_adam(ep.support_x, ep.support_y, 5, 5, 1, m2.inner_state, torch.Generator())
    step = (m2.meta["conv0.weight"] - fast["conv0.weight"]).abs()
    assert state["t"] == 1 and torch.allclose(step[step > 1e-7], torch.tensor(0.001), rtol=1e-2)
    # adapt starts from the stored Adam state and leaves it alone
    v_before = {k: v.clone() for k, v in m.inner_state["v"].items()}
    m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert m.inner_state["t"] == 6 and all(torch.equal(v_before[k], m.inner_state["v"][k]) for k in v_before)


def test_reptile_trains_on_support_and_query_but_adapts_on_support(synthetic_set):
    m = small(Reptile, synthetic_set, meta_batch=1, inner_batch=100, inner_steps=1)
    ep = synthetic_set.episode("train", 0)
    seen = []
    orig = m.inner_adam

    def spy(x, y, way, batch, steps, state, gen):
        seen.append(len(y))
        return orig(x, y, way, batch, steps, state, gen)

    m.inner_adam = spy
    m.fit(iter([ep]), 1)
    m.adapt(ep.support_x, ep.support_y)
    assert seen == [len(ep.support_y) + len(ep.query_y), len(ep.support_y)]


def test_reptile_non_transductive_prediction_uses_support_plus_one_query(synthetic_set):
    m = small(Reptile, synthetic_set, inner_steps_test=2)
    ep = synthetic_set.episode("test", 1)
    logits = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
    fast = adapted(m, ep)
    for i in (0, 7):
        ref = m.forward(fast, torch.cat([ep.support_x, ep.query_x[i:i + 1]]), 5)[-1]
        assert torch.allclose(logits[i], ref, atol=1e-5)
    t = small(Reptile, synthetic_set, inner_steps_test=2, transductive=True)
    assert torch.allclose(t.adapt(ep.support_x, ep.support_y)(ep.query_x), m.forward(fast, ep.query_x, 5).detach(),
                          atol=1e-5)
    assert (m.tags.bn_mode, m.tags.transductive, t.tags.bn_mode, t.tags.transductive) == \
        ("inductive", False, "transductive", True)
    assert m.tags.order == "first"


@pytest.mark.parametrize("fused_on", [False, True], ids=["unfused", "fused"])
def test_reptile_non_transductive_prediction_on_colour_images_in_chunks(fused_on, monkeypatch):
    """Several channels (miniImageNet, Meta-Dataset) under vmap, with the fused kernel's switch on or off, and
    queries in chunks (reptile.INDUCTIVE_CHUNK_VALUES): each query still sees the support set plus itself."""
    from baselines import fused, reptile
    from bench.api import TaskInfo

    if fused_on and not fused.available():
        pytest.skip(f"the fused kernel did not build: {fused.build_error()}")
    gen = torch.Generator().manual_seed(3)
    ep = Episode(torch.rand(10, 3, 16, 16, generator=gen), torch.arange(5).repeat(2),
                 torch.rand(7, 3, 16, 16, generator=gen), torch.arange(7) % 5, tuple(range(5)), "test", 0, "x")
    m = Reptile(hidden=8, seed=1, inner_steps_test=2).setup(TaskInfo((3, 16, 16), 5, 5))
    with fused.fused(fused_on):
        whole = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
        monkeypatch.setattr(reptile, "INDUCTIVE_CHUNK_VALUES", 3 * ep.support_x[0].numel() * 11)  # 3 queries a chunk
        chunked = m.adapt(ep.support_x, ep.support_y)(ep.query_x)
        fast = adapted(m, ep)
        ref = torch.stack([m.forward(fast, torch.cat([ep.support_x, q[None]]), 5)[-1] for q in ep.query_x])
    assert whole.shape == (7, 5) and torch.allclose(whole, ref, atol=1e-5) and torch.allclose(chunked, ref, atol=1e-5)


def test_reptile_state_dict_carries_the_inner_adam_state(synthetic_set):
    m = small(Reptile, synthetic_set, inner_steps=2)
    m.fit(synthetic_set.stream("train"), 1)
    state = m.state_dict()
    again = Reptile(**m.params()).load_state_dict(state)
    assert again.inner_state["t"] == m.inner_state["t"] == 4
    assert all(torch.equal(again.inner_state["v"][k], m.inner_state["v"][k]) for k in m.meta)


# --- registry -------------------------------------------------------------------------------
def test_registry_entries_of_the_zoo():
    def values(name, key):
        return registry.preset(name, key).values

    assert values("reptile", "omniglot-5w")["inner_lr"] == 0.00044
    assert values("reptile", "omniglot-20w")["inner_steps_test"] == 97
    assert values("reptile", "miniimagenet")["outer_lr"] == 0.235
    assert registry.preset("reptile", "omniglot-5w").steps == 200000
    assert values("anil", "omniglot-5w") == values("maml", "omniglot-5w")
    assert values("boil", "miniimagenet")["inner_lr"] == 0.5
    assert registry.preset("boil", "miniimagenet").steps == 30000
    assert values("metasgd", "omniglot-5w")["inner_steps"] == 1
    assert values("cavia", "miniimagenet")["n_context"] == 100
    for name in ("reptile", "metasgd", "anil", "boil", "cavia"):
        cls = registry.method_class(name)
        assert issubclass(cls, MAML) or cls is Reptile
        assert all(p.paper for p in cls.PRESETS.values())

"""Backbones beyond Conv-4 (baselines/backbones.py): ResNet-12 and ResNet-18 for every gradient method.

- the networks: shapes, parameter counts of the published widths, labels, errors at construction;
- float64 second-order meta-gradients through a tiny ResNet-12 equal a plain-autograd reference
  (written here with explicit batch-norm formulas, independent of core.Ops) for MAML, ANIL, BOIL,
  Meta-SGD, CAVIA, Proto-MAML and MAML++, and the task-batched fast path equals the per-task one;
- the conformance suite on each method with each backbone (a tiny ResNet-12 / ResNet-18);
- DropBlock draws from the method's own generator, only in meta-training;
- the params_hash of the committed zoo results is unchanged by the new hyperparameters;
- a short learning run of a tiny ResNet-12 on real Omniglot (slow).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import benchmarks
from bench.api import Episode, TaskInfo
from bench.checks import run_checks
from bench.errors import MetabenchError
from bench.runner import build_learner, params_hash
from baselines import registry
from baselines.anil import ANIL
from baselines.backbones import dropping, drop_block, get_backbone
from baselines.boil import BOIL
from baselines.cavia import CAVIA
from baselines.core import BN_EPS, GradientLearner, head_forward
from baselines.maml import MAML
from baselines.mamlpp import LR_PREFIX, MAMLpp
from baselines.metasgd import MetaSGD
from baselines.protomaml import ProtoMAML, proto_head
from baselines.protonet import prototypes
from test_zoo import to_double  # tests/ is on sys.path (pytest's rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = "4-5-6-4"  # distinct widths, so that a layer wired to the wrong width fails


# --- the networks -------------------------------------------------------------------------
def n_params(p, body_only=True):
    return sum(v.numel() for k, v in p.items() if not (body_only and k.startswith("head.")))


def test_published_widths_and_parameter_counts():
    r12, r18 = get_backbone("resnet12"), get_backbone("resnet18")
    assert r12.widths == (64, 160, 320, 640) and r18.widths == (64, 128, 256, 512)
    assert r12.label == "resnet12-64-160-320-640" and get_backbone("conv4", "", 32).label == "conv4-32"
    g = torch.Generator().manual_seed(0)
    # MetaOptNet's ResNet-12 body on RGB: 12.4M parameters (3x3 convs, 1x1 shortcuts, batch norm)
    assert n_params(r12.init(g, 3, 5, 84)) == 12_424_320
    # ResNet-18 (torchvision's layout without its classifier): 11,176,512
    assert n_params(r18.init(g, 3, 5, 126)) == 11_176_512
    assert len(r12.conv_layers()) == 16 and len(r18.conv_layers()) == 20


@pytest.mark.parametrize("name,size,feat", [("resnet12", 84, 4), ("resnet18", 126, 4), ("resnet12", 28, 4),
                                            ("conv4", 28, 8)])
def test_features_are_average_pooled_to_the_last_width(name, size, feat):
    net = get_backbone(name, "" if name == "conv4" else TINY, 8)
    p = net.init(torch.Generator().manual_seed(0), 3, 5, size)
    x = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    f = net.features(p, x)
    assert f.shape == (6, feat if name != "conv4" else 8 * (size // 16) ** 2)
    assert head_forward(p, f, 3).shape == (6, 3)


def test_init_is_a_function_of_the_generator_and_leaves_the_global_rng():
    net = get_backbone("resnet18", TINY)
    before = torch.random.get_rng_state()
    a = net.init(torch.Generator().manual_seed(5), 1, 5, 28)
    b = net.init(torch.Generator().manual_seed(5), 1, 5, 28)
    assert torch.equal(before, torch.random.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Kaiming-normal (fan_out) convs: std sqrt(2 / (c_out k^2))
    w = get_backbone("resnet12").init(torch.Generator().manual_seed(0), 3, 5, 84)["block3.conv2.weight"]
    assert abs(w.std().item() - (2 / (640 * 9)) ** 0.5) < 1e-3 * 2


@pytest.mark.parametrize("kw,words", [
    (dict(backbone="resnet50"), "unknown backbone"),
    (dict(backbone="resnet12", widths="4-4-4"), "four positive whole numbers"),
    (dict(widths="8-8-8-8"), "takes its width from `hidden`"),
    (dict(backbone="resnet18", dropblock=0.1), "resnet12 only"),
])
def test_bad_backbones_fail_at_construction(kw, words):
    with pytest.raises(MetabenchError, match=words):
        registry.make("maml", "omniglot-5w", **kw)


def test_images_too_small_and_dropblock_without_per_task_masks_fail_at_setup():
    with pytest.raises(MetabenchError, match="at least 16 px"):
        MAML(backbone="resnet12", widths=TINY).setup(TaskInfo((1, 8, 8), 5, 20))
    for name in ("reptile", "imaml"):
        with pytest.raises(MetabenchError, match="dropblock must be 0"):
            registry.make(name, "omniglot-5w", backbone="resnet12", dropblock=0.1)


# --- params_hash of existing runs ------------------------------------------------------------
def test_new_hyperparameters_are_left_out_at_their_defaults():
    m = MAML()
    assert not {"backbone", "widths", "dropblock"} & set(m.params())
    r = MAML(backbone="resnet12", widths="8-8-8-8")
    assert r.params()["backbone"] == "resnet12" and r.params()["widths"] == "8-8-8-8" and "dropblock" not in r.params()
    assert MAML(**r.params()).params() == r.params()
    assert r.backbone_label == "resnet12-8-8-8-8" and m.backbone_label == "conv4-64"


ZOO_CARDS = sorted((REPO / "results" / "zoo" / "omniglot-small-5w1s").glob("*/seed0.json"))


@pytest.mark.parametrize("card_path", ZOO_CARDS, ids=[p.parent.name for p in ZOO_CARDS])
def test_zoo_results_keep_their_params_hash(card_path):
    """Every committed zoo run, rebuilt as scripts/zoo_omniglot_small.py builds it (its PLAN overrides), has
    the hyperparameters and params_hash of its card: the backbone fields did not change existing rows."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from zoo_omniglot_small import PLAN
    finally:
        sys.path.remove(str(REPO / "scripts"))
    card = json.loads(card_path.read_text())
    method = card["base_method"] if "base_method" in card else card["method"]
    learner = build_learner(method, benchmarks.get_benchmark(card["benchmark"]), int(card["seed"]),
                            PLAN.get(method, {}), int(card["fit_steps"]) or None)
    params = learner.params()
    assert not {"backbone", "widths", "dropblock"} & set(params)
    if "task_batch" not in card["params"]:
        # recorded before MAML's task_batch field existed: that older change, not the backbone's, moved these
        # cards' hashes (maml, fomaml, anil, boil, metasgd, cavia); the rest of their hyperparameters must match
        params.pop("task_batch", None)
    assert params == card["params"]
    assert params_hash(params) == card["params_hash"]
    assert learner.backbone_label == card["backbone"]


# --- float64 meta-gradients against plain autograd --------------------------------------------
def explicit_bn(x, w, b):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + BN_EPS) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def reference_resnet12(p, x, bn=None):
    """ResNet-12 written out: bn(name, x) is the batch norm (default: the explicit formula with p's row)."""
    bn = bn or (lambda name, h: explicit_bn(h, p[name + ".weight"], p[name + ".bias"]))
    for b in range(4):
        def conv_bn(j, h):
            w = p[f"block{b}.conv{j}.weight"]
            return bn(f"block{b}.bn{j}", F.conv2d(h, w, padding=w.shape[-1] // 2))

        h = F.leaky_relu(conv_bn("1", x), 0.1)
        h = F.leaky_relu(conv_bn("2", h), 0.1)
        x = F.max_pool2d(F.leaky_relu(conv_bn("3", h) + conv_bn("_s", x), 0.1), 2)
    return x.mean(dim=(2, 3))


def linear(p, feats, way):
    return F.linear(feats, p["head.weight"][:way], p["head.bias"][:way])


def double_episode(ep):
    return Episode(ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y, ep.classes, ep.split,
                   ep.index, ep.spec_hash)


def reference_grads(m, ep, start, keys, lr_of, forward, steps, weights=None):
    """d(outer loss)/d(m.meta) through `steps` plain second-order inner steps on forward(p, x, step).

    The inner gradients are partial derivatives w.r.t. each adapted tensor (taken at a zero added to
    it), also where one is computed from another (Proto-MAML's head from the body's prototypes)."""
    p, outer = dict(start), 0.0
    for s in range(steps):
        zeros = {k: torch.zeros_like(p[k], requires_grad=True) for k in keys}
        loss = F.cross_entropy(forward({**p, **{k: p[k] + z for k, z in zeros.items()}}, ep.support_x, s),
                               ep.support_y)
        gs = torch.autograd.grad(loss, list(zeros.values()), create_graph=True, allow_unused=True)
        p = {**p, **{k: p[k] - lr_of(k, s) * (0 if g is None else g) for k, g in zip(keys, gs)}}
        if weights is not None:
            outer = outer + weights[s] * F.cross_entropy(forward(p, ep.query_x, s), ep.query_y)
    if weights is None:
        outer = F.cross_entropy(forward(p, ep.query_x, steps - 1), ep.query_y)
    return torch.autograd.grad(outer, list(m.meta.values()), allow_unused=True)


def film_forward(m):
    def forward(p, x, _):
        film = F.linear(p["context"], p["film.weight"], p["film.bias"])
        c = film.shape[0] // 2
        layer = f"block{m.film_block}.bn3"

        def bn(name, h):
            h = explicit_bn(h, p[name + ".weight"], p[name + ".bias"])
            return film[:c].view(1, -1, 1, 1) * h + film[c:].view(1, -1, 1, 1) if name == layer else h

        return linear(p, reference_resnet12(p, x, bn), 5)

    return forward


def step_forward(p, x, s):
    """MAML++'s network at inner step s: batch-norm row s of every per-step [steps, C] parameter."""
    return linear(p, reference_resnet12(p, x, lambda name, h: explicit_bn(h, p[name + ".weight"][s],
                                                                            p[name + ".bias"][s])), 5)


def plain(p, x, _):
    return linear(p, reference_resnet12(p, x), 5)


def setup_of(name, m, ep):
    """(start, adapted keys, lr_of, forward, weights) of the reference for method `name`."""
    meta = dict(m.meta)
    if name == "cavia":
        return {**meta, "context": torch.zeros(m.n_context, dtype=torch.float64, requires_grad=True)}, ["context"], \
            lambda k, s: m.inner_lr, film_forward(m), None
    if name == "protomaml":
        start = {**meta, **proto_head(prototypes(reference_resnet12(meta, ep.support_x), ep.support_y, 5))}
        return start, list(start), lambda k, s: m.inner_lr, plain, None
    if name == "mamlpp":
        keys = [k for k in meta if not (k.startswith(LR_PREFIX) or ".bn" in k)]
        return meta, keys, lambda k, s: m.meta[LR_PREFIX + k][s], step_forward, m.loss_weights()
    keys = {"maml": list(meta), "anil": ["head.weight", "head.bias"],
            "boil": [k for k in meta if not k.startswith("head.")],
            "metasgd": [k for k in meta if not k.startswith("lr.")]}[name]
    lr_of = (lambda k, s: m.meta["lr." + k]) if name == "metasgd" else (lambda k, s: m.inner_lr)
    return meta, keys, lr_of, plain, None


SECOND_ORDER = {"maml": (MAML, {}), "anil": (ANIL, {}), "boil": (BOIL, {}), "metasgd": (MetaSGD, {}),
                "cavia": (CAVIA, dict(n_context=3)), "protomaml": (ProtoMAML, dict(first_order=False)),
                "mamlpp": (MAMLpp, dict(msl_epochs=10, first_order_epochs=0))}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_second_order_meta_gradient_through_resnet12_matches_autograd_float64(synthetic_set, name):
    cls, kw = SECOND_ORDER[name]
    m = cls(**dict(backbone="resnet12", widths=TINY, meta_batch=1, seed=2, inner_steps=2, inner_lr=0.3) | kw)
    m.setup(synthetic_set.task_info())
    ep = to_double(m, synthetic_set.episode("train", 0))
    assert m.tags.order == "second"
    start, keys, lr_of, forward, weights = setup_of(name, m, ep)
    got = torch.autograd.grad(m.task_loss(ep), list(m.meta.values()), allow_unused=True)
    ref = reference_grads(m, ep, start, keys, lr_of, forward, m.inner_steps, weights)
    nonzero = 0
    for k, g, r in zip(m.meta, got, ref):
        g = torch.zeros_like(m.meta[k]) if g is None else g
        r = torch.zeros_like(m.meta[k]) if r is None else r
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10, msg=lambda msg: f"{name} {k}: {msg}")
        nonzero += bool(r.abs().max() > 0)
    assert nonzero > len(m.meta) // 3  # the body's gradient is there (batch norm zeroes the conv biases' only)


@pytest.mark.parametrize("name,widths", [("resnet12", TINY), ("resnet18", TINY)])
@pytest.mark.parametrize("cls", [MAML, ANIL, BOIL, MetaSGD], ids=lambda c: c.__name__)
def test_task_batched_fast_path_matches_per_task_float64(synthetic_set, cls, name, widths):
    stream = synthetic_set.stream("train")
    eps = [double_episode(next(stream)) for _ in range(3)]
    grads = []
    for fast in (False, True):
        m = cls(backbone=name, widths=widths, meta_batch=3, seed=3, inner_steps=2, inner_lr=0.3, task_batch=3)
        m.setup(synthetic_set.task_info())
        m.meta = {k: v.detach().double().requires_grad_(True) for k, v in m.meta.items()}
        m.optimizer = torch.optim.SGD(list(m.meta.values()), lr=0.0)
        (MAML.outer_step if fast else GradientLearner.outer_step)(m, eps)
        grads.append({k: v.grad for k, v in m.meta.items() if v.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-9, atol=1e-12, msg=lambda msg: f"{k}: {msg}")


@pytest.mark.parametrize("name", ["resnet12", "resnet18"])
@pytest.mark.parametrize("cls", [MAML, BOIL], ids=lambda c: c.__name__)
def test_adapt_many_equals_adapt_float64(synthetic_set, cls, name):
    m = cls(backbone=name, widths=TINY, seed=1, inner_steps_test=3).setup(synthetic_set.task_info())
    m.meta = {k: v.detach().double().requires_grad_(True) for k, v in m.meta.items()}
    eps = [double_episode(synthetic_set.episode("test", i)) for i in range(3)]
    many = m.adapt_many([(ep.support_x, ep.support_y) for ep in eps])
    for predictor, ep in zip(many, eps):
        torch.testing.assert_close(predictor(ep.query_x), m.adapt(ep.support_x, ep.support_y)(ep.query_x),
                                   rtol=1e-9, atol=1e-11)


def test_resnet12_forward_of_every_method_network_equals_the_written_out_one(synthetic_set):
    ep = synthetic_set.episode("test", 0)
    m = MAML(backbone="resnet12", widths=TINY).setup(synthetic_set.task_info())
    p = {k: v.detach().double() for k, v in m.meta.items()}
    torch.testing.assert_close(m.forward(p, ep.query_x.double(), 5), plain(p, ep.query_x.double(), 0),
                               rtol=1e-10, atol=1e-12)


# --- conformance on each backbone -------------------------------------------------------------
GRADIENT_METHODS = [n for n in registry.METHODS if issubclass(registry.method_class(n), GradientLearner)]
# the contract's checks that a backbone could break (state, seeding, resumption, shapes, adaptation); check_learns
# is the real-data test below, and check_adapt_many is compared in float64 above: on a 4-filter ResNet at 28 px a
# few inner steps at Omniglot's lr 0.4 amplify float32 round-off beyond its 1% tolerance (also between the
# per-task float32 and float64 paths), while both paths agree to 1e-12 in float64
CHECKS = ["check_hyperparameters", "check_setup_seeded", "check_adapt_shapes", "check_adapt_leaves_meta_untouched",
          "check_adapt_repeatable", "check_state_dict_roundtrip", "check_resume_from_state_dict",
          "check_fit_worker_independent", "check_variable_way_fit"]
BACKBONES = {"resnet12": dict(backbone="resnet12", widths="4-4-4-4"),
             "resnet18": dict(backbone="resnet18", widths="4-4-4-4")}
FEWER_STEPS = {"mamlpp": dict(inner_steps=2), "metal": dict(inner_steps=2, inner_steps_test=2)}  # (time)


def test_every_gradient_method_is_covered():
    assert len(GRADIENT_METHODS) == len(registry.METHODS) - 1  # all but chance


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_conformance_checks_pass_on_each_backbone(method, backbone):
    checks = CHECKS if backbone == "resnet12" else CHECKS[:6]
    results = run_checks(method, only=checks, params=BACKBONES[backbone] | FEWER_STEPS.get(method, {}))
    failed = [f"{r.check}: {r.message}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)


# --- DropBlock ----------------------------------------------------------------------------------
def test_drop_block_zeroes_whole_blocks_and_rescales():
    x = torch.ones(2, 3, 10, 10)
    out = drop_block(x, 0.3, 5, torch.Generator().manual_seed(0))
    zero = out == 0
    assert zero.any() and (out[~zero] > 1).all()  # kept values rescaled by numel / kept
    assert torch.isclose(out.sum(), x.sum())
    # a dropped value's 5x5 block: every zero lies in some all-zero 5x5 window of its channel
    windows = F.max_pool2d((~zero).float(), 5, stride=1)  # 0 where a 5x5 window is all zero
    covered = F.max_pool2d(F.pad((windows == 0).float(), (4, 4, 4, 4)), 5, stride=1) > 0
    assert (covered | ~zero).all()


def test_dropblock_draws_from_the_methods_generator_in_training_only(synthetic_set):
    kw = dict(backbone="resnet12", widths=TINY, dropblock=0.2, meta_batch=2, seed=4)
    on, off = MAML(**kw).setup(synthetic_set.task_info()), MAML(**kw | {"dropblock": 0.0}).setup(synthetic_set.task_info())
    for k in on.meta:
        on.meta[k].data.copy_(off.meta[k])
    ep = synthetic_set.episode("train", 0)
    # adaptation and prediction: deterministic, no masks
    torch.testing.assert_close(on.adapt(ep.support_x, ep.support_y)(ep.query_x),
                               off.adapt(ep.support_x, ep.support_y)(ep.query_x))
    # training: masks from (seed, step, episode), never from the global RNG
    before = torch.random.get_rng_state()
    a, b = on.training_loss(ep), on.training_loss(ep)
    assert torch.equal(before, torch.random.get_rng_state())
    assert a.item() == b.item() != off.training_loss(ep).item()
    with dropping(0.5, torch.Generator().manual_seed(0)):
        dropped = on.features(on.meta, ep.query_x)
    assert (dropped != on.features(on.meta, ep.query_x)).any()
    assert torch.equal(on.features(on.meta, ep.query_x), off.features(off.meta, ep.query_x))


def test_conformance_with_dropblock_on():
    results = run_checks("maml", only=["check_global_rng_untouched", "check_fit_deterministic",
                                       "check_fit_worker_independent", "check_resume_from_state_dict",
                                       "check_adapt_repeatable"],
                         params=dict(backbone="resnet12", widths="8-8-8-8", dropblock=0.1))
    failed = [f"{r.check}: {r.message}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)


# --- presets ------------------------------------------------------------------------------------
def test_resnet12_presets_are_selected_by_the_backbone():
    for name in ("maml", "fomaml", "unicorn-maml", "boil", "scale-shift"):
        assert registry.preset_key(name, "miniimagenet", {"backbone": "resnet12"}) == "miniimagenet-resnet12"
        p = registry.preset(name, "miniimagenet-resnet12")
        assert p.paper and p.repository and p.values["backbone"] == "resnet12"
        m = registry.make(name, "miniimagenet", backbone="resnet12")
        assert m.backbone_label.startswith("resnet12-")
    assert registry.make("maml", "miniimagenet", backbone="resnet12").params()["inner_steps"] == 15  # Ye & Chao 1-shot
    assert registry.outer_steps("maml", "miniimagenet", "miniimagenet-5w1s", {"backbone": "resnet12"}) == 10000
    # no ResNet preset: the benchmark's own, with the backbone set over it
    assert registry.preset_key("cavia", "miniimagenet", {"backbone": "resnet12"}) == "miniimagenet"
    assert registry.make("anil", "miniimagenet", backbone="resnet12").params()["inner_lr"] == 0.01
    assert "miniimagenet-resnet12" not in registry.method_class("anil").PRESETS


# --- learning on real data (the omniglot_small fixture: tests/conftest.py) ----------------------
@pytest.mark.slow
def test_tiny_resnet12_maml_learns_omniglot_small(omniglot_small):
    """Second-order MAML on ResNet-12 16-16-16-16: 100 outer steps of 2 tasks at outer lr 3e-3, inner lr 0.1
    (Omniglot's 0.4 is Conv-4's: 0.42 here with 8-8-16-16 and 4 tasks, 0.1: 0.54), 5 test steps, 60 test
    episodes. Measured: 0.59 in 27 s on one thread of a shared machine."""
    es = omniglot_small
    m = registry.make("maml", es.bench.preset, seed=0, backbone="resnet12", widths="16-16-16-16", meta_batch=2,
                      outer_lr=3e-3, inner_lr=0.1, inner_steps=1, inner_steps_test=5)
    m.setup(es.task_info())
    m.fit(es.stream("train"), 100)
    acc = float(np.mean([r["accuracy"] for r in m.evaluate(es.episodes("test", 60))]))
    assert acc >= 0.4, f"{acc:.3f} test accuracy (chance 0.2)"

"""The method registry: name -> "module:Class", paper defaults per benchmark family, citation.

Defaults are keyed by a protocol key derived from the benchmark (`protocol_key`):
"omniglot-5w", "omniglot-20w", "miniimagenet", ...; "*" applies everywhere unless a more
specific key overrides it. `steps` is the paper's number of outer updates (full protocol).
A submission may also name any importable "pkg.module:Class" instead of a registered name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from bench.api import MetaLearner
from bench.errors import MetabenchError, unknown


@dataclass(frozen=True)
class MethodEntry:
    """One registered method."""

    name: str
    target: str
    citation: str
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)


_MAML_DEFAULTS = {
    "omniglot-5w": dict(inner_lr=0.4, inner_steps=1, inner_steps_test=10, meta_batch=32, outer_lr=1e-3, hidden=64),
    "omniglot-20w": dict(inner_lr=0.1, inner_steps=5, inner_steps_test=10, meta_batch=16, outer_lr=1e-3, hidden=64),
    "miniimagenet": dict(inner_lr=0.01, inner_steps=5, inner_steps_test=10, meta_batch=4, outer_lr=1e-3, hidden=32),
}
_MAML_STEPS = {"omniglot-5w": 40000, "omniglot-20w": 40000, "miniimagenet": 60000}
# Meta-Dataset (family "meta-dataset"): fo-MAML's best config of Triantafillou et al., ICLR 2020
# (google-research/meta-dataset learn/gin/best/maml_imagenet.gin, maml_all.gin; shared
# published_hyperparameters.csv): inner lr 0.09915, 10 steps (+5 at evaluation), one episode per
# update, Adam 3.601e-4 (ImageNet-only; 2.370e-4 for all datasets), 75000 updates. Not taken over:
# their pretrained ResNet-18 and 126 px (Conv-4 64 at 84 px here) and the lr decay x0.835 / 10000.
# Second-order `maml` uses the same settings (the paper ran first order only; our choice).
_MD_MAML = dict(inner_lr=0.09915, inner_steps=10, inner_steps_test=15, meta_batch=1, outer_lr=3.601e-4, hidden=64)

# MAML++ (Antoniou et al. 2019), Omniglot 5- and 20-way: the released configs (see the citation below)
_MAMLPP_OMNIGLOT = dict(inner_lr=0.1, inner_steps=5, meta_batch=8, outer_lr=1e-3, min_outer_lr=1e-5, hidden=64,
                        epoch_steps=500, total_epochs=100, msl_epochs=10, first_order_epochs=0, grad_clip=0.0)

# Prototypical Networks (Snell et al. 2017): Adam 1e-3 halved every 2000 episodes (paper Sec. 3.1;
# jakesnell/prototypical-networks run_train.py: lr 0.001, decay_every 20 epochs of 100 episodes), one
# episode per update, Conv-4 64 (also on miniImageNet). Higher-way training from merged stream episodes
# (baselines/protonet.py): Omniglot 60-way (12 x 5-way, 3 x 20-way), miniImageNet 30-way (6 x 5-way: the
# paper's 1-shot setting; its 5-shot models trained 20-way, which the "miniimagenet" key cannot tell apart).
_PROTONET = dict(meta_batch=1, outer_lr=1e-3, lr_decay=0.5, lr_decay_every=2000, hidden=64, episodes_per_task=1)
# fo-Proto-MAML on Meta-Dataset (Triantafillou et al. 2020): the ImageNet-only best config (google-research/
# meta-dataset learn/gin/best/maml_init_with_proto_imagenet.gin; published_hyperparameters.csv).
_MD_PROTOMAML = dict(inner_lr=0.005435, inner_steps=6, inner_steps_test=6, meta_batch=1, outer_lr=3.634e-4,
                     outer_lr_decay=0.648, outer_lr_decay_every=2500, hidden=64, first_order=True)

# iMAML (GD) on Omniglot: the paper's Table 2 caption and the imaml_dev README replication command (see "imaml")
_IMAML_OMNIGLOT = dict(inner_lr=0.1, inner_steps=16, inner_steps_test=16, lam=2.0, lam_test=0.0, cg_steps=5,
                       meta_batch=32, outer_lr=1e-3, adam_eps=1e-3, hidden=64)

METHODS: dict[str, MethodEntry] = {
    "maml": MethodEntry(
        "maml", "baselines.maml:MAML",
        "Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks. ICML 2017 "
        "(hyperparameters: cbfinn/maml main.py usage)",
        {**_MAML_DEFAULTS, "meta-dataset": _MD_MAML}, {**_MAML_STEPS, "meta-dataset": 75000}),
    "fomaml": MethodEntry(
        "fomaml", "baselines.maml:MAML",
        "Finn et al. 2017, first-order approximation (Sec. 5.2; --stop_grad=True in cbfinn/maml)",
        {k: {**v, "first_order": True} for k, v in {**_MAML_DEFAULTS, "meta-dataset": _MD_MAML}.items()},
        {**_MAML_STEPS, "meta-dataset": 75000}),
    "finetune": MethodEntry(
        "finetune", "baselines.finetune:Finetune",
        "Chen, Liu, Kira, Wang, Huang. A Closer Look at Few-shot Classification. ICLR 2019 ('Baseline'; "
        "pre-training Adam 1e-3; fine-tuning SGD 0.01, momentum 0.9, weight decay 1e-3, 100 iterations)",
        {"*": dict(meta_batch=4, outer_lr=1e-3, hidden=64, head_steps=100, head_lr=0.01),
         "miniimagenet": dict(hidden=32)},
        {"*": 40000}),
    "chance": MethodEntry("chance", "baselines.chance:Chance", "uniform prediction (accuracy 1/way)", {}, {"*": 0}),
    "reptile": MethodEntry(
        "reptile", "baselines.reptile:Reptile",
        "Nichol, Achiam, Schulman. On First-Order Meta-Learning Algorithms. arXiv:1803.02999, 2018 "
        "(hyperparameters: openai/supervised-reptile README commands 'used for the paper', 1-shot rows; "
        "inner Adam beta1=0; meta step annealed linearly to 0)",
        {"omniglot-5w": dict(inner_lr=0.00044, inner_batch=5, inner_steps=12, eval_batch=5, inner_steps_test=86,
                             meta_batch=3, outer_lr=1.0, outer_lr_final=0.0, total_steps=200000, hidden=64),
         "omniglot-20w": dict(inner_lr=0.00046, inner_batch=15, inner_steps=12, eval_batch=10, inner_steps_test=97,
                              meta_batch=3, outer_lr=1.0, outer_lr_final=0.0, total_steps=200000, hidden=64),
         "miniimagenet": dict(inner_lr=0.0012, inner_batch=3, inner_steps=19, eval_batch=3, inner_steps_test=55,
                              meta_batch=2, outer_lr=0.235, outer_lr_final=0.0, total_steps=200000, hidden=32)},
        {"omniglot-5w": 200000, "omniglot-20w": 200000, "miniimagenet": 200000}),
    "metasgd": MethodEntry(
        "metasgd", "baselines.metasgd:MetaSGD",
        "Li, Zhou, Chen, Li. Meta-SGD: Learning to Learn Quickly for Few-Shot Learning. arXiv:1707.09835, 2017 "
        "(one inner step; per-parameter learning rates initialised uniformly at MAML's inner lr +-50% (our "
        "choice); meta-batch, outer Adam 1e-3, width and steps as MAML, not confirmed from the paper)",
        {k: {**v, "inner_steps": 1, "inner_steps_test": 1, "alpha_spread": 0.5} for k, v in _MAML_DEFAULTS.items()},
        _MAML_STEPS),
    "anil": MethodEntry(
        "anil", "baselines.anil:ANIL",
        "Raghu, Raghu, Bengio, Vinyals. Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness "
        "of MAML. ICLR 2020 (inner loop on the head only; 'same architecture and setup as Finn et al.': MAML's "
        "hyperparameters and steps)",
        _MAML_DEFAULTS, _MAML_STEPS),
    "boil": MethodEntry(
        "boil", "baselines.boil:BOIL",
        "Oh, Yoo, Kim, Yun. BOIL: Towards Representation Change for Few-shot Learning. ICLR 2021 (miniImageNet: "
        "HJ-Yoo/BOIL main.py + run_4conv.sh, LibFewShot reproduce/BOIL: body lr 0.5, head 0, 1 step, meta-batch 4, "
        "Conv-4 64, 30000 steps; Omniglot not in the paper: MAML's Omniglot settings, our choice)",
        {"omniglot-5w": {**_MAML_DEFAULTS["omniglot-5w"]}, "omniglot-20w": {**_MAML_DEFAULTS["omniglot-20w"]},
         "miniimagenet": dict(inner_lr=0.5, inner_steps=1, inner_steps_test=1, meta_batch=4, outer_lr=1e-3, hidden=64)},
        {"omniglot-5w": 40000, "omniglot-20w": 40000, "miniimagenet": 30000}),
    "cavia": MethodEntry(
        "cavia", "baselines.cavia:CAVIA",
        "Zintgraf, Shiarlis, Kurin, Hofmann, Whiteson. Fast Context Adaptation via Meta-Learning. ICML 2019 "
        "(lmzintgraf/cavia classification/arguments.py + main.py: 100 context parameters FiLM-ing conv block 3, "
        "inner lr 1.0, 2 steps, 16 tasks per update, Adam 1e-3 x0.9 every 5000, grad clamp 10, 32 filters, 60000 "
        "steps; Omniglot not in the paper: same with MAML's Omniglot meta-batch and width, our choice)",
        {"omniglot-5w": dict(n_context=100, inner_lr=1.0, inner_steps=2, inner_steps_test=2, meta_batch=32,
                             outer_lr=1e-3, outer_lr_decay=0.9, outer_lr_decay_every=5000, hidden=64),
         "omniglot-20w": dict(n_context=100, inner_lr=1.0, inner_steps=2, inner_steps_test=2, meta_batch=16,
                              outer_lr=1e-3, outer_lr_decay=0.9, outer_lr_decay_every=5000, hidden=64),
         "miniimagenet": dict(n_context=100, inner_lr=1.0, inner_steps=2, inner_steps_test=2, meta_batch=16,
                              outer_lr=1e-3, outer_lr_decay=0.9, outer_lr_decay_every=5000, hidden=32)},
        {"omniglot-5w": 40000, "omniglot-20w": 40000, "miniimagenet": 60000}),
    "mamlpp": MethodEntry(
        "mamlpp", "baselines.mamlpp:MAMLpp",
        "Antoniou, Edwards, Storkey. How to train your MAML. ICLR 2019 (hyperparameters: the released configs "
        "AntreasAntoniou/HowToTrainYourMAMLPytorch experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_{5,20}_0.json "
        "and mini-imagenet_maml++-mini-imagenet_1_2_0.01_48_5_0.json: 5 inner steps at train and test (evaluates "
        "with the steps it was trained with: per-step lrs and BN exist only for those), LSLR init 0.1 / 0.01, "
        "meta-batch 8 / 2, Adam 1e-3 cosine-annealed to 1e-5 / 1e-3 over 100 epochs x 500 steps, multi-step loss "
        "for 10 / 15 epochs, second order throughout (first_order_to_second_order_epoch -1; the paper's text "
        "uses first order for the first 50 epochs, the README template for 81 of 150), Conv-4 64 / 48, meta-grad "
        "clamp 10 on miniImageNet; shared Conv-4 with ReLU instead of leaky ReLU)",
        {"omniglot-5w": _MAMLPP_OMNIGLOT, "omniglot-20w": _MAMLPP_OMNIGLOT,
         "miniimagenet": dict(inner_lr=0.01, inner_steps=5, meta_batch=2, outer_lr=1e-3, min_outer_lr=1e-3,
                              hidden=48, epoch_steps=500, total_epochs=100, msl_epochs=15, first_order_epochs=0,
                              grad_clip=10.0)},
        {"omniglot-5w": 50000, "omniglot-20w": 50000, "miniimagenet": 50000}),
    "protonet": MethodEntry(
        "protonet", "baselines.protonet:ProtoNet",
        "Snell, Swersky, Zemel. Prototypical Networks for Few-shot Learning. NeurIPS 2017 (Adam 1e-3 halved every "
        "2000 episodes, one episode per update, Conv-4 64: paper Sec. 3 and jakesnell/prototypical-networks "
        "run_train.py; training ways above the test way (Omniglot 60, miniImageNet 30 for 1-shot / 20 for 5-shot) "
        "reproduced by merging consecutive stream episodes (60 / 30-way; 5-shot miniImageNet also gets 30); "
        "steps: the paper early-stops on validation (code: at most 10000 x 100 episodes, patience 200 epochs), "
        "20000 is our choice (the lr has then been halved 10 times))",
        {"*": _PROTONET, "omniglot-5w": {**_PROTONET, "episodes_per_task": 12},
         "omniglot-20w": {**_PROTONET, "episodes_per_task": 3}, "miniimagenet": {**_PROTONET, "episodes_per_task": 6}},
        {"*": 20000}),
    "protomaml": MethodEntry(
        "protomaml", "baselines.protomaml:ProtoMAML",
        "Triantafillou, Zhu, Dumoulin, Lamblin, Evci, Xu, Goroshin, Gelada, Swersky, Manzagol, Larochelle. "
        "Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples. ICLR 2020 (fo-Proto-MAML; "
        "Meta-Dataset: learn/gin/best/maml_init_with_proto_imagenet.gin: inner lr 0.005435, 6 steps (+0 at "
        "evaluation), one episode per update, Adam 3.634e-4 x0.648 every 2500, 75000 updates; not taken over: "
        "pretrained ResNet-18 at 126 px, adapt_batch_norm=False, weight decay 1.37e-5, and the all-datasets config "
        "maml_init_with_proto_all.gin (0.01988, 1 step +5, 2.981e-4 x0.766 every 500), which the family key "
        "cannot tell apart; Omniglot / miniImageNet are not in the paper: MAML's settings and steps, first "
        "order, our choice)",
        {**{k: {**v, "first_order": True} for k, v in _MAML_DEFAULTS.items()}, "meta-dataset": _MD_PROTOMAML},
        {**_MAML_STEPS, "meta-dataset": 75000}),
    "baseline++": MethodEntry(
        "baseline++", "baselines.baselinepp:BaselinePP",
        "Chen, Liu, Kira, Wang, Huang. A Closer Look at Few-shot Classification. ICLR 2019 ('Baseline++': cosine "
        "classifier in pre-training and fine-tuning, scale 2 up to 200 classes and 10 above: wyharveychen/"
        "CloserLookFewShot backbone.distLinear; the rest as `finetune`: pre-training Adam 1e-3, fine-tuning SGD "
        "0.01, momentum 0.9, weight decay 1e-3, 100 iterations; budget and widths as `finetune`, our choice: the "
        "paper pre-trains Conv-4 64 with batch 16 for 400 epochs on miniImageNet, 5 on Omniglot)",
        {"*": dict(meta_batch=4, outer_lr=1e-3, hidden=64, head_steps=100, head_lr=0.01, scale_factor=2.0,
                   scale_factor_many=10.0, many_classes=200),
         "miniimagenet": dict(hidden=32)},
        {"*": 40000}),
    "scale-shift": MethodEntry(
        "scale-shift", "baselines.scaleshift:ScaleShift",
        "Sun, Liu, Chua, Schiele. Meta-Transfer Learning for Few-Shot Learning. CVPR 2019 (scaling and shifting "
        "without the hard-task meta-batch; yaoyao-liu/meta-transfer-learning pytorch/main.py defaults: inner lr "
        "0.01, 50 steps at train and test, Adam 1e-4 for SS and 1e-3 for the head, x0.5 every 10 epochs of 100 "
        "tasks (1000 updates), one task per update, 100 epochs (10000 updates); pre-training SGD lr 0.1, Nesterov "
        "momentum 0.9, weight decay 5e-4, x0.2 every 30 epochs, 100 epochs of batch 128 over miniImageNet's 38400 "
        "images = 30000 iterations, here 2 episodes (160 images at 5w1s) per step: 30000 steps, decay every "
        "9000; second order as the paper's TF code; its ResNet-12 replaced by Conv-4 64, our choice; Omniglot "
        "is not in the paper: the same settings, our choice)",
        {"*": dict(meta_batch=1, outer_lr=1e-4, head_lr=1e-3, inner_lr=0.01, inner_steps=50, inner_steps_test=50,
                   meta_lr_decay=0.5, meta_lr_decay_every=1000, pretrain_steps=30000, pretrain_batch=2,
                   pretrain_lr=0.1, pretrain_momentum=0.9, pretrain_weight_decay=5e-4, pretrain_lr_decay=0.2,
                   pretrain_lr_decay_every=9000, hidden=64, first_order=False)},
        {"*": 40000}),
    "imaml": MethodEntry(
        "imaml", "baselines.imaml:IMAML",
        "Rajeswaran, Finn, Kakade, Levine. Meta-Learning with Implicit Gradients. NeurIPS 2019 ('iMAML, GD'; "
        "Table 2 caption: 16 / 25 inner gradient-descent steps for 5- / 20-way, lam 2.0, 5 CG steps for the "
        "meta-gradient, Adam; aravindr93/imaml_dev examples/README.md replication command: inner lr 0.1, outer lr "
        "1e-3, 32 tasks per meta-batch, at least 20000 outer steps, accuracy measured with 16 steps at lam 0; "
        "implicit_maml/learner_model.py: Adam eps 1e-3. Our choices: 20-way test steps = train steps (25) and "
        "meta-batch 32 as 5-way; miniImageNet (paper ran only the Hessian-free variant there): MAML's "
        "miniImageNet inner lr 0.01, meta-batch 4, width 32, 60000 steps)",
        {"omniglot-5w": _IMAML_OMNIGLOT,
         "omniglot-20w": {**_IMAML_OMNIGLOT, "inner_steps": 25, "inner_steps_test": 25},
         "miniimagenet": {**_IMAML_OMNIGLOT, "inner_lr": 0.01, "meta_batch": 4, "hidden": 32}},
        {"omniglot-5w": 20000, "omniglot-20w": 20000, "miniimagenet": 60000}),
    "mixture": MethodEntry(
        "mixture", "baselines.mixture:Mixture",
        "Mixture of K MAML initialisations with hard per-task assignment by post-adaptation support loss; related: "
        "Jerfel, Grant, Griffiths, Heller. Reconciling meta-learning and continual learning with online mixtures "
        "of tasks. NeurIPS 2019 (and TSA-MAML, Zhou et al. UAI 2021: 5 groups of MAML initialisations, "
        "Carbonaraa/TSA-MAML README). Inner loop, meta-batch, outer Adam, widths and steps: MAML's (Finn et al. "
        "2017, cbfinn/maml), as every component is a MAML initialisation; K = 2 is our choice: cost grows with K, "
        "and K = 1 / 2 / 4 compared on omniglot-small-5w1s showed no gain from more components (baselines/mixture.py))",
        {k: {**v, "n_components": 2} for k, v in _MAML_DEFAULTS.items()}, _MAML_STEPS),
}


def protocol_key(family: str, way: int) -> str:
    """The defaults key of a benchmark: Omniglot-like families split by way, others by family."""
    if family == "omniglot":
        return "omniglot-20w" if way >= 20 else "omniglot-5w"
    return family


def import_target(target: str) -> type[MetaLearner]:
    """Import "pkg.module:Class" and check that it is a MetaLearner subclass."""
    if ":" not in target:
        raise MetabenchError(f"method target {target!r} must look like 'pkg.module:Class'")
    module, cls_name = target.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as e:
        raise MetabenchError(f"cannot import method {target!r}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, MetaLearner)):
        raise MetabenchError(f"{target!r} is not a subclass of bench.api.MetaLearner")
    return cls


def get_entry(name: str) -> MethodEntry:
    """The registry entry of `name`, or an entry for an importable "pkg.module:Class"."""
    if name in METHODS:
        return METHODS[name]
    if ":" in name:
        import_target(name)
        return MethodEntry(name, name, "user-supplied method")
    raise unknown("method", name, list(METHODS))


def defaults(name: str, family: str, way: int) -> dict[str, Any]:
    """Paper hyperparameters of method `name` for a benchmark of `family` and `way`."""
    entry = get_entry(name)
    key = protocol_key(family, way)
    return {**entry.defaults.get("*", {}), **entry.defaults.get(key, {})}


def paper_steps(name: str, family: str, way: int) -> int | None:
    """The paper's number of outer updates for this benchmark (None when unknown)."""
    entry = get_entry(name)
    key = protocol_key(family, way)
    return entry.steps.get(key, entry.steps.get("*"))


def make(name: str, family: str, way: int, seed: int = 0, **overrides: Any) -> MetaLearner:
    """Construct method `name` with its paper defaults for the benchmark, then `overrides`."""
    cls = import_target(get_entry(name).target)
    params = {**defaults(name, family, way), **overrides, "seed": seed}
    try:
        return cls(**params)
    except TypeError as e:
        raise MetabenchError(f"method {name!r}: bad hyperparameters {sorted(params)}: {e}") from e

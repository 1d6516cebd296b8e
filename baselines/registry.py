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

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

METHODS: dict[str, MethodEntry] = {
    "maml": MethodEntry(
        "maml", "baselines.maml:MAML",
        "Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks. ICML 2017 "
        "(hyperparameters: cbfinn/maml main.py usage)",
        _MAML_DEFAULTS, _MAML_STEPS),
    "fomaml": MethodEntry(
        "fomaml", "baselines.maml:MAML",
        "Finn et al. 2017, first-order approximation (Sec. 5.2; --stop_grad=True in cbfinn/maml)",
        {k: {**v, "first_order": True} for k, v in _MAML_DEFAULTS.items()}, _MAML_STEPS),
    "finetune": MethodEntry(
        "finetune", "baselines.finetune:Finetune",
        "Chen, Liu, Kira, Wang, Huang. A Closer Look at Few-shot Classification. ICLR 2019 ('Baseline'; "
        "pre-training Adam 1e-3; fine-tuning SGD 0.01, momentum 0.9, weight decay 1e-3, 100 iterations)",
        {"*": dict(meta_batch=4, outer_lr=1e-3, hidden=64, head_steps=100, head_lr=0.01),
         "miniimagenet": dict(hidden=32)},
        {"*": 40000}),
    "chance": MethodEntry("chance", "baselines.chance:Chance", "uniform prediction (accuracy 1/way)", {}, {"*": 0}),
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

"""The method registry: registered names -> method classes, and construction from their presets.

Built-in methods are found in this package: a module declares `REGISTER = {"name": "Class"}` at
its top (a literal dict, read without importing the module), so adding a method is one module
(plus its test). Installed packages add methods through the entry-point group
"metabench.methods" (name = "pkg.module:Class"); any importable "pkg.module:Class" also works
unregistered. A method's paper settings are its class's `PRESETS` (bench.api.Preset), keyed by
the preset key a benchmark names (`Benchmark.preset`), with "*" for every other benchmark.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path
from typing import Any, Mapping

from bench.api import MetaLearner, Preset
from bench.errors import MetabenchError
from bench.hparams import validate
from bench.registry import Registry

PACKAGE = Path(__file__).parent


def _check_method(obj: Any, name: str) -> None:
    if not (isinstance(obj, type) and issubclass(obj, MetaLearner)):
        raise MetabenchError(f"method {name!r} is not a subclass of bench.api.MetaLearner")


def declared(module_path: Path) -> dict[str, str]:
    """The `REGISTER = {"name": "Class"}` literal at the top level of a module file ({} if none)."""
    tree = ast.parse(module_path.read_text(encoding="utf-8"), str(module_path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "REGISTER" for t in node.targets):
            value = ast.literal_eval(node.value)
            if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
                raise MetabenchError(f"{module_path}: REGISTER must be a literal dict of names to class names")
            return value
    return {}


METHODS: Registry[type[MetaLearner]] = Registry("method", group="metabench.methods", check=_check_method, targets=True)
for _info in sorted(pkgutil.iter_modules([str(PACKAGE)]), key=lambda m: m.name):
    for _name, _cls in declared(PACKAGE / f"{_info.name}.py").items():
        METHODS.add(_name, f"baselines.{_info.name}:{_cls}")


def method_class(name: str) -> type[MetaLearner]:
    """The class of a registered method or an importable "pkg.module:Class" (clear errors otherwise)."""
    return METHODS.get(name)


def preset(name: str, key: str) -> Preset | None:
    """The preset of method `name` for preset key `key` (else its "*" preset; None when it has neither)."""
    presets = method_class(name).PRESETS
    return presets.get(key) if key in presets else presets.get("*")


def preset_key(name: str, key: str, overrides: Mapping[str, Any] | None = None) -> str:
    """The preset key a run of method `name` uses on a benchmark of preset key `key`: "<key>-<backbone>"
    when `overrides` choose a backbone the method has a preset of its own for there (e.g. --set
    backbone=resnet12 on miniImageNet: "miniimagenet-resnet12"), else `key`."""
    backbone = (overrides or {}).get("backbone")
    return f"{key}-{backbone}" if backbone and f"{key}-{backbone}" in method_class(name).PRESETS else key


def outer_steps(name: str, key: str, benchmark: str, overrides: Mapping[str, Any] | None = None) -> int:
    """The number of outer steps of the method's preset for `key` (and the backbone `overrides` choose);
    a clear error when it has none."""
    key = preset_key(name, key, overrides)
    found = preset(name, key)
    if found is None:
        keys = ", ".join(method_class(name).PRESETS) or "none"
        raise MetabenchError(f"method {name!r} has no preset for benchmark {benchmark!r} (preset key "
                             f"{key or 'none'!r}; its presets: {keys}): pass --steps")
    return found.steps


def make(name: str, key: str, seed: int = 0, **overrides: Any) -> MetaLearner:
    """Construct method `name` with its preset for `key` (class defaults where it has none; the backbone's
    own preset where `overrides` choose one it has, `preset_key`), then `overrides`."""
    cls = method_class(name)
    found = preset(name, preset_key(name, key, overrides))
    params = {**(found.values if found else {}), **overrides, "seed": seed}
    validate(cls, params, name)
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise MetabenchError(f"method {name!r}: bad hyperparameters: {e}") from e

"""One registry type for every kind of named part: methods, benchmarks, sources, datasets, checks.

An entry is a name, a target and a one-line description. A target is the object itself or a
lazy "pkg.module:attr" string, imported on first use. An unknown name is an `UnknownNameError`
that suggests the closest known one. A registry with an entry-point `group` also holds what
installed packages declare under that group (`[project.entry-points."metabench.methods"]` in
their pyproject.toml: `name = "pkg.module:Class"`), so a package adds methods or benchmarks
without editing this repository; a built-in name wins over an installed one of the same name.
With `targets=True`, `get` also accepts any importable "pkg.module:attr" that is not registered.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from bench.errors import MetabenchError, unknown

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One registered part: name, target (an object or "pkg.module:attr") and a one-line description."""

    name: str
    target: Any
    about: str = ""


def import_target(target: str, kind: str = "target") -> Any:
    """The object named by "pkg.module:attr" (attr may be dotted); one clear error for any failure.

    An import that raises anything (a SyntaxError in the module, an exception at import time)
    becomes a MetabenchError naming the target and the cause.
    """
    module, sep, attr = str(target).partition(":")
    if not sep or not module or not attr:
        raise MetabenchError(f"{kind} target {target!r} must look like 'pkg.module:{'Class' if kind == 'method' else 'name'}'")
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a user's module may fail in any way on import
        raise MetabenchError(f"cannot import {kind} {target!r}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MetabenchError(f"cannot import {kind} {target!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Named parts of one kind.

    kind: the word used in messages ("method", "benchmark", ...); group: the entry-point group
    that installed packages add to (None: built-ins only); check(obj, name) raises a
    MetabenchError when a resolved target is not of the right kind; targets: `get` also takes
    unregistered "pkg.module:attr" strings.
    """

    def __init__(self, kind: str, group: str | None = None,
                 check: Callable[[Any, str], None] | None = None, targets: bool = False) -> None:
        self.kind = kind
        self.group = group
        self.check = check
        self.targets = targets
        self._builtin: dict[str, Entry] = {}
        self._installed: dict[str, Entry] | None = None
        self._resolved: dict[str, T] = {}

    def add(self, name: str, target: Any, about: str = "") -> None:
        """Register a built-in part (an object or a lazy "pkg.module:attr")."""
        if name in self._builtin:
            raise MetabenchError(f"{self.kind} {name!r} is registered twice")
        self._builtin[name] = Entry(name, target, about)

    def register(self, name: str, about: str = "") -> Callable[[T], T]:
        """Decorator form of `add` for objects defined where they are registered."""

        def deco(obj: T) -> T:
            self.add(name, obj, about)
            return obj

        return deco

    def installed(self) -> dict[str, Entry]:
        """Entries that installed packages declare under the entry-point group (read once)."""
        if self._installed is None:
            self._installed = {}
            if self.group:
                for ep in importlib.metadata.entry_points(group=self.group):
                    if ep.name in self._builtin:
                        warnings.warn(f"installed {self.kind} {ep.name!r} ({ep.value}) is shadowed by the "
                                      f"built-in one of that name", stacklevel=2)
                        continue
                    self._installed[ep.name] = Entry(ep.name, ep.value, f"installed from {ep.value}")
        return self._installed

    def entries(self) -> dict[str, Entry]:
        """Every entry, built-ins first, then installed ones."""
        return {**self._builtin, **self.installed()}

    def names(self) -> list[str]:
        """Every registered name, built-ins first."""
        return list(self.entries())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.entries()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.entries())

    def entry(self, name: str) -> Entry:
        """The entry of `name` (or, with targets=True, an entry for a "pkg.module:attr" string)."""
        found = self.entries().get(name)
        if found is not None:
            return found
        if self.targets and isinstance(name, str) and ":" in name:
            return Entry(name, name, f"user-supplied {self.kind}")
        raise unknown(self.kind, str(name), self.names())

    def get(self, name: str) -> T:
        """The registered object of `name`, imported (once) if its target is lazy, then checked."""
        if name in self._resolved:
            return self._resolved[name]
        target = self.entry(name).target
        obj = import_target(target, self.kind) if isinstance(target, str) else target
        if self.check is not None:
            self.check(obj, name)
        self._resolved[name] = obj
        return obj

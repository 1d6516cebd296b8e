"""Hyperparameter checks: values are validated from a method's dataclass fields before it is built.

Each field's annotation gives its type (bool, int, float, str); numbers must be finite, whole
numbers must be whole (8.0 is not an int), and every number is >= 0 unless the class's `LIMITS`
(merged along its bases) says otherwise: ">=1", ">0", "<=1", "0..1" (inclusive), "any". A bad
value is one MetabenchError naming the method, the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Mapping

from bench.errors import MetabenchError

DEFAULT_LIMIT = ">=0"


def limits(cls: type) -> dict[str, str]:
    """The LIMITS of `cls` and its bases (subclasses win)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("LIMITS", {}) or {})
    return out


def _within(value: float, limit: str) -> bool:
    limit = limit.replace(" ", "")
    if limit == "any":
        return True
    if ".." in limit:
        lo, hi = (float(x) for x in limit.split(".."))
        return lo <= value <= hi
    for op, test in ((">=", lambda a, b: a >= b), ("<=", lambda a, b: a <= b), (">", lambda a, b: a > b),
                     ("<", lambda a, b: a < b)):
        if limit.startswith(op):
            return test(value, float(limit[len(op):]))
    raise ValueError(f"bad limit {limit!r}")


def _type_problem(value: Any, kind: Any) -> str | None:
    """Why `value` is not of the annotated type `kind` (None when it is)."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if value is None:
        return None if type(None) in options else "must not be empty"
    if bool in options:
        if isinstance(value, bool):
            return None
        if len(options) == 1 or options == (bool, type(None)):
            return "must be true or false"
    if isinstance(value, bool):
        return f"must be a {'/'.join(getattr(o, '__name__', str(o)) for o in options if o is not type(None))}, not a boolean"
    if int in options and isinstance(value, int):
        return None
    if float in options and isinstance(value, (int, float)):
        return None if math.isfinite(value) else "must be a finite number"
    if str in options and isinstance(value, str):
        return None
    if int in options and isinstance(value, float):
        return "must be a whole number"
    words = {int: "whole number", float: "number", str: "string", bool: "true or false"}
    names = " or ".join(words.get(o, getattr(o, "__name__", str(o))) for o in options if o is not type(None))
    return f"must be a {names}"


def validate(cls: type, params: Mapping[str, Any], name: str = "") -> None:
    """Raise MetabenchError for the first hyperparameter of `params` that `cls` does not accept."""
    label = name or cls.__name__
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MetabenchError(f"method {label!r} has no hyperparameter {unknown[0]!r}{hint}; it has "
                             f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    bounds = limits(cls)
    for key, value in params.items():
        why = _type_problem(value, hints.get(key, Any)) if hints.get(key, Any) is not Any else None
        if why is None and isinstance(value, (int, float)) and not isinstance(value, bool):
            limit = bounds.get(key, DEFAULT_LIMIT)
            if not _within(float(value), limit):
                why = f"must be {limit.replace('..', ' to ')}"
        if why:
            raise MetabenchError(f"method {label!r}: {key}={plain(value)} {why}")
    together = getattr(cls, "validate_params", None)  # a class's checks of values together (e.g. a backbone's widths)
    if callable(together):
        try:
            together(params)
        except MetabenchError as e:
            raise MetabenchError(f"method {label!r}: {e}") from None


def plain(value: Any) -> str:
    """A value as a user wrote it: numpy scalars as plain numbers, strings quoted."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    return repr(value) if isinstance(value, str) else str(value)

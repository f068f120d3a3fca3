"""Config fields that are also command-line options: `opt` declares a field with its help text, the objectives it
concerns, its choices and the range its value must lie in; `check_values` holds a whole config to those ranges.

The one place where a setting's meaning and its allowed values are written down: engine/options.py turns the fields
into options, and every entry point calls `check_values` before it touches a folder. A leaf: imports only the
loaders' error type.
"""
from __future__ import annotations

import math
from dataclasses import field, fields, is_dataclass
from typing import Callable

from cellssl.loaders import InputError

Check = Callable[[object], "str | None"]  # what a value must be, when it is not (None: allowed)


def opt(default, help: str, objectives: tuple[str, ...] | None = None, choices=None, check: Check | None = None,
        **kw):
    """A config field with its command-line help; `objectives`: the objectives it concerns (None: all); `check`:
    what its value must satisfy (see the checks below)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "objectives": objectives, "choices": choices, "check": check},
                 **kw)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: int) -> Check:
    return lambda v: None if _number(v) and v >= low and float(v).is_integer() else f"an integer ≥ {low}"


def positive(v) -> str | None:
    return None if _number(v) and v > 0 else "a finite number > 0"


def non_negative(v) -> str | None:
    return None if _number(v) and v >= 0 else "a finite number ≥ 0"


def fraction(v) -> str | None:
    """(0, 1): a rate that must do something and cannot take everything."""
    return None if _number(v) and 0 < v < 1 else "a number strictly between 0 and 1"


def probability(v) -> str | None:
    return None if _number(v) and 0 <= v <= 1 else "a number in [0, 1]"


def dropout(v) -> str | None:
    return None if _number(v) and 0 <= v < 1 else "a number in [0, 1)"


def widths(v) -> str | None:
    ok = isinstance(v, tuple) and len(v) > 0 and all(isinstance(w, int) and w > 0 for w in v)
    return None if ok else "one or more positive integers, comma-separated (e.g. 512,512,256,256)"


def leaves(config, prefix: tuple[str, ...] = ()):
    """(path, field, value) of every leaf field of a (nested) config dataclass."""
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            yield from leaves(value, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, value


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_values(config) -> None:
    """Every field's value against its declared choices and range: the first bad one is one `InputError` naming the
    option, the value and what it must be."""
    for path, f, value in leaves(config):
        choices = f.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise InputError(flag(path[-1]), f"{value!r} is not one of {list(choices)}", f"choose one of {list(choices)}")
        check = f.metadata.get("check")
        wanted = check(value) if check is not None and value is not None else None
        if wanted:
            raise InputError(flag(path[-1]), f"{value!r} is not {wanted}", f"pass {flag(path[-1])} {wanted}")

"""Command lines generated from config dataclasses: every field is an option (`--max-steps`, `--rate`,
`--hidden 512,512,256,256`, `--no-class-weighted`), `--help` shows each default, and a recipe is offered only
the fields that apply to its objective. Unknown options and abbreviations are refused in one line (a typo must
never start a default run); the deepspeed launcher's own `--local_rank` is accepted and ignored.
"""
from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import fields, is_dataclass, replace

from cellssl.loaders import InputError

from .fields import check_values, flag


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `InputError` instead of usage + exit."""

    def error(self, message: str):
        raise InputError(self.prog, message, f"see {self.prog} --help")


def _parse_type(hint):
    """(argparse type, is_bool, is_tuple) for a field's annotation."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if base is bool:
        return None, True, False
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        return (lambda text: tuple(item(v) for v in text.split(",") if v)), False, True
    return base, False, False


def _walk(cls, prefix=()):
    """(path, field, type hint) for every leaf field; nested dataclasses are flattened."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        if is_dataclass(hint):
            yield from _walk(hint, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, hint


def add_options(parser: argparse.ArgumentParser, defaults, objective: str | None = None,
                skip: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """One option per field of `defaults` (a dataclass instance) that applies to `objective`; returns their paths."""
    paths = []
    for path, f, hint in _walk(type(defaults)):
        applies = f.metadata.get("objectives")
        if path[-1] in skip or (objective and applies and objective not in applies):
            continue
        value = defaults
        for part in path:
            value = getattr(value, part)
        kind, is_bool, is_tuple = _parse_type(hint)
        shown = ",".join(map(str, value)) if is_tuple and value is not None else value
        words = f.metadata.get("help", "").replace("%", "%%")  # argparse expands % in help ("60 % train")
        help_text = words + ("" if "default:" in words else f" (default: {shown})".replace("%", "%%"))
        if is_bool:
            parser.add_argument(flag(path[-1]), dest=".".join(path), action=argparse.BooleanOptionalAction,
                                default=value, help=f"{words} (default: {'on' if value else 'off'})")
        else:
            parser.add_argument(flag(path[-1]), dest=".".join(path), type=kind, default=value,
                                choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else
                                path[-1].upper(), help=help_text)
        paths.append(path)
    return paths


def apply(defaults, args: argparse.Namespace, paths: list[tuple[str, ...]]):
    """`defaults` with every parsed option written in (nested dataclasses replaced, not mutated), every value then
    checked against its field's range (one `InputError` for the first that is out of it)."""
    def set_path(obj, path, value):
        if len(path) == 1:
            return replace(obj, **{path[0]: value})
        return replace(obj, **{path[0]: set_path(getattr(obj, path[0]), path[1:], value)})

    for path in paths:
        defaults = set_path(defaults, path, getattr(args, ".".join(path)))
    check_values(defaults)
    return defaults


def recipe_parser(defaults, description: str, prog: str | None = None) -> tuple[argparse.ArgumentParser, list]:
    parser = OneLineParser(prog=prog or sys.argv[0].rsplit("/", 1)[-1], description=description, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    paths = add_options(parser, defaults, defaults.objective.name, skip=("name",))
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the launcher's
    return parser, paths


def parse_recipe(defaults, argv: list[str], description: str = "", prog: str | None = None):
    parser, paths = recipe_parser(defaults, description, prog)
    return apply(defaults, parser.parse_args(argv), paths)

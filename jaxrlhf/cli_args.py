"""Config dataclasses → command-line flags, and back.

Each field of a frozen config becomes ``--field-name`` with the field's help text and default;
``bool`` fields get ``--x/--no-x``; ``Optional[T]`` accepts ``none``; ``tuple[T, ...]`` takes a list.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _unwrap_optional(tp):
    """(inner type, is_optional) for ``T | None`` / ``Optional[T]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar_parser(tp, optional: bool, flag: str):
    if tp not in (int, float, str):
        raise TypeError(f"{flag}: config field type {tp!r} cannot be a command-line flag")

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a valid {tp.__name__}")

    return parse


def add_config_arguments(
    parser: argparse.ArgumentParser, config_cls, *, prefix: str = "", defaults=None
) -> None:
    """Add one flag per field of ``config_cls`` (in a group named after the class).

    ``prefix`` (e.g. ``"ppo-"``) keeps several configs apart on one command line; ``defaults`` (an
    instance of ``config_cls``) replaces the class defaults, for commands with their own presets.
    """
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group(
        config_cls.__name__, (config_cls.__doc__ or "").split("\n")[0]
    )
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        flag = "--" + prefix + field.name.replace("_", "-")
        dest = prefix.replace("-", "_") + field.name
        help_text = field.metadata.get("help", "")
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        if defaults is not None:
            default = getattr(defaults, field.name)
        required = default is dataclasses.MISSING
        tp, optional = _unwrap_optional(hints[field.name])
        kwargs: dict[str, Any] = {"dest": dest, "help": f"{help_text} (default: {default})"}
        if required:
            kwargs.update(required=True, help=help_text)
        else:
            kwargs.update(default=default)
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            group.add_argument(flag, nargs="*", type=_scalar_parser(inner, False, flag), **kwargs)
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            group.add_argument(flag, choices=choices, type=type(choices[0]), **kwargs)
        else:
            group.add_argument(flag, type=_scalar_parser(tp, optional, flag), **kwargs)


def config_from_args(config_cls, args: argparse.Namespace, *, prefix: str = ""):
    """Build ``config_cls`` from the parsed flags (validation happens in its ``__post_init__``)."""
    values = {}
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        value = getattr(args, prefix.replace("-", "_") + field.name)
        if isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    return config_cls(**values)

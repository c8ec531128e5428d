"""Config dataclasses → command-line flags, and back.

Each field of a frozen config becomes ``--<prefix><field-name>`` with the field's help text and
default (a field that already starts with the prefix's word keeps one: PPOConfig.ppo_epochs is
``--ppo-epochs``); ``bool`` fields get ``--x/--no-x``; ``Optional[T]`` accepts ``none``;
``tuple[T, ...]`` takes a list. Invalid values come back as one error naming every offending flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any

from jaxrlhf.config import ConfigError


def plain(text: str) -> str:
    """Docstring markup made plain for ``--help``: ``x`` → x, :mod:`x` → x."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def flag_name(field: str, prefix: str = "") -> str:
    """The flag of config field ``field`` under ``prefix`` ("ppo-"): ``--ppo-clip-eps``, and
    ``--ppo-epochs`` (not ``--ppo-ppo-epochs``) for a field that starts with the prefix's word."""
    name = field.replace("_", "-")
    if prefix and name.startswith(prefix):
        name = name[len(prefix) :]
    return "--" + prefix + name


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


UNPREFIXED = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "adapter", "max_turns")
"""Fields whose flag also has an unprefixed spelling (``--lora-rank``), for the first config of a
command that has them (the trainer's)."""


def add_config_arguments(
    parser: argparse.ArgumentParser, config_cls, *, prefix: str = "", defaults=None
) -> None:
    """Add one flag per field of ``config_cls`` (in a group named after the class).

    ``prefix`` (e.g. ``"ppo-"``) keeps several configs apart on one command line; ``defaults`` (an
    instance of ``config_cls``) replaces the class defaults, for commands with their own presets.
    """
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group(
        config_cls.__name__, plain((config_cls.__doc__ or "").split("\n")[0])
    )
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        flag = flag_name(field.name, prefix)
        flags = [flag]
        plain_flag = flag_name(field.name)
        if field.name in UNPREFIXED and prefix and plain_flag not in parser._option_string_actions:
            flags.append(plain_flag)  # --lora-rank for --grpo-lora-rank: one trainer per command
        dest = prefix.replace("-", "_") + field.name
        help_text = plain(field.metadata.get("help", "")).replace("%", "%%")
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
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            group.add_argument(*flags, choices=choices, type=type(choices[0]), **kwargs)
        elif typing.get_origin(tp) is tuple:
            inner = _scalar_parser(typing.get_args(tp)[0], False, flag)
            group.add_argument(*flags, nargs="*", type=inner, metavar=_metavar(flag), **kwargs)
        else:
            parse = _scalar_parser(tp, optional, flag)
            group.add_argument(*flags, type=parse, metavar=_metavar(flag), **kwargs)


def _metavar(flag: str) -> str:
    return flag[2:].upper().replace("-", "_")


def config_from_args(config_cls, args: argparse.Namespace, *, prefix: str = ""):
    """Build ``config_cls`` from the parsed flags (validation happens in its ``__post_init__``).

    Every invalid field is reported at once, by its flag: the config is built again with each
    offending field back at its default until it validates, and the errors are raised together
    as one ``ValueError`` ("--sft-batch-size 0: must be ≥ 1; --sft-warmup-steps -1: …").
    """
    values = {}
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        value = getattr(args, prefix.replace("-", "_") + field.name)
        if isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    errors: dict[str, str] = {}  # field → "--flag value: message"
    while True:
        try:
            config = config_cls(**values)
        except ConfigError as err:
            retry = err.config == config_cls.__name__ and err.field in values
            retry = retry and err.field not in errors
            errors.setdefault(err.field, _flag_error(err, prefix))
            if not retry:
                break
            default = _default(config_cls, err.field)
            if default is dataclasses.MISSING or default == values[err.field]:
                break  # nothing left to try: the default itself is invalid here
            values[err.field] = default
            continue
        if not errors:
            return config
        break
    raise ValueError("; ".join(errors.values()))


def _default(config_cls, name: str):
    field = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _flag_error(err: ConfigError, prefix: str) -> str:
    return f"{flag_name(err.field, prefix)} {_shown(err.value)}: {err.message}"


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)

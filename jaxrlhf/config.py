"""Helpers for jaxrlhf's configuration dataclasses.

Every config (``RewardConfig``, ``PPOConfig``, ...) is a frozen, keyword-only dataclass whose fields are
declared with :func:`option`, so each carries a one-line help text; the ``jaxrlhf`` CLI turns those
fields into flags. ``__post_init__`` validates with :func:`require`, whose error names the field.

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class PPOConfig:
        clip_eps: float = option(0.2, "PPO ratio clip ε.")
        def __post_init__(self):
            require(0 < self.clip_eps < 1, self, "clip_eps", "must be in (0, 1)")
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:
    """A config field with a default and a one-line help text (shown by ``jaxrlhf <cmd> --help``)."""
    if not help:
        raise ValueError("every config option needs a help text")
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (immutable) as the default of a frozen config field")
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


class ConfigError(ValueError):
    """An invalid config field: ``str(err)`` is ``"<Config>.<field> = <value>: <message>"``; the
    parts are kept (``config``, ``field``, ``value``, ``message``) so that the command line can name
    its flag instead."""

    def __init__(self, config: str, field: str, value: Any, message: str):
        super().__init__(f"{config}.{field} = {value!r}: {message}")
        self.config, self.field, self.value, self.message = config, field, value, message


def require(condition: bool, config: Any, field: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"<Config>.<field> = <value>: <message>"`` unless ``condition``."""
    if not condition:
        raise ConfigError(type(config).__name__, field, getattr(config, field, "?"), message)


def help_of(cls_or_config: Any, field: str) -> str:
    """The help text of one field of a config class (or instance)."""
    for f in dataclasses.fields(cls_or_config):
        if f.name == field:
            return f.metadata.get("help", "")
    raise KeyError(field)

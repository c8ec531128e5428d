"""Config dataclasses become flags and come back unchanged; bad values name the flag/field."""

import argparse
import dataclasses

import pytest

from jaxrlhf.cli_args import add_config_arguments, config_from_args
from jaxrlhf.config import help_of, option, require


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig:
    """A toy config."""

    lr: float = option(1e-3, "Learning rate.")
    steps: int = option(10, "Number of steps.")
    name: str = option("run", "Run name.")
    whiten: bool = option(True, "Whiten advantages.")
    clip: float | None = option(None, "Optional clip.")
    sizes: tuple[int, ...] = option((2, 3), "Layer sizes.")

    def __post_init__(self):
        require(self.lr > 0, self, "lr", "must be positive")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ToyConfig)
    return config_from_args(ToyConfig, parser.parse_args(argv))


def test_defaults_round_trip():
    assert parse([]) == ToyConfig()


def test_every_kind_of_flag():
    cfg = parse(
        [
            "--lr",
            "0.5",
            "--steps",
            "3",
            "--name",
            "x",
            "--no-whiten",
            "--clip",
            "0.2",
            "--sizes",
            "4",
        ]
    )
    assert cfg == ToyConfig(lr=0.5, steps=3, name="x", whiten=False, clip=0.2, sizes=(4,))
    assert parse(["--clip", "none"]).clip is None


def test_help_text_comes_from_the_field():
    assert help_of(ToyConfig, "lr") == "Learning rate."
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ToyConfig)
    assert "Learning rate. (default: 0.001)" in parser.format_help()


def test_validation_error_names_the_field():
    with pytest.raises(ValueError, match=r"ToyConfig.lr = -1.0: must be positive"):
        parse(["--lr", "-1"])


def test_bad_type_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse(["--steps", "many"])
    assert "--steps" in capsys.readouterr().err


def test_option_refuses_mutable_defaults_and_missing_help():
    with pytest.raises(TypeError):
        option([1], "a list")
    with pytest.raises(ValueError):
        option(1)


def test_prefix_and_preset_defaults():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ToyConfig, prefix="ppo-", defaults=ToyConfig(steps=7))
    args = parser.parse_args(["--ppo-lr", "0.25"])
    assert config_from_args(ToyConfig, args, prefix="ppo-") == ToyConfig(lr=0.25, steps=7)

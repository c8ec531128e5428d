"""Config dataclasses become flags and come back unchanged; bad values name the flag/field."""

import argparse
import dataclasses

import pytest

from jaxrlhf.cli.flags import add_config_arguments, config_from_args
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
        require(self.steps >= 1, self, "steps", "must be ≥ 1")
        require(self.clip is None or self.clip < self.lr, self, "clip", "must be below lr")


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
    assert "``" not in parser.format_help()


def test_validation_error_names_the_field():
    with pytest.raises(ValueError, match=r"ToyConfig.lr = -1.0: must be positive"):
        ToyConfig(lr=-1.0)  # in Python: the field
    with pytest.raises(ValueError, match=r"^--lr -1.0: must be positive$"):
        parse(["--lr", "-1"])  # on the command line: the flag


def test_every_invalid_flag_at_once():
    # lr and steps are both wrong: one error lists both (lr's default then lets steps be checked).
    with pytest.raises(ValueError) as error:
        parse(["--lr", "-1", "--steps", "0", "--clip", "none"])
    assert str(error.value) == "--lr -1.0: must be positive; --steps 0: must be ≥ 1"
    # A cross-field error that the default of its own field cannot lift is reported, and the loop
    # ends (clip's default None is valid, so 0.5 ≥ lr 0.25 is reported alone).
    with pytest.raises(ValueError) as error:
        parse(["--lr", "0.25", "--clip", "0.5"])
    assert str(error.value) == "--clip 0.5: must be below lr"


def test_a_field_that_starts_with_the_prefix_keeps_one():
    from jaxrlhf.cli.flags import flag_name, plain

    assert flag_name("ppo_epochs", "ppo-") == "--ppo-epochs"
    assert flag_name("clip_eps", "ppo-") == "--ppo-clip-eps"
    assert flag_name("rm_epochs", "") == "--rm-epochs"
    assert plain("see ``demo`` and :mod:`jaxrlhf.rl`") == "see demo and jaxrlhf.rl"


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


def test_later_errors_name_the_flag_the_command_has():
    from jaxrlhf.cli.main import build_parser, with_flags

    flags = build_parser().parse_args(["sft", "--data", "d", "--model", "m", "--out", "o"]).flags
    message = "SFTConfig.batch_size = 64: larger than the data; DataConfig.truncate = False: x"
    assert with_flags(message, flags) == "--sft-batch-size 64: larger than the data; " + (
        "--data-truncate False: x"
    )
    # A config the command has no flag for keeps its own name (sft has no PPO flags).
    assert with_flags("PPOConfig.clip_eps = 2: y", flags) == "PPOConfig.clip_eps = 2: y"


def test_collect_port_is_stable_per_output_file(tmp_path, monkeypatch):
    from jaxrlhf.cli.collect import PORTS, default_port

    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert default_port(a) == default_port(a) and PORTS[0] <= default_port(a) < PORTS[1]
    assert default_port(a) != default_port(b)
    # The same file named another way (relative vs absolute) is the same page.
    monkeypatch.chdir(tmp_path)
    assert default_port("a.jsonl") == default_port(a)


def test_help_is_plain_text():
    from jaxrlhf.cli.main import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for text in [parser.format_help(), *(c.format_help() for c in commands.values())]:
        assert "``" not in text and ":mod:" not in text

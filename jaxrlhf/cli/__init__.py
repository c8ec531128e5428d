"""The ``jaxrlhf`` command line: :mod:`jaxrlhf.cli.main` (the parser, the dispatch, ``demo``, ``ppo``,
``generate``), :mod:`jaxrlhf.cli.train` (``sft``, ``train-rm``), :mod:`jaxrlhf.cli.algorithms`
(``grpo``, ``dpo``), :mod:`jaxrlhf.cli.collect` (``collect``), :mod:`jaxrlhf.cli.flags` (config
dataclasses ↔ flags) and :mod:`jaxrlhf.cli.common` (what they share). It imports the library; nothing
in the library imports it."""

from jaxrlhf.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

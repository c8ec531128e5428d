"""The offline demo (``jaxrlhf demo``): the RLHF pipeline on tasks the package generates itself.

    run_demo(DemoConfig())                                   # reviews: SFT → reward model → PPO
    run_demo(DemoConfig(algo="dpo"))                         # reviews: DPO beside PPO
    run_demo(DemoConfig(task="arithmetic", algo="grpo"))     # arithmetic: GRPO / Dr. GRPO / RLOO
    run_demo(DemoConfig(task="calculator", algo="grpo"))     # products, with a calculator tool

:mod:`jaxrlhf.demo.common` holds what the runs share and the presets, :mod:`jaxrlhf.demo.ppo` the
default run, :mod:`jaxrlhf.demo.algorithms` the others, :mod:`jaxrlhf.demo.calculator` tool use. The demo imports the library, never the
command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxrlhf.demo.algorithms import run_arithmetic, run_dpo
from jaxrlhf.demo.calculator import run_calculator
from jaxrlhf.demo.common import (
    DEMO_DPO,
    DEMO_GRPO,
    DEMO_PPO,
    DEMO_REWARD,
    DEMO_SFT,
    GROUP_ALGOS,
    TASKS,
    DemoConfig,
)
from jaxrlhf.demo.ppo import run_ppo_demo
from jaxrlhf.train.dpo import DPOConfig
from jaxrlhf.train.grpo_config import GRPOConfig
from jaxrlhf.train.ppo import PPOConfig
from jaxrlhf.train.reward import RewardConfig
from jaxrlhf.train.sft import SFTConfig


def run_demo(
    demo: DemoConfig = DemoConfig(),  # noqa: B008 (frozen: safe to share)
    sft: SFTConfig = DEMO_SFT,
    reward: RewardConfig = DEMO_REWARD,
    ppo: PPOConfig = DEMO_PPO,
    *,
    grpo: GRPOConfig = DEMO_GRPO,
    dpo: DPOConfig = DEMO_DPO,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the demo ``demo.task`` / ``demo.algo`` with these settings (the presets by default).

    Writes ``report.md``, ``summary.json``, plots, metrics and (``demo.save_models``) the models
    under ``demo.out_dir``; returns the summary.
    """
    if demo.lora_rank:  # the RL stage trains adapters on the SFT policy (the SFT stays full)
        ppo, grpo, dpo = (
            dataclasses.replace(c, lora_rank=demo.lora_rank,
                                learning_rate=c.learning_rate * demo.lora_lr_scale)
            for c in (ppo, grpo, dpo)
        )  # fmt: skip
    if demo.algo == "ppo":
        return run_ppo_demo(demo, sft, reward, ppo, progress=progress, echo=echo)
    if demo.algo == "dpo":
        return run_dpo(demo, sft, reward, ppo, dpo, progress=progress, echo=echo)
    if demo.task == "calculator":
        return run_calculator(demo, grpo, group_advantage=GROUP_ALGOS[demo.algo],
                              progress=progress, echo=echo)  # fmt: skip
    return run_arithmetic(demo, grpo, progress=progress, echo=echo)


__all__ = [
    "DEMO_DPO",
    "DEMO_GRPO",
    "DEMO_PPO",
    "DEMO_REWARD",
    "DEMO_SFT",
    "TASKS",
    "DemoConfig",
    "run_demo",
]

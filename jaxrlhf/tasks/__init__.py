"""Built-in offline tasks with an exact (verifiable) reward, for critic-free RL (GRPO and kin):
arithmetic (the policy answers) and calculator (products, with a calculator tool to call).

The review task with a learned reward model is :mod:`jaxrlhf.data.demo_task`.
"""

from jaxrlhf.tasks.arithmetic import (
    ArithmeticTask,
    build_arithmetic_task,
    char_tokenizer,
    correctness_reward,
    format_reward,
    reward,
    sft_policy,
)
from jaxrlhf.tasks.calculator_task import CalculatorTask, build_calculator_task

__all__ = [
    "ArithmeticTask",
    "CalculatorTask",
    "build_arithmetic_task",
    "build_calculator_task",
    "char_tokenizer",
    "correctness_reward",
    "format_reward",
    "reward",
    "sft_policy",
]

"""Built-in offline tasks with an exact (verifiable) reward, for critic-free RL (GRPO and kin).

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

__all__ = [
    "ArithmeticTask",
    "build_arithmetic_task",
    "char_tokenizer",
    "correctness_reward",
    "format_reward",
    "reward",
    "sft_policy",
]

"""jaxrlhf: RLHF with PPO in JAX/Flax — the derivation you can step through, the trainer you can run."""

from jaxrlhf.rl import *  # noqa: F401,F403  (the seed's math; see jaxrlhf/rl/__init__.py)
from jaxrlhf.rl import __all__ as _rl_all

__version__ = "0.1.0"

__all__ = [*_rl_all]

"""Entry checks shared by the rl functions: shapes must agree exactly (no broadcast surprises)."""

from __future__ import annotations

import chex
import jax.numpy as jnp

# log ρ is clamped to ±MAX_LOG_RATIO before exp (PPO's ratio, the k3 KL): one stray token with
# log π − log π_old = 1000 would otherwise make ρ = inf, the loss inf and its gradient NaN.
# e^20 ≈ 5·10⁸ is far outside any clip range, so no ordinary result changes.
MAX_LOG_RATIO = 20.0


def check_same_shape(*arrays) -> None:
    """All arrays have exactly the same shape, and at least one (time) axis."""
    chex.assert_rank(arrays[0], {i for i in range(1, 8)})
    chex.assert_equal_shape(arrays)


def zero_masked(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """``x`` with every masked (mask == 0) entry replaced by 0.

    Done *before* any nonlinearity, so that whatever is stored at masked positions (inf, nan, 1e30)
    can change neither a result nor a gradient: ``where`` passes zero cotangent to the dropped branch.
    """
    return jnp.where(mask.astype(bool), x, jnp.zeros_like(x))


def last_valid_index(mask: jnp.ndarray) -> jnp.ndarray:
    """Index of the last valid token of each row ([...]); -1 for a row with no valid token.

    The index of the last 1, wherever the holes are (not Σ mask − 1, which is the same only for one
    contiguous run starting at t = 0).
    """
    positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)  # [T]
    return jnp.max(jnp.where(mask.astype(bool), positions, -1), axis=-1, initial=-1)

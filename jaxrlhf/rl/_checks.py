"""Entry checks shared by the rl functions: shapes must agree exactly (no broadcast surprises)."""

from __future__ import annotations

import chex
import jax.numpy as jnp


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
    """Index of the last valid token of each row ([...]); -1 for a row with no valid token."""
    return jnp.sum(mask.astype(jnp.int32), axis=-1) - 1

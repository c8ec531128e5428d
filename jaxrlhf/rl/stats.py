"""Masked reductions and the PPO diagnostics (clip fraction, approximate KL, explained variance).

Every reduction here is a sum over the valid entries, whatever their order: a mask with holes
(environment tokens between policy tokens) gives what the row with its holes removed gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.rl._checks import check_same_shape, zero_masked


def masked_sum(x: jnp.ndarray, mask: jnp.ndarray, axis=None) -> jnp.ndarray:
    """Σ maskᵢ·xᵢ over ``axis`` (all axes when None)."""
    check_same_shape(x, mask)
    return jnp.sum(zero_masked(x, mask), axis=axis)


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray, axis=None) -> jnp.ndarray:
    """Mean over the valid entries.

    mean_m(x) = Σ mᵢxᵢ / Σ mᵢ        (0 where no entry is valid)

    Args:
      x: [..., T] values.  mask: [..., T] 1 at valid entries.
      axis: the axes to reduce (None: all).
    """
    check_same_shape(x, mask)
    count = jnp.sum(mask.astype(jnp.float32), axis=axis)
    return masked_sum(x.astype(jnp.float32), mask, axis=axis) / jnp.maximum(count, 1.0)


def masked_var(x: jnp.ndarray, mask: jnp.ndarray, *, unbiased: bool = True) -> jnp.ndarray:
    """Variance over all valid entries, with Bessel's correction n/(n−1) when ``unbiased``.

    var_m(x) = Σ mᵢ (xᵢ − mean_m(x))² / (Σ mᵢ − 1)
    """
    check_same_shape(x, mask)
    x = zero_masked(x.astype(jnp.float32), mask)  # before squaring: a huge masked entry → nan grad
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = jnp.sum(mask.astype(jnp.float32))
        var = var * count / jnp.maximum(count - 1.0, 1.0)
    return var


def masked_whiten(
    x: jnp.ndarray, mask: jnp.ndarray, *, shift_mean: bool = True, eps: float = 1e-8
) -> jnp.ndarray:
    """Normalise the valid entries to mean 0 and variance 1 (as PPO does to advantages).

    x̂ = (x − mean_m(x)) / √(var_m(x) + ε);   with ``shift_mean=False`` the mean is added back:
    x̂ = (x − mean) / √(var + ε) + mean  (the scale changes, the sign of the mean does not).
    Masked entries are 0 in the output.
    """
    x = zero_masked(x.astype(jnp.float32), mask)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_masked(whitened, mask)


def clip_fraction(
    logprobs: jnp.ndarray, old_logprobs: jnp.ndarray, mask: jnp.ndarray, *, clip_eps: float
) -> jnp.ndarray:
    """Fraction of valid tokens whose ratio ρ = exp(logπ − logπ_old) lies outside [1−ε, 1+ε].

    This counts every ratio outside the clip range, whichever way the advantage points; trl's
    ``policy/clipfrac_avg`` counts only the tokens whose gradient the clip cuts (the clipped term
    taken by the min): see ``rl.clipped_surrogate``.
    """
    check_same_shape(logprobs, old_logprobs, mask)
    ratio = jnp.exp(zero_masked(logprobs - old_logprobs, mask))
    return masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask)


def approx_kl(logprobs: jnp.ndarray, old_logprobs: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Approximate KL between the policy before and after an update (the k2 estimator).

    KL ≈ ½ · mean_m[(log π − log π_old)²]
    """
    check_same_shape(logprobs, old_logprobs, mask)
    return 0.5 * masked_mean(zero_masked(logprobs - old_logprobs, mask) ** 2, mask)


def explained_variance(values: jnp.ndarray, returns: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """How much of the return's variance the critic explains.

    EV = 1 − Var_m[R − V] / Var_m[R]     (1: perfect; 0: no better than a constant; < 0: worse)
    """
    check_same_shape(values, returns, mask)
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(var_returns, 1e-8)

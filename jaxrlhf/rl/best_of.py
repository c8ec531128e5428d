"""Best-of-n: draw n responses from π, keep the one a reward scores highest.

The simplest way to spend a reward model (at inference, and the baseline of RLHF papers), and the
other half of Gao, Schulman & Hilton's over-optimisation curves (2022, arXiv:2210.10760). Three
pieces, all over the last axis:

    best_of_n_kl(n)                       the KL(π_n ‖ π) every paper quotes: log n − (n−1)/n
    best_of_n_probs(probs, scores, n)     π_n of a policy with finitely many outcomes, exactly
    best_of_n_estimate(scores, values, n) E[value of the best of n], unbiased, from one pool of N ≥ n

Where the formula comes from: write U = F(score(y)) for the quantile of a draw's score. If no two
draws can tie, U is uniform on [0, 1] and the best of n draws has the largest of n uniforms, whose
density is n·uⁿ⁻¹. KL(π_n ‖ π) is the KL of that density to the uniform one (the map y ↦ U is one to
one), ∫₀¹ n uⁿ⁻¹ log(n uⁿ⁻¹) du = log n − (n−1)/n. A policy over token sequences has atoms: a
sequence can be drawn twice, and different sequences can score the same. Then y ↦ U loses the
position inside an atom, and by the chain rule the formula splits into KL(π_n ‖ π) plus the
(non-negative) KL of where, inside its atom, the winner's quantile sits: the formula is an upper
bound (Beirami et al. 2024, arXiv:2401.01879), close when every outcome is unlikely.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
from jax.scipy.special import gammaln


def best_of_n_kl(n) -> jnp.ndarray:
    """KL(π_n ‖ π) = log n − (n−1)/n, the best-of-n policy's KL when scores never tie.

    0 at n = 1, ≈ log n − 1 for large n (so √KL grows like √log n: best-of-n is a cheap way to move
    little). An upper bound for a policy whose outcomes have mass (``best_of_n_probs`` is exact).

    Args:
      n: the number of candidates (≥ 1), a number or an array of them.
    Returns: float32, n's shape.
    """
    n = jnp.asarray(n, jnp.float32)
    return jnp.log(n) - (n - 1.0) / n


def best_of_n_probs(probs: jnp.ndarray, scores: jnp.ndarray, n: int) -> jnp.ndarray:
    """The exact best-of-n distribution π_n of a policy with finitely many outcomes.

    With F(s) = P_π(score ≤ s) and F⁻(s) = P_π(score < s), the best of n i.i.d. draws scores ≤ s with
    probability F(s)ⁿ, so its score is s with probability F(s)ⁿ − F⁻(s)ⁿ. Ties between draws of equal
    score are broken uniformly at random, so each outcome y of that score gets the share π(y)/q(s)
    of it, q(s) = F(s) − F⁻(s):

        π_n(y) = π(y) · (F(s_y)ⁿ − F⁻(s_y)ⁿ) / (F(s_y) − F⁻(s_y))          (distinct scores: F ⁿ − F⁻ⁿ)

    Args:
      probs: [..., K] π over K outcomes (each row sums to 1).  scores: [..., K] their scores.
      n: the number of candidates (≥ 1).
    Returns: [..., K] π_n (rows sum to 1; 0 where π is 0).
    """
    chex.assert_equal_shape([probs, scores])
    if n < 1:
        raise ValueError(f"n={n}: best-of-n needs at least one candidate")
    probs = probs.astype(jnp.float32)
    not_above = scores[..., None, :] <= scores[..., :, None]  # [..., K, K]: s_j ≤ s_y at [y, j]
    below = scores[..., None, :] < scores[..., :, None]
    cdf = jnp.sum(jnp.where(not_above, probs[..., None, :], 0.0), axis=-1)  # F(s_y)   [..., K]
    cdf_below = jnp.sum(jnp.where(below, probs[..., None, :], 0.0), axis=-1)  # F⁻(s_y) [..., K]
    level = cdf - cdf_below  # q(s_y) ≥ π(y)
    safe = jnp.where(level > 0, level, 1.0)
    return jnp.where(probs > 0, probs * (cdf**n - cdf_below**n) / safe, 0.0)


def best_of_n_estimate(scores: jnp.ndarray, values: jnp.ndarray, n: int) -> jnp.ndarray:
    """E[value of the best of n candidates] from one pool of N ≥ n i.i.d. samples: unbiased.

    The average, over all C(N, n) subsets of the pool, of the value of the subset's best-scored
    member. Sorting the pool by score (ascending, ranks i = 1 … N), member i is the best of exactly
    C(i−1, n−1) subsets, so

        Ê_n = Σᵢ C(i−1, n−1) / C(N, n) · v₍ᵢ₎

    (Coste et al. 2023, arXiv:2310.02743). A U-statistic, so unbiased for the i.i.d. best-of-n mean;
    one pool gives every n ≤ N. ``values`` may be the scores themselves (the proxy's value) or
    another reward of the same samples (the gold reward of the proxy's choice). Ties in score are
    broken uniformly at random: a tied member's value is replaced by its tie group's mean.

    Args:
      scores: [..., N] the selection score of each sample.  values: [..., N] what is averaged.
      n: the number of candidates, 1 ≤ n ≤ N.
    Returns: [...] float32.
    """
    chex.assert_equal_shape([scores, values])
    size = scores.shape[-1]
    if not 1 <= n <= size:
        raise ValueError(f"n={n}: best-of-n from a pool of {size} needs 1 ≤ n ≤ {size}")
    tied = scores[..., :, None] == scores[..., None, :]  # [..., N, N]
    values = values.astype(jnp.float32)
    tie_mean = jnp.sum(jnp.where(tied, values[..., None, :], 0.0), -1) / jnp.sum(tied, -1)
    order = jnp.argsort(scores, axis=-1)
    ranked = jnp.take_along_axis(tie_mean, order, axis=-1)  # [..., N] by ascending score
    i = jnp.arange(size, dtype=jnp.float32)  # rank − 1: member i is the best of C(i, n−1) subsets
    log_weight = (gammaln(i + 1.0) - gammaln(float(n)) - gammaln(jnp.maximum(i - n + 2.0, 1.0))) - (
        gammaln(size + 1.0) - gammaln(n + 1.0) - gammaln(size - n + 1.0)
    )
    weight = jnp.where(i >= n - 1, jnp.exp(log_weight), 0.0)  # [N], sums to 1
    return jnp.sum(weight * ranked, axis=-1)

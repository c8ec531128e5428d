"""Best-of-n math (jaxrlhf.rl.best_of) against brute-force enumeration and hand values."""

import itertools
import math

import jax
import numpy as np
import pytest

from jaxrlhf.rl import best_of_n_estimate, best_of_n_kl, best_of_n_probs


def kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def brute_force_probs(probs, scores, n):
    """π_n by enumerating every ordered n-tuple of draws; ties among the best shared equally."""
    out = np.zeros(len(probs))
    for draws in itertools.product(range(len(probs)), repeat=n):
        weight = np.prod([probs[d] for d in draws])
        top = max(scores[d] for d in draws)
        winners = [d for d in draws if scores[d] == top]
        for d in winners:  # a uniform pick among the tied draws (a draw, not an outcome)
            out[d] += weight / len(winners)
    return out


def brute_force_estimate(scores, values, n):
    """The mean over all n-subsets of the pool of the best-scored member's value (ties shared)."""
    total, count = 0.0, 0
    for subset in itertools.combinations(range(len(scores)), n):
        top = max(scores[i] for i in subset)
        winners = [i for i in subset if scores[i] == top]
        total += np.mean([values[i] for i in winners])
        count += 1
    return total / count


def test_kl_formula_hand_values():
    np.testing.assert_allclose(best_of_n_kl(1), 0.0, atol=1e-7)
    np.testing.assert_allclose(best_of_n_kl(2), math.log(2) - 0.5, rtol=1e-6)  # 0.19315
    np.testing.assert_allclose(best_of_n_kl(64), math.log(64) - 63 / 64, rtol=1e-6)  # 3.17533
    np.testing.assert_allclose(best_of_n_kl(np.array([1, 4])), [0.0, math.log(4) - 0.75], rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_probs_match_enumeration_distinct_and_tied(n):
    probs = np.array([0.1, 0.25, 0.3, 0.15, 0.2])
    for scores in (np.array([0.3, -1.0, 2.0, 0.7, 1.1]),  # distinct
                   np.array([1.0, 0.0, 1.0, 2.0, 0.0])):  # ties  # fmt: skip
        got = np.asarray(best_of_n_probs(probs, scores, n))
        np.testing.assert_allclose(got, brute_force_probs(probs, scores, n), atol=1e-6)
        np.testing.assert_allclose(got.sum(), 1.0, atol=1e-6)


def test_probs_hand_case():
    # Two outcomes, the better one with mass 1/4: best of 2 picks it unless both draws miss it.
    got = np.asarray(best_of_n_probs(np.array([0.75, 0.25]), np.array([0.0, 1.0]), 2))
    np.testing.assert_allclose(got, [0.75**2, 1 - 0.75**2], atol=1e-7)
    # Equal scores: best-of-n is π itself.
    same = np.asarray(best_of_n_probs(np.array([0.6, 0.4]), np.array([3.0, 3.0]), 5))
    np.testing.assert_allclose(same, [0.6, 0.4], atol=1e-7)


def test_kl_formula_is_an_upper_bound_and_tight_for_fine_policies():
    rng = np.random.default_rng(0)
    for n in (2, 4, 16):
        bound = float(best_of_n_kl(n))
        for _ in range(5):  # random policies, with and without tied scores
            probs = rng.dirichlet(np.ones(12))
            for scores in (rng.normal(size=12), rng.integers(0, 3, size=12).astype(float)):
                exact = kl(np.asarray(best_of_n_probs(probs, scores, n)), probs)
                assert 0.0 <= exact <= bound + 1e-6
        # Uniform over K outcomes with distinct scores: the gap closes as K grows.
        gaps = []
        for k in (10, 50):  # float32: beyond K ≈ 100 the gap drops below the rounding
            probs, scores = np.full(k, 1.0 / k), np.arange(k, dtype=float)
            gaps.append(bound - kl(np.asarray(best_of_n_probs(probs, scores, n)), probs))
        assert gaps[0] > 4 * gaps[1] > 0 and gaps[1] < 3e-3 * bound  # 1.2–5.6%, then 0.05–0.23%


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_estimate_matches_all_subsets(n):
    scores = np.array([0.5, 2.0, -1.0, 2.0, 0.5, 3.0])  # ties at 0.5 and 2.0
    values = np.array([1.0, -2.0, 4.0, 6.0, 3.0, 0.0])
    got = float(best_of_n_estimate(scores, values, n))
    np.testing.assert_allclose(got, brute_force_estimate(scores, values, n), rtol=1e-5, atol=1e-6)


def test_estimate_hand_values_and_batch_axes():
    scores = np.array([[3.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    # Row 0: n = 2 keeps the larger of each pair {3,1}→3, {3,2}→3, {1,2}→2: mean 8/3; n = 1: mean.
    np.testing.assert_allclose(best_of_n_estimate(scores, scores, 2), [8 / 3, 0.0], rtol=1e-5)
    np.testing.assert_allclose(best_of_n_estimate(scores, scores, 1), [2.0, 0.0], rtol=1e-5)
    np.testing.assert_allclose(best_of_n_estimate(scores, scores, 3), [3.0, 0.0], rtol=1e-5)
    jitted = jax.jit(best_of_n_estimate, static_argnums=2)(scores, scores + 1.0, 2)
    np.testing.assert_allclose(jitted, [11 / 3, 1.0], rtol=1e-5)


def test_estimate_is_unbiased_for_iid_best_of_n():
    # π uniform on {0, …, 9}, score = value: E[max of 3 i.i.d.] = Σ_k P(max ≥ k) for k = 1 … 9.
    exact = sum(1 - (k / 10) ** 3 for k in range(1, 10))
    rng = np.random.default_rng(1)
    pools = rng.integers(0, 10, size=(4000, 8)).astype(float)
    mean = float(np.mean(best_of_n_estimate(pools, pools, 3)))
    assert abs(mean - exact) < 0.05  # the estimator's standard error here is ≈ 0.01


def test_bad_n_is_refused():
    with pytest.raises(ValueError, match="n=0"):
        best_of_n_probs(np.array([1.0]), np.array([0.0]), 0)
    with pytest.raises(ValueError, match="pool of 3"):
        best_of_n_estimate(np.zeros(3), np.zeros(3), 4)

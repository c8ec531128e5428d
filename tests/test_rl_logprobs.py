"""token_logprobs, trajectory_logprob, token_entropy: hand values and oracles."""

import math

import jax
import numpy as np
import pytest
import rlax
from rl_utils import (
    check_grads_fd,
    close,
    f32,
    jit_and_not,
    np_token_entropy,
    np_token_logprobs,
    random_mask,
    with_garbage,
)

from jaxrlhf.rl import masked_mean, token_entropy, token_logprobs, trajectory_logprob

LN2, LN3 = math.log(2.0), math.log(3.0)


@pytest.mark.parametrize("fn", jit_and_not(token_logprobs, "temperature"))
def test_token_logprobs_hand(fn):
    # t=0: logits [0, ln2, ln3] → softmax ∝ [1, 2, 3] = [1/6, 1/3, 1/2]; token 2 → log(1/2) = −ln2.
    # t=1: logits [5, 5, 5] → uniform; token 1 → −ln3.
    # logits[..., t, :] predicts tokens[..., t] (no shift inside the function).
    logits = f32([[[0.0, LN2, LN3], [5.0, 5.0, 5.0]]])  # [B=1, T=2, V=3]
    tokens = np.array([[2, 1]], np.int32)  # [1, 2]
    out = fn(logits, tokens)
    assert out.shape == (1, 2)
    close(out, [[-LN2, -LN3]])


@pytest.mark.parametrize("fn", jit_and_not(token_logprobs, "temperature"))
def test_token_logprobs_temperature_hand(fn):
    # logits [0, ln2, ln3] / τ=2 → exp = [1, √2, √3], so log p(token 0) = −log(1 + √2 + √3).
    logits = f32([[0.0, LN2, LN3]])  # [T=1, V=3] (no batch axis: [..., T, V] allows none)
    tokens = np.array([0], np.int32)
    out = fn(logits, tokens, temperature=2.0)
    close(out, [-math.log(1.0 + math.sqrt(2.0) + math.sqrt(3.0))])


@pytest.mark.parametrize("fn", jit_and_not(token_logprobs, "temperature"))
def test_token_logprobs_numpy_oracle_and_stability(fn):
    # Random [2, 3, T=4, V=7] logits (two leading batch axes), compared with a float64 NumPy
    # log-softmax; then shifting all logits by +100 (exp(100) overflows float32) changes nothing.
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 4, 7)).astype(np.float32) * 3
    tokens = rng.integers(0, 7, size=(2, 3, 4)).astype(np.int32)
    for temperature in (1.0, 0.7):
        out = fn(f32(logits), tokens, temperature=temperature)
        assert out.shape == (2, 3, 4)
        close(out, np_token_logprobs(logits, tokens, temperature), atol=2e-5)
    shifted = fn(f32(logits + 100.0), tokens)
    close(shifted, np_token_logprobs(logits, tokens), atol=2e-4)


@pytest.mark.parametrize("fn", jit_and_not(trajectory_logprob))
def test_trajectory_logprob_hand(fn):
    # Row 0, all valid: −1 − 2 − 3 = −6. Row 1, last token padded: −0.5 − 0.25 = −0.75 (the 7 is
    # padding and must be ignored).
    logprobs = f32([[-1.0, -2.0, -3.0], [-0.5, -0.25, 7.0]])
    mask = f32([[1, 1, 1], [1, 1, 0]])
    out = fn(logprobs, mask)
    assert out.shape == (2,)
    close(out, [-6.0, -0.75])


@pytest.mark.parametrize("fn", jit_and_not(trajectory_logprob))
def test_trajectory_logprob_bool_mask(fn):
    # The contract allows a bool mask: same answer as the float mask above.
    logprobs = f32([[-1.0, -2.0, -3.0], [-0.5, -0.25, 7.0]])
    mask = np.array([[True, True, True], [True, True, False]])
    close(fn(logprobs, mask), [-6.0, -0.75])


@pytest.mark.parametrize("fn", jit_and_not(token_entropy, "temperature"))
def test_token_entropy_hand(fn):
    # t=0: uniform over 3 → H = ln3.
    # t=1: p = [1/6, 1/3, 1/2] → H = (1/6)ln6 + (1/3)ln3 + (1/2)ln2.
    logits = f32([[[1.0, 1.0, 1.0], [0.0, LN2, LN3]]])  # [1, 2, 3]
    out = fn(logits)
    assert out.shape == (1, 2)
    close(out, [[LN3, math.log(6.0) / 6 + LN3 / 3 + LN2 / 2]])


@pytest.mark.parametrize("fn", jit_and_not(token_entropy, "temperature"))
def test_token_entropy_temperature_hand(fn):
    # logits [0, 2ln2] / τ=2 → [0, ln2] → p = [1/3, 2/3] → H = (1/3)ln3 + (2/3)ln(3/2).
    logits = f32([[0.0, 2 * LN2]])
    close(fn(logits, temperature=2.0), [LN3 / 3 + (2.0 / 3.0) * math.log(1.5)])


@pytest.mark.parametrize("fn", jit_and_not(token_entropy, "temperature"))
def test_token_entropy_oracles(fn):
    # Against a float64 NumPy loop, and against rlax.entropy_loss (= −mean_t H_t with weights 1),
    # one row at a time; also entropy stays finite and correct for a near-one-hot distribution.
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 5, 6)) * 2).astype(np.float32)
    out = fn(f32(logits))
    close(out, np_token_entropy(logits), atol=2e-5)
    for i in range(3):
        rlax_loss = rlax.entropy_loss(f32(logits[i]), f32(np.ones(5)))
        close(-np.mean(np.asarray(out[i])), float(rlax_loss), atol=2e-5)
    peaked = f32([[0.0, 200.0, -200.0]])  # exp(200) overflows float32: must not give nan
    h = fn(peaked)
    assert np.all(np.isfinite(np.asarray(h)))
    close(h, [0.0], atol=1e-6)


def _mean_entropy(logits, mask, *, temperature=1.0):
    # The entropy bonus of the PPO loss: ppo_loss takes per-token entropies and averages them with
    # masked_mean; this is that composition.
    return masked_mean(token_entropy(logits, temperature=temperature), mask)


@pytest.mark.parametrize("fn", jit_and_not(_mean_entropy, "temperature"))
def test_masked_mean_entropy_hand(fn):
    # Row 0: uniform over 3 (ln3) then p=[1/6,1/3,1/2]; row 1: uniform over 3, then a padded step
    # whose logits are garbage. Masked mean over the 3 valid steps:
    #   (ln3 + H([1/6,1/3,1/2]) + ln3) / 3.
    h1 = math.log(6.0) / 6 + LN3 / 3 + LN2 / 2
    logits = f32(
        [[[1.0, 1.0, 1.0], [0.0, LN2, LN3]], [[2.0, 2.0, 2.0], [1e6, -1e6, 3.0]]]
    )  # [2, 2, 3]
    mask = f32([[1, 1], [1, 0]])
    close(fn(logits, mask), (2 * LN3 + h1) / 3)


@pytest.mark.parametrize("fn", jit_and_not(_mean_entropy, "temperature"))
def test_masked_mean_entropy_rlax_oracle(fn):
    # rlax.entropy_loss(logits, w) = −(1/T) Σₜ wₜ Hₜ for one row; with w = mask and all rows
    # concatenated, the masked mean is −entropy_loss · T_total / Σ mask.
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((3, 4, 5)) * 2).astype(np.float32)
    mask = random_mask(rng, (3,), 4)
    flat_logits, flat_mask = f32(logits.reshape(12, 5)), f32(mask.reshape(12))
    expected = -float(rlax.entropy_loss(flat_logits, flat_mask)) * 12 / mask.sum()
    garbage_logits = with_garbage(logits, mask[..., None] * np.ones(5), rng)
    close(fn(f32(garbage_logits), f32(mask)), expected, atol=2e-5)


def test_logprob_gradients_finite_differences():
    # ∂/∂logits of Σₜ log p(tokensₜ) and of Σₜ Hₜ, checked against central differences in float32.
    rng = np.random.default_rng(4)
    logits = f32(rng.standard_normal((2, 3, 4)))
    tokens = rng.integers(0, 4, size=(2, 3)).astype(np.int32)
    check_grads_fd(lambda x: token_logprobs(x, tokens, temperature=0.8), (logits,))
    check_grads_fd(lambda x: token_entropy(x, temperature=1.3), (logits,))
    # And the analytic gradient of log softmax: ∂ log p_a / ∂ z_j = 1[j = a] − p_j.
    g = jax.grad(lambda x: token_logprobs(x, tokens).sum())(logits)
    p = np.exp(np.asarray(jax.nn.log_softmax(logits)))
    close(g, np.eye(4)[tokens] - p, atol=1e-6)

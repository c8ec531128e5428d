"""kl_estimate, kl_penalized_rewards and the adaptive KL controller."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_utils import (
    close,
    f32,
    jit_and_not,
    np_kl_penalized_rewards,
    random_mask,
    with_garbage,
)

from jaxrlhf.rl import AdaptiveKLState, adaptive_kl_update, kl_estimate, kl_penalized_rewards

LN2 = math.log(2.0)
kl_fns = jit_and_not(kl_estimate, "kind")
penalty_fns = jit_and_not(kl_penalized_rewards, "kl_coef", "kind")


@pytest.mark.parametrize("fn", kl_fns)
@pytest.mark.parametrize(
    "kind,expected",
    [
        # ℓ = logprobs − ref_logprobs = [ln2, −ln2, 0].
        ("k1", [LN2, -LN2, 0.0]),  # ℓ
        ("k2", [0.5 * LN2**2, 0.5 * LN2**2, 0.0]),  # ½ℓ²
        # e^{−ℓ} − 1 + ℓ: e^{−ln2} = ½ → ln2 − ½;  e^{ln2} = 2 → 1 − ln2;  0.
        ("k3", [LN2 - 0.5, 1.0 - LN2, 0.0]),
    ],
)
def test_kl_estimate_hand(fn, kind, expected):
    logprobs = f32([[0.0, -LN2, -1.0]])
    ref = f32([[-LN2, 0.0, -1.0]])
    out = fn(logprobs, ref, kind=kind)
    assert out.shape == (1, 3)
    close(out, [expected], atol=1e-6)


def test_kl_estimate_default_kind_is_k1():
    close(kl_estimate(f32([0.5]), f32([0.25])), [0.25])


def test_k2_k3_nonnegative():
    # k2 = ½ℓ² ≥ 0 trivially; k3 = e^{−ℓ} − 1 + ℓ ≥ 0 because e^x ≥ 1 + x. Checked on a grid that
    # reaches far into both tails (e^{30} is still finite in float32).
    ell = np.concatenate([np.linspace(-30, 30, 601), np.geomspace(1e-8, 1, 50)]).astype(np.float32)
    ref = f32(np.zeros_like(ell))
    for kind in ("k2", "k3"):
        out = np.asarray(kl_estimate(f32(ell), ref, kind=kind))
        assert np.all(np.isfinite(out)) and np.all(out >= 0.0), kind


def test_kl_estimators_agree_near_zero():
    # Pointwise: k2 and k3 are both ½ℓ² + O(ℓ³) (k3 = ½ℓ² − ℓ³/6 + …), so |k3 − k2| ≤ |ℓ|³/6·(1+…).
    for ell in (1e-1, -1e-1, 3e-2, -3e-2):
        k2 = float(kl_estimate(f32([ell]), f32([0.0]), kind="k2")[0])
        k3 = float(kl_estimate(f32([ell]), f32([0.0]), kind="k3")[0])
        assert abs(k3 - k2) <= 0.2 * abs(ell) ** 3 + 1e-7, (ell, k2, k3)
    # In expectation under π (what the trainer averages): take π = softmax(z + δu) close to
    # π_ref = softmax(z). E_π[k1] = E_π[k3] = KL(π‖π_ref) exactly (E_π[e^{−ℓ}] = Σ π_ref = 1), and
    # E_π[k2] = KL·(1 + O(δ)): all three agree at leading order.
    rng = np.random.default_rng(0)
    z, u = rng.standard_normal(5), rng.standard_normal(5)
    ref = jax.nn.log_softmax(jnp.asarray(z, jnp.float32))
    for delta in (0.1, 0.05):
        logp = jax.nn.log_softmax(jnp.asarray(z + delta * u, jnp.float32))
        p = np.exp(np.asarray(logp, np.float64))
        true_kl = float(np.sum(p * (np.asarray(logp, np.float64) - np.asarray(ref, np.float64))))
        expect = {
            k: float(np.sum(p * np.asarray(kl_estimate(logp, ref, kind=k))))
            for k in ("k1", "k2", "k3")
        }
        close(expect["k1"], true_kl, atol=1e-6)
        close(expect["k3"], true_kl, atol=1e-6)
        # relative gap of k2 is O(δ) (about 0.19·δ for this u): second-order agreement
        assert abs(expect["k2"] - true_kl) <= 0.5 * delta * true_kl, (delta, expect, true_kl)
        assert true_kl > 1e-4  # the agreement above is not 0 = 0


def test_kl_estimate_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(f32([0.0]), f32([0.0]), kind="k4")


@pytest.mark.parametrize("fn", penalty_fns)
def test_kl_penalized_rewards_hand(fn):
    # β = 0.1, k1. Row 0 (3 valid): ℓ = [ln2, 0, −ln2] → −βℓ = [−0.1ln2, 0, 0.1ln2], plus the
    # score 3 at the last valid token (t = 2). Row 1 (1 valid): ℓ₀ = −ln2 → 0.1ln2 − 1; padded 0.
    scores = f32([3.0, -1.0])
    logprobs = f32([[0.0, 0.0, 0.0], [0.0, 5.0, -5.0]])
    ref = f32([[-LN2, 0.0, LN2], [LN2, 9.0, 9.0]])
    mask = f32([[1, 1, 1], [1, 0, 0]])
    out = fn(scores, logprobs, ref, mask, kl_coef=0.1)
    assert out.shape == (2, 3)
    close(out, [[-0.1 * LN2, 0.0, 3.0 + 0.1 * LN2], [0.1 * LN2 - 1.0, 0.0, 0.0]], atol=1e-6)
    # k3: row 0 KLₜ = [ln2 − ½, 0, 1 − ln2]; row 1 KL₀ = 1 − ln2.
    out = fn(scores, logprobs, ref, mask, kl_coef=0.1, kind="k3")
    close(
        out,
        [
            [-0.1 * (LN2 - 0.5), 0.0, 3.0 - 0.1 * (1 - LN2)],
            [-1.0 - 0.1 * (1 - LN2), 0.0, 0.0],
        ],
        atol=1e-6,
    )


@pytest.mark.parametrize("fn", penalty_fns)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalized_rewards_numpy_oracle(fn, kind):
    rng = np.random.default_rng(1)
    mask = random_mask(rng, (2, 3), 5)
    logprobs = rng.standard_normal((2, 3, 5)).astype(np.float32)
    ref = (logprobs + 0.3 * rng.standard_normal((2, 3, 5))).astype(np.float32)
    scores = rng.standard_normal((2, 3)).astype(np.float32)
    out = fn(
        f32(scores),
        f32(with_garbage(logprobs, mask, rng)),
        f32(with_garbage(ref, mask, rng)),
        f32(mask),
        kl_coef=0.05,
        kind=kind,
    )
    assert out.shape == (2, 3, 5)
    close(out, np_kl_penalized_rewards(scores, logprobs, ref, mask, 0.05, kind), atol=1e-5)
    # The sum over a row is score − β Σ KLₜ.
    close(
        np.asarray(out).sum(-1),
        np_kl_penalized_rewards(scores, logprobs, ref, mask, 0.05, kind).sum(-1),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "current_kl,expected",
    [
        # β = 0.1, target 6, n_steps/horizon = 256/10000 = 0.0256.
        (9.0, 0.1 * (1 + 0.2 * 0.0256)),  # 9/6 − 1 = 0.5 → clipped to 0.2
        (6.6, 0.1 * (1 + 0.1 * 0.0256)),  # 6.6/6 − 1 = 0.1
        (6.0, 0.1),  # on target: unchanged
        (0.0, 0.1 * (1 - 0.2 * 0.0256)),  # −1 → clipped to −0.2
    ],
)
def test_adaptive_kl_update_hand(current_kl, expected):
    state = AdaptiveKLState(kl_coef=0.1)
    for update in (
        adaptive_kl_update,
        jax.jit(adaptive_kl_update, static_argnames=("target", "horizon")),
    ):
        new = update(state, current_kl, 256, target=6.0, horizon=10000)
        close(new.kl_coef, expected, atol=1e-8, rtol=1e-6)
    assert float(state.kl_coef) == 0.1  # the old state is not mutated


def test_adaptive_kl_controller_converges_direction():
    # Repeatedly seeing a KL above target raises β, below target lowers it, monotonically.
    state_up = state_down = AdaptiveKLState(kl_coef=0.2)
    for _ in range(5):
        before_up, before_down = float(state_up.kl_coef), float(state_down.kl_coef)
        state_up = adaptive_kl_update(state_up, 12.0, 512, target=6.0, horizon=1000)
        state_down = adaptive_kl_update(state_down, 1.0, 512, target=6.0, horizon=1000)
        close(state_up.kl_coef, before_up * (1 + 0.2 * 0.512), rtol=1e-6)
        close(state_down.kl_coef, before_down * (1 - 0.2 * 0.512), rtol=1e-6)

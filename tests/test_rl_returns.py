"""discounted_return, reward_to_go, td_error, gae: hand values, identities, rlax and NumPy oracles."""

import numpy as np
import pytest
from rl_utils import (
    close,
    f32,
    jit_and_not,
    np_discounted_return,
    np_gae,
    np_reward_to_go,
    np_td_error,
    random_mask,
    rlax_gae,
    rlax_reward_to_go,
    with_garbage,
)

from jaxrlhf.rl import discounted_return, gae, reward_to_go, td_error

# One row of length 3 followed by one padded step (whose entries are garbage and must be ignored).
REWARDS = [[1.0, 2.0, 3.0, 100.0]]
MASK = [[1.0, 1.0, 1.0, 0.0]]

gae_fns = jit_and_not(gae, "gamma", "lam")
rtg_fns = jit_and_not(reward_to_go, "gamma")
ret_fns = jit_and_not(discounted_return, "gamma")
td_fns = jit_and_not(td_error, "gamma")


@pytest.mark.parametrize("fn", ret_fns)
def test_discounted_return_hand(fn):
    # γ = 0.5: 1 + 0.5·2 + 0.25·3 = 2.75; the 100 at the padded step is not counted.
    out = fn(f32(REWARDS), f32(MASK), gamma=0.5)
    assert out.shape == (1,)
    close(out, [2.75])


@pytest.mark.parametrize("fn", rtg_fns)
def test_reward_to_go_hand(fn):
    # γ = 0.5, backwards: G₂ = 3; G₁ = 2 + 0.5·3 = 3.5; G₀ = 1 + 0.5·3.5 = 2.75; G₃ = 0 (padded).
    out = fn(f32(REWARDS), f32(MASK), gamma=0.5)
    assert out.shape == (1, 4)
    close(out, [[2.75, 3.5, 3.0, 0.0]])


# GAE example: r = [1, 0, 2 | 9], V = [0.5, 1, −1 | 4], mask = [1, 1, 1 | 0], γ = λ = 0.5.
GAE_R = [[1.0, 0.0, 2.0, 9.0]]
GAE_V = [[0.5, 1.0, -1.0, 4.0]]
# δ₂ = 2 + 0.5·0 − (−1) = 3       (the value after the last valid token is 0: terminal)
# δ₁ = 0 + 0.5·(−1) − 1 = −1.5
# δ₀ = 1 + 0.5·1 − 0.5 = 1
GAE_DELTA = [[1.0, -1.5, 3.0, 0.0]]
# γλ = 0.25: Â₂ = 3; Â₁ = −1.5 + 0.25·3 = −0.75; Â₀ = 1 + 0.25·(−0.75) = 0.8125; Â₃ = 0.
GAE_ADV = [[0.8125, -0.75, 3.0, 0.0]]
# returns = Â + V = [1.3125, 0.25, 2, 0 (padded)].
GAE_RET = [[1.3125, 0.25, 2.0, 0.0]]


@pytest.mark.parametrize("fn", td_fns)
def test_td_error_hand(fn):
    close(fn(f32(GAE_R), f32(GAE_V), f32(MASK), gamma=0.5), GAE_DELTA)


@pytest.mark.parametrize("fn", gae_fns)
def test_gae_hand(fn):
    adv, ret = fn(f32(GAE_R), f32(GAE_V), f32(MASK), gamma=0.5, lam=0.5)
    assert adv.shape == ret.shape == (1, 4)
    close(adv, GAE_ADV)
    close(ret, GAE_RET)


@pytest.mark.parametrize("fn", gae_fns)
def test_gae_single_token_and_full_rows(fn):
    # Row 0 has one valid token: Â₀ = δ₀ = r₀ − V₀ = 2 − 0.5 = 1.5 (terminal right after it).
    # Row 1 is fully valid (no padding), γ = 1, λ = 1: Â = Σ_{k≥t} r_k − Vₜ = [3−1, 2−1, 1−1].
    r = f32([[2.0, 5.0, 5.0], [1.0, 1.0, 1.0]])
    v = f32([[0.5, 7.0, 7.0], [1.0, 1.0, 1.0]])
    m = f32([[1, 0, 0], [1, 1, 1]])
    adv, ret = fn(r, v, m, gamma=1.0, lam=1.0)
    close(adv, [[1.5, 0.0, 0.0], [2.0, 1.0, 0.0]])
    close(ret, [[2.0, 0.0, 0.0], [3.0, 2.0, 1.0]])


def _random_batch(seed, batch_shape=(4,), T=6):
    rng = np.random.default_rng(seed)
    shape = (*batch_shape, T)
    mask = random_mask(rng, batch_shape, T)
    rewards = with_garbage(rng.standard_normal(shape), mask, rng)
    values = with_garbage(rng.standard_normal(shape), mask, rng)
    return rewards, values, mask


@pytest.mark.parametrize("fn", gae_fns)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.7, 0.0)])
def test_gae_matches_rlax_and_numpy(fn, gamma, lam):
    # rlax: per row, discount_t = γ·mask_{t+1} (0 at the last valid step: terminal) and a bootstrap
    # value 0 appended; the NumPy oracle sums (γλ)^{k−t} δ_k directly. Masked entries are garbage.
    rewards, values, mask = _random_batch(seed=10)
    adv, ret = fn(f32(rewards), f32(values), f32(mask), gamma=gamma, lam=lam)
    rlax_adv, rlax_ret = rlax_gae(rewards, values, mask, gamma=gamma, lam=lam)
    close(adv, rlax_adv, atol=1e-5)
    close(ret, rlax_ret, atol=1e-5)
    np_adv, np_ret = np_gae(
        np.where(mask > 0, rewards, 0), np.where(mask > 0, values, 0), mask, gamma, lam
    )
    close(adv, np_adv, atol=1e-5)
    close(ret, np_ret, atol=1e-5)


@pytest.mark.parametrize("fn", rtg_fns)
def test_reward_to_go_matches_rlax_and_numpy(fn):
    rewards, _, mask = _random_batch(seed=11)
    out = fn(f32(rewards), f32(mask), gamma=0.9)
    close(out, rlax_reward_to_go(rewards, mask, gamma=0.9), atol=1e-5)
    close(out, np_reward_to_go(np.where(mask > 0, rewards, 0), mask, 0.9), atol=1e-5)


def test_returns_leading_batch_axes():
    # [..., T] with two leading axes [2, 3, T]: same as the NumPy loops row by row.
    rewards, values, mask = _random_batch(seed=12, batch_shape=(2, 3), T=5)
    clean_r, clean_v = np.where(mask > 0, rewards, 0), np.where(mask > 0, values, 0)
    out = discounted_return(f32(rewards), f32(mask), gamma=0.8)
    assert out.shape == (2, 3)
    close(out, np_discounted_return(clean_r, mask, 0.8), atol=1e-5)
    out = reward_to_go(f32(rewards), f32(mask), gamma=0.8)
    assert out.shape == (2, 3, 5)
    close(out, np_reward_to_go(clean_r, mask, 0.8), atol=1e-5)
    out = td_error(f32(rewards), f32(values), f32(mask), gamma=0.8)
    close(out, np_td_error(clean_r, clean_v, mask, 0.8), atol=1e-5)
    adv, ret = gae(f32(rewards), f32(values), f32(mask), gamma=0.8, lam=0.9)
    np_adv, np_ret = np_gae(clean_r, clean_v, mask, 0.8, 0.9)
    assert adv.shape == ret.shape == (2, 3, 5)
    close(adv, np_adv, atol=1e-5)
    close(ret, np_ret, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Identities between the functions.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lambda_one_is_reward_to_go_minus_value(gamma):
    # With λ = 1 the δ's telescope: Âₜ = Σ_{k≥t} γ^{k−t} r_k − Vₜ (terminal value 0), so
    # returns = reward-to-go exactly.
    rewards, values, mask = _random_batch(seed=13)
    adv, ret = gae(f32(rewards), f32(values), f32(mask), gamma=gamma, lam=1.0)
    rtg = reward_to_go(f32(rewards), f32(mask), gamma=gamma)
    close(adv, (np.asarray(rtg) - values) * mask, atol=1e-5)
    close(ret, rtg, atol=1e-5)


def test_gae_lambda_zero_is_td_error():
    rewards, values, mask = _random_batch(seed=14)
    adv, ret = gae(f32(rewards), f32(values), f32(mask), gamma=0.9, lam=0.0)
    delta = td_error(f32(rewards), f32(values), f32(mask), gamma=0.9)
    close(adv, delta, atol=1e-6)
    # one-step return rₜ + γ V(sₜ₊₁):
    close(ret, (np.asarray(delta) + values) * mask, atol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reward_to_go_at_zero_is_discounted_return(gamma):
    rewards, _, mask = _random_batch(seed=15)
    rtg = reward_to_go(f32(rewards), f32(mask), gamma=gamma)
    close(
        np.asarray(rtg)[..., 0], discounted_return(f32(rewards), f32(mask), gamma=gamma), atol=1e-5
    )


def test_reward_to_go_recursion():
    # Gₜ = rₜ + γ Gₜ₊₁ on valid steps.
    rewards, _, mask = _random_batch(seed=16)
    g = np.asarray(reward_to_go(f32(rewards), f32(mask), gamma=0.8))
    nxt = np.concatenate([g[:, 1:], np.zeros_like(g[:, :1])], axis=-1)
    close(g, (rewards + 0.8 * nxt) * mask, atol=1e-5)

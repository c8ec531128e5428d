"""Critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++), GRPO's KL loss term, and the masked
garbage property of every masked function added with them (GSPO, clip-higher, TIS, Dr. GRPO's norm).
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_utils import (
    close,
    f32,
    jit_and_not,
    lengths_to_mask,
    np_kl,
    np_reward_to_go,
    random_mask,
    with_garbage,
)

from jaxrlhf.rl import (
    MAX_LOG_RATIO,
    aggregate,
    clipped_surrogate,
    grpo_advantages,
    kl_estimate,
    kl_loss,
    kl_penalized_rewards,
    logprob_mismatch,
    masked_whiten,
    ppo_policy_loss,
    reinforce_pp_advantages,
    reward_to_go,
    rloo_advantages,
    tis_weights,
)

LN2 = math.log(2.0)
grpo_fns = jit_and_not(grpo_advantages, "group_size", "scale_by_std", "eps")
rloo_fns = jit_and_not(rloo_advantages, "group_size")
rpp_fns = jit_and_not(reinforce_pp_advantages, "gamma")
kl_loss_fns = jit_and_not(kl_loss, "kind")


# ------------------------------------------------------------------------------- NumPy oracles


def np_grpo(scores, group_size, scale_by_std=True, eps=1e-4):
    """Plain loop: per group, (r − mean) / (std(ddof=1) + ε) (trl's formula), in float64."""
    r = np.asarray(scores, np.float64)
    out = np.zeros_like(r)
    for start in range(0, len(r), group_size):
        g = r[start : start + group_size]
        adv = g - g.mean()
        if scale_by_std:
            adv = adv / (g.std(ddof=1) + eps)
        out[start : start + group_size] = adv
    return out


def np_rloo(scores, group_size):
    """Plain loop: rᵢ minus the mean of the other G − 1 scores of its group."""
    r = np.asarray(scores, np.float64)
    out = np.zeros_like(r)
    for start in range(0, len(r), group_size):
        for i in range(start, start + group_size):
            others = [r[j] for j in range(start, start + group_size) if j != i]
            out[i] = r[i] - sum(others) / len(others)
    return out


def np_reinforce_pp(rewards, mask):
    """Reward-to-go (γ = 1), then (G − mean) / √(var + 1e-8) over every valid token of the batch."""
    g = np_reward_to_go(rewards, mask, 1.0)
    m = np.asarray(mask) > 0
    valid = g[m]
    out = np.zeros_like(g)
    out[m] = (valid - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
    return out


# ------------------------------------------------------------------------------ GRPO / Dr. GRPO


@pytest.mark.parametrize("fn", grpo_fns)
def test_grpo_advantages_hand(fn):
    # Group 0, r = [1, 2, 3, 6]: mean 3, r − mean = [−2, −1, 0, 3], Σ(r − mean)² = 4+1+0+9 = 14,
    # unbiased std = √(14/3) ≈ 2.1602 (the biased √(14/4) ≈ 1.8708 would be wrong), so
    # Â = [−2, −1, 0, 3] / (√(14/3) + 10⁻⁴).
    # Group 1, r = [5, 5, 5, 5]: r − mean = 0, std = 0 → 0 / (0 + ε) = 0.
    scores = f32([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    out = fn(scores, group_size=4)
    assert out.shape == (8,)
    std = math.sqrt(14 / 3)
    close(out, [-2 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 3 / (std + 1e-4), 0, 0, 0, 0])
    # G = 2, r = [0, 1]: r − mean = ∓½, std = √((¼ + ¼)/1) = √½ → ∓½/(√½ + ε) ≈ ∓0.70700;
    # r = [4, 2]: r − mean = ±1, std = √2 → ±1/(√2 + ε) ≈ ±0.70706 (≈ ±1/√2 whatever the scale).
    out = fn(f32([0.0, 1.0, 4.0, 2.0]), group_size=2)
    a, b = 0.5 / (math.sqrt(0.5) + 1e-4), 1.0 / (math.sqrt(2.0) + 1e-4)
    close(out, [-a, a, b, -b])
    # ε is a keyword: ε = 1 gives [−2, −1, 0, 3] / (√(14/3) + 1).
    close(fn(scores[:4], group_size=4, eps=1.0), np.array([-2, -1, 0, 3]) / (std + 1.0))


@pytest.mark.parametrize("fn", grpo_fns)
def test_dr_grpo_advantages_hand(fn):
    # scale_by_std=False: just r − mean_g r: [−2, −1, 0, 3] and [0, 0, 0, 0].
    scores = f32([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    out = fn(scores, group_size=4, scale_by_std=False)
    close(out, [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    # groups of 2: [0, 1] → ∓½ and [4, 2] → ±1
    close(fn(f32([0.0, 1.0, 4.0, 2.0]), group_size=2, scale_by_std=False), [-0.5, 0.5, 1.0, -1.0])


@pytest.mark.parametrize("fn", rloo_fns)
def test_rloo_advantages_hand(fn):
    # r = [1, 2, 3, 6], the others' mean: (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, (1+2+6)/3 = 3,
    # (1+2+3)/3 = 2 → Â = [1 − 11/3, 2 − 10/3, 3 − 3, 6 − 2] = [−8/3, −4/3, 0, 4] (sum 0).
    # G = 2, r = [4, 2]: Â = [4 − 2, 2 − 4] = [2, −2].
    out = fn(f32([1.0, 2.0, 3.0, 6.0]), group_size=4)
    close(out, [-8 / 3, -4 / 3, 0.0, 4.0])
    close(fn(f32([4.0, 2.0, 0.0, 0.0]), group_size=2), [2.0, -2.0, 0.0, 0.0])


@pytest.mark.parametrize("group_size", [2, 3, 5])
def test_group_advantages_numpy_oracles_and_identities(group_size):
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal(4 * group_size) * 3 + 1).astype(np.float32)
    s = f32(scores)
    grpo = grpo_advantages(s, group_size=group_size)
    dr = grpo_advantages(s, group_size=group_size, scale_by_std=False)
    rloo = rloo_advantages(s, group_size=group_size)
    close(grpo, np_grpo(scores, group_size), atol=1e-5)
    close(dr, np_grpo(scores, group_size, scale_by_std=False), atol=1e-5)
    close(rloo, np_rloo(scores, group_size), atol=1e-5)
    # Every group's advantages sum to 0.
    for adv in (grpo, dr, rloo):
        close(np.asarray(adv).reshape(-1, group_size).sum(-1), np.zeros(4), atol=1e-5)
    # RLOO is the group-mean advantage scaled by G/(G−1).
    close(rloo, group_size / (group_size - 1) * np.asarray(dr), atol=1e-5)
    # GRPO with std scaling has unit (unbiased) std in every group, up to ε.
    std = np.asarray(grpo, np.float64).reshape(-1, group_size).std(-1, ddof=1)
    close(std, np.ones(4), atol=1e-3)


@pytest.mark.parametrize("value", [0.1, -0.7, 1e4 + 0.3, 3.0])
@pytest.mark.parametrize("group_size", [2, 3, 7])
def test_equal_scores_give_exactly_zero(value, group_size):
    # A group of equal rewards carries no signal: advantages exactly 0 (GRPO: 0/(0 + ε), no nan),
    # even where the float mean of G copies of 0.1 is not 0.1. The other group is unaffected.
    scores = f32([value] * group_size + list(range(group_size)))
    for adv in (
        grpo_advantages(scores, group_size=group_size),
        grpo_advantages(scores, group_size=group_size, scale_by_std=False),
        rloo_advantages(scores, group_size=group_size),
    ):
        adv = np.asarray(adv)
        assert np.all(adv[:group_size] == 0.0), adv
        assert np.all(np.isfinite(adv)) and np.any(adv[group_size:] != 0.0)
    # ... and its gradient w.r.t. the scores stays finite (√ at a zero variance).
    c = f32(np.linspace(-1.0, 1.0, 2 * group_size))
    g = jax.grad(lambda r: jnp.sum(c * grpo_advantages(r, group_size=group_size)))(scores)
    assert np.all(np.isfinite(np.asarray(g)))


def test_group_size_errors():
    with pytest.raises(ValueError, match=r"\b6\b.*\b4\b|\b4\b.*\b6\b") as excinfo:
        grpo_advantages(f32(np.zeros(6)), group_size=4)
    assert "6" in str(excinfo.value) and "group_size=4" in str(excinfo.value)
    with pytest.raises(ValueError, match="group_size=4"):
        rloo_advantages(f32(np.zeros(10)), group_size=4)
    for fn in (grpo_advantages, rloo_advantages):
        with pytest.raises(ValueError, match="group_size=1"):
            fn(f32(np.zeros(4)), group_size=1)
        with pytest.raises(AssertionError, match="rank"):  # scores are [B], not [B, G]
            fn(f32(np.zeros((2, 4))), group_size=4)


# ------------------------------------------------------------ unbiasedness by exact enumeration

K = 3  # actions of the toy policy π_θ(a) = softmax(θ)_a, one step, reward r(a)


@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_rloo_is_unbiased_and_the_group_mean_is_biased_by_g_minus_1_over_g(group_size):
    # Draw G i.i.d. actions a₁…a_G ~ π_θ. Enumerate all K^G tuples with their exact probability
    # P = Πᵢ π(aᵢ) and compute E[(1/G) Σᵢ Âᵢ ∇log π(aᵢ)] = Σ_tuples P · (1/G) Σᵢ Âᵢ ∇log π(aᵢ).
    #   RLOO: Âᵢ = rᵢ − mean_{j≠i} r_j; the baseline is independent of aᵢ → exactly ∇E[r].
    #   group mean (Dr. GRPO): Âᵢ = rᵢ − (1/G)Σ_j r_j = ((G−1)/G) rᵢ − (1/G)Σ_{j≠i} r_j; the second
    #   term has zero mean against ∇log π(aᵢ) → exactly ((G−1)/G)·∇E[r].
    rng = np.random.default_rng(group_size)
    theta = f32(rng.standard_normal(K))
    reward = f32([1.0, -0.5, 2.0])
    tuples = np.array(list(itertools.product(range(K), repeat=group_size)))  # [K^G, G]
    actions = jnp.asarray(tuples)
    scores = reward[actions].reshape(-1)  # [K^G · G], consecutive groups of G

    @jax.jit
    def gradients(theta):
        logp = jax.nn.log_softmax(theta)
        prob = jnp.exp(jnp.sum(logp[actions], axis=-1))  # [K^G]: P(tuple), a constant below
        true = jax.grad(lambda th: jnp.sum(jax.nn.softmax(th) * reward))(theta)

        def estimate(adv):  # E[(1/G) Σᵢ Âᵢ ∇log π(aᵢ)], Â constants
            adv = adv.reshape(-1, group_size)  # [K^G, G]

            def surrogate(th):
                return jnp.sum(prob * jnp.sum(adv * jax.nn.log_softmax(th)[actions], -1))

            return jax.grad(surrogate)(theta) / group_size

        rloo = estimate(rloo_advantages(scores, group_size=group_size))
        group_mean = estimate(grpo_advantages(scores, group_size=group_size, scale_by_std=False))
        by_hand = estimate(scores - jnp.repeat(scores.reshape(-1, group_size).mean(-1), group_size))
        return true, rloo, group_mean, by_hand, jnp.sum(prob)

    true, rloo, group_mean, by_hand, total = gradients(theta)
    close(total, 1.0, atol=1e-6)
    assert float(jnp.abs(true).max()) > 0.1  # a non-trivial gradient
    close(rloo, true, atol=1e-6)
    shrink = (group_size - 1) / group_size
    close(group_mean, shrink * np.asarray(true), atol=1e-6)
    close(by_hand, group_mean, atol=1e-6)
    assert float(jnp.abs(group_mean - true).max()) > 0.05 * float(jnp.abs(true).max())


# ---------------------------------------------------------------------------------- REINFORCE++


@pytest.mark.parametrize("fn", rpp_fns)
def test_reinforce_pp_advantages_hand(fn):
    # rewards [[0, 0, 1], [0, 2, pad]] → reward-to-go (γ = 1) [[1, 1, 1], [2, 2, 0]].
    # The 5 valid values {1, 1, 1, 2, 2}: mean 1.4; Σ(x − mean)² = 3·0.16 + 2·0.36 = 1.2,
    # unbiased var = 1.2/4 = 0.3 → Â = (G − 1.4)/√(0.3 + 1e-8): −0.4/√0.3 ≈ −0.7303, 0.6/√0.3 ≈ 1.0954.
    rewards = f32([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    mask = f32([[1, 1, 1], [1, 1, 0]])
    out = fn(rewards, mask)
    lo, hi = -0.4 / math.sqrt(0.3 + 1e-8), 0.6 / math.sqrt(0.3 + 1e-8)
    close(out, [[lo, lo, lo], [hi, hi, 0.0]])


@pytest.mark.parametrize("fn", rpp_fns)
def test_reinforce_pp_is_kl_rewards_then_reward_to_go_then_whitening(fn):
    rng = np.random.default_rng(3)
    mask = random_mask(rng, (4,), 6)
    logprobs = rng.standard_normal((4, 6)).astype(np.float32)
    ref = (logprobs + 0.3 * rng.standard_normal((4, 6))).astype(np.float32)
    scores = f32(rng.standard_normal(4))
    rewards = kl_penalized_rewards(scores, f32(logprobs), f32(ref), f32(mask), kl_coef=0.05)
    dirty = f32(with_garbage(rewards, mask, rng))
    out = fn(dirty, f32(mask))
    composed = masked_whiten(reward_to_go(rewards, f32(mask), gamma=1.0), f32(mask))
    close(out, composed, atol=1e-6)
    close(out, np_reinforce_pp(rewards, mask), atol=1e-5)
    # whitened over the batch: mean 0 and unbiased variance ≈ 1 over the valid tokens
    valid = np.asarray(out, np.float64)[mask > 0]
    close(valid.mean(), 0.0, atol=1e-6)
    close(valid.var(ddof=1), 1.0, atol=1e-4)


# ----------------------------------------------------------------------------- GRPO's KL term


@pytest.mark.parametrize("fn", kl_loss_fns)
def test_kl_loss_hand_and_gradient(fn):
    # ℓ = logprobs − ref = [ln2, −ln2, 0 | masked]; k3 = e^{−ℓ} − 1 + ℓ = [ln2 − ½, 1 − ln2, 0, 0].
    # ∂k3/∂logprobs = 1 − e^{−ℓ} = [1 − ½, 1 − 2, 0, 0] = [½, −1, 0, 0]; ∂/∂ref = 0 (a constant).
    logprobs = f32([[0.0, -LN2, -1.0, 7.0]])
    ref = f32([[-LN2, 0.0, -1.0, -9.0]])
    mask = f32([[1, 1, 1, 0]])
    out = fn(logprobs, ref, mask)
    close(out, [[LN2 - 0.5, 1.0 - LN2, 0.0, 0.0]], atol=1e-6)
    g_lp, g_ref = jax.grad(lambda a, b: jnp.sum(fn(a, b, mask)), argnums=(0, 1))(logprobs, ref)
    close(g_lp, [[0.5, -1.0, 0.0, 0.0]], atol=1e-6)
    close(g_ref, np.zeros((1, 4)))
    # the other estimators, and the masked mean a GRPO loss adds as β·KL
    close(fn(logprobs, ref, mask, kind="k1"), [[LN2, -LN2, 0.0, 0.0]], atol=1e-6)
    close(fn(logprobs, ref, mask, kind="k2"), [[LN2**2 / 2, LN2**2 / 2, 0.0, 0.0]], atol=1e-6)
    close(aggregate(out, mask), (LN2 - 0.5 + 1.0 - LN2) / 3, atol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_loss_numpy_oracle(kind):
    rng = np.random.default_rng(4)
    mask = random_mask(rng, (3, 2), 5)
    logprobs = rng.standard_normal((3, 2, 5)).astype(np.float32)
    ref = (logprobs + 0.5 * rng.standard_normal((3, 2, 5))).astype(np.float32)
    out = kl_loss(f32(with_garbage(logprobs, mask, rng)), f32(ref), f32(mask), kind=kind)
    close(out, np_kl(logprobs, ref, kind) * mask, atol=1e-5)
    close(out, kl_estimate(f32(logprobs), f32(ref), kind=kind) * mask, atol=1e-6)
    with pytest.raises(ValueError, match="'k4'"):
        kl_loss(f32(logprobs), f32(ref), f32(mask), kind="k4")


# ------------------------------------------------- masked garbage: inf, nan, 1e30 change nothing

B, T = 3, 5
MASK = lengths_to_mask([5, 3, 1], T)  # [B, T]
SCORES = f32([1.0, -2.0, 0.5])

# name → (fn(*float inputs [B, T], mask) → output pytree, number of float inputs)
MASKED_CASES = {
    "clipped_surrogate token clip-higher": (
        lambda lp, o, a, m: clipped_surrogate(lp, o, a, m, clip_eps=0.2, clip_eps_high=0.28),
        3,
    ),
    "clipped_surrogate sequence (GSPO)": (
        lambda lp, o, a, m: clipped_surrogate(
            lp, o, a, m, clip_eps=0.2, importance_level="sequence"
        ),
        3,
    ),
    "clipped_surrogate weights": (
        lambda lp, o, a, w, m: clipped_surrogate(lp, o, a, m, clip_eps=0.2, weights=w),
        4,
    ),
    "ppo_policy_loss GSPO + TIS + Dr. GRPO norm": (
        lambda lp, o, a, w, m: ppo_policy_loss(
            lp,
            o,
            a,
            m,
            clip_eps=0.2,
            clip_eps_high=0.3,
            importance_level="sequence",
            weights=w,
            aggregation="seq_mean_token_sum_norm",
        ),
        4,
    ),
    "aggregate seq_mean_token_sum_norm": (
        lambda x, m: aggregate(x, m, aggregation="seq_mean_token_sum_norm"),
        1,
    ),
    "kl_loss": (lambda lp, ref, m: tuple(kl_loss(lp, ref, m, kind=k) for k in ("k1", "k3")), 2),
    "tis_weights": (lambda lp, r, m: tis_weights(lp, r, m, cap=2.0), 2),
    "logprob_mismatch": (logprob_mismatch, 2),
    "reinforce_pp_advantages": (reinforce_pp_advantages, 1),
    "reinforce_pp of kl_penalized_rewards": (
        lambda lp, ref, m: reinforce_pp_advantages(
            kl_penalized_rewards(SCORES, lp, ref, m, kl_coef=0.1, kind="k3"), m
        ),
        2,
    ),
}


def _poison(x, mask):
    """x with masked positions overwritten by inf, −inf, nan and 1e30 in turn."""
    x = np.array(x, np.float32)
    junk = np.resize(np.array([np.inf, -np.inf, np.nan, 1e30], np.float32), x.shape)
    return np.where(mask > 0, x, junk).astype(np.float32)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(MASKED_CASES))
def test_inf_nan_at_masked_positions_change_no_value_and_no_gradient(name, jit):
    fn, n = MASKED_CASES[name]
    rng = np.random.default_rng(5)
    valid = [rng.uniform(-1.0, 1.0, (B, T)).astype(np.float32) for _ in range(n)]
    clean = [f32(x * MASK) for x in valid]
    dirty = [f32(_poison(x, MASK)) for x in valid]
    cot = f32(1.5 + np.cos(np.arange(B * T)).reshape(B, T))

    def scalar(floats):
        out = fn(*floats, f32(MASK))
        return sum(jnp.sum(o * (cot if o.shape == (B, T) else 1.0)) for o in jax.tree.leaves(out))

    def probe(floats):
        return fn(*floats, f32(MASK)), jax.grad(scalar)(floats)

    probe = jax.jit(probe) if jit else probe
    (out_clean, g_clean), (out_dirty, g_dirty) = probe(clean), probe(dirty)
    for a, b in zip(jax.tree.leaves((out_dirty, g_dirty)), jax.tree.leaves((out_clean, g_clean))):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.isfinite(a)), (name, a)
        np.testing.assert_array_equal(a, b, err_msg=name)
    for g in g_dirty:  # no gradient reaches a masked position
        assert np.all(np.asarray(g)[MASK == 0] == 0.0), name
    # and the clean outputs are 0 at the masked positions of per-token results
    for o in jax.tree.leaves(out_clean):
        if np.shape(o) == (B, T):
            assert np.all(np.asarray(o)[MASK == 0] == 0.0), name


def test_kl_loss_clamp_keeps_extreme_log_ratios_finite():
    # ℓ = ±1000 at valid tokens: k3 is evaluated at ℓ clamped to ±MAX_LOG_RATIO, gradient finite.
    logprobs, ref, mask = f32([[1000.0, -1000.0]]), f32([[0.0, 0.0]]), f32([[1, 1]])
    out, g = jax.value_and_grad(lambda lp: jnp.sum(kl_loss(lp, ref, mask)))(logprobs)
    close(out, math.expm1(-MAX_LOG_RATIO) + MAX_LOG_RATIO + math.expm1(MAX_LOG_RATIO) - MAX_LOG_RATIO,
          rtol=1e-5)  # fmt: skip
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize(
    "call",
    [
        lambda bt, row: kl_loss(bt, row, bt),
        lambda bt, row: kl_loss(bt, bt, row),
        lambda bt, row: tis_weights(bt, row, bt, cap=2.0),
        lambda bt, row: logprob_mismatch(bt, bt, row),
        lambda bt, row: reinforce_pp_advantages(bt, row),
    ],
    ids=["kl_loss ref [T]", "kl_loss mask [T]", "tis_weights", "logprob_mismatch", "reinforce_pp"],
)
def test_mismatched_shapes_raise(call):
    # [B, T] against [T] would broadcast in jnp; the functions refuse at entry.
    with pytest.raises(AssertionError, match=r"\(2, 3\)"):
        call(f32(np.zeros((2, 3))), f32(np.ones(3)))

"""ppo_policy_loss, value_loss, ppo_loss, bradley_terry_loss: hand values, identities, oracles."""

import math

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import rlax
from rl_utils import (
    close,
    f32,
    jit_and_not,
    np_policy_loss,
    np_value_loss,
    random_mask,
    with_garbage,
)

from jaxrlhf.rl import (
    MAX_LOG_RATIO,
    aggregate,
    aggregate_terms,
    bradley_terry_loss,
    clip_fraction,
    clipped_surrogate,
    kl_estimate,
    masked_mean,
    ppo_loss,
    ppo_policy_loss,
    value_loss,
    value_loss_terms,
)

policy_fns = jit_and_not(ppo_policy_loss, "clip_eps", "aggregation")
value_fns = jit_and_not(value_loss, "clip_eps")
bt_fns = jit_and_not(bradley_terry_loss, "margin")
ppo_fns = jit_and_not(ppo_loss, "clip_eps", "value_clip_eps", "vf_coef", "ent_coef", "aggregation")

# Policy-loss example, ε = 0.2, old_logprobs = 0 so ρ = exp(logprobs):
#   token  ρ    Â    ρÂ     clip(ρ)Â     −min
#   a     1.5   1    1.5    1.2·1=1.2    −1.2   (clipped: no credit beyond 1+ε)
#   b     0.5   1    0.5    0.8·1=0.8    −0.5   (pessimistic: the unclipped, smaller term)
#   c     1.1  −1   −1.1    1.1·−1=−1.1  +1.1   (inside the trust region)
#   d     0.5  −2   −1.0    0.8·−2=−1.6  +1.6   (clipped: the penalty is kept at 1−ε)
# Rows: [a, b, c] (all valid) and [d, pad, pad].
RATIOS = [[1.5, 0.5, 1.1], [0.5, 3.0, 0.2]]
ADV = [[1.0, 1.0, -1.0], [-2.0, 5.0, 5.0]]
PMASK = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize("fn", policy_fns)
@pytest.mark.parametrize(
    "aggregation,expected",
    [
        ("token_mean", (-1.2 - 0.5 + 1.1 + 1.6) / 4),  # 4 valid tokens: 1.0/4 = 0.25
        ("seq_mean_token_mean", ((-1.2 - 0.5 + 1.1) / 3 + 1.6) / 2),  # (−0.2 + 1.6)/2 = 0.7
        ("seq_mean_token_sum", ((-1.2 - 0.5 + 1.1) + 1.6) / 2),  # (−0.6 + 1.6)/2 = 0.5
    ],
)
def test_ppo_policy_loss_hand(fn, aggregation, expected):
    logprobs = f32(np.log(RATIOS))
    old = f32(np.zeros((2, 3)))
    out = fn(logprobs, old, f32(ADV), f32(PMASK), clip_eps=0.2, aggregation=aggregation)
    assert out.shape == ()
    close(out, expected)


@pytest.mark.parametrize("fn", policy_fns)
def test_ppo_policy_loss_default_is_token_mean(fn):
    out = fn(f32(np.log(RATIOS)), f32(np.zeros((2, 3))), f32(ADV), f32(PMASK), clip_eps=0.2)
    close(out, 0.25)


@pytest.mark.parametrize("fn", policy_fns)
def test_ratio_one_gives_minus_mean_advantage(fn):
    # ρ = 1 is inside [1−ε, 1+ε], so −min(ρÂ, clip(ρ)Â) = −Â: the loss is −masked_mean(Â)
    # (the plain policy-gradient surrogate at the old policy), for any ε.
    rng = np.random.default_rng(0)
    mask = random_mask(rng, (3,), 5)
    logprobs = f32(rng.standard_normal((3, 5)))
    adv = f32(with_garbage(rng.standard_normal((3, 5)), mask, rng))
    out = fn(logprobs, logprobs, adv, f32(mask), clip_eps=0.1)
    close(out, -float(masked_mean(adv, f32(mask))), atol=1e-6)
    # and its gradient is the REINFORCE gradient: ∂L/∂logprobsₜ = −Âₜ·maskₜ / Σ mask.
    g = jax.grad(lambda lp: fn(lp, logprobs, adv, f32(mask), clip_eps=0.1))(logprobs)
    close(g, -np.where(mask > 0, np.asarray(adv), 0) / mask.sum(), atol=1e-6)


@pytest.mark.parametrize("fn", policy_fns)
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_ppo_policy_loss_oracles(fn, aggregation):
    # NumPy loop on a masked batch, and rlax.clipped_surrogate_pg_loss (= −mean over one unmasked
    # sequence) on each row's valid prefix, recombined per aggregation.
    rng = np.random.default_rng(1)
    mask = random_mask(rng, (4,), 6)
    old = rng.standard_normal((4, 6)).astype(np.float32)
    logprobs = (old + 0.4 * rng.standard_normal((4, 6))).astype(np.float32)
    adv = rng.standard_normal((4, 6)).astype(np.float32)
    g = lambda x: f32(with_garbage(x, mask, rng))
    out = fn(g(logprobs), g(old), g(adv), f32(mask), clip_eps=0.2, aggregation=aggregation)
    close(out, np_policy_loss(logprobs, old, adv, mask, 0.2, aggregation), atol=1e-5)
    lengths = mask.sum(-1).astype(int)
    row_losses = [
        float(
            rlax.clipped_surrogate_pg_loss(
                f32(np.exp(logprobs[i, :n] - old[i, :n])), f32(adv[i, :n]), 0.2
            )
        )
        for i, n in enumerate(lengths)
    ]
    rlax_value = {
        "token_mean": np.dot(row_losses, lengths) / lengths.sum(),
        "seq_mean_token_mean": np.mean(row_losses),
        "seq_mean_token_sum": np.mean(np.multiply(row_losses, lengths)),
    }[aggregation]
    close(out, rlax_value, atol=1e-5)


def test_ppo_policy_loss_gradient_zero_where_clipped():
    # Where the clipped term is the minimum (tokens a and d above), the loss is flat in logprobs:
    # gradient 0. Elsewhere ∂(−ρÂ)/∂logp = −ρÂ, divided by the 4 valid tokens (token_mean).
    grad = jax.grad(
        lambda lp: ppo_policy_loss(lp, f32(np.zeros((2, 3))), f32(ADV), f32(PMASK), clip_eps=0.2)
    )(f32(np.log(RATIOS)))
    close(grad, [[0.0, -0.5 / 4, 1.1 / 4], [0.0, 0.0, 0.0]], atol=1e-6)


# Value-loss example, ε = 0.2; rows [[a, b], [c, pad]]:
#   token  V    V_old  R    (V−R)²   clip(V, V_old ± ε)   (V_clip−R)²   max
#   a     1.0   0.5   2.0    1.0      0.7                  1.69          1.69
#   b     0.0   0.1   0.0    0.0      0.0                  0.0           0.0
#   c     3.0   2.0   3.0    0.0      2.2                  0.64          0.64
VALUES = [[1.0, 0.0], [3.0, -40.0]]
OLD_VALUES = [[0.5, 0.1], [2.0, 50.0]]
RETURNS = [[2.0, 0.0], [3.0, 60.0]]
VMASK = [[1.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("fn", value_fns)
def test_value_loss_hand(fn):
    args = f32(VALUES), f32(OLD_VALUES), f32(RETURNS), f32(VMASK)
    close(fn(*args), (1.0 + 0.0 + 0.0) / 3)  # plain squared error, no ½
    close(fn(*args, clip_eps=None), 1.0 / 3)
    close(fn(*args, clip_eps=0.2), (1.69 + 0.0 + 0.64) / 3)


@pytest.mark.parametrize("fn", value_fns)
@pytest.mark.parametrize("clip_eps", [None, 0.3])
def test_value_loss_numpy_oracle(fn, clip_eps):
    rng = np.random.default_rng(2)
    mask = random_mask(rng, (4,), 6)
    v, ov, r = (rng.standard_normal((3, 4, 6)) * [[[1.0]], [[1.0]], [[2.0]]]).astype(np.float32)
    g = lambda x: f32(with_garbage(x, mask, rng))
    out = fn(g(v), g(ov), g(r), f32(mask), clip_eps=clip_eps)
    close(out, np_value_loss(v, ov, r, mask, clip_eps), atol=1e-5)


@pytest.mark.parametrize("fn", bt_fns)
def test_bradley_terry_hand(fn):
    # pair 0: r_c − r_r = 1 → −log σ(1) = log(1 + e^{−1}); pair 1: equal → −log σ(0) = log 2.
    chosen, rejected = f32([2.0, 0.0]), f32([1.0, 0.0])
    close(fn(chosen, rejected), (math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2)
    # margin 1: arguments 0 and −1 → (log 2 + log(1 + e)) / 2.
    close(fn(chosen, rejected, margin=1.0), (math.log(2.0) + math.log1p(math.e)) / 2)


@pytest.mark.parametrize("fn", bt_fns)
def test_bradley_terry_equal_rewards_is_log2_and_stable(fn):
    r = f32([-3.0, 0.0, 5.0, 1e4])
    close(fn(r, r), math.log(2.0))
    # A huge wrong-way gap: −log σ(−1000) = 1000 (softplus form, no overflow to inf).
    close(fn(f32([0.0]), f32([1000.0])), 1000.0, rtol=1e-6)
    close(fn(f32([1000.0]), f32([0.0])), 0.0, atol=1e-6)
    # d/d r_c of −log σ(Δ) = −σ(−Δ) = −(1 − σ(Δ)); at Δ = 0 that is −½, averaged over 4 pairs.
    g = jax.grad(lambda c: fn(c, f32(np.zeros(4))))(f32(np.zeros(4)))
    close(g, [-0.125] * 4, atol=1e-7)


@pytest.mark.parametrize("fn", ppo_fns)
def test_ppo_loss_composes_parts(fn):
    # loss = L_policy + c₁·L_value − c₂·H̄, H̄ = masked mean of the per-token entropies.
    # With the hand examples above on the [[a, b], [c, pad]] layout:
    #   policy tokens (ρ, Â): a (1.5, 1) → −1.2, b (0.5, 1) → −0.5, c (1.1, −1) → 1.1:
    #     L_policy = (−1.2 − 0.5 + 1.1)/3 = −0.2
    #   L_value (clipped, ε_v = 0.2) = (1.69 + 0 + 0.64)/3 = 2.33/3
    #   entropies [0.5, 1.0, 1.5, pad] → H̄ = 1.0
    #   loss = −0.2 + 0.5·(2.33/3) − 0.01·1.0
    logprobs = f32(np.log([[1.5, 0.5], [1.1, 9.0]]))
    old = f32(np.zeros((2, 2)))
    adv = f32([[1.0, 1.0], [-1.0, 7.0]])
    entropy = f32([[0.5, 1.0], [1.5, 100.0]])
    loss, parts = fn(
        logprobs,
        old,
        adv,
        f32(VALUES),
        f32(OLD_VALUES),
        f32(RETURNS),
        f32(VMASK),
        entropy,
        clip_eps=0.2,
        value_clip_eps=0.2,
        vf_coef=0.5,
        ent_coef=0.01,
    )
    expected = -0.2 + 0.5 * (2.33 / 3) - 0.01 * 1.0
    assert loss.shape == ()
    close(loss, expected)
    assert set(parts) == {"policy", "value", "entropy"}
    close(parts["policy"], -0.2)
    close(parts["value"], 2.33 / 3)
    close(parts["entropy"], 1.0)
    # without value clipping the value part is the plain MSE (1 + 0 + 0)/3
    loss, parts = fn(
        logprobs,
        old,
        adv,
        f32(VALUES),
        f32(OLD_VALUES),
        f32(RETURNS),
        f32(VMASK),
        entropy,
        clip_eps=0.2,
        vf_coef=0.5,
        ent_coef=0.01,
    )
    close(parts["value"], 1.0 / 3)
    close(loss, -0.2 + 0.5 / 3 - 0.01)


@pytest.mark.parametrize("fn", jit_and_not(aggregate, "aggregation"))
def test_aggregate_hand(fn):
    # per-token x = [[1, 2, 3], [4, pad, pad]]:
    #   token_mean = (1+2+3+4)/4 = 2.5;  seq_mean_token_mean = (2 + 4)/2 = 3;
    #   seq_mean_token_sum = (6 + 4)/2 = 5.
    x, mask = f32([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]]), f32([[1, 1, 1], [1, 0, 0]])
    close(fn(x, mask), 2.5)
    close(fn(x, mask, aggregation="token_mean"), 2.5)
    close(fn(x, mask, aggregation="seq_mean_token_mean"), 3.0)
    close(fn(x, mask, aggregation="seq_mean_token_sum"), 5.0)


# ----------------------------------------------------------------------------- clip indicators


@pytest.mark.parametrize("fn", jit_and_not(clipped_surrogate, "clip_eps"))
def test_clipped_surrogate_marks_where_the_clip_cuts_the_gradient(fn):
    # The table above: a (ρ=1.5, Â=+1) and d (ρ=0.5, Â=−2) take the clipped term; b (ρ=0.5, Â=+1:
    # the unclipped term is the smaller one) and c (inside) do not. trl's clipfrac counts a and d.
    # The |ρ − 1| > ε count of rl.clip_fraction would also count b.
    logprobs = f32(np.log([[1.5, 0.5, 1.1], [0.5, 7.0, 7.0]]))
    advantages = f32([[1.0, 1.0, -1.0], [-2.0, 3.0, 3.0]])
    mask = f32([[1, 1, 1], [1, 0, 0]])
    loss, clipped = fn(logprobs, np.zeros_like(logprobs), advantages, mask, clip_eps=0.2)
    close(loss, [[-1.2, -0.5, 1.1], [1.6, 0.0, 0.0]])
    close(clipped, [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(clip_fraction(logprobs, np.zeros_like(logprobs), mask, clip_eps=0.2)) == 0.75


def test_value_loss_terms_mark_where_the_clipped_error_is_larger():
    # V_old = 0, ε = 0.2, R = 1: V = 0.5 clips to 0.2 → (0.2−1)² = 0.64 > 0.25: clipped term taken.
    # V = −0.1 stays inside → both errors 1.21: not clipped. Masked entry: 0 in both outputs.
    values, old, returns = f32([[0.5, -0.1, 9.0]]), f32([[0.0, 0.0, 0.0]]), f32([[1.0, 1.0, 1.0]])
    loss, clipped = value_loss_terms(values, old, returns, f32([[1, 1, 0]]), clip_eps=0.2)
    close(loss, [[0.64, 1.21, 0.0]])
    close(clipped, [[1.0, 0.0, 0.0]])


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_aggregate_terms_add_across_a_split_batch(aggregation):
    # (sum, count) of two halves add up to the whole batch's: what data parallelism relies on.
    rng = np.random.default_rng(0)
    x, mask = f32(rng.normal(size=(4, 5))), random_mask(rng, (4,), 5)
    whole = aggregate_terms(x, mask, aggregation=aggregation)
    halves = [
        aggregate_terms(x[i : i + 2], mask[i : i + 2], aggregation=aggregation) for i in (0, 2)
    ]
    close(whole[0], halves[0][0] + halves[1][0])
    close(whole[1], halves[0][1] + halves[1][1])
    close(whole[0] / whole[1], aggregate(x, mask, aggregation=aggregation))


# ----------------------------------------------------------------------------- overflow guard


def test_an_extreme_log_ratio_leaves_the_loss_and_its_gradient_finite():
    # One stray token with log π − log π_old = 1000 (e.g. a numerical accident): without the clamp
    # ρ = inf, the loss is inf and the gradient NaN.
    logprobs = f32([[1000.0, 0.0, -1000.0]])
    old, mask = np.zeros_like(logprobs), f32([[1, 1, 1]])
    advantages = f32([[-1.0, 1.0, 1.0]])

    def total(lp):
        return ppo_policy_loss(lp, old, advantages, mask, clip_eps=0.2) + jnp.sum(
            kl_estimate(lp, old, kind="k3")
        )

    value, grad = jax.value_and_grad(total)(logprobs)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    # The clamp sits at ±MAX_LOG_RATIO: the first token's ratio is e^20, so its loss is e^20 / 3.
    close(
        ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2),
        (math.exp(MAX_LOG_RATIO) - 1.0) / 3,
        rtol=1e-5,
    )
    close(kl_estimate(f32([[-1000.0]]), f32([[0.0]]), kind="k3"),
          [[math.expm1(MAX_LOG_RATIO) - MAX_LOG_RATIO]], rtol=1e-5)  # fmt: skip

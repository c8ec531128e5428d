"""ppo_policy_loss, value_loss, ppo_loss, bradley_terry_loss: hand values, identities, oracles."""

import math

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import rlax
from rl_utils import (
    check_grads_fd,
    close,
    f32,
    jit_and_not,
    lengths_to_mask,
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
    logprob_mismatch,
    masked_mean,
    ppo_loss,
    ppo_policy_loss,
    tis_weights,
    value_loss,
    value_loss_terms,
)

LN2 = math.log(2.0)

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


# ------------------------------------------------------------------ the GRPO family's options


def np_policy_loss_ext(
    logprobs,
    old,
    adv,
    mask,
    eps,
    eps_high=None,
    level="token",
    weights=None,
    aggregation="token_mean",
):
    """Loop oracle with DAPO's clip-higher, GSPO's sequence ratio and per-token weights."""
    lp, olp, a, m = (np.asarray(x, np.float64) for x in (logprobs, old, adv, mask))
    w = np.ones_like(lp) if weights is None else np.asarray(weights, np.float64)
    high = eps if eps_high is None else eps_high
    rows = []
    for i in range(lp.shape[0]):
        valid = [t for t in range(lp.shape[1]) if m[i, t]]
        seq_ratio = math.exp(sum(lp[i, t] - olp[i, t] for t in valid) / len(valid))
        losses = []
        for t in valid:
            ratio = seq_ratio if level == "sequence" else math.exp(lp[i, t] - olp[i, t])
            clipped = min(max(ratio, 1 - eps), 1 + high)
            losses.append(-w[i, t] * min(ratio * a[i, t], clipped * a[i, t]))
        rows.append(losses)
    if aggregation == "token_mean":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if aggregation == "seq_mean_token_mean":
        return float(np.mean([sum(r) / len(r) for r in rows]))
    if aggregation == "seq_mean_token_sum":
        return float(np.mean([sum(r) for r in rows]))
    if aggregation == "seq_mean_token_sum_norm":
        return sum(map(sum, rows)) / (lp.shape[0] * lp.shape[1])
    raise ValueError(aggregation)


surrogate_fns = jit_and_not(clipped_surrogate, "clip_eps", "clip_eps_high", "importance_level")
policy_ext_fns = jit_and_not(
    ppo_policy_loss, "clip_eps", "clip_eps_high", "importance_level", "aggregation"
)


@pytest.mark.parametrize("fn", surrogate_fns)
def test_clip_higher_hand(fn):
    # DAPO, ε = 0.2, ε_high = 0.28: ρ ∈ [0.8, 1.28]. old_logprobs = 0 so ρ = exp(logprobs):
    #   ρ    Â    symmetric (ε_high = ε)          clip-higher
    #   1.5   1   −min(1.5, 1.2)  = −1.2 (cut)    −min(1.5, 1.28) = −1.28 (cut)
    #   1.25  1   −min(1.25, 1.2) = −1.2 (cut)    −1.25 (inside now)
    #   0.5  −2   −min(−1, −1.6)  =  1.6 (cut)     1.6 (the lower bound is unchanged)
    #   0.5   1   −0.5                            −0.5
    logprobs = f32(np.log([[1.5, 1.25, 0.5, 0.5]]))
    adv, mask, old = f32([[1.0, 1.0, -2.0, 1.0]]), f32([[1, 1, 1, 1]]), f32(np.zeros((1, 4)))
    loss, clipped = fn(logprobs, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    close(loss, [[-1.28, -1.25, 1.6, -0.5]])
    close(clipped, [[1.0, 0.0, 1.0, 0.0]])
    loss, clipped = fn(logprobs, old, adv, mask, clip_eps=0.2)
    close(loss, [[-1.2, -1.2, 1.6, -0.5]])
    close(clipped, [[1.0, 1.0, 1.0, 0.0]])


@pytest.mark.parametrize("fn", policy_fns)
def test_new_options_at_their_defaults_change_nothing(fn):
    # clip_eps_high = ε, importance_level = "token", weights = None / all ones: today's loss.
    rng = np.random.default_rng(7)
    mask = f32(random_mask(rng, (4,), 6))
    old = f32(rng.standard_normal((4, 6)))
    logprobs = old + f32(0.4 * rng.standard_normal((4, 6)))
    adv = f32(rng.standard_normal((4, 6)))
    base = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    for kwargs in (
        {"clip_eps_high": 0.2},
        {"importance_level": "token"},
        {"weights": jnp.ones_like(adv)},
        {"clip_eps_high": None, "importance_level": "token", "weights": None},
    ):
        out = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, **kwargs)
        assert float(out) == float(base), kwargs
    close(fn(logprobs, old, adv, mask, clip_eps=0.2), base, atol=1e-7)


@pytest.mark.parametrize("fn", surrogate_fns)
def test_gspo_sequence_ratio_hand(fn):
    # Row 0: log ρₜ = [0.2, −0.4 | pad 5.0]: s = exp((0.2 − 0.4)/2) = e^{−0.1} ≈ 0.9048 ∈ [0.8, 1.2],
    #   Â = [1, 3] → ℓ = [−s, −3s], not clipped (token level ρ₀ = e^{0.2} ≈ 1.22 would be cut).
    # Row 1: log ρₜ = [0.6, 0.4, 0.5]: s = e^{0.5} ≈ 1.6487 > 1.2, Â = 2 at every token →
    #   ℓ = −min(2s, 2·1.2) = −2.4 at each, all three clipped (as one).
    logprobs = f32([[0.2, -0.4, 5.0], [0.6, 0.4, 0.5]])
    old, mask = f32(np.zeros((2, 3))), f32([[1, 1, 0], [1, 1, 1]])
    adv = f32([[1.0, 3.0, 9.0], [2.0, 2.0, 2.0]])
    loss, clipped = fn(logprobs, old, adv, mask, clip_eps=0.2, importance_level="sequence")
    s = math.exp(-0.1)
    close(loss, [[-s, -3 * s, 0.0], [-2.4, -2.4, -2.4]])
    close(clipped, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


def test_gspo_gradient_flows_through_the_mean():
    # Row 0 above alone, aggregation seq_mean_token_mean: L = (−s − 3s)/2 = −2s with
    # s = exp((lp₀ + lp₁)/2), so ∂L/∂lpₜ = −2s · ½ = −s at both valid tokens, 0 at the padding.
    logprobs, old = f32([[0.2, -0.4, 5.0]]), f32(np.zeros((1, 3)))
    adv, mask = f32([[1.0, 3.0, 9.0]]), f32([[1, 1, 0]])

    def loss(lp):
        return ppo_policy_loss(
            lp,
            old,
            adv,
            mask,
            clip_eps=0.2,
            importance_level="sequence",
            aggregation="seq_mean_token_mean",
        )

    s = math.exp(-0.1)
    close(loss(logprobs), -2 * s)
    close(jax.grad(loss)(logprobs), [[-s, -s, 0.0]])
    # old_logprobs are constants at either level
    g_old = jax.grad(
        lambda o: ppo_policy_loss(logprobs, o, adv, mask, clip_eps=0.2, importance_level="sequence")
    )(old)
    close(g_old, np.zeros((1, 3)))


@pytest.mark.parametrize("fn", policy_ext_fns)
def test_gspo_equals_token_ppo_for_one_token_sequences(fn):
    # With a single valid token per row the sequence ratio is that token's ratio: same loss, same
    # gradient. Rows of length 1 (T = 1), and rows of one valid token then padding (T = 4).
    rng = np.random.default_rng(8)
    kw = {"clip_eps": 0.2, "clip_eps_high": 0.3, "aggregation": "seq_mean_token_mean"}
    for T, mask in ((1, np.ones((5, 1), np.float32)), (4, lengths_to_mask([1] * 5, 4))):
        old = f32(rng.standard_normal((5, T)))
        logprobs = old + f32(0.5 * rng.standard_normal((5, T)))
        adv = f32(with_garbage(rng.standard_normal((5, T)), mask, rng))
        args = (old, adv, f32(mask))
        seq, g_seq = jax.value_and_grad(
            lambda lp, a=args: fn(lp, *a, importance_level="sequence", **kw)
        )(logprobs)
        tok, g_tok = jax.value_and_grad(
            lambda lp, a=args: fn(lp, *a, importance_level="token", **kw)
        )(logprobs)
        close(seq, tok, atol=1e-7)
        close(g_seq, g_tok, atol=1e-7)


@pytest.mark.parametrize("fn", surrogate_fns)
def test_weights_multiply_the_per_token_loss(fn):
    # The hand table of test_ppo_policy_loss_hand, weights [[0.5, 2, 1], [3, garbage…]]:
    # ℓ = [[−1.2·0.5, −0.5·2, 1.1·1], [1.6·3, 0, 0]]; the clip indicator is not weighted.
    weights = f32([[0.5, 2.0, 1.0], [3.0, np.nan, np.inf]])
    loss, clipped = fn(
        f32(np.log(RATIOS)),
        f32(np.zeros((2, 3))),
        f32(ADV),
        f32(PMASK),
        clip_eps=0.2,
        weights=weights,
    )
    close(loss, [[-0.6, -1.0, 1.1], [4.8, 0.0, 0.0]])
    close(clipped, [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # weights are constants: no gradient reaches them; the logprobs' gradient is scaled by them
    # (token b: −ρÂ·w = −0.5·2 per token_mean over 4 tokens; a and d are clipped: 0).
    g_lp, g_w = jax.grad(
        lambda lp, w: ppo_policy_loss(lp, f32(np.zeros((2, 3))), f32(ADV), f32(PMASK), clip_eps=0.2,
                                      weights=w),
        argnums=(0, 1),
    )(f32(np.log(RATIOS)), f32([[0.5, 2.0, 1.0], [3.0, 1.0, 1.0]]))  # fmt: skip
    close(g_lp, [[0.0, -1.0 / 4, 1.1 / 4], [0.0, 0.0, 0.0]], atol=1e-6)
    close(g_w, np.zeros((2, 3)))


@pytest.mark.parametrize("fn", policy_ext_fns)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(
    "aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
)
def test_policy_loss_options_numpy_oracle(fn, level, aggregation):
    rng = np.random.default_rng(9)
    mask = random_mask(rng, (4,), 6)
    old = rng.standard_normal((4, 6)).astype(np.float32)
    logprobs = (old + 0.3 * rng.standard_normal((4, 6))).astype(np.float32)
    adv = rng.standard_normal((4, 6)).astype(np.float32)
    weights = rng.uniform(0.2, 2.0, (4, 6)).astype(np.float32)
    g = lambda x: f32(with_garbage(x, mask, rng))
    out = fn(
        g(logprobs),
        g(old),
        g(adv),
        f32(mask),
        clip_eps=0.2,
        clip_eps_high=0.28,
        importance_level=level,
        weights=g(weights),
        aggregation=aggregation,
    )
    expected = np_policy_loss_ext(logprobs, old, adv, mask, 0.2, 0.28, level, weights, aggregation)
    close(out, expected, atol=1e-5)


def test_gspo_and_weights_gradient_finite_differences():
    rng = np.random.default_rng(10)
    mask = f32(lengths_to_mask([5, 3, 1], 5))
    old = f32(rng.standard_normal((3, 5)))
    # row mean log-ratios −0.3, 0.1, 0.5 (s ≈ 0.74, 1.11, 1.65): away from the edges 0.8 and 1.28
    log_ratio = f32([[-0.1, -0.5, -0.3, -0.2, -0.4], [0.3, 0.0, 0.0, 9, 9], [0.5, 9, 9, 9, 9]])
    adv, weights = f32(rng.standard_normal((3, 5))), f32(rng.uniform(0.5, 1.5, (3, 5)))
    check_grads_fd(
        lambda lp: ppo_policy_loss(
            lp,
            old,
            adv,
            mask,
            clip_eps=0.2,
            clip_eps_high=0.28,
            importance_level="sequence",
            weights=weights,
            aggregation="seq_mean_token_mean",
        ),
        (old + log_ratio * mask,),
    )


def test_policy_loss_option_errors():
    x, mask = f32(np.zeros((2, 3))), f32(np.ones((2, 3)))
    with pytest.raises(ValueError, match="'tokens'") as excinfo:
        ppo_policy_loss(x, x, x, mask, clip_eps=0.2, importance_level="tokens")
    assert "sequence" in str(excinfo.value)
    with pytest.raises(AssertionError):  # weights [B, 1] would broadcast
        clipped_surrogate(x, x, x, mask, clip_eps=0.2, weights=f32(np.ones((2, 1))))


# ------------------------------------------------------------------ Dr. GRPO's aggregation


@pytest.mark.parametrize("fn", jit_and_not(aggregate, "aggregation"))
def test_seq_mean_token_sum_norm_hand(fn):
    # x = [[1, 2, 3], [4, pad, pad]]: Σ m·x / (B·T) = (6 + 4) / (2·3) = 10/6, whatever the lengths.
    x, mask = f32([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]]), f32([[1, 1, 1], [1, 0, 0]])
    close(fn(x, mask, aggregation="seq_mean_token_sum_norm"), 10.0 / 6.0)
    # (sum, count) = (Σ m·x / T, #sequences) = (10/3, 2)
    total, count = aggregate_terms(x, mask, aggregation="seq_mean_token_sum_norm")
    close(total, 10.0 / 3.0)
    close(count, 2.0)
    # leading axes count as sequences: [2, 1, 3] → B = 2
    close(fn(x[:, None], mask[:, None], aggregation="seq_mean_token_sum_norm"), 10.0 / 6.0)
    # a token's weight 1/(B·T) does not depend on its row's length (unlike seq_mean_token_mean)
    g = jax.grad(lambda v: fn(v, mask, aggregation="seq_mean_token_sum_norm"))(x)
    close(g, np.asarray(mask) / 6.0)


def test_seq_mean_token_sum_norm_terms_add_across_a_split_batch():
    rng = np.random.default_rng(0)
    x, mask = f32(rng.normal(size=(4, 5))), random_mask(rng, (4,), 5)
    agg = "seq_mean_token_sum_norm"
    whole = aggregate_terms(x, mask, aggregation=agg)
    halves = [aggregate_terms(x[i : i + 2], mask[i : i + 2], aggregation=agg) for i in (0, 2)]
    close(whole[0], halves[0][0] + halves[1][0])
    close(whole[1], halves[0][1] + halves[1][1])
    close(whole[0] / whole[1], np.sum(np.asarray(x) * mask) / 20.0)


# ------------------------------------------------------- truncated importance sampling (TIS)


@pytest.mark.parametrize("fn", jit_and_not(tis_weights, "cap"))
def test_tis_weights_hand(fn):
    # log π_train − log π_rollout = [ln2, −ln2, ln4, 1000 | masked]: ratios [2, ½, 4, e^20];
    # capped at C = 3: [2, ½, 3, 3]; masked → 0.
    train = f32([[LN2, -LN2, 2 * LN2, 1000.0, 7.0]])
    rollout, mask = f32(np.zeros((1, 5))), f32([[1, 1, 1, 1, 0]])
    close(fn(train, rollout, mask, cap=3.0), [[2.0, 0.5, 3.0, 3.0, 0.0]], atol=1e-6)
    # the weights are constants: no gradient to either log-prob
    g = jax.grad(lambda a, b: jnp.sum(fn(a, b, mask, cap=3.0)), argnums=(0, 1))(train, rollout)
    close(g[0], np.zeros((1, 5)))
    close(g[1], np.zeros((1, 5)))
    with pytest.raises(ValueError, match="cap=0"):
        tis_weights(train, rollout, mask, cap=0.0)


def test_tis_weights_in_the_policy_loss():
    # ρ = 1 (logprobs = old) and Â = 1: ℓₜ = −wₜ, token_mean over 3 valid tokens: −(2 + ½ + 3)/3.
    train = f32([[LN2, -LN2, 2 * LN2, 0.0]])
    rollout, mask = f32(np.zeros((1, 4))), f32([[1, 1, 1, 0]])
    weights = tis_weights(train, rollout, mask, cap=3.0)
    lp = f32([[0.3, -1.0, 0.2, 0.0]])
    out = ppo_policy_loss(lp, lp, f32(np.ones((1, 4))), mask, clip_eps=0.2, weights=weights)
    close(out, -(2.0 + 0.5 + 3.0) / 3, atol=1e-6)


@pytest.mark.parametrize("fn", jit_and_not(logprob_mismatch))
def test_logprob_mismatch_hand(fn):
    # log π_train − log π_rollout = [0.1, −0.3, 0.2 | masked 50]: mean |·| = 0.6/3 = 0.2;
    # max ratio = e^{0.2} (the masked 50 would give e^{20}).
    train, rollout = f32([[0.1, -0.3, 0.2, 50.0]]), f32(np.zeros((1, 4)))
    out = fn(train, rollout, f32([[1, 1, 1, 0]]))
    assert set(out) == {"mean_abs_diff", "max_ratio"}
    close(out["mean_abs_diff"], 0.2, atol=1e-6)
    close(out["max_ratio"], math.exp(0.2), atol=1e-6)
    # identical log-probs: no mismatch
    same = fn(train, train, f32([[1, 1, 1, 1]]))
    close(same["mean_abs_diff"], 0.0)
    close(same["max_ratio"], 1.0)


def test_value_clipping_counts_no_token_inside_the_band():
    """V inside [V_old − ε, V_old + ε] is not clipped, to the bit: V_old + (V − V_old) is not V in
    float32 for this triple (found by search), and once counted it as clipped. 1000 random tokens
    within 0.1 of V_old with ε = 0.2: no clipped token, and the loss is (V − R)² exactly."""
    values, old, returns = (
        jnp.array([x], jnp.float32) for x in (0.04767273, 0.11123639, -0.0013711975)
    )
    assert float((old + (values - old))[0]) != float(values[0])  # the rounding the old form hit
    rng = np.random.default_rng(0)
    v = rng.normal(size=1000).astype(np.float32)
    o = (v + rng.uniform(-0.1, 0.1, 1000)).astype(np.float32)
    r = rng.normal(size=1000).astype(np.float32)
    for v_, o_, r_ in ((values, old, returns), (jnp.asarray(v), jnp.asarray(o), jnp.asarray(r))):
        loss, clipped = value_loss_terms(v_, o_, r_, jnp.ones_like(v_), clip_eps=0.2)
        assert float(jnp.sum(clipped)) == 0.0
        np.testing.assert_array_equal(loss, (v_ - r_) ** 2)

"""Multi-turn episodes: masks with holes (tokens a tool or environment inserted between policy tokens).

The environment's tokens belong to the state, not the actions (the transitions do not depend on θ),
so every function over time must give, at policy tokens, what it gives on the row with its holes
removed, and 0 at masked positions. The oracle here is that compaction, done in NumPy: the
masked-in entries of each row moved to the left (same padded length T, mask = leading ones); the
function runs on both and the compacted result is scattered back to the policy tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_utils import (
    close,
    f32,
    jit_and_not,
    np_discounted_return,
    np_gae,
    np_kl_penalized_rewards,
    np_reward_to_go,
    np_td_error,
    with_garbage,
)

from jaxrlhf.rl import (
    aggregate,
    clipped_surrogate,
    discounted_return,
    gae,
    kl_loss,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss,
    ppo_policy_loss,
    reinforce_pp_advantages,
    reward_to_go,
    td_error,
    value_loss,
)
from jaxrlhf.rl._checks import last_valid_index
from jaxrlhf.rl.kl import KL_KINDS
from jaxrlhf.rl.losses import AGGREGATIONS

T = 16
FIXED_ROWS = [
    [1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # a hole right after the first token
    [1] * T,  # all policy
    [1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0],  # holes of lengths 5, 1, 1
    [1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1],  # ends on policy tokens (no padding)
    [0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # starts with environment tokens
    [1] + [0] * (T - 1),  # one policy token
    [0] * T,  # no policy token
]


def holed_mask(rng, n_random=9):
    """[len(FIXED_ROWS) + n_random, T]: the fixed rows, then random runs of 1–3 policy tokens and
    1–4 environment tokens, ending in padding."""
    rows = [list(r) for r in FIXED_ROWS]
    for _ in range(n_random):
        row = []
        while len(row) < T:
            row += [1] * int(rng.integers(1, 4))
            row += [0] * int(rng.integers(1, 5))
            if rng.random() < 0.15:  # padding from here on
                row += [0] * T
        rows.append(row[:T])
    return np.asarray(rows, np.float32)


def compact(x, mask):
    """Each row's masked-in entries moved to the left, zeros after them (NumPy, row by row)."""
    x, mask = np.asarray(x, np.float32), np.asarray(mask)
    flat_x, flat_m = x.reshape(-1, x.shape[-1]), mask.reshape(-1, mask.shape[-1])
    out = np.zeros_like(flat_x)
    for i in range(flat_x.shape[0]):
        kept = flat_x[i][flat_m[i] > 0]
        out[i, : kept.size] = kept
    return out.reshape(x.shape)


def compact_mask(mask):
    return compact(np.ones_like(mask), mask)


def scatter(y_compact, mask):
    """Inverse of ``compact`` at the policy tokens: compacted entries back in place, 0 elsewhere."""
    y, mask = np.asarray(y_compact, np.float64), np.asarray(mask)
    flat_y, flat_m = y.reshape(-1, y.shape[-1]), mask.reshape(-1, mask.shape[-1])
    out = np.zeros_like(flat_y)
    for i in range(flat_y.shape[0]):
        n = int(flat_m[i].sum())
        out[i][flat_m[i] > 0] = flat_y[i, :n]
    return out.reshape(y.shape)


def make_batch(seed, batch_shape=None):
    """(per-token inputs {name: [..., T]} with garbage where masked, mask, scores [...])."""
    rng = np.random.default_rng(seed)
    mask = holed_mask(rng)
    shape = mask.shape
    old = rng.standard_normal(shape) - 1.0
    raw = {
        "rewards": rng.standard_normal(shape),
        "values": rng.standard_normal(shape),
        "old_values": rng.standard_normal(shape),
        "returns": rng.standard_normal(shape),
        "logprobs": old + 0.3 * rng.standard_normal(shape),  # ratios inside and outside the clip
        "old_logprobs": old,
        "advantages": rng.standard_normal(shape),
        "weights": rng.uniform(0.5, 2.0, shape),
        "entropy": rng.uniform(0.0, 3.0, shape),
    }
    inputs = {k: with_garbage(v, mask, rng) for k, v in raw.items()}
    scores = rng.standard_normal(shape[:-1]).astype(np.float32)
    if batch_shape is not None:
        inputs = {k: v.reshape(*batch_shape, T) for k, v in inputs.items()}
        mask, scores = mask.reshape(*batch_shape, T), scores.reshape(batch_shape)
    return inputs, mask, scores


def cases(gamma, lam):
    """name → fn(inputs dict, mask, scores) → pytree; per-token leaves have the mask's shape."""
    g = {"gamma": gamma}
    return {
        "td_error": lambda x, m, s: td_error(x["rewards"], x["values"], m, **g),
        "gae": lambda x, m, s: gae(x["rewards"], x["values"], m, gamma=gamma, lam=lam),
        "reward_to_go": lambda x, m, s: reward_to_go(x["rewards"], m, **g),
        "discounted_return": lambda x, m, s: discounted_return(x["rewards"], m, **g),
        "reinforce_pp": lambda x, m, s: reinforce_pp_advantages(x["rewards"], m, **g),
        "kl_penalized_rewards": lambda x, m, s: [
            kl_penalized_rewards(s, x["logprobs"], x["old_logprobs"], m, kl_coef=0.1, kind=k)
            for k in KL_KINDS
        ],
        "kl_loss": lambda x, m, s: [
            kl_loss(x["logprobs"], x["old_logprobs"], m, kind=k) for k in KL_KINDS
        ],
        "masked_stats": lambda x, m, s: [
            masked_mean(x["rewards"], m),
            masked_mean(x["rewards"], m, axis=-1),
            masked_var(x["rewards"], m),
            masked_whiten(x["rewards"], m),
            masked_whiten(x["rewards"], m, shift_mean=False),
        ],
        "aggregate": lambda x, m, s: [
            aggregate(x["rewards"], m, aggregation=a) for a in AGGREGATIONS
        ],
        "clipped_surrogate": lambda x, m, s: [
            clipped_surrogate(
                x["logprobs"],
                x["old_logprobs"],
                x["advantages"],
                m,
                clip_eps=0.2,
                clip_eps_high=0.28,
                importance_level=level,
                weights=w,
            )
            for level in ("token", "sequence")
            for w in (None, x["weights"])
        ],
        "ppo_policy_loss": lambda x, m, s: [
            ppo_policy_loss(
                x["logprobs"],
                x["old_logprobs"],
                x["advantages"],
                m,
                clip_eps=0.2,
                importance_level=level,
                aggregation=a,
            )
            for level in ("token", "sequence")
            for a in AGGREGATIONS
        ],
        "value_loss": lambda x, m, s: [
            value_loss(x["values"], x["old_values"], x["returns"], m, clip_eps=eps, aggregation=a)
            for eps in (None, 0.2)
            for a in AGGREGATIONS
        ],
        "ppo_loss": lambda x, m, s: ppo_loss(
            *(x[k] for k in ("logprobs", "old_logprobs", "advantages", "values", "old_values")),
            x["returns"],
            m,
            x["entropy"],
            clip_eps=0.2,
            value_clip_eps=0.2,
            ent_coef=0.01,
        ),
    }


CASE_NAMES = list(cases(1.0, 1.0))
GAMMA_LAM = [(1.0, 1.0), (0.9, 0.95), (0.9, 1.0), (0.5, 0.0)]


def assert_hole_removal_identity(out_holed, out_compact, mask, atol=2e-5):
    for a, b in zip(jax.tree.leaves(out_holed), jax.tree.leaves(out_compact), strict=True):
        a = np.asarray(a)
        if a.shape == mask.shape:  # per token: the compacted values at the policy tokens, 0 else
            close(a, scatter(b, mask), atol=atol)
            assert np.all(a[np.asarray(mask) == 0] == 0)
        else:  # per row or scalar
            close(a, np.asarray(b, np.float64), atol=atol)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_hole_removal_identity(name, gamma, lam, use_jit):
    fn = cases(gamma, lam)[name]
    fn = jax.jit(fn) if use_jit else fn
    inputs, mask, scores = make_batch(seed=CASE_NAMES.index(name))
    compacted = {k: f32(compact(v, mask)) for k, v in inputs.items()}
    out_holed = fn({k: f32(v) for k, v in inputs.items()}, f32(mask), f32(scores))
    out_compact = fn(compacted, f32(compact_mask(mask)), f32(scores))
    assert_hole_removal_identity(out_holed, out_compact, mask)


@pytest.mark.parametrize("name", ["gae", "kl_penalized_rewards", "clipped_surrogate", "aggregate"])
def test_hole_removal_identity_leading_axes(name):
    # [4, 4, T]: the leading axes are rows like any other.
    fn = cases(0.9, 0.95)[name]
    inputs, mask, scores = make_batch(seed=40, batch_shape=(4, 4))
    compacted = {k: f32(compact(v, mask)) for k, v in inputs.items()}
    out_holed = fn({k: f32(v) for k, v in inputs.items()}, f32(mask), f32(scores))
    out_compact = fn(compacted, f32(compact_mask(mask)), f32(scores))
    assert_hole_removal_identity(out_holed, out_compact, mask)


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_gradients_obey_the_hole_removal_identity(gamma, lam):
    # ∂L/∂x at policy tokens equals the compacted row's gradient there; 0 at masked positions.
    inputs, mask, scores = make_batch(seed=41)
    cot = np.random.default_rng(0).standard_normal(mask.shape).astype(np.float32)

    def loss(x, m, cot):
        adv, ret = gae(x["rewards"], x["values"], m, gamma=gamma, lam=lam)
        rewards = kl_penalized_rewards(scores, x["logprobs"], x["old_logprobs"], m, kl_coef=0.1)
        policy = ppo_policy_loss(x["logprobs"], x["old_logprobs"], adv, m, clip_eps=0.2)
        return jnp.sum(cot * (adv + ret + rewards)) + policy

    grad = jax.jit(jax.grad(loss))
    holed = grad({k: f32(v) for k, v in inputs.items()}, f32(mask), f32(cot))
    comp = grad(
        {k: f32(compact(v, mask)) for k, v in inputs.items()},
        f32(compact_mask(mask)),
        f32(compact(cot, mask)),
    )
    for k in ("rewards", "values", "logprobs", "old_logprobs"):
        assert_hole_removal_identity(holed[k], comp[k], mask, atol=1e-4)


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_returns_match_numpy_oracles_on_compacted_rows(gamma, lam):
    # The rl_utils loops (written for one run of 1s) on the compacted rows, scattered back.
    inputs, mask, scores = make_batch(seed=42)
    r, v = inputs["rewards"], inputs["values"]
    cr, cv, cm = compact(r, mask), compact(v, mask), compact_mask(mask)
    close(
        td_error(f32(r), f32(v), f32(mask), gamma=gamma),
        scatter(np_td_error(cr, cv, cm, gamma), mask),
    )
    adv, ret = gae(f32(r), f32(v), f32(mask), gamma=gamma, lam=lam)
    np_adv, np_ret = np_gae(cr, cv, cm, gamma, lam)
    close(adv, scatter(np_adv, mask), atol=1e-5)
    close(ret, scatter(np_ret, mask), atol=1e-5)
    rtg = reward_to_go(f32(r), f32(mask), gamma=gamma)
    close(rtg, scatter(np_reward_to_go(cr, cm, gamma), mask), atol=1e-5)
    ret0 = discounted_return(f32(r), f32(mask), gamma=gamma)
    close(ret0, np_discounted_return(cr, cm, gamma), atol=1e-5)
    lp, ref = inputs["logprobs"], inputs["old_logprobs"]
    for kind in KL_KINDS:
        out = kl_penalized_rewards(
            f32(scores), f32(lp), f32(ref), f32(mask), kl_coef=0.1, kind=kind
        )
        expected = np_kl_penalized_rewards(
            scores, compact(lp, mask), compact(ref, mask), cm, 0.1, kind
        )
        close(out, scatter(expected, mask), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Hand values: mask [1, 1, 0, 0, 1, 0] (policy, policy, tool, tool, policy, padding), γ = 0.5.
# ---------------------------------------------------------------------------------------------

HAND_MASK = [[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]]
HAND_R = [[1.0, 2.0, 50.0, 60.0, 3.0, 70.0]]  # the entries at masked positions are ignored
HAND_V = [[0.5, 1.0, 9.0, 9.0, 2.0, 9.0]]
# The policy's steps are t = 0, 1, 4; the tool's tokens 2, 3 are the transition s₁ → s₄.
# δ₀ = r₀ + γ V₁ − V₀ = 1 + 0.5·1 − 0.5 = 1
# δ₁ = r₁ + γ V₄ − V₁ = 2 + 0.5·2 − 1 = 2      (V at the next *policy* token, not 0, not 9)
# δ₄ = r₄ + γ·0 − V₄ = 3 − 2 = 1               (terminal after the last policy token)
HAND_DELTA = [[1.0, 2.0, 0.0, 0.0, 1.0, 0.0]]
# λ = 1, γλ = 0.5: Â₄ = 1;  Â₁ = 2 + 0.5·1 = 2.5;  Â₀ = 1 + 0.5·2.5 = 2.25
HAND_ADV = [[2.25, 2.5, 0.0, 0.0, 1.0, 0.0]]
# R = Â + V = [2.75, 3.5, ·, ·, 3] = the reward-to-go: G₄ = 3, G₁ = 2 + 0.5·3, G₀ = 1 + 0.5·3.5
HAND_RET = [[2.75, 3.5, 0.0, 0.0, 3.0, 0.0]]
# discounted return: 1 + 0.5·2 + 0.5²·3 = 2.75 (γ once per policy step: not 0.5⁴·3)


@pytest.mark.parametrize("fn", jit_and_not(gae, "gamma", "lam"))
def test_gae_hand_with_a_hole(fn):
    close(td_error(f32(HAND_R), f32(HAND_V), f32(HAND_MASK), gamma=0.5), HAND_DELTA)
    adv, ret = fn(f32(HAND_R), f32(HAND_V), f32(HAND_MASK), gamma=0.5, lam=1.0)
    close(adv, HAND_ADV)
    close(ret, HAND_RET)


@pytest.mark.parametrize("fn", jit_and_not(reward_to_go, "gamma"))
def test_reward_to_go_and_return_hand_with_a_hole(fn):
    close(fn(f32(HAND_R), f32(HAND_MASK), gamma=0.5), HAND_RET)
    close(discounted_return(f32(HAND_R), f32(HAND_MASK), gamma=0.5), [2.75])


@pytest.mark.parametrize("fn", jit_and_not(kl_penalized_rewards, "kl_coef", "kind"))
def test_kl_penalized_rewards_hand_with_a_hole(fn):
    # k1, β = 0.1, ℓ = [0.2, −0.4, ·, ·, 1]: r = [−0.02, 0.04, 0, 0, −0.1 + 5, 0]; the score lands
    # on t = 4, the last policy token (Σ mask − 1 = 2 would be a tool token).
    logprobs = f32([[0.2, -0.4, 7.0, 7.0, 1.0, 7.0]])
    out = fn(f32([5.0]), logprobs, jnp.zeros_like(logprobs), f32(HAND_MASK), kl_coef=0.1, kind="k1")
    close(out, [[-0.02, 0.04, 0.0, 0.0, 4.9, 0.0]])


def test_last_valid_index_is_the_last_one():
    mask = f32([[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1]])
    np.testing.assert_array_equal(last_valid_index(mask), [4, 2, -1, 5])
    np.testing.assert_array_equal(jax.jit(last_valid_index)(mask), [4, 2, -1, 5])
    assert last_valid_index(jnp.zeros((2, 0))).tolist() == [-1, -1]


# ---------------------------------------------------------------------------------------------
# Whatever sits in a hole (1e30, inf, nan) changes no result and no gradient.
# ---------------------------------------------------------------------------------------------


def _poisoned(inputs, mask, value):
    return {
        k: np.where(mask > 0, v, np.float32(value)).astype(np.float32) for k, v in inputs.items()
    }


@pytest.mark.parametrize("poison", [1e30, -1e30, np.inf, np.nan])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_values_in_holes_change_nothing(name, poison):
    fn = cases(0.9, 0.95)[name]
    inputs, mask, scores = make_batch(seed=43)
    clean, dirty = _poisoned(inputs, mask, 0.0), _poisoned(inputs, mask, poison)
    cot = np.random.default_rng(1).standard_normal(mask.shape).astype(np.float32)

    def scalar(x):
        out = fn(x, f32(mask), f32(scores))
        leaves = jax.tree.leaves(out)
        return sum(jnp.sum(o * (cot if o.shape == mask.shape else 1.0)) for o in leaves)

    probe = jax.jit(lambda x: (fn(x, f32(mask), f32(scores)), jax.grad(scalar)(x)))
    (out_clean, grad_clean), (out_dirty, grad_dirty) = probe(clean), probe(dirty)
    for a, b in zip(jax.tree.leaves(out_clean), jax.tree.leaves(out_dirty), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in inputs:
        g = np.asarray(grad_dirty[k])
        assert np.all(np.isfinite(g)), k
        assert np.all(g[mask == 0] == 0), k
        np.testing.assert_array_equal(g, np.asarray(grad_clean[k]))

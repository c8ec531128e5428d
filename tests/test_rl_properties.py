"""Properties of every masked function of jaxrlhf.rl, and gradients against finite differences.

1. Whatever finite values (up to ±3.4e38, float32's largest) sit at masked positions, no output and
   no gradient changes: per-token outputs are 0 there, gradients are 0 there and unchanged elsewhere.
2. Extra trailing padding (more masked steps, holding garbage) changes no output and no gradient.
3. The losses' gradients match central finite differences.
"""

import functools

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from rl_utils import check_grads_fd, lengths_to_mask

from jaxrlhf.rl import (
    approx_kl,
    bradley_terry_loss,
    clip_fraction,
    discounted_return,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss,
    ppo_policy_loss,
    reward_to_go,
    td_error,
    token_entropy,
    token_logprobs,
    trajectory_logprob,
    value_loss,
)

B, T, PAD = 3, 5, 3
SCORES = jnp.asarray([1.5, -0.5, 2.0], jnp.float32)  # [B], for kl_penalized_rewards

# name → (fn(*float_inputs [B, T], mask) → output pytree, number of float inputs, differentiate?)
CASES = {
    "trajectory_logprob": (trajectory_logprob, 1, True),
    "discounted_return": (lambda r, m: discounted_return(r, m, gamma=0.9), 1, True),
    "reward_to_go": (lambda r, m: reward_to_go(r, m, gamma=0.9), 1, True),
    "td_error": (lambda r, v, m: td_error(r, v, m, gamma=0.9), 2, True),
    "gae": (lambda r, v, m: gae(r, v, m, gamma=0.9, lam=0.95), 2, True),
    "masked_mean": (lambda x, m: (masked_mean(x, m), masked_mean(x, m, axis=-1)), 1, True),
    "masked_var": (masked_var, 1, True),
    "masked_whiten": (masked_whiten, 1, True),
    "ppo_policy_loss": (
        lambda lp, o, a, m: tuple(
            ppo_policy_loss(lp, o, a, m, clip_eps=0.2, aggregation=agg)
            for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
        ),
        3,
        True,
    ),
    "value_loss": (
        lambda v, o, r, m: (value_loss(v, o, r, m), value_loss(v, o, r, m, clip_eps=0.2)),
        3,
        True,
    ),
    "ppo_loss": (
        lambda lp, o, a, v, ov, r, h, m: ppo_loss(
            lp,
            o,
            a,
            v,
            ov,
            r,
            m,
            h,
            clip_eps=0.2,
            value_clip_eps=0.2,
            vf_coef=0.5,
            ent_coef=0.01,
        ),
        7,
        True,
    ),
    "kl_penalized_rewards": (
        lambda lp, ref, m: tuple(
            kl_penalized_rewards(SCORES, lp, ref, m, kl_coef=0.1, kind=kind)
            for kind in ("k1", "k2", "k3")
        ),
        2,
        True,
    ),
    "clip_fraction": (lambda lp, o, m: clip_fraction(lp, o, m, clip_eps=0.2), 2, False),
    "approx_kl": (approx_kl, 2, True),
    "explained_variance": (explained_variance, 2, True),
}


def _cotangent(shape):
    """A fixed, position-dependent cotangent c[b, t] = 1.5 + cos(0.7t + 1.3b) (b: row index)."""
    if not shape:
        return jnp.ones((), jnp.float32)
    lead = int(np.prod(shape[:-1], dtype=int))
    b = jnp.arange(lead, dtype=jnp.float32).reshape(shape[:-1] + (1,))
    t = jnp.arange(shape[-1], dtype=jnp.float32)
    return 1.5 + jnp.cos(0.7 * t + 1.3 * b)


@functools.cache
def _probe(name):
    """jit(inputs, mask → (outputs, gradients of Σ c·outputs w.r.t. every float input))."""
    fn, _, differentiable = CASES[name]

    def probe(floats, mask):
        def scalar(floats):
            out = fn(*floats, mask)
            return sum(jnp.sum(o * _cotangent(o.shape)) for o in jax.tree.leaves(out))

        out = fn(*floats, mask)
        grads = jax.grad(scalar)(floats) if differentiable else ()
        return out, grads

    return jax.jit(probe)


def _assert_tree_close(actual, expected, what):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert np.all(np.isfinite(a)), f"{what}: non-finite values {a}"
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6, err_msg=what)


F32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e38
finite_f32 = st.floats(-F32_MAX, F32_MAX, width=32, allow_nan=False, allow_infinity=False)
moderate_f32 = st.floats(-2.0, 2.0, width=32)


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_garbage_at_masked_positions_changes_nothing(name, data):
    n = CASES[name][1]
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B), label="lengths")
    valid = data.draw(hnp.arrays(np.float32, (n, B, T), elements=moderate_f32), label="valid")
    garbage = data.draw(hnp.arrays(np.float32, (n, B, T), elements=finite_f32), label="garbage")
    mask = lengths_to_mask(lengths, T)  # [B, T]
    clean = tuple(jnp.asarray(x * mask) for x in valid)  # zeros at masked positions
    dirty = tuple(jnp.asarray(np.where(mask > 0, x, g)) for x, g in zip(valid, garbage))
    probe = _probe(name)
    out_clean, grads_clean = probe(clean, jnp.asarray(mask))
    out_dirty, grads_dirty = probe(dirty, jnp.asarray(mask))
    _assert_tree_close(out_dirty, out_clean, f"{name} output")
    _assert_tree_close(grads_dirty, grads_clean, f"{name} gradient")
    for g in jax.tree.leaves(grads_dirty):  # no gradient flows into masked positions
        assert np.all(np.asarray(g)[mask == 0] == 0.0), name


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_trailing_padding_changes_nothing(name, data):
    n = CASES[name][1]
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B), label="lengths")
    valid = data.draw(hnp.arrays(np.float32, (n, B, T), elements=moderate_f32), label="valid")
    extra = data.draw(hnp.arrays(np.float32, (n, B, PAD), elements=finite_f32), label="padding")
    mask = lengths_to_mask(lengths, T)
    short = tuple(jnp.asarray(x * mask) for x in valid)
    padded_mask = np.concatenate([mask, np.zeros((B, PAD), np.float32)], axis=-1)  # [B, T+PAD]
    long = tuple(jnp.asarray(np.concatenate([x * mask, e], axis=-1)) for x, e in zip(valid, extra))
    probe = _probe(name)
    out_short, grads_short = probe(short, jnp.asarray(mask))
    out_long, grads_long = probe(long, jnp.asarray(padded_mask))

    def cut(tree):  # per-token arrays [B, T+PAD] → [B, T], after checking the padding part is 0
        def one(x):
            x = np.asarray(x)
            if x.shape[-1:] == (T + PAD,):
                assert np.all(x[..., T:] == 0.0), f"{name}: nonzero at padding"
                return x[..., :T]
            return x

        return jax.tree.map(one, tree)

    _assert_tree_close(cut(out_long), out_short, f"{name} output")
    _assert_tree_close(cut(grads_long), grads_short, f"{name} gradient")


# ---------------------------------------------------------------------------------------------
# Gradients of the losses against central finite differences (float32: ε = 1e-3, tolerance 1e-2).
# Inputs keep every ratio ρ at least 0.05 away from the clip edges 1 ± ε, so no kink is crossed.
# ---------------------------------------------------------------------------------------------


def _fd_inputs():
    rng = np.random.default_rng(0)
    mask = lengths_to_mask([5, 3, 1], T)
    old = rng.standard_normal((B, T)).astype(np.float32)
    # log-ratios from {−0.5, −0.1, 0.05, 0.4}: ρ ≈ 0.61, 0.90, 1.05, 1.49 (ε = 0.2 edges 0.8, 1.2)
    logprobs = old + rng.choice([-0.5, -0.1, 0.05, 0.4], size=(B, T)).astype(np.float32)
    adv = rng.standard_normal((B, T)).astype(np.float32)
    return [jnp.asarray(x) for x in (logprobs, old, adv, mask)]


def _check(f, args):
    check_grads_fd(f, args, eps=1e-3, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_policy_loss_gradient_finite_differences(aggregation):
    logprobs, old, adv, mask = _fd_inputs()
    _check(
        lambda lp: ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2, aggregation=aggregation),
        (logprobs,),
    )


def test_value_and_ppo_loss_gradients_finite_differences():
    rng = np.random.default_rng(1)
    logprobs, old, adv, mask = _fd_inputs()
    old_values = jnp.asarray(rng.standard_normal((B, T)), jnp.float32)
    # V − V_old from {−0.5, −0.1, 0.1, 0.5}: away from the value-clip edges ±0.2
    values = old_values + jnp.asarray(rng.choice([-0.5, -0.1, 0.1, 0.5], size=(B, T)), jnp.float32)
    returns = jnp.asarray(rng.standard_normal((B, T)), jnp.float32)
    entropy = jnp.asarray(rng.uniform(0.5, 1.5, (B, T)), jnp.float32)
    for clip_eps in (None, 0.2):
        _check(
            lambda v, c=clip_eps: value_loss(v, old_values, returns, mask, clip_eps=c), (values,)
        )

    def total(lp, v, h):
        loss, _ = ppo_loss(
            lp,
            old,
            adv,
            v,
            old_values,
            returns,
            mask,
            h,
            clip_eps=0.2,
            value_clip_eps=0.2,
            vf_coef=0.5,
            ent_coef=0.01,
        )
        return loss

    _check(total, (logprobs, values, entropy))


def test_bradley_terry_and_kl_gradients_finite_differences():
    rng = np.random.default_rng(2)
    chosen, rejected = (jnp.asarray(rng.standard_normal(4) * 2, jnp.float32) for _ in range(2))
    _check(lambda c, r: bradley_terry_loss(c, r, margin=0.5), (chosen, rejected))
    logprobs, ref, _, mask = _fd_inputs()
    for kind in ("k1", "k2", "k3"):
        _check(
            lambda lp, k=kind: kl_penalized_rewards(SCORES, lp, ref, mask, kl_coef=0.1, kind=k),
            (logprobs,),
        )


def test_logits_to_loss_gradient_finite_differences():
    # The actor's path: logits → token_logprobs / token_entropy → ppo_loss.
    rng = np.random.default_rng(3)
    _, _, adv, mask = _fd_inputs()
    logits = jnp.asarray(rng.standard_normal((B, T, 4)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 4, size=(B, T)), jnp.int32)
    # ρ = e^{0.3} ≈ 1.35 at θ: clipped where Â > 0, unclipped where Â < 0, far from the edge 1.2
    old = token_logprobs(logits, tokens, temperature=0.9) - 0.3
    zeros = jnp.zeros((B, T), jnp.float32)

    def total(z):
        loss, _ = ppo_loss(
            token_logprobs(z, tokens, temperature=0.9),
            old,
            adv,
            zeros,
            zeros,
            zeros,
            mask,
            token_entropy(z, temperature=0.9),
            clip_eps=0.2,
            vf_coef=0.5,
            ent_coef=0.05,
        )
        return loss

    _check(total, (logits,))

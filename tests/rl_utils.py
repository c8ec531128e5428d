"""Shared helpers for the tests of jaxrlhf.rl: jit/eager parametrization, masked batches, NumPy oracles.

The NumPy oracles below are deliberately written as plain Python loops over rows and time steps,
the way the equations read on paper, so that they share no code (and no vectorization trick) with
jaxrlhf.rl. They work in float64.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

# Absolute/relative tolerances for float32 results compared with float64 oracles.
ATOL = 1e-5
RTOL = 1e-5


def jit_and_not(fn, *static_argnames):
    """[fn, jax.jit(fn)] as pytest params, so every hand-derived test runs both eagerly and jitted.

    Keyword hyperparameters (γ, λ, ε, kind, aggregation, ...) are static under jit: strings and None
    must be, and the trainer closes over the floats as constants anyway.
    """
    return [
        pytest.param(fn, id="eager"),
        pytest.param(jax.jit(fn, static_argnames=static_argnames), id="jit"),
    ]


def f32(x):
    return jnp.asarray(x, dtype=jnp.float32)


def close(actual, expected, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Random masked batches (right padding: 1s then 0s), with optional garbage at masked positions.
# ---------------------------------------------------------------------------------------------


def lengths_to_mask(lengths, T):
    """lengths [...] ints → mask [..., T] float32 with `length` leading ones."""
    lengths = np.asarray(lengths)
    return (np.arange(T) < lengths[..., None]).astype(np.float32)


def random_mask(rng: np.random.Generator, batch_shape, T, min_len=1):
    lengths = rng.integers(min_len, T + 1, size=batch_shape)
    return lengths_to_mask(lengths, T)


def with_garbage(x, mask, rng: np.random.Generator, scale=1e6):
    """x with every masked position overwritten by a large random finite value."""
    x = np.array(x, dtype=np.float32)
    garbage = (rng.standard_normal(x.shape) * scale).astype(np.float32)
    return np.where(np.asarray(mask) > 0, x, garbage).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# NumPy loop oracles (float64). Inputs are numpy-able arrays with time on the last axis.
# ---------------------------------------------------------------------------------------------


def _rows(x):
    """Flatten leading axes: [..., T] → [N, T] (float64)."""
    x = np.asarray(x, np.float64)
    return x.reshape(-1, x.shape[-1])


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_token_logprobs(logits, tokens, temperature=1.0):
    logp = np_log_softmax(np.asarray(logits, np.float64) / temperature)  # [..., T, V]
    return np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1)[..., 0]


def np_token_entropy(logits, temperature=1.0):
    logp = np_log_softmax(np.asarray(logits, np.float64) / temperature)
    return -(np.exp(logp) * logp).sum(axis=-1)


def np_reward_to_go(rewards, mask, gamma):
    r, m = _rows(rewards), _rows(mask)
    out = np.zeros_like(r)
    for i in range(r.shape[0]):
        for t in range(r.shape[1]):
            if m[i, t]:
                out[i, t] = sum(gamma ** (k - t) * r[i, k] for k in range(t, r.shape[1]) if m[i, k])
    return out.reshape(np.shape(rewards))


def np_discounted_return(rewards, mask, gamma):
    r, m = _rows(rewards), _rows(mask)
    out = np.array(
        [sum(gamma**t * r[i, t] for t in range(r.shape[1]) if m[i, t]) for i in range(r.shape[0])]
    )
    return out.reshape(np.shape(rewards)[:-1])


def np_td_error(rewards, values, mask, gamma):
    r, v, m = _rows(rewards), _rows(values), _rows(mask)
    out = np.zeros_like(r)
    T = r.shape[1]
    for i in range(r.shape[0]):
        for t in range(T):
            if m[i, t]:
                next_v = v[i, t + 1] if t + 1 < T and m[i, t + 1] else 0.0  # terminal → 0
                out[i, t] = r[i, t] + gamma * next_v - v[i, t]
    return out.reshape(np.shape(rewards))


def np_gae(rewards, values, mask, gamma, lam):
    """Âₜ = Σ_{k≥t} (γλ)^{k−t} δ_k over valid steps (the closed form, not the recursion)."""
    delta = _rows(np_td_error(rewards, values, mask, gamma))
    m = _rows(mask)
    adv = np.zeros_like(delta)
    T = delta.shape[1]
    for i in range(delta.shape[0]):
        for t in range(T):
            if m[i, t]:
                adv[i, t] = sum(
                    (gamma * lam) ** (k - t) * delta[i, k] for k in range(t, T) if m[i, k]
                )
    adv = adv.reshape(np.shape(rewards))
    ret = (adv + np.asarray(values, np.float64)) * np.asarray(mask, np.float64)
    return adv, ret


def np_kl(logprobs, ref_logprobs, kind):
    log_ratio = np.asarray(logprobs, np.float64) - np.asarray(ref_logprobs, np.float64)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return np.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(kind)


def np_kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kind="k1"):
    kl = _rows(np_kl(logprobs, ref_logprobs, kind))
    m = _rows(mask)
    s = np.asarray(scores, np.float64).reshape(-1)
    out = np.zeros_like(kl)
    for i in range(kl.shape[0]):
        last = None
        for t in range(kl.shape[1]):
            if m[i, t]:
                out[i, t] = -kl_coef * kl[i, t]
                last = t
        if last is not None:
            out[i, last] += s[i]
    return out.reshape(np.shape(logprobs))


def np_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, aggregation="token_mean"):
    lp, olp, a, m = _rows(logprobs), _rows(old_logprobs), _rows(advantages), _rows(mask)
    per_row_sum, per_row_count = [], []
    for i in range(lp.shape[0]):
        s, n = 0.0, 0
        for t in range(lp.shape[1]):
            if m[i, t]:
                ratio = math.exp(lp[i, t] - olp[i, t])
                clipped = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
                s += -min(ratio * a[i, t], clipped * a[i, t])
                n += 1
        per_row_sum.append(s)
        per_row_count.append(n)
    if aggregation == "token_mean":
        return sum(per_row_sum) / sum(per_row_count)
    if aggregation == "seq_mean_token_mean":
        return float(np.mean([s / n for s, n in zip(per_row_sum, per_row_count)]))
    if aggregation == "seq_mean_token_sum":
        return float(np.mean(per_row_sum))
    raise ValueError(aggregation)


def np_value_loss(values, old_values, returns, mask, clip_eps=None):
    v, ov, r, m = _rows(values), _rows(old_values), _rows(returns), _rows(mask)
    total, n = 0.0, 0
    for i in range(v.shape[0]):
        for t in range(v.shape[1]):
            if m[i, t]:
                loss = (v[i, t] - r[i, t]) ** 2
                if clip_eps is not None:
                    vc = min(max(v[i, t], ov[i, t] - clip_eps), ov[i, t] + clip_eps)
                    loss = max(loss, (vc - r[i, t]) ** 2)
                total += loss
                n += 1
    return total / n


def np_masked_mean(x, mask):
    x, m = np.asarray(x, np.float64), np.asarray(mask, np.float64)
    return float((x * m).sum() / m.sum())


# ---------------------------------------------------------------------------------------------
# rlax oracles. rlax works on one unbatched, unmasked sequence in Sutton & Barto's convention:
# discount_t is the discount applied *after* step t and `values` carries one extra bootstrap value.
# A right-padded row of length L becomes: discount_t = γ·mask_{t+1} (0 after the last valid step,
# i.e. a terminal), bootstrap value 0, and zeros at padded steps (which then contribute nothing).
# ---------------------------------------------------------------------------------------------


def _next_mask(mask):
    """mask_{t+1}, with 0 after the final step: [..., T]."""
    mask = jnp.asarray(mask, jnp.float32)
    return jnp.concatenate([mask[..., 1:], jnp.zeros_like(mask[..., :1])], axis=-1)


@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def rlax_gae(rewards, values, mask, *, gamma, lam):
    """Advantages and returns from rlax.truncated_generalized_advantage_estimation, row by row."""
    mask = jnp.asarray(mask, jnp.float32)
    r = jnp.asarray(rewards, jnp.float32) * mask  # [N, T]
    v = jnp.asarray(values, jnp.float32) * mask  # [N, T]
    discount = gamma * _next_mask(mask)  # [N, T]
    v_boot = jnp.concatenate([v, jnp.zeros_like(v[:, :1])], axis=-1)  # [N, T+1]
    adv = jax.vmap(
        lambda r_, d_, v_: rlax.truncated_generalized_advantage_estimation(r_, d_, lam, v_)
    )(r, discount, v_boot)
    adv = adv * mask
    return adv, (adv + v) * mask


@functools.partial(jax.jit, static_argnames="gamma")
def rlax_reward_to_go(rewards, mask, *, gamma):
    mask = jnp.asarray(mask, jnp.float32)
    r = jnp.asarray(rewards, jnp.float32) * mask
    discount = gamma * _next_mask(mask)
    g = jax.vmap(lambda r_, d_: rlax.discounted_returns(r_, d_, jnp.zeros(())))(r, discount)
    return g * mask


# ---------------------------------------------------------------------------------------------
# Gradients against central finite differences, in float32, compiled once.
# ---------------------------------------------------------------------------------------------


def check_grads_fd(f, args, *, eps=1e-3, rtol=1e-2, atol=1e-3, n_directions=3, seed=0):
    """Assert ⟨∇f(x), d⟩ == (f(x + εd) − f(x − εd)) / 2ε along a few random directions d.

    f may return any array: it is reduced with a fixed random cotangent c to Σ c·f(x). All the
    evaluations happen in one jitted function (one compilation), in float32; ε = 1e-3 keeps the
    round-off error (≈ 1e-7·|f|/ε) and the truncation error (≈ ε²·|f'''|) both near 1e-4.
    """
    args = tuple(jnp.asarray(a, jnp.float32) for a in args)
    rng = np.random.default_rng(seed)
    out_shape = jax.eval_shape(f, *args).shape
    cot = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    dirs = [tuple(jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in args)]
    for _ in range(n_directions - 1):
        dirs.append(tuple(jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in args))

    def scalar(*xs):
        return jnp.sum(f(*xs) * cot)

    @jax.jit
    def both(args, dirs):
        grads = jax.grad(scalar, argnums=tuple(range(len(args))))(*args)
        auto, numeric = [], []
        for d in dirs:
            auto.append(sum(jnp.vdot(g, di) for g, di in zip(grads, d)))
            plus = scalar(*(a + eps * di for a, di in zip(args, d)))
            minus = scalar(*(a - eps * di for a, di in zip(args, d)))
            numeric.append((plus - minus) / (2 * eps))
        return jnp.stack(auto), jnp.stack(numeric), grads

    auto, numeric, grads = both(args, dirs)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(auto), np.asarray(numeric), rtol=rtol, atol=atol)
    return grads

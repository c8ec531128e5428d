"""The policy-gradient theorem, checked exactly on a policy small enough to enumerate.

Policy: vocab {0 = EOS, 1, 2}, horizon 3, a softmax over a logits table θ[t, previous token, a]
(previous token 3 stands for BOS). A trajectory stops at its first EOS (the EOS is a valid token,
mask 1; later steps are padding, mask 0), so there are 1 + 2 + 2·2·3 = 15 distinct trajectories.

J(θ) = E_τ[R(τ)] = Σ_τ P(τ|θ) R(τ) is computed exactly and differentiated by jax.grad. The score-
function estimators, written with jaxrlhf.rl, must give the same vector:
    ∇J = Σ_τ P(τ) R(τ) ∇ log P(τ)                         (log P from trajectory_logprob)
       = Σ_τ P(τ) Σₜ γᵗ Gₜ ∇ log π(aₜ|sₜ)                 (reward_to_go: causality)
       = Σ_τ P(τ) Σₜ γᵗ (Gₜ − b(sₜ)) ∇ log π(aₜ|sₜ)        (any state baseline: unbiased)
while a baseline that depends on the action aₜ changes it (the test can tell the difference).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_utils import close

from jaxrlhf.rl import (
    discounted_return,
    ppo_policy_loss,
    reward_to_go,
    token_logprobs,
    trajectory_logprob,
)

EOS, BOS, V, T = 0, 3, 3, 3


def _trajectories():
    """tokens [15, 3] int32 (EOS-padded after the first EOS), mask [15, 3], prev tokens [15, 3]."""
    seqs = set()
    for seq in itertools.product(range(V), repeat=T):
        seq = list(seq)
        if EOS in seq:
            first = seq.index(EOS)
            seq = seq[: first + 1] + [EOS] * (T - first - 1)
        seqs.add(tuple(seq))
    tokens = np.array(sorted(seqs), np.int32)
    mask = np.zeros(tokens.shape, np.float32)
    for i, seq in enumerate(tokens):
        n = list(seq).index(EOS) + 1 if EOS in seq else T
        mask[i, :n] = 1.0
    prev = np.concatenate([np.full((len(tokens), 1), BOS, np.int32), tokens[:, :-1]], axis=1)
    return tokens, mask, prev


TOKENS, MASK, PREV = _trajectories()
STEPS = np.broadcast_to(np.arange(T), TOKENS.shape)


def _setup(seed):
    rng = np.random.default_rng(seed)
    theta = jnp.asarray(rng.standard_normal((T, V + 1, V)), jnp.float32)  # θ[t, prev, a]
    reward_table = rng.standard_normal((T, V)).astype(np.float32)  # r(t, a)
    rewards = jnp.asarray(reward_table[STEPS, TOKENS] * MASK)  # [15, 3]
    return theta, rewards


def _token_logprobs(theta):
    logits = theta[STEPS, PREV]  # [15, 3, V]: the logits that produced each token
    return token_logprobs(logits, jnp.asarray(TOKENS))  # [15, 3]


def _probs(theta):
    return jnp.exp(trajectory_logprob(_token_logprobs(theta), jnp.asarray(MASK)))  # [15]


def test_enumeration_is_a_distribution():
    assert TOKENS.shape == (15, 3)
    theta, _ = _setup(0)
    # Σ_τ P(τ) = 1 only if trajectory_logprob ignores the padded steps after EOS.
    close(jnp.sum(jax.jit(_probs)(theta)), 1.0, atol=1e-6)


@functools.partial(jax.jit, static_argnames="gamma")
def _gradients(theta, rewards, state_baseline, action_baseline, *, gamma):
    """The exact ∇J and each estimator of it (one compilation for all of them)."""
    mask = jnp.asarray(MASK)
    returns = discounted_return(rewards, mask, gamma=gamma)  # R(τ) = Σₜ γᵗ rₜ, [15]
    p = jax.lax.stop_gradient(_probs(theta))  # [15]
    discount = jnp.asarray(gamma ** STEPS.astype(np.float32))  # γᵗ, [15, 3]
    rtg = reward_to_go(rewards, mask, gamma=gamma)  # Gₜ, [15, 3]

    def objective(th):  # J(θ) = Σ_τ P(τ|θ) R(τ), exact
        return jnp.sum(_probs(th) * returns)

    # (1) REINFORCE with the whole return: Σ_τ P R ∇ log P.
    def reinforce(th):
        return jnp.sum(p * returns * trajectory_logprob(_token_logprobs(th), mask))

    # (2) reward-to-go: each log π(aₜ|sₜ) weighted by γᵗ Gₜ, the rewards from t on only;
    # (3) minus a baseline: unbiased if it depends on the state sₜ only.
    def with_baseline(th, baseline):
        adv = discount * (rtg - baseline)  # [15, 3]
        return jnp.sum(p[:, None] * adv * mask * _token_logprobs(th))

    # (4) the PPO clipped surrogate at the old policy (ρ = 1): with "seq_mean_token_sum" the loss
    # is (1/15) Σ_τ Σₜ −ρₜ Âₜ, so Âₜ = 15·P(τ)·γᵗ(Gₜ − b(sₜ)) makes −∇L the exact policy gradient.
    ppo_adv = 15.0 * p[:, None] * discount * (rtg - state_baseline)
    old_logprobs = jax.lax.stop_gradient(_token_logprobs(theta))

    def ppo(th):
        return ppo_policy_loss(
            _token_logprobs(th),
            old_logprobs,
            ppo_adv,
            mask,
            clip_eps=0.2,
            aggregation="seq_mean_token_sum",
        )

    zero_baseline = jnp.zeros_like(rtg)
    return {
        "exact": jax.grad(objective)(theta),
        "reinforce": jax.grad(reinforce)(theta),
        "reward_to_go": jax.grad(with_baseline)(theta, zero_baseline),
        "state_baseline": jax.grad(with_baseline)(theta, state_baseline),
        "action_baseline": jax.grad(with_baseline)(theta, action_baseline),
        "ppo": -jax.grad(ppo)(theta),
    }


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_policy_gradient_theorem(gamma):
    theta, rewards = _setup(1)
    rng = np.random.default_rng(2)
    # b(sₜ) = table[t, previous token]; b(sₜ, aₜ) = table[t, aₜ] (not a valid baseline)
    state_baseline = jnp.asarray(rng.standard_normal((T, V + 1)) * 3, jnp.float32)[STEPS, PREV]
    action_baseline = jnp.asarray(rng.standard_normal((T, V)) * 3, jnp.float32)[STEPS, TOKENS]
    grads = _gradients(theta, rewards, state_baseline, action_baseline, gamma=gamma)
    exact = grads["exact"]
    assert float(jnp.abs(exact).max()) > 1e-2  # a non-trivial gradient
    close(grads["reinforce"], exact, atol=2e-6)
    close(grads["reward_to_go"], exact, atol=2e-6)
    close(grads["state_baseline"], exact, atol=5e-6)
    close(grads["ppo"], exact, atol=1e-5)
    # ... while a baseline that depends on the action taken biases the estimate.
    assert float(jnp.abs(grads["action_baseline"] - exact).max()) > 1e-2

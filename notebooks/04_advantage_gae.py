# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 4 — Value, Q, advantage, TD error and GAE
#
# Chapter 3 measured what baselines and GAE do to the gradient's variance. This chapter defines the
# quantities precisely, checks the identities between them on the enumerable world, and works the
# GAE recursion by hand on a four-token example.
#
# For a policy $\pi$ and the reward-to-go $G_t = \sum_{k \ge t} \gamma^{k-t} r_k$:
#
# $$V^\pi(s) = \mathbb{E}_\pi\big[G_t \mid s_t = s\big], \qquad
#   Q^\pi(s, a) = \mathbb{E}_\pi\big[G_t \mid s_t = s,\ a_t = a\big], \qquad
#   A^\pi(s, a) = Q^\pi(s, a) - V^\pi(s).$$
#
# $V$ is how good a state is on average under the policy; $Q$ is how good it is to pick $a$ there
# and then continue with the policy; the advantage $A$ says how much better $a$ is than the
# policy's average choice. Weighting $\nabla \log \pi(a_t \mid s_t)$ by $A$ raises the probability
# of better-than-usual tokens and lowers the others — the direction the policy gradient wants.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import toyworld as tw

from jaxrlhf import rl

world = tw.ToyWorld()
prompts, tokens = tw.enumerate_trajectories(world)  # [N], [N, T]
ids = tw.state_ids(world, prompts, tokens)  # [N, T]
rewards = tw.rewards(world, prompts, tokens)  # [N, T]
mask = jnp.ones(tokens.shape, jnp.float32)
theta = tw.init_table(world, jax.random.key(0))  # [S, V]
p_tau = jnp.exp(tw.log_prob_trajectories(world, theta, prompts, tokens, ids))  # [N]
GAMMA = 0.9  # a discount < 1, so that every γ in the identities is visible

# %% [markdown]
# ## V and Q by enumeration, and the identities between them
#
# The conditional expectations are computed by their definition: average $G_t$ over the
# trajectories that pass through the state (for $V$) or through the state-action pair (for $Q$),
# weighted by their probability. Three identities follow from the definitions:
#
# 1. $V^\pi(s) = \sum_a \pi(a \mid s)\, Q^\pi(s, a)$ — the value is the policy's average Q; so
#    the advantages of a state average to zero under the policy: $\mathbb{E}_{a \sim \pi}[A(s,a)] = 0$.
# 2. For an LM, taking action $a$ in $s$ leads to one known state $s' = s \oplus a$, and the reward
#    is a known function of $(s, a)$, so $Q^\pi(s_t, a_t) = r_t + \gamma V^\pi(s_{t+1})$
#    (with $V = 0$ after the last token).
# 3. Hence the **TD error** computed with the true value is exactly the advantage:
#    $\delta_t = r_t + \gamma V^\pi(s_{t+1}) - V^\pi(s_t) = A^\pi(s_t, a_t)$. With a learned
#    critic and random transitions it is only an estimate of it.

# %%
G = rl.reward_to_go(rewards, mask, gamma=GAMMA)  # [N, T]
V = tw.conditional_mean(p_tau, G, ids, world.n_states)  # [N, T]  V^π(sₜ)
state_action = ids * world.vocab_size + tokens  # [N, T] an id for each (sₜ, aₜ)
Q = tw.conditional_mean(p_tau, G, state_action, world.n_states * world.vocab_size)  # Q^π(sₜ,aₜ)
A = Q - V  # [N, T]

# 1. E_{a~π}[A(s, a)] = 0 in every state (the conditional mean of A given the state)
assert jnp.abs(tw.conditional_mean(p_tau, A, ids, world.n_states)).max() < 1e-5
# 2. Q(sₜ, aₜ) = rₜ + γ V(sₜ₊₁), V after the last token = 0
V_next = jnp.concatenate([V[:, 1:], jnp.zeros((V.shape[0], 1))], axis=1)
assert jnp.allclose(Q, rewards + GAMMA * V_next, atol=1e-5)
# 3. the library's TD error with the exact value is the exact advantage
delta = rl.td_error(rewards, V, mask, gamma=GAMMA)  # [N, T]
assert jnp.allclose(delta, A, atol=1e-5)
print(
    "e.g. trajectory 5: V =",
    np.round(V[5], 3),
    " Q =",
    np.round(Q[5], 3),
    " A =",
    np.round(A[5], 3),
)

# %% [markdown]
# This is why PPO needs only **one** value network, not a Q network and a V network: given $V$,
# the rewards and $\gamma$ give $Q$ and the advantage for free.
#
# ## GAE by hand on a four-token response
#
# Take a response of four tokens with rewards $r = (0.1, -0.2, 0.0, 1.0)$ — the shape of RLHF
# rewards: small per-token terms and the reward model's score at the end — critic values
# $V = (0.5, 0.6, 0.7, 0.8)$, $\gamma = 0.9$ and $\lambda = 0.95$, so $\gamma\lambda = 0.855$.
#
# **TD errors** $\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t)$, with $V(s_4) = 0$ (the episode is over):
#
# | $t$ | $r_t + \gamma V(s_{t+1}) - V(s_t)$ | $\delta_t$ |
# |---|---|---|
# | 3 | $1.0 + 0.9 \cdot 0 - 0.8$ | $0.2$ |
# | 2 | $0.0 + 0.9 \cdot 0.8 - 0.7$ | $0.02$ |
# | 1 | $-0.2 + 0.9 \cdot 0.7 - 0.6$ | $-0.17$ |
# | 0 | $0.1 + 0.9 \cdot 0.6 - 0.5$ | $0.14$ |
#
# **GAE**, $\hat A_t = \delta_t + \gamma\lambda\, \hat A_{t+1}$, computed backwards from the end:
#
# | $t$ | $\delta_t + 0.855\, \hat A_{t+1}$ | $\hat A_t$ |
# |---|---|---|
# | 3 | $0.2 + 0.855 \cdot 0$ | $0.2$ |
# | 2 | $0.02 + 0.855 \cdot 0.2$ | $0.191$ |
# | 1 | $-0.17 + 0.855 \cdot 0.191$ | $-0.006695$ |
# | 0 | $0.14 + 0.855 \cdot (-0.006695)$ | $0.134276$ |
#
# The critic's **targets** (the "returns" the value loss regresses on) are $\hat A_t + V(s_t) =
# (0.634276,\ 0.593305,\ 0.891,\ 1.0)$.

# %%
r4 = jnp.array([0.1, -0.2, 0.0, 1.0])
v4 = jnp.array([0.5, 0.6, 0.7, 0.8])
m4 = jnp.ones(4)
delta4 = rl.td_error(r4, v4, m4, gamma=0.9)
adv4, ret4 = rl.gae(r4, v4, m4, gamma=0.9, lam=0.95)
print("δ =", delta4, "\nÂ =", adv4, "\ntargets =", ret4)
np.testing.assert_allclose(delta4, [0.14, -0.17, 0.02, 0.2], atol=1e-6)
np.testing.assert_allclose(adv4, [0.134275775, -0.006695, 0.191, 0.2], atol=1e-6)
np.testing.assert_allclose(ret4, [0.634275775, 0.593305, 0.891, 1.0], atol=1e-6)

# %% [markdown]
# Unrolling the recursion gives the closed form — an exponentially weighted sum of future TD
# errors, with weight $(\gamma\lambda)^l$ for the error $l$ steps ahead:
#
# $$\hat A_t = \delta_t + (\gamma\lambda)\,\delta_{t+1} + (\gamma\lambda)^2 \delta_{t+2} + \cdots
#   = \sum_{l=0}^{T-1-t} (\gamma\lambda)^l\, \delta_{t+l}.$$

# %%
gl = 0.9 * 0.95
closed_form = [sum(gl**l * float(delta4[t + l]) for l in range(4 - t)) for t in range(4)]
np.testing.assert_allclose(adv4, closed_form, atol=1e-6)

# %% [markdown]
# ## The two limits of λ
#
# * $\lambda = 0$: only the first term survives, $\hat A_t = \delta_t$ — the one-step TD error.
#   It uses a single real reward and trusts the critic for everything after: low variance, but as
#   wrong as the critic is.
# * $\lambda = 1$: the sum telescopes. Every $\gamma^{l} V(s_{t+l})$ appears once with a plus sign
#   and once with a minus sign, except $-V(s_t)$ at the start and the terminal value 0 at the end:
#
# $$\sum_{l} \gamma^l \big(r_{t+l} + \gamma V(s_{t+l+1}) - V(s_{t+l})\big)
#   = \sum_l \gamma^l r_{t+l} - V(s_t) = G_t - V(s_t),$$
#
#   the Monte Carlo return minus the baseline: no critic error in the bias, all the sampling
#   noise of the rest of the episode in the variance.
#
# Both limits checked, by hand and on every trajectory of the toy world with an imperfect critic.

# %%
assert jnp.allclose(rl.gae(r4, v4, m4, gamma=0.9, lam=0.0)[0], delta4, atol=1e-6)
G4 = rl.reward_to_go(r4, m4, gamma=0.9)
assert jnp.allclose(rl.gae(r4, v4, m4, gamma=0.9, lam=1.0)[0], G4 - v4, atol=1e-6)

noisy_V = V + 0.3 * jax.random.normal(jax.random.key(1), V.shape)  # an imperfect critic
adv0, _ = rl.gae(rewards, noisy_V, mask, gamma=GAMMA, lam=0.0)
adv1, _ = rl.gae(rewards, noisy_V, mask, gamma=GAMMA, lam=1.0)
assert jnp.allclose(adv0, rl.td_error(rewards, noisy_V, mask, gamma=GAMMA), atol=1e-5)
assert jnp.allclose(adv1, G - noisy_V, atol=1e-5)

# %% [markdown]
# How $\hat A_t$ moves between the two limits on the hand example: as $\lambda$ grows, more of the
# real future rewards (and their noise) enter the estimate.

# %%
lams = np.linspace(0, 1, 21)
curves = np.array([rl.gae(r4, v4, m4, gamma=0.9, lam=float(lam))[0] for lam in lams])  # [λ, T]
plt.figure(figsize=(6, 3.5))
for t in range(4):
    plt.plot(lams, curves[:, t], label=f"Â_{t}")
plt.scatter([0] * 4, delta4, c="k", marker="x", label="δₜ (λ=0)")
plt.scatter([1] * 4, G4 - v4, c="r", marker="x", label="Gₜ − V(sₜ) (λ=1)")
plt.xlabel("λ")
plt.ylabel("advantage estimate")
plt.legend(fontsize=8)
plt.tight_layout()
np.testing.assert_allclose(curves[0], delta4, atol=1e-6)
np.testing.assert_allclose(curves[-1], G4 - v4, atol=1e-6)

# %% [markdown]
# ## GAE with an exact critic is exactly the advantage — in expectation
#
# With the true $V^\pi$, each $\delta_{t+l}$ for $l \ge 1$ has zero mean given $(s_t, a_t)$ (it is
# a future advantage, and advantages average to zero under the policy). So every $\lambda$ gives an
# unbiased estimate of $A^\pi(s_t, a_t)$: the conditional mean of GAE given $(s_t, a_t)$ is $A$.

# %%
for lam in (0.0, 0.5, 0.95, 1.0):
    adv, _ = rl.gae(rewards, V, mask, gamma=GAMMA, lam=lam)
    mean_given_sa = tw.conditional_mean(p_tau, adv, state_action, world.n_states * world.vocab_size)
    assert jnp.allclose(mean_given_sa, A, atol=1e-5), lam
print("E[Â_GAE | sₜ, aₜ] = A^π(sₜ, aₜ) for λ ∈ {0, 0.5, 0.95, 1}")

# %% [markdown]
# ## Padding and the end of the episode
#
# In a batch, responses end at different lengths. The recursion must treat the step after the last
# valid token as terminal ($V = 0$, $\hat A = 0$), and whatever sits in the padded slots must not
# leak in. The same four tokens, padded to length 6 with garbage rewards and values, give the same
# advantages, and zeros on the padding.

# %%
r6 = jnp.concatenate([r4, jnp.array([5.0, -7.0])])
v6 = jnp.concatenate([v4, jnp.array([100.0, 3.0])])
m6 = jnp.array([1.0, 1, 1, 1, 0, 0])
adv6, ret6 = rl.gae(r6, v6, m6, gamma=0.9, lam=0.95)
assert jnp.allclose(adv6[:4], adv4, atol=1e-6) and jnp.all(adv6[4:] == 0)
assert jnp.allclose(ret6[:4], ret4, atol=1e-6) and jnp.all(ret6[4:] == 0)

# %% [markdown]
# **Summary.** $V$, $Q$ and $A$ are conditional averages of the reward-to-go; for a language model
# $Q = r + \gamma V'$, so one critic suffices and the TD error estimates the advantage. GAE blends
# the TD errors of all later steps with weights $(\gamma\lambda)^l$ (`rl.gae`), interpolating
# between the TD error ($\lambda=0$, `rl.td_error`) and the Monte Carlo advantage ($\lambda=1$,
# `rl.reward_to_go` minus $V$).

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
# # Chapter 2 — The policy-gradient theorem
#
# RL wants the parameters $\theta$ that make the expected return as large as possible:
#
# $$\theta^\star = \arg\max_\theta J(\theta), \qquad
#   J(\theta) = \mathbb{E}_{\tau \sim \pi_\theta}\big[R(\tau)\big] = \sum_\tau P(\tau \mid \theta)\, R(\tau).$$
#
# We climb $J$ by gradient **ascent**, $\theta_{k+1} = \theta_k + \alpha \nabla_\theta J(\theta_k)$.
# The difficulty: $J$ is an average over every possible response, and for a real LM there are
# $V^T$ of them. This chapter derives a formula for $\nabla_\theta J$ that only needs *sampled*
# responses, then checks every step of the derivation exactly, on the enumerable world of
# chapter 1 where the sum over all $\tau$ is only 54 terms long and `jax.grad` can differentiate it.

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
mask = jnp.ones(tokens.shape, jnp.float32)  # [N, T]
R = rl.discounted_return(rewards, mask, gamma=1.0)  # [N] R(τ); γ = 1, as in RLHF
theta = tw.init_table(world, jax.random.key(0))  # [S, V]


def log_P(theta):
    """log P(τ|θ) for all 54 trajectories: log p(s₀) + trajectory_logprob (chapter 1)."""
    return tw.log_prob_trajectories(world, theta, prompts, tokens, ids)  # [N]


def J(theta):
    """The objective, exactly: Σ_τ P(τ|θ) R(τ)."""
    return jnp.sum(jnp.exp(log_P(theta)) * R)


grad_J = jax.grad(J)(theta)  # [S, V] the exact gradient, by automatic differentiation
print(f"J(θ) = {float(J(theta)):.5f},  ‖∇J‖ = {float(jnp.linalg.norm(grad_J)):.5f}")

# %% [markdown]
# ## Step 1 — write the expectation as a sum
#
# $$\nabla_\theta J(\theta) = \nabla_\theta \sum_\tau P(\tau \mid \theta)\, R(\tau).$$
#
# (For continuous spaces the sum is an integral; nothing below changes.)
#
# ## Step 2 — move the gradient inside
#
# The gradient of a sum is the sum of the gradients. The return $R(\tau)$ of a *given* trajectory
# does not depend on $\theta$ — the parameters decide which trajectories are likely, not what a
# trajectory is worth — so only the probability is differentiated:
#
# $$\nabla_\theta J(\theta) = \sum_\tau R(\tau)\, \nabla_\theta P(\tau \mid \theta).$$
#
# Check: sum the per-trajectory gradients of $P$ (a Jacobian, one gradient per trajectory) weighted
# by $R$, and compare with `jax.grad` of the whole objective.

# %%
dP = jax.jacobian(lambda th: jnp.exp(log_P(th)))(theta)  # [N, S, V] ∇P(τ|θ) for each τ
step2 = jnp.einsum("n,nsv->sv", R, dP)
assert jnp.allclose(step2, grad_J, atol=1e-6)

# %% [markdown]
# ## Step 3 — the log-derivative trick
#
# This form is exact but useless in practice: $\sum_\tau R\, \nabla P$ is not an average under
# $P$, so it cannot be estimated by sampling. The trick is the chain rule for the logarithm,
# $\nabla \log f = \nabla f / f$, read backwards:
#
# $$\nabla_\theta P(\tau \mid \theta) = P(\tau \mid \theta)\, \nabla_\theta \log P(\tau \mid \theta).$$
#
# Check it for each of the 54 trajectories separately.

# %%
dlogP = jax.jacobian(log_P)(theta)  # [N, S, V] ∇ log P(τ|θ)
p_tau = jnp.exp(log_P(theta))  # [N]
assert jnp.allclose(dP, p_tau[:, None, None] * dlogP, atol=1e-6)

# %% [markdown]
# ## Step 4 — back to an expectation
#
# Substituting, a factor $P(\tau \mid \theta)$ reappears in front of everything, so the sum is again
# an expectation under the policy:
#
# $$\nabla_\theta J(\theta) = \sum_\tau P(\tau \mid \theta)\, \nabla_\theta \log P(\tau \mid \theta)\,
#   R(\tau) = \mathbb{E}_{\tau \sim \pi_\theta}\big[\nabla_\theta \log P(\tau \mid \theta)\, R(\tau)\big].$$
#
# The gradient of an expectation has become the expectation of something we can compute on each
# sampled trajectory: the *score function* $\nabla \log P$ times the return.

# %%
step4 = jnp.einsum("n,nsv->sv", p_tau * R, dlogP)
assert jnp.allclose(step4, grad_J, atol=1e-6)

# %% [markdown]
# ## Step 5 — only the policy has a gradient
#
# From chapter 1, $\log P(\tau \mid \theta) = \log p(s_0) + \sum_t \log \pi_\theta(a_t \mid s_t) +
# \sum_t \log P(s_{t+1} \mid s_t, a_t)$. The prompt distribution and the environment's transitions
# do not involve $\theta$, so their gradients vanish:
#
# $$\nabla_\theta \log P(\tau \mid \theta) = \sum_{t=0}^{T-1} \nabla_\theta \log \pi_\theta(a_t \mid s_t).$$
#
# This matters twice: we never need a model of the environment, and the gradient is just the sum
# of the per-token gradients that backpropagation through the LM gives us. Check: the Jacobian of
# the full $\log P$ (which includes $\log p(s_0)$) equals the Jacobian of `rl.trajectory_logprob`
# alone.


# %%
def policy_logprob(theta):
    logprobs = rl.token_logprobs(tw.policy_logits(theta, ids), tokens)  # [N, T]
    return rl.trajectory_logprob(logprobs, mask)  # [N] Σₜ log π(aₜ|sₜ)


dlogpi = jax.jacobian(policy_logprob)(theta)  # [N, S, V]
assert jnp.allclose(dlogP, dlogpi, atol=1e-6)

# %% [markdown]
# ## Step 6 — the policy-gradient theorem
#
# $$\boxed{\nabla_\theta J(\theta) = \mathbb{E}_{\tau \sim \pi_\theta}\Big[\Big(\sum_{t=0}^{T-1}
#   \nabla_\theta \log \pi_\theta(a_t \mid s_t)\Big) R(\tau)\Big]}$$
#
# Read it as: sample a response, compute its return, and push up the log-probability of every token
# in it in proportion to that return. Good responses become more likely, bad ones less likely.

# %%
theorem = jnp.einsum("n,nsv->sv", p_tau * R, dlogpi)
print("max |score-function formula − jax.grad(J)| =", float(jnp.abs(theorem - grad_J).max()))
assert jnp.allclose(theorem, grad_J, atol=1e-6)

# %% [markdown]
# ## Step 7 — the Monte Carlo estimate
#
# The expectation is still over all responses, but now it can be *estimated*: draw $N$ trajectories
# $\tau_1, \ldots, \tau_N$ from the current policy and average,
#
# $$\hat g_N = \frac{1}{N} \sum_{i=1}^{N} \Big(\sum_t \nabla_\theta \log \pi_\theta(a_{i,t} \mid s_{i,t})\Big) R(\tau_i).$$
#
# In code this is the gradient of a *surrogate loss* whose value means nothing but whose gradient
# is $-\hat g_N$: $L = -\frac{1}{N} \sum_i R(\tau_i) \sum_t \log \pi_\theta(a_{i,t} \mid s_{i,t})$,
# with $R$ held constant. PPO's policy loss is such a surrogate: when the "old" log-probs are the
# current ones (ratio 1, the first PPO step) and every token's advantage is $R(\tau)$,
# `rl.ppo_policy_loss` with the per-sequence sum aggregation has exactly this gradient. We check
# that on a batch of 8 sampled trajectories.

# %%
key = jax.random.key(42)
batch = jax.random.choice(key, p_tau.shape[0], shape=(8,), p=p_tau)  # 8 sampled trajectories
score_vectors = dlogpi.reshape(dlogpi.shape[0], -1)  # [N, S·V] ∇ log P(τ) per trajectory
g_hat = jnp.mean(score_vectors[batch] * R[batch, None], axis=0).reshape(theta.shape)


def surrogate(theta):
    logprobs = rl.token_logprobs(tw.policy_logits(theta, ids[batch]), tokens[batch])  # [8, T]
    advantages = jnp.broadcast_to(R[batch, None], logprobs.shape)  # every token gets R(τ)
    return rl.ppo_policy_loss(
        logprobs,
        jax.lax.stop_gradient(logprobs),  # old = current: the ratio is 1
        advantages,
        mask[batch],
        clip_eps=0.2,
        aggregation="seq_mean_token_sum",
    )


assert jnp.allclose(-jax.grad(surrogate)(theta), g_hat, atol=1e-6)

# %% [markdown]
# ## The estimate is unbiased, and its error shrinks like $1/\sqrt{N}$
#
# Because step 6 is an exact identity, a single sample is already right *on average*:
# $\mathbb{E}[\hat g_1] = \nabla J$ (we just verified the weighted sum). Averaging $N$ independent
# samples keeps the mean and divides the variance by $N$, so the expected squared error is
#
# $$\mathbb{E}\,\big\|\hat g_N - \nabla J\big\|^2 = \frac{\sigma^2}{N}, \qquad
#   \sigma^2 = \sum_\tau P(\tau \mid \theta)\, \big\|\nabla \log P(\tau \mid \theta) R(\tau) - \nabla J\big\|^2,$$
#
# and the typical error falls as $1/\sqrt{N}$: four times the samples for half the error. We know
# $\sigma^2$ exactly here, so we can compare. (Sampling an index with probability $P(\tau)$ is
# the same as generating token by token; chapter 1 checked that.)

# %%
per_sample = score_vectors * R[:, None]  # [N, S·V] the one-sample estimate for each τ
true_grad = grad_J.ravel()
sigma2 = float(jnp.sum(p_tau * jnp.sum((per_sample - true_grad) ** 2, axis=1)))
print(
    f"exact one-sample variance σ² = {sigma2:.4f}  vs  ‖∇J‖² = {float(true_grad @ true_grad):.4f}"
)

sizes = np.array([4, 16, 64, 256, 1024, 4096])
repeats = 400


@jax.jit
def squared_errors(key, n_index):
    """‖ĝ_N − ∇J‖² for `repeats` independent batches of N = sizes[n_index] trajectories."""
    keys = jax.random.split(key, repeats)

    def one(k):
        idx = jax.random.choice(k, p_tau.shape[0], shape=(sizes.max(),), p=p_tau)
        weights = (jnp.arange(sizes.max()) < jnp.asarray(sizes)[n_index]) / jnp.asarray(sizes)[
            n_index
        ]  # average over the first N samples only
        g = jnp.sum(per_sample[idx] * weights[:, None], axis=0)
        return jnp.sum((g - true_grad) ** 2), g

    return jax.vmap(one)(keys)


mse, mean_of_estimates = [], []
for j, n in enumerate(sizes):
    err2, g = squared_errors(jax.random.key(j), j)
    mse.append(float(err2.mean()))
    mean_of_estimates.append(g.mean(axis=0))
    print(f"N={n:>5}: E‖ĝ−∇J‖² ≈ {mse[-1]:.5f}   σ²/N = {sigma2 / n:.5f}")
mse = np.array(mse)

# %% [markdown]
# Three claims, checked:
#
# 1. **The measured error matches $\sigma^2/N$** (each mean of 400 squared errors is itself noisy,
#    so within 20%).
# 2. **The slope of $\log \mathrm{RMSE}$ against $\log N$ is $-1/2$.**
# 3. **Unbiased:** the average of the 400 estimates at $N = 4096$ is far closer to $\nabla J$ than
#    any single estimate — its remaining error is what 400 · 4096 samples predict.

# %%
np.testing.assert_allclose(mse, sigma2 / sizes, rtol=0.2)
slope = np.polyfit(np.log(sizes), 0.5 * np.log(mse), 1)[0]
print(f"slope of log RMSE vs log N: {slope:.3f}")
assert abs(slope + 0.5) < 0.05
bias2 = float(jnp.sum((mean_of_estimates[-1] - true_grad) ** 2))
print(f"‖mean of 400 estimates − ∇J‖² = {bias2:.2e}   (σ²/(400·4096) = {sigma2 / 400 / 4096:.2e})")
assert bias2 < 5 * sigma2 / (repeats * sizes[-1])

plt.figure(figsize=(5, 3.5))
plt.loglog(sizes, np.sqrt(mse), "o-", label="measured RMSE")
plt.loglog(sizes, np.sqrt(sigma2 / sizes), "k--", label="σ/√N (exact)")
plt.xlabel("trajectories per estimate, N")
plt.ylabel("‖ĝ_N − ∇J‖")
plt.legend()
plt.title("Monte Carlo policy gradient")
plt.tight_layout()

# %% [markdown]
# ## Gradient ascent with the estimate
#
# Finally, use it: 150 steps of $\theta \leftarrow \theta + \alpha \hat g_N$ with $N = 16$ sampled
# responses per step, next to the same number of steps with the exact gradient. The noisy climb
# reaches nearly the same place — that is REINFORCE. The rest of the derivation is about making
# $\hat g$ less noisy (chapter 3) and reusing samples safely (chapter 5).


# %%
def score_per_trajectory(theta):
    return jax.jacobian(policy_logprob)(theta).reshape(p_tau.shape[0], -1)  # [N, S·V]


def ascend(theta, key, exact: bool):
    def step(theta, k):
        probs = jnp.exp(log_P(theta))
        if exact:
            g = jax.grad(J)(theta)
        else:
            idx = jax.random.choice(k, probs.shape[0], shape=(16,), p=probs)
            g = jnp.mean(score_per_trajectory(theta)[idx] * R[idx, None], 0).reshape(theta.shape)
        return theta + 0.5 * g, J(theta)

    return jax.lax.scan(step, theta, jax.random.split(key, 150))


ascend = jax.jit(ascend, static_argnames="exact")
theta_exact, curve_exact = ascend(theta, jax.random.key(0), exact=True)
theta_mc, curve_mc = ascend(theta, jax.random.key(0), exact=False)
best = float(jnp.sum(jnp.asarray(world.prompt_probs) * R.reshape(world.n_prompts, -1).max(1)))
print(
    f"J: start {float(J(theta)):.3f}, exact-gradient ascent {float(J(theta_exact)):.3f}, "
    f"REINFORCE (N=16) {float(J(theta_mc)):.3f};  best possible {best:.3f}"
)
assert J(theta_mc) > J(theta) + 1.0 and J(theta_exact) > J(theta) + 1.0

plt.figure(figsize=(5, 3.5))
plt.plot(curve_exact, label="exact ∇J")
plt.plot(curve_mc, label="Monte Carlo ĝ, N = 16")
plt.xlabel("gradient step")
plt.ylabel("J(θ)")
plt.legend()
plt.tight_layout()

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
# # Chapter 3 — Reducing the variance of the policy gradient
#
# Chapter 2's estimator is unbiased but noisy: on our toy world one sample's variance was ~45 times
# the squared length of the gradient it estimates. Sampling responses from an LM is expensive, so
# instead of more samples we want a better estimator. All the estimators in this chapter have the
# same shape,
#
# $$\hat g = \sum_{t=0}^{T-1} \Psi_t \, \nabla_\theta \log \pi_\theta(a_t \mid s_t),$$
#
# and differ only in the per-token weight $\Psi_t$:
#
# | estimator | $\Psi_t$ |
# |---|---|
# | full return (chapter 2) | $R(\tau)$ |
# | constant baseline | $R(\tau) - b$ |
# | reward-to-go | $G_t = \sum_{k \ge t} \gamma^{k-t} r_k$ |
# | value baseline | $G_t - V(s_t)$ |
# | GAE($\lambda$) | $\hat A_t^{\mathrm{GAE}(\gamma, \lambda)}$ |
#
# On the enumerable world we can compute, **exactly**, the mean and the variance of each one over
# the policy's own distribution of trajectories:
#
# $$\text{bias} = \Big\|\sum_\tau P(\tau)\, \hat g(\tau) - \nabla J\Big\|, \qquad
#   \text{variance} = \sum_\tau P(\tau)\, \big\|\hat g(\tau) - \mathbb{E}[\hat g]\big\|^2 .$$
#
# A batch of $N$ trajectories then has expected squared error $\text{bias}^2 + \text{variance}/N$.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import toyworld as tw

from jaxrlhf import rl

world = tw.ToyWorld()
prompts, tokens = tw.enumerate_trajectories(world)  # [N], [N, T]
ids = tw.state_ids(world, prompts, tokens)  # [N, T]
rewards = tw.rewards(world, prompts, tokens)  # [N, T]
mask = jnp.ones(tokens.shape, jnp.float32)  # [N, T]
GAMMA = 1.0
theta = tw.init_table(world, jax.random.key(0))  # [S, V]


def token_logprobs(theta):
    return rl.token_logprobs(tw.policy_logits(theta, ids), tokens)  # [N, T]


p_tau = jnp.exp(tw.log_prob_trajectories(world, theta, prompts, tokens, ids))  # [N]
R = rl.discounted_return(rewards, mask, gamma=GAMMA)  # [N]
grad_J = jax.grad(
    lambda th: jnp.sum(jnp.exp(tw.log_prob_trajectories(world, th, prompts, tokens, ids)) * R)
)(theta).ravel()  # [S·V] the exact gradient (chapter 2)
# ∇ log π(aₜ|sₜ) for every trajectory and step: [N, T, S·V]
token_scores = jax.jacobian(token_logprobs)(theta).reshape(*tokens.shape, -1)


@jax.jit
def _bias_and_variance(psi):
    g = jnp.einsum("nt,ntp->np", psi, token_scores)  # [N, S·V] one estimate per trajectory
    mean = jnp.sum(p_tau[:, None] * g, axis=0)  # E ĝ, exactly
    variance = jnp.sum(p_tau * jnp.sum((g - mean) ** 2, axis=1))
    return jnp.linalg.norm(mean - grad_J), variance


def bias_and_variance(psi):
    """Exact bias ‖E ĝ − ∇J‖ and variance E‖ĝ − E ĝ‖² of ĝ(τ) = Σₜ Ψₜ ∇log π(aₜ|sₜ)."""
    return tuple(float(x) for x in _bias_and_variance(psi))


results = {}

# %% [markdown]
# ## Reward-to-go: an action cannot change the past
#
# The full-return estimator multiplies the score of token $t$ by *all* the rewards, including the
# ones collected before token $t$ was chosen. Those earlier rewards do not depend on $a_t$; in
# expectation their product with $\nabla \log \pi(a_t \mid s_t)$ is zero, because
# $\mathbb{E}_{a \sim \pi}[\nabla \log \pi(a \mid s)] = \sum_a \nabla \pi(a \mid s) = \nabla 1 = 0$.
# Dropping them leaves the mean unchanged and removes their noise: weight each token by the
# reward-to-go $G_t$ instead (`rl.reward_to_go`).

# %%
G = rl.reward_to_go(rewards, mask, gamma=GAMMA)  # [N, T]
results["full return R(τ)"] = bias_and_variance(jnp.broadcast_to(R[:, None], G.shape))
results["reward-to-go Gₜ"] = bias_and_variance(G)
for name, (bias, var) in results.items():
    print(f"{name:<22} bias {bias:.1e}   variance {var:.4f}")
assert results["full return R(τ)"][0] < 1e-5 and results["reward-to-go Gₜ"][0] < 1e-5
assert results["reward-to-go Gₜ"][1] < 0.8 * results["full return R(τ)"][1]

# %% [markdown]
# ## Baselines: subtract what you expected
#
# By the same identity, subtracting from $\Psi_t$ anything that depends only on the state
# $s_t$ (not on $a_t$) keeps the estimator unbiased:
# $\mathbb{E}_{a_t}[b(s_t)\, \nabla \log \pi(a_t \mid s_t)] = b(s_t) \cdot 0$. What changes is the
# variance. With a raw return, a response that is merely average still pushes its tokens up,
# and other samples must push them back down; subtracting the expected return lets average
# responses do nothing. Three baselines:
#
# * a constant, $b = J(\theta)$, the average return;
# * the value function $V^\pi(s_t) = \mathbb{E}[G_t \mid s_t]$, computed here **exactly** by
#   enumeration (the conditional mean of $G_t$ over the trajectories through $s_t$);
# * a *learned* value — a critic trained by regression on sampled returns with `rl.value_loss`,
#   as PPO does. A table with one number per state can learn $V^\pi$ almost exactly.
#
# $G_t - V(s_t)$ is the Monte Carlo *advantage* estimate: how much better the rest of this
# trajectory went than the state's average.

# %%
J = float(jnp.sum(p_tau * R))
V_exact = tw.conditional_mean(p_tau, G, ids, world.n_states)  # [N, T] V^π(sₜ) by definition


def fit_critic(n_params, index, steps=300, batch=4096, seed=7):
    """Train values table[index] on sampled trajectories by minimising rl.value_loss."""
    idx = jax.random.choice(jax.random.key(seed), p_tau.shape[0], shape=(batch,), p=p_tau)
    opt = optax.adam(0.1)

    def loss(params):
        values = params[index[idx]]  # [B, T]
        return rl.value_loss(values, values, G[idx], mask[idx])  # mean (V − G)²

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss(params)

    params = jnp.zeros(n_params)
    (params, _), losses = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
        (params, opt.init(params))
    )
    return params[index], losses


V_learned, critic_losses = fit_critic(world.n_states, ids)  # one value per state
critic_rmse = float(jnp.sqrt(jnp.sum(p_tau[:, None] * (V_learned - V_exact) ** 2) / 3))
print(f"learned critic: RMS error (weighted by how often states occur) = {critic_rmse:.3f}")
assert critic_rmse < 0.1 and critic_losses[-1] < 0.5 * critic_losses[0]

results["R(τ) − J (constant)"] = bias_and_variance(jnp.broadcast_to(R[:, None] - J, G.shape))
results["Gₜ − V̂(sₜ) (learned)"] = bias_and_variance(G - V_learned)
results["Gₜ − V^π(sₜ) (exact)"] = bias_and_variance(G - V_exact)
for name, (bias, var) in results.items():
    print(f"{name:<24} bias {bias:.1e}   variance {var:.4f}")
for name, (bias, _) in results.items():
    assert bias < 1e-4, name  # every one of them is unbiased
v = {name: var for name, (_, var) in results.items()}
assert v["R(τ) − J (constant)"] < v["full return R(τ)"]
assert v["Gₜ − V^π(sₜ) (exact)"] < v["reward-to-go Gₜ"] < v["full return R(τ)"]
assert v["Gₜ − V̂(sₜ) (learned)"] < 1.1 * v["Gₜ − V^π(sₜ) (exact)"]

# %% [markdown]
# ## GAE: trading bias for variance
#
# $G_t - V(s_t)$ still carries the randomness of every later token. Generalized advantage
# estimation (chapter 4 derives it) replaces part of that future with the critic's prediction:
#
# $$\hat A_t^{\mathrm{GAE}} = \sum_{l \ge 0} (\gamma\lambda)^l \delta_{t+l}, \qquad
#   \delta_t = r_t + \gamma V(s_{t+1}) - V(s_t).$$
#
# $\lambda = 1$ gives back $G_t - V(s_t)$; $\lambda = 0$ trusts the critic after one step. If the
# critic were perfect, every $\lambda$ would be unbiased (then $\mathbb{E}[\delta_t \mid s_t, a_t]$ is
# the true advantage). Real critics are not, and then a small $\lambda$ imports the critic's
# errors into the gradient — **bias** — while removing sampling noise — **variance**.
#
# To show the trade-off we use a *weak* critic: one learned number per position $t$, blind to the
# actual state (trained exactly as before). We sweep $\lambda$ with `rl.gae` and measure both
# quantities exactly, for the weak critic and for the exact $V^\pi$.

# %%
V_weak, _ = fit_critic(world.horizon, jnp.broadcast_to(jnp.arange(world.horizon), ids.shape))
lams = np.linspace(0.0, 1.0, 11)
gae_advantages = jax.jit(lambda values, lam: rl.gae(rewards, values, mask, gamma=GAMMA, lam=lam)[0])
sweep = {"weak critic": [], "exact V^π": []}
for lam in lams:
    for name, values in (("weak critic", V_weak), ("exact V^π", V_exact)):
        adv = gae_advantages(values, lam)  # [N, T]
        sweep[name].append(bias_and_variance(adv))
sweep = {k: np.array(v) for k, v in sweep.items()}  # [λ, (bias, variance)]
for lam, (bw, vw), (be, ve) in zip(lams, sweep["weak critic"], sweep["exact V^π"]):
    print(
        f"λ={lam:.1f}  weak critic: bias {bw:.3f} var {vw:.3f}"
        f" | exact V: bias {be:.1e} var {ve:.3f}"
    )

# %% [markdown]
# What the numbers show:
#
# * with the exact $V^\pi$, GAE is unbiased for every $\lambda$, and the variance falls as
#   $\lambda \to 0$;
# * with the weak critic, $\lambda = 1$ is unbiased (a state-blind baseline is still a baseline),
#   and the bias grows as $\lambda$ decreases while the variance shrinks;
# * the best $\lambda$ depends on the batch size: minimise $\text{bias}^2 + \text{variance}/N$.

# %%
weak, exact = sweep["weak critic"], sweep["exact V^π"]
assert exact[:, 0].max() < 1e-4
assert np.all(np.diff(exact[:, 1]) > 0)  # variance increases with λ
assert weak[-1, 0] < 1e-4 and weak[0, 0] > 0.05  # unbiased at λ=1, biased at λ=0
assert np.all(np.diff(weak[:, 0]) < 1e-6)  # bias decreases as λ grows
assert weak[0, 1] < 0.7 * weak[-1, 1]  # ... and variance increases
for n in (4, 64):
    mse = weak[:, 0] ** 2 + weak[:, 1] / n
    print(f"N={n:>3}: best λ for the weak critic = {lams[np.argmin(mse)]:.1f}")
best_small, best_large = (lams[np.argmin(weak[:, 0] ** 2 + weak[:, 1] / n)] for n in (4, 64))
assert best_small < best_large  # small batches favour the low-variance, biased end

fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
axes[0].plot(lams, weak[:, 0], "o-", label="weak critic")
axes[0].plot(lams, exact[:, 0], "s-", label="exact V^π")
axes[0].set(xlabel="λ", ylabel="bias ‖E ĝ − ∇J‖", title="bias")
axes[1].plot(lams, weak[:, 1], "o-", label="weak critic")
axes[1].plot(lams, exact[:, 1], "s-", label="exact V^π")
axes[1].set(xlabel="λ", ylabel="variance of one-sample ĝ", title="variance")
for n in (4, 16, 64):
    axes[2].plot(lams, weak[:, 0] ** 2 + weak[:, 1] / n, "o-", label=f"N = {n}")
axes[2].set(xlabel="λ", ylabel="bias² + variance/N", title="expected error, weak critic")
for ax in axes:
    ax.legend()
plt.tight_layout()

# %% [markdown]
# ## All estimators side by side
#
# Variance of a single-trajectory estimate, as a fraction of the full-return estimator's. The
# numbers replace the usual words ("reward-to-go and baselines reduce variance; GAE trades bias
# for variance") with measurements.

# %%
names = list(results) + ["GAE λ=0.9, weak critic", "GAE λ=0, weak critic"]
variances = [v[n] for n in results] + [weak[-2, 1], weak[0, 1]]
biases = [b for b, _ in results.values()] + [weak[-2, 0], weak[0, 0]]
for n, var, b in zip(names, variances, biases):
    print(f"{n:<26} variance {var / v['full return R(τ)']:6.1%}   bias {b:.3f}")
plt.figure(figsize=(7, 3.5))
plt.barh(names[::-1], np.array(variances[::-1]) / v["full return R(τ)"])
plt.xlabel("variance relative to the full-return estimator")
plt.tight_layout()

# %% [markdown]
# A Monte Carlo spot-check that the exact variance is what sampling sees: 2000 batches of 32
# trajectories with the reward-to-go-minus-value estimator; the measured mean squared error should
# match variance/32 (the estimator is unbiased).

# %%
psi = G - V_exact
per_traj = jnp.einsum("nt,ntp->np", psi, token_scores)  # [N, S·V]
idx = jax.random.choice(jax.random.key(3), p_tau.shape[0], shape=(2000, 32), p=p_tau)
estimates = per_traj[idx].mean(axis=1)  # [2000, S·V]
measured = float(jnp.mean(jnp.sum((estimates - grad_J) ** 2, axis=1)))
predicted = v["Gₜ − V^π(sₜ) (exact)"] / 32
print(f"measured E‖ĝ₃₂ − ∇J‖² = {measured:.5f}, predicted {predicted:.5f}")
assert abs(measured / predicted - 1) < 0.1

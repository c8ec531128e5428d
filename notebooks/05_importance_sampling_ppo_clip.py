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
# # Chapter 5 — Importance sampling, off-policy gradients and PPO's clip
#
# The policy gradient is an expectation under the *current* policy. Taken literally, every
# gradient step needs fresh responses from the model that exists right now — and generating text
# is the most expensive part of RLHF. We would like to generate a batch once, with the policy of
# that moment ($\pi_{\text{old}}$), and take several gradient steps on it. Importance sampling makes
# that possible; PPO's clipped objective makes it safe.

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
R = rl.discounted_return(rewards, mask, gamma=1.0)  # [N]
theta = tw.init_table(world, jax.random.key(0))  # [S, V] the current policy
direction = jax.random.normal(jax.random.key(1), theta.shape)  # a direction to move the policy in


def log_P(theta):
    return tw.log_prob_trajectories(world, theta, prompts, tokens, ids)  # [N]


def token_logprobs(theta):
    return rl.token_logprobs(tw.policy_logits(theta, ids), tokens)  # [N, T]


def exact_kl(logp, logq):
    """KL(p‖q) over all trajectories = E_p[log p − log q] = E_p[k1] (estimators: chapter 6)."""
    k1 = rl.kl_estimate(logp[:, None], logq[:, None], kind="k1")[:, 0]  # [N]
    return float(jnp.sum(jnp.exp(logp) * k1))


# %% [markdown]
# ## The importance-sampling identity
#
# For any function $f$ and two distributions $p$ and $q$ with $q(x) > 0$ wherever $p(x) > 0$,
#
# $$\mathbb{E}_{x \sim p}[f(x)] = \sum_x p(x) f(x) = \sum_x q(x) \frac{p(x)}{q(x)} f(x)
#   = \mathbb{E}_{x \sim q}\Big[\frac{p(x)}{q(x)} f(x)\Big].$$
#
# Samples from $q$ can stand in for samples from $p$ if each is reweighted by $w(x) = p(x)/q(x)$:
# up-weighted where $p$ would have produced it more often, down-weighted where less. Here
# $p$ = a policy $\pi_\theta$ we want to evaluate, $q$ = the older policy that produced the data,
# $f$ = the return.

# %%
log_p = log_P(theta + 0.3 * direction)  # target: a policy a few steps later
log_q = log_P(theta)  # proposal: the policy that generated the data
w = jnp.exp(log_p - log_q)  # [N] importance weights
lhs = jnp.sum(jnp.exp(log_p) * R)  # E_p[R]
rhs = jnp.sum(jnp.exp(log_q) * w * R)  # E_q[w R]
print(
    f"E_p[R] = {float(lhs):.5f}   E_q[(p/q) R] = {float(rhs):.5f}   E_q[R] = "
    f"{float(jnp.sum(jnp.exp(log_q) * R)):.5f}"
)
assert jnp.isclose(lhs, rhs, rtol=1e-5)
assert jnp.isclose(jnp.sum(jnp.exp(log_q) * w), 1.0, rtol=1e-5)  # E_q[w] = 1

samples = jax.random.choice(jax.random.key(2), w.shape[0], shape=(200_000,), p=jnp.exp(log_q))
mc = (w * R)[samples]
print(f"Monte Carlo from q (200k samples): {float(mc.mean()):.4f} ± {float(mc.std() / 447):.4f}")
assert abs(float(mc.mean() - lhs)) < 4 * float(mc.std()) / np.sqrt(200_000)

# %% [markdown]
# ## The price: variance grows as the policies drift apart
#
# The identity is exact for any $q$, but the *estimator* is not equally good. One sample's
# variance is $\mathbb{E}_q[w^2 f^2] - (\mathbb{E}_p f)^2 = \sum_x \frac{p(x)^2}{q(x)} f(x)^2 - (\mathbb{E}_p f)^2$:
# when $q$ rarely produces what $p$ likes, the rare samples carry huge weights. A common summary
# is the *effective sample size* fraction $1 / \mathbb{E}_q[w^2]$: how many on-policy samples one
# off-policy sample is worth. We move the target further and further from the data-collecting
# policy and compute both exactly.

# %%
scales = np.linspace(0.0, 3.0, 13)
kls, variances, ess = [], [], []
for s in scales:
    log_p = log_P(theta + s * direction)
    w = jnp.exp(log_p - log_q)
    mean = jnp.sum(jnp.exp(log_p) * R)
    variances.append(float(jnp.sum(jnp.exp(log_q) * (w * R) ** 2) - mean**2))
    ess.append(float(1.0 / jnp.sum(jnp.exp(log_q) * w**2)))
    kls.append(exact_kl(log_p, log_q))
kls, variances, ess = map(np.array, (kls, variances, ess))
for s, k, v, e in zip(scales[::3], kls[::3], variances[::3], ess[::3]):
    print(f"shift {s:.2f}: KL(p‖q) = {k:6.3f}  one-sample variance {v:8.3f}  ESS fraction {e:.3f}")
assert ess[0] == 1.0 or abs(ess[0] - 1.0) < 1e-5  # on-policy: every sample counts fully
assert np.all(np.diff(kls) > 0) and np.all(np.diff(ess) < 0)
assert variances[-1] > 10 * variances[0]

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
axes[0].semilogy(kls, variances, "o-")
axes[0].set(xlabel="KL(π_θ ‖ π_old)", ylabel="variance of one IS sample", title="IS variance")
axes[1].plot(kls, ess, "o-")
axes[1].set(xlabel="KL(π_θ ‖ π_old)", ylabel="1 / E_q[w²]", title="effective sample size")
plt.tight_layout()

# %% [markdown]
# ## The off-policy policy gradient
#
# Apply the identity to the policy gradient of chapter 2, with trajectories from $\pi_{\text{old}}$:
#
# $$\nabla_\theta J(\theta) = \mathbb{E}_{\tau \sim \pi_{\text{old}}}\Big[\frac{P(\tau \mid \theta)}{P(\tau \mid \theta_{\text{old}})}
#   \nabla_\theta \log P(\tau \mid \theta)\, R(\tau)\Big]
#   = \mathbb{E}_{\tau \sim \pi_{\text{old}}}\Big[\nabla_\theta \frac{P(\tau \mid \theta)}{P(\tau \mid \theta_{\text{old}})}\, R(\tau)\Big].$$
#
# The trajectory ratio is a product of per-token ratios $\rho_t = \pi_\theta(a_t \mid s_t) /
# \pi_{\text{old}}(a_t \mid s_t)$ (the prompt and transition terms cancel), and a product of many
# ratios has exactly the exploding variance just measured. PPO therefore uses the *per-token*
# surrogate, one ratio per token times that token's advantage:
#
# $$L^{\text{IS}}(\theta) = \mathbb{E}_{\tau \sim \pi_{\text{old}}}\Big[\sum_t \rho_t(\theta)\, \hat A_t\Big],
#   \qquad \rho_t(\theta) = \frac{\pi_\theta(a_t \mid s_t)}{\pi_{\text{old}}(a_t \mid s_t)} .$$
#
# At $\theta = \theta_{\text{old}}$ every $\rho_t = 1$ and $\nabla \rho_t = \nabla \log \pi_\theta(a_t
# \mid s_t)$, so the surrogate's gradient *is* the policy gradient there. Away from
# $\theta_{\text{old}}$ it is only an approximation (it ignores that the states themselves would be
# visited with different frequencies) — one more reason to stay close.
#
# Check: trajectory-level importance sampling gives the exact gradient at any $\theta$; the
# per-token surrogate, built from `rl.ppo_policy_loss`, gives it exactly at $\theta_{\text{old}}$
# and drifts away as $\theta$ moves. The expectation over $\pi_{\text{old}}$ is exact: each
# trajectory's advantages are multiplied by its probability times $N$ before the library's mean over
# sequences, which is allowed because the advantages are constants of the loss.

# %%
G = rl.reward_to_go(rewards, mask, gamma=1.0)  # [N, T]
p_old = jnp.exp(log_q)  # [N]
V_old = tw.conditional_mean(p_old, G, ids, world.n_states)  # the exact critic of π_old
adv_old = G - V_old  # [N, T] advantages of the data, fixed during the update
old_logprobs = token_logprobs(theta)  # [N, T] stored at rollout time
N = tokens.shape[0]


def J(th):
    return jnp.sum(jnp.exp(log_P(th)) * R)


def trajectory_is_objective(th):
    """E_old[(P_θ/P_old) R]: equal to J(θ) for every θ."""
    return jnp.sum(p_old * jnp.exp(log_P(th) - log_q) * R)


def ppo_objective(th, clip_eps):
    """−(PPO policy loss) with the expectation over π_old taken exactly."""
    weighted_adv = adv_old * (p_old * N)[:, None]  # constants: E_old = mean over N of (N·P)·x
    loss = rl.ppo_policy_loss(
        token_logprobs(th),
        old_logprobs,
        weighted_adv,
        mask,
        clip_eps=clip_eps,
        aggregation="seq_mean_token_sum",
    )
    return -loss


grad_J = jax.jit(jax.grad(J))
grad_traj = jax.jit(jax.grad(trajectory_is_objective))
grad_tok = jax.jit(jax.grad(ppo_objective), static_argnums=1)
steps = np.linspace(0.0, 1.5, 7)
rows = []
for s in steps:
    th = theta + s * direction
    g_true = grad_J(th)
    g_traj = grad_traj(th)
    g_tok = grad_tok(th, 1e6)  # an enormous ε: no clipping, the plain IS surrogate
    assert jnp.allclose(g_traj, g_true, atol=1e-5)
    rel = float(jnp.linalg.norm(g_tok - g_true) / jnp.linalg.norm(g_true))
    rows.append((s, exact_kl(log_P(th), log_q), rel))
    print(f"shift {s:.2f}: KL {rows[-1][1]:.3f}  ‖∇L_token − ∇J‖/‖∇J‖ = {rel:.3f}")
assert rows[0][2] < 1e-5  # exact at θ_old
assert rows[-1][2] > 0.1  # ... and not far from it

# %% [markdown]
# ## PPO's clipped objective
#
# PPO keeps the per-token surrogate but removes the incentive to push a ratio far from 1:
#
# $$L^{\text{CLIP}}(\theta) = \mathbb{E}_t\Big[\min\big(\rho_t \hat A_t,\ \operatorname{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\, \hat A_t\big)\Big].$$
#
# `rl.ppo_policy_loss` returns its negative (a loss to minimise). Read the min case by case, for one
# token with $\epsilon = 0.2$:
#
# * $\hat A > 0$ (a good token; the gradient wants $\rho$ up). Once $\rho > 1 + \epsilon$ the clipped
#   term $(1+\epsilon)\hat A$ is the smaller one: the objective goes flat and its gradient is zero
#   — no reward for making the token even more likely in this update. Below $1 - \epsilon$, the
#   unclipped $\rho \hat A$ is the smaller one, so a step that has made the good token *less*
#   likely still feels the full gradient that undoes it.
# * $\hat A < 0$ (a bad token; the gradient wants $\rho$ down). Below $1 - \epsilon$ the objective
#   is flat at $(1-\epsilon)\hat A$: no reward for suppressing it further. Above $1 + \epsilon$,
#   $\rho \hat A$ is the more negative term, and the min keeps it: a mistake in the wrong direction
#   is always penalised in full.
#
# The min makes the objective a pessimistic lower bound of the unclipped one: clipping can only
# remove *gains*, never hide *losses*.

# %%
EPS = 0.2
ratios = jnp.linspace(0.2, 2.0, 181)


def clipped_objective(ratio, advantage):
    """One token: −ppo_policy_loss with log π − log π_old = log ratio."""
    lp = jnp.log(ratio)[None]
    return -rl.ppo_policy_loss(lp, jnp.zeros(1), jnp.array([advantage]), jnp.ones(1), clip_eps=EPS)


objective = jax.vmap(clipped_objective, in_axes=(0, None))
slope = jax.vmap(jax.grad(clipped_objective), in_axes=(0, None))

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for ax, adv in zip(axes, (1.0, -1.0)):
    ax.plot(ratios, ratios * adv, "k:", label="unclipped ρ·Â")
    ax.plot(ratios, objective(ratios, adv), lw=2, label="PPO: min(ρÂ, clip(ρ)Â)")
    ax.plot(ratios, slope(ratios, adv), "--", label="d objective / dρ")
    ax.axvspan(1 - EPS, 1 + EPS, color="grey", alpha=0.15, label="1 ± ε")
    ax.set(xlabel="ratio ρ = π_θ / π_old", title=f"Â = {adv:+.0f}")
    ax.legend(fontsize=8)
plt.tight_layout()

# %% [markdown]
# The four regions, asserted (values and slopes):


# %%
def at(r, a):
    return float(clipped_objective(jnp.float32(r), a)), float(
        jax.grad(clipped_objective)(jnp.float32(r), a)
    )


# Â > 0
assert np.allclose(at(1.5, 1.0), (1.2, 0.0))  # above 1+ε: flat at (1+ε)Â, no gradient
assert np.allclose(at(0.5, 1.0), (0.5, 1.0))  # below 1−ε: unclipped, full gradient
assert np.allclose(at(1.1, 1.0), (1.1, 1.0))  # inside: the plain IS objective
# Â < 0
assert np.allclose(at(0.5, -1.0), (-0.8, 0.0))  # below 1−ε: flat at (1−ε)Â
assert np.allclose(at(1.5, -1.0), (-1.5, -1.0))  # above 1+ε: unclipped, full penalty
# pessimism: never above the unclipped objective
assert jnp.all(objective(ratios, 1.0) <= ratios * 1.0 + 1e-6)
assert jnp.all(objective(ratios, -1.0) <= ratios * -1.0 + 1e-6)

# %% [markdown]
# ## Several epochs on one batch
#
# Put together: collect one batch with $\pi_{\text{old}}$, then take many gradient steps on the
# surrogate without generating again. With the clip, tokens whose ratio has left
# $[1-\epsilon, 1+\epsilon]$ stop contributing, which in practice keeps the whole update close to
# $\pi_{\text{old}}$ (it is not a hard bound on the KL); without it, nothing stops the optimiser
# (`rl.clip_fraction` reports how many tokens end up clipped). The true objective $J$ and the
# exact KL from $\pi_{\text{old}}$ are computed along the way.
#
# An honest note on what this toy shows. Here the unclipped run reaches a *higher* $J$: the
# world is tiny, the advantages are exact, and the surrogate happens to keep pointing uphill. But it
# gets there by moving the policy a KL of about 1 away on a single batch — a distance at which
# the off-policy check above measured the surrogate's gradient to be off by more than 100%. It was lucky,
# not right. The clip gives up some progress per batch in exchange for never trusting the
# surrogate where it has stopped being a good guide; with a large model, noisy advantages and a
# reward model that can be fooled, that bound is what keeps training stable.

# %%
surrogate_grad = grad_tok  # jitted above; clip_eps is static


J_jit = jax.jit(J)


def run_epochs(clip_eps, n_steps=60, lr=1.0):
    th = theta
    history = []
    for _ in range(n_steps):
        th = th + lr * surrogate_grad(th, clip_eps)
        history.append(J_jit(th))
    lp = token_logprobs(th)
    frac = float(rl.clip_fraction(lp, old_logprobs, mask, clip_eps=0.2))
    return th, np.array(history), frac


th_clip, hist_clip, frac_clip = run_epochs(0.2)
th_free, hist_free, frac_free = run_epochs(1e6)
kl_clip, kl_free = exact_kl(log_P(th_clip), log_q), exact_kl(log_P(th_free), log_q)
print(f"start J = {float(J(theta)):.3f}")
print(
    f"clipped  : J = {hist_clip[-1]:.3f}, KL(π‖π_old) = {kl_clip:.3f},"
    f" clip fraction {frac_clip:.2f}"
)
print(f"unclipped: J = {hist_free[-1]:.3f}, KL(π‖π_old) = {kl_free:.3f}")
assert kl_clip < 0.1 < kl_free  # the clip keeps the whole update close to π_old
assert frac_clip > 0.2  # ... by switching off the tokens that moved too far
assert (
    hist_clip[-1] > float(J(theta)) + 0.1
)  # and the clipped update still improves J  # the clipped update still improves the true objective

plt.figure(figsize=(5, 3.5))
plt.plot(hist_clip, label="clipped surrogate (ε = 0.2)")
plt.plot(hist_free, label="unclipped surrogate")
plt.axhline(float(J(theta)), color="k", ls=":", label="J(θ_old)")
plt.xlabel("gradient steps on one batch")
plt.ylabel("true J(θ)")
plt.legend()
plt.tight_layout()

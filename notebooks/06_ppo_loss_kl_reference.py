# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 6 — The full PPO loss, the KL penalty and the reference model
#
# PPO trains two things at once — the policy (actor) and the value function (critic) — and keeps
# the policy from collapsing onto a few tokens. RLHF adds one more ingredient: a frozen copy of the
# model before RL, the **reference**, and a penalty for drifting away from it. This chapter checks
# each piece with the library and ends with the reason the penalty exists: reward hacking.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import toyworld as tw

from jaxrlhf import rl

# %% [markdown]
# ## Three terms
#
# $$L(\theta) = L^{\text{policy}} + c_1\, L^{\text{value}} - c_2\, H, \qquad
#   L^{\text{policy}} = -\mathbb{E}_t\big[\min(\rho_t \hat A_t, \operatorname{clip}(\rho_t, 1\pm\epsilon)\hat A_t)\big],$$
#
# $$L^{\text{value}} = \mathbb{E}_t\big[(V_\phi(s_t) - R_t)^2\big], \qquad
#   H = \mathbb{E}_t\Big[-\sum_v \pi_\theta(v \mid s_t) \log \pi_\theta(v \mid s_t)\Big].$$
#
# * The **policy** term is chapter 5's clipped surrogate.
# * The **value** term regresses the critic onto the GAE targets $R_t = \hat A_t + V_{\text{old}}(s_t)$
#   of chapter 4 (a mean squared error; `rl.value_loss` has no ½ factor, so our $c_1$ is half of
#   the $c_1$ of libraries that include it).
# * The **entropy** term is *subtracted*: minimising $L$ raises the entropy of the next-token
#   distribution, which keeps the policy exploring instead of locking onto one answer early.
#
# A hand example: two tokens, with the new policy equal to the old one (ratio 1, so the policy loss
# is $-\text{mean}(\hat A)$), values off by 0.5 and 1.0 from their targets, and a two-token
# vocabulary with logits $(0, 0)$ (entropy $\log 2$) and $(\ln 3, 0)$ (probabilities ¾, ¼).
#
# * $L^{\text{policy}} = -(1.0 + (-0.5))/2 = -0.25$
# * $L^{\text{value}} = (0.5^2 + 1.0^2)/2 = 0.625$
# * $H = \big(\log 2 + [-\tfrac34 \log \tfrac34 - \tfrac14 \log \tfrac14]\big)/2 = (0.693147 + 0.562335)/2 = 0.627741$
# * with $c_1 = 0.1$, $c_2 = 0.01$: $L = -0.25 + 0.0625 - 0.00627741 = -0.19377741$

# %%
logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])  # [T=2, V=2]
entropy = rl.token_entropy(logits)  # [T]
np.testing.assert_allclose(
    entropy, [np.log(2), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))], rtol=1e-6
)
lp = jnp.array([-0.7, -1.2])
loss, parts = rl.ppo_loss(
    logprobs=lp,
    old_logprobs=lp,
    advantages=jnp.array([1.0, -0.5]),
    values=jnp.array([0.5, 2.0]),
    old_values=jnp.array([0.5, 2.0]),
    returns=jnp.array([1.0, 1.0]),
    mask=jnp.ones(2),
    entropy=entropy,
    clip_eps=0.2,
    vf_coef=0.1,
    ent_coef=0.01,
)
print({k: round(float(v), 6) for k, v in parts.items()}, "total", float(loss))
np.testing.assert_allclose(parts["policy"], -0.25, atol=1e-6)
np.testing.assert_allclose(parts["value"], 0.625, atol=1e-6)
np.testing.assert_allclose(parts["entropy"], 0.627741, atol=1e-6)
np.testing.assert_allclose(loss, -0.25 + 0.1 * 0.625 - 0.01 * 0.627741, atol=1e-6)

# %% [markdown]
# Entropy ranges from 0 (all mass on one token) to $\log V$ (uniform), and the gradient of the
# bonus points towards uniform: one gradient step on $-H$ from a peaked distribution raises $H$.

# %%
V_SIZE = 5
uniform = rl.token_entropy(jnp.zeros((1, V_SIZE)))[0]
peaked_logits = jnp.array([[8.0, 0.0, 0.0, 0.0, 0.0]])
peaked = rl.token_entropy(peaked_logits)[0]
print(f"H(uniform over 5) = {float(uniform):.4f} = log 5;  H(peaked) = {float(peaked):.4f}")
assert jnp.isclose(uniform, np.log(V_SIZE)) and peaked < 0.05
step = peaked_logits + 1.0 * jax.grad(lambda z: rl.token_entropy(z).sum())(peaked_logits)
assert rl.token_entropy(step)[0] > peaked

# %% [markdown]
# ## The reference model and KL(π‖π_ref)
#
# The reward model is a learned, imperfect judge. Optimise against it hard enough and the policy
# finds responses it scores highly for the wrong reasons. RLHF therefore keeps the pre-RL model
# frozen as $\pi_{\text{ref}}$ and penalises the divergence
#
# $$\mathrm{KL}(\pi_\theta \,\|\, \pi_{\text{ref}}) = \mathbb{E}_{a \sim \pi_\theta}\Big[\log \frac{\pi_\theta(a \mid s)}{\pi_{\text{ref}}(a \mid s)}\Big].$$
#
# Only the *sampled* token's log-probabilities are at hand during training, so the KL is estimated
# from samples $a \sim \pi_\theta$. With $\ell = \log \pi_\theta(a) - \log \pi_{\text{ref}}(a)$
# (Schulman, "Approximating KL divergence", 2020):
#
# | estimator | formula | unbiased | always ≥ 0 |
# |---|---|---|---|
# | k1 | $\ell$ | yes | no |
# | k2 | $\tfrac12 \ell^2$ | no (exact to 2nd order) | yes |
# | k3 | $e^{-\ell} - 1 + \ell$ | yes | yes |
#
# k3 is unbiased because $\mathbb{E}_\pi[e^{-\ell}] = \sum_a \pi(a)\, \frac{\pi_{\text{ref}}(a)}{\pi(a)} = 1$,
# so the added $e^{-\ell} - 1$ has mean zero — it is a *control variate* that cancels much of
# $\ell$'s noise, and $e^{-\ell} - 1 + \ell \ge 0$ because $e^x \ge 1 + x$.
#
# The control variate helps most where RLHF operates, close to the reference; far from it,
# $e^{-\ell}$ is huge on tokens the policy has nearly abandoned, and k3 can become the noisier one.
#
# We measure bias and standard deviation **exactly** — the expectation over a vocabulary of 50
# tokens is a finite sum — for policies at increasing distance from a fixed reference.

# %%
V_BIG = 50
ref_logits = jax.random.normal(jax.random.key(0), (V_BIG,))
push = jax.random.normal(jax.random.key(1), (V_BIG,))
ref_logp = jax.nn.log_softmax(ref_logits)
scales = np.linspace(0.05, 2.0, 14)
table = {k: [] for k in ("kl", "k1", "k2", "k3")}
for s in scales:
    logp = jax.nn.log_softmax(ref_logits + s * push)  # the policy, moved away from the reference
    p = jnp.exp(logp)
    true_kl = float(jnp.sum(p * (logp - ref_logp)))
    table["kl"].append(true_kl)
    for kind in ("k1", "k2", "k3"):
        k = rl.kl_estimate(logp[None], ref_logp[None], kind=kind)[0]  # [V] value per sampled token
        mean = float(jnp.sum(p * k))
        std = float(jnp.sqrt(jnp.sum(p * (k - mean) ** 2)))
        table[kind].append((mean - true_kl, std, float(k.min())))
kl_true = np.array(table["kl"])
est = {kind: np.array(table[kind]) for kind in ("k1", "k2", "k3")}  # [scale, (bias, std, min)]
for i in (0, 6, 13):
    row = " | ".join(f"{kd}: bias {est[kd][i, 0]:+.4f} std {est[kd][i, 1]:.4f}" for kd in est)
    print(f"KL = {kl_true[i]:.4f} | {row}")

# %%
assert np.abs(est["k1"][:, 0]).max() < 1e-5  # k1 unbiased
assert np.abs(est["k3"][:, 0]).max() < 1e-5  # k3 unbiased
assert est["k3"][:, 2].min() >= -1e-7 and est["k2"][:, 2].min() >= 0  # k2, k3 never negative
assert est["k1"][:, 2].min() < 0  # k1 can be negative for a single token
assert np.abs(est["k2"][-1, 0]) > 0.05  # k2 is biased far from the reference ...
assert np.abs(est["k2"][0, 0]) < 0.01 * kl_true[0]  # ... nearly exact close to it
near = kl_true < 0.3
assert np.all(est["k3"][near, 1] < est["k1"][near, 1])  # near π_ref, k3 is far less noisy than k1
assert est["k3"][-1, 1] > est["k1"][-1, 1]  # far from it, e^{−ℓ} has heavy tails and k3 is not

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for kind in est:
    axes[0].plot(kl_true, est[kind][:, 0], "o-", label=kind)
    axes[1].plot(kl_true, est[kind][:, 1] / kl_true, "o-", label=kind)
axes[0].set(xlabel="true KL(π‖π_ref)", ylabel="bias", title="bias of one sample (exact)")
axes[1].set(xlabel="true KL(π‖π_ref)", ylabel="std / KL", title="relative std of one sample")
axes[1].set_yscale("log")
for ax in axes:
    ax.legend()
plt.tight_layout()

# %% [markdown]
# A sampling check of the same claims at one distance: 100 000 tokens drawn from $\pi$, the
# sample means of k1 and k3 within four standard errors of the true KL; k2's is not.

# %%
logp = jax.nn.log_softmax(ref_logits + 1.5 * push)
true_kl = float(jnp.sum(jnp.exp(logp) * (logp - ref_logp)))
draws = jax.random.categorical(jax.random.key(2), logp, shape=(100_000,))
for kind in ("k1", "k2", "k3"):
    k = rl.kl_estimate(logp[draws][None], ref_logp[draws][None], kind=kind)[0]
    z = (float(k.mean()) - true_kl) / (float(k.std()) / np.sqrt(k.size))
    print(
        f"{kind}: sample mean {float(k.mean()):.4f} (true {true_kl:.4f}), {z:+.1f} standard errors"
    )
    if kind in ("k1", "k3"):
        assert abs(z) < 4
    else:
        assert abs(z) > 4

# %% [markdown]
# ## KL-shaped rewards
#
# RLHF turns the penalty into part of the reward. Each generated token pays $\beta$ times its KL
# estimate, and the reward model's score arrives at the last valid token:
#
# $$r_t = -\beta\, \mathrm{KL}_t + \mathbb{1}[t = t_{\text{last}}]\; r_\phi(x, y).$$
#
# Hand example: score 2.0, $\beta = 0.1$, $\log \pi = (-1, -2, -0.5)$, $\log \pi_{\text{ref}} =
# (-1.5, -2, -1)$, so k1 $= (0.5, 0, 0.5)$ and $r = (-0.05,\ 0,\ -0.05 + 2) = (-0.05, 0, 1.95)$. If
# the response ended after two tokens (mask $1, 1, 0$), the score moves to $t = 1$ and the padded
# slot earns nothing: $r = (-0.05, 2.0, 0)$.

# %%
lp = jnp.array([-1.0, -2.0, -0.5])
ref = jnp.array([-1.5, -2.0, -1.0])
r_full = rl.kl_penalized_rewards(jnp.array(2.0), lp, ref, jnp.ones(3), kl_coef=0.1)
r_short = rl.kl_penalized_rewards(jnp.array(2.0), lp, ref, jnp.array([1.0, 1.0, 0.0]), kl_coef=0.1)
print(r_full, r_short)
np.testing.assert_allclose(r_full, [-0.05, 0.0, 1.95], atol=1e-6)
np.testing.assert_allclose(r_short, [-0.05, 2.0, 0.0], atol=1e-6)

# %% [markdown]
# Summing per-token k1 terms gives the KL between whole responses, because log-probabilities of a
# sequence add up (chapter 1): $\mathbb{E}_\pi\big[\sum_t \ell_t\big] = \mathrm{KL}(P_\pi(\tau) \,\|\, P_{\text{ref}}(\tau))$.
# So the return of the KL-shaped rewards (with $\gamma = 1$) is, in expectation, exactly
# "score minus $\beta$ times sequence-level KL". Checked exactly on the enumerable world.

# %%
world = tw.ToyWorld()
prompts, tokens = tw.enumerate_trajectories(world)
ids = tw.state_ids(world, prompts, tokens)
mask = jnp.ones(tokens.shape, jnp.float32)
theta_ref = tw.init_table(world, jax.random.key(0))
theta = theta_ref + 0.7 * jax.random.normal(jax.random.key(5), theta_ref.shape)
logprobs = rl.token_logprobs(tw.policy_logits(theta, ids), tokens)  # [N, T]
ref_logprobs = rl.token_logprobs(tw.policy_logits(theta_ref, ids), tokens)  # [N, T]
p_tau = jnp.exp(tw.log_prob_trajectories(world, theta, prompts, tokens, ids))
p_ref = jnp.exp(tw.log_prob_trajectories(world, theta_ref, prompts, tokens, ids))
scores = rl.discounted_return(tw.rewards(world, prompts, tokens), mask, gamma=1.0)  # any score
beta = 0.2
shaped = rl.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=beta)  # [N, T]
expected_return = jnp.sum(p_tau * rl.discounted_return(shaped, mask, gamma=1.0))
sequence_kl = jnp.sum(p_tau * (jnp.log(p_tau) - jnp.log(p_ref)))
print(
    f"E[Σ rₜ] = {float(expected_return):.5f};  E[score] − β·KL = "
    f"{float(jnp.sum(p_tau * scores) - beta * sequence_kl):.5f}"
)
assert jnp.isclose(expected_return, jnp.sum(p_tau * scores) - beta * sequence_kl, atol=1e-5)

# %% [markdown]
# ## Reward hacking, with and without the penalty
#
# A bandit is enough to see it. A prompt has six possible responses. The reference model (the
# model before RL) mostly gives reasonable ones and almost never (1%) the sixth, an obsequious
# "thank you, thank you…" reply. The **gold** reward is what people actually want; the **proxy** is
# the reward model, which agrees with gold on the common responses but, having seen almost no
# examples of the rare one, scores it highest.
#
# We maximise the KL-shaped objective with exact gradients (the expectation over six responses is
# a sum) and Adam, starting from the reference:
#
# $$\max_\theta\; \mathbb{E}_{y \sim \pi_\theta}\big[r_{\text{proxy}}(y)\big] - \beta\, \mathrm{KL}(\pi_\theta \,\|\, \pi_{\text{ref}}),$$
#
# written with `rl.kl_penalized_rewards` on one-token "responses".

# %%
responses = ["helpful", "correct", "short", "refusal", "rambling", "thank-you spam"]
ref_probs = jnp.array([0.30, 0.25, 0.20, 0.15, 0.09, 0.01])
gold = jnp.array([1.0, 0.6, 0.3, -0.2, 0.0, -1.0])
proxy = gold.at[5].set(2.0)  # the reward model's blind spot
ref_lp = jnp.log(ref_probs)


def kl_shaped_objective(logits, beta):
    """E_π[r_proxy − β·k1]: the expected return of the KL-shaped reward, exactly."""
    logp = jax.nn.log_softmax(logits)  # [6]
    r = rl.kl_penalized_rewards(
        proxy, logp[:, None], ref_lp[:, None], jnp.ones((6, 1)), kl_coef=beta
    )
    return jnp.sum(jnp.exp(logp) * r[:, 0])


optimiser = optax.adam(optax.cosine_decay_schedule(0.1, 2000))  # what LM training would use


@jax.jit
def optimise(beta):
    def step(carry, _):
        logits, opt_state = carry
        grads = jax.grad(lambda z: -kl_shaped_objective(z, beta))(logits)  # ascent = descent on −
        updates, opt_state = optimiser.update(grads, opt_state)
        logits = optax.apply_updates(logits, updates)
        p = jax.nn.softmax(logits)
        return (logits, opt_state), (p @ proxy, p @ gold)

    init = (ref_lp, optimiser.init(ref_lp))  # start at the reference policy
    (logits, _), curves = jax.lax.scan(step, init, None, length=2000)
    return logits, curves


def summary(logits):
    p = jax.nn.softmax(logits)
    return float(p @ proxy), float(p @ gold), float(jnp.sum(p * (jnp.log(p) - ref_lp)))


print(f"reference:      proxy {float(ref_probs @ proxy):.3f}  gold {float(ref_probs @ gold):.3f}")
runs = {}
for beta in (0.0, 0.5):
    logits, curves = optimise(beta)
    runs[beta] = (logits, curves)
    pr, go, kl = summary(logits)
    probs = ", ".join(f"{n} {float(q):.2f}" for n, q in zip(responses, jax.nn.softmax(logits)))
    print(f"β = {beta}: proxy {pr:.3f}  gold {go:.3f}  KL {kl:.3f}\n   π = {probs}")

# %% [markdown]
# Without the penalty the policy learns to say "thank you" — the proxy score climbs to its maximum
# while the gold reward falls to its minimum. (Early on the gold reward rises too: the policy
# first moves towards the genuinely helpful answer, and only later does the spam take over — the
# proxy and the gold agree until they suddenly don't.) With $\beta = 0.5$ it improves the gold
# reward over the reference (the wiggles in its curve are Adam's momentum settling).
#
# The KL-regularised optimum has a closed form (a classic result, e.g. in the DPO paper),
# $\pi^\star(y) \propto \pi_{\text{ref}}(y)\, e^{r(y)/\beta}$: the reference reweighted, never
# abandoned — the rare response can only gain the factor $e^{r/\beta}$. The optimised policy
# matches it.

# %%
pr0, go0, kl0 = summary(runs[0.0][0])
pr5, go5, kl5 = summary(runs[0.5][0])
ref_gold = float(ref_probs @ gold)
assert go0 < -0.9 and pr0 > 1.9  # hacked: spam almost always
assert go5 > ref_gold + 0.05  # the penalised policy really is better
assert kl5 < 0.5 < kl0
closed_form = ref_probs * jnp.exp(proxy / 0.5)
closed_form = closed_form / closed_form.sum()
np.testing.assert_allclose(jax.nn.softmax(runs[0.5][0]), closed_form, atol=1e-3)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for ax, beta in zip(axes, (0.0, 0.5)):
    proxy_curve, gold_curve = runs[beta][1]
    ax.plot(proxy_curve, label="proxy (reward model)")
    ax.plot(gold_curve, label="gold (what people want)")
    ax.axhline(ref_gold, color="k", ls=":", label="gold of π_ref")
    ax.set(xlabel="gradient step", ylabel="expected reward", title=f"β = {beta}", xscale="log")
    ax.legend(fontsize=8)
plt.tight_layout()

# %% [markdown]
# Sweeping $\beta$ traces the familiar over-optimisation curve: as the policy is allowed further
# from the reference (larger KL), the proxy reward keeps rising while the gold reward rises, peaks
# and falls.

# %%
betas = jnp.geomspace(0.05, 5.0, 25)
final = jax.vmap(lambda b: optimise(b)[0])(betas)  # [25, 6]
stats = np.array([summary(l) for l in final])  # [β, (proxy, gold, KL)]
order = np.argsort(stats[:, 2])
plt.figure(figsize=(5.5, 3.5))
plt.plot(stats[order, 2], stats[order, 0], "o-", label="proxy")
plt.plot(stats[order, 2], stats[order, 1], "s-", label="gold")
plt.xlabel("KL(π‖π_ref) at the optimum")
plt.ylabel("expected reward")
plt.legend()
plt.tight_layout()
peak = np.argmax(stats[order, 1])
assert 0 < peak < len(order) - 1  # gold peaks at an intermediate KL
assert np.all(np.diff(stats[order, 0]) > -1e-4)  # proxy only rises with KL

# %% [markdown]
# One more detail that makes the trainer simple: PPO treats the KL-shaped rewards as fixed numbers
# (they are computed once, at rollout time), even though they depend on $\theta$ through
# $\log \pi_\theta$. That is still the correct gradient: the extra term is
# $-\beta\, \mathbb{E}_\pi[\nabla \log \pi] = -\beta \sum_y \nabla \pi(y) = 0$. Checked exactly:

# %%
logits = ref_lp + 0.3 * jax.random.normal(jax.random.key(9), (6,))


def score_function_objective(logits, beta=0.5):
    """Σ π(y) · stop_gradient(r(y)): the rewards frozen, as in PPO's rollout."""
    logp = jax.nn.log_softmax(logits)
    r = rl.kl_penalized_rewards(
        proxy, logp[:, None], ref_lp[:, None], jnp.ones((6, 1)), kl_coef=beta
    )
    return jnp.sum(jnp.exp(logp) * jax.lax.stop_gradient(r[:, 0]))


np.testing.assert_allclose(
    jax.grad(score_function_objective)(logits),
    jax.grad(kl_shaped_objective)(logits, 0.5),
    atol=1e-6,
)

# %% [markdown]
# ## LoRA: the reference model for free
#
# With LoRA the policy is the base with a low-rank update on each projection,
# $W' = W + \Delta W$, $\Delta W = \tfrac{\alpha}{r} A B$ with $A \in \mathbb{R}^{d_\text{in}\times r}$,
# $B \in \mathbb{R}^{r \times d_\text{out}}$ (Hu et al. 2021); only $A$ and $B$ are trained.
# $B$ starts at zero, so before the first update the policy *is* the base: the first PPO ratio
# $\pi_\theta / \pi_\text{old}$ is exactly 1 and the KL to the base is exactly 0. And since the
# reference is the initial policy, it is the same model with $\Delta W$ switched off: no second copy
# of the weights. Checked on a tiny GPT-2 against the package:

# %%
from flax import nnx

from jaxrlhf.models import CausalLM, ModelConfig
from jaxrlhf.models.lora import adapters_off, merge_lora, split_trainable, with_lora

tiny = ModelConfig(family="gpt2", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2)
base = CausalLM(tiny, rngs=nnx.Rngs(0))
policy = with_lora(base, rank=2, alpha=4.0)
ids = jnp.array([[3, 7, 1, 9, 4, 2]])
mask = jnp.ones_like(ids)


def logprobs(model):
    return rl.token_logprobs(model(ids, mask)[:, :-1], ids[:, 1:])  # [1, 5]


ratio = jnp.exp(logprobs(policy) - logprobs(base))
np.testing.assert_allclose(ratio, 1.0, atol=1e-6)  # B = 0: the first ratio is 1

# one "update" of the adapters alone (the base is frozen), then the three identities
graphdef, adapters, frozen = split_trainable(policy)
adapters = jax.tree.map(lambda x: x + 0.2, adapters)
policy = nnx.merge(graphdef, adapters, frozen)
proj = policy.model.h.attn.c_attn  # layer 0 of the stacked blocks: [L, …]
delta = (4.0 / 2) * proj.lora_a[...][0] @ proj.lora_b[...][0]
merged = merge_lora(policy)
np.testing.assert_allclose(
    merged.model.h.attn.c_attn.kernel[...][0] - proj.kernel[...][0], delta, atol=1e-6
)  # ΔW = (α/r)·A·B, folded into W for export
np.testing.assert_allclose(logprobs(merged), logprobs(policy), atol=1e-5)
reference = adapters_off(policy)  # the same arrays, α/r = 0
np.testing.assert_array_equal(logprobs(reference), logprobs(base))  # the reference, exactly
assert float(jnp.abs(logprobs(policy) - logprobs(base)).max()) > 1e-3
n_adapters = sum(x.size for x in jax.tree.leaves(adapters))
n_base = sum(x.size for x in jax.tree.leaves(frozen))
print(f"trained: {n_adapters} adapter numbers; frozen and shared with the reference: {n_base}")
assert n_adapters == 2 * 2 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))

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
# # Chapter 9 — From PPO to GRPO and RLOO
#
# PPO trains a critic next to the policy: a second network, as large as the first, whose only job
# is the baseline $V(s_t)$ of chapter 3. In RLHF the reward usually arrives once, at the end of
# the response (a reward model's score, or a verifier's pass/fail), and the simplest baseline is
# the critic's guess at the start: how good an answer to *this prompt* is expected to be. That
# guess can also be *measured* instead of learned — sample several answers to the same prompt and
# look at how they score. This is the idea of the critic-free methods:
#
# * **RLOO** (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740): each answer's baseline is
#   the mean score of the *other* answers to its prompt;
# * **GRPO** (Shao et al. 2024, arXiv:2402.03300): the mean of the whole group, and the advantage
#   divided by the group's standard deviation;
# * **Dr. GRPO** (Liu et al. 2025, arXiv:2503.20783): GRPO without the two normalisations that
#   bias it (the std, and the division by each answer's length).
#
# This chapter derives what each of them estimates, exactly, on the enumerable world of chapters
# 1–6, and then checks the variants that recent recipes add on top of the loss: DAPO's
# clip-higher and GSPO's sequence-level ratio.
#
# The world is the one of chapter 2, seen from the end of the response: a prompt $x$, a response
# $y$ of three tokens (27 per prompt), the policy
# $\pi_\theta(y \mid x) = \prod_t \pi_\theta(y_t \mid s_t)$, and one score per response,
# $R(x, y) = \sum_t r_t$.

# %%
import functools
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import toyworld as tw

from jaxrlhf import rl

world = tw.ToyWorld()
prompts, tokens = tw.enumerate_trajectories(world)  # [N], [N, T]
ids = tw.state_ids(world, prompts, tokens)  # [N, T]
mask = jnp.ones(tokens.shape, jnp.float32)  # [N, T]
R = rl.discounted_return(tw.rewards(world, prompts, tokens), mask, gamma=1.0)  # [N] the score
theta = tw.init_table(world, jax.random.key(0))  # [S, V] the policy of chapter 2
X, K = world.n_prompts, world.vocab_size**world.horizon  # 2 prompts, 27 responses each
p_x = jnp.asarray(world.prompt_probs)  # [X]


def policy_logprob(theta):
    """log π_θ(y|x) of every response: Σₜ log π_θ(yₜ|sₜ) (chapter 1)."""
    logprobs = rl.token_logprobs(tw.policy_logits(theta, ids), tokens)  # [N, T]
    return rl.trajectory_logprob(logprobs, mask)  # [N]


pi = jnp.exp(policy_logprob(theta)).reshape(X, K)  # [X, K] π(y|x)
scores = R.reshape(X, K)  # [X, K] R(x, y)
score_fn = jax.jit(jax.jacobian(policy_logprob))(theta).reshape(X, K, -1)  # [X, K, P] ∇log π(y|x)


def J(theta):
    """The objective, exactly: Σₓ p(x) Σ_y π(y|x) R(x, y)."""
    return jnp.sum(p_x * jnp.sum(jnp.exp(policy_logprob(theta)).reshape(X, K) * scores, axis=1))


grad_J = jax.jit(jax.grad(J))(theta).ravel()  # [P] the true gradient, by autodiff
V = jnp.sum(pi * scores, axis=1)  # [X] V(x) = E[R | x], what a perfect critic would say
print(f"V(x) = {np.round(np.asarray(V), 4)},  ‖∇J‖ = {float(jnp.linalg.norm(grad_J)):.4f}")

# %% [markdown]
# ## A group of answers per prompt
#
# GRPO samples a prompt $x$ and a **group** of $G$ answers
# $y_1, \ldots, y_G \sim \pi_\theta(\cdot \mid x)$, scores each, turns the scores into advantages $A_i$ and uses the policy-gradient
# estimate of chapter 2, one advantage per answer, copied onto each of its tokens:
#
# $$\hat g = \frac{1}{G} \sum_{i=1}^{G} A_i\, \nabla_\theta \log \pi_\theta(y_i \mid x)
#   = \frac{1}{G} \sum_{i=1}^{G} A_i \sum_t \nabla_\theta \log \pi_\theta(y_{i,t} \mid s_{i,t}).$$
#
# In code it is PPO's clipped loss (chapter 5) with those advantages: at ratio 1 its gradient is
# $-\hat g$ when the per-token losses are summed per answer and averaged over the group
# (`aggregation="seq_mean_token_sum"`). Check on one sampled group of four.

# %%
G = 4
group = jax.random.choice(jax.random.key(1), K, shape=(G,), p=pi[0])  # 4 answers to prompt 0
A = rl.rloo_advantages(scores[0, group], group_size=G)  # [G] one advantage per answer
rows = group  # prompt 0's responses are rows 0..26 of the enumeration


def group_loss(theta):
    logprobs = rl.token_logprobs(tw.policy_logits(theta, ids[rows]), tokens[rows])  # [G, T]
    return rl.ppo_policy_loss(
        logprobs,
        jax.lax.stop_gradient(logprobs),  # ratio 1: the first step on fresh samples
        jnp.broadcast_to(A[:, None], logprobs.shape),  # the answer's advantage on each token
        mask[rows],
        clip_eps=0.2,
        aggregation="seq_mean_token_sum",
    )


g_hat = jnp.mean(A[:, None] * score_fn[0, group], axis=0)  # [P]
assert jnp.allclose(-jax.jit(jax.grad(group_loss))(theta).ravel(), g_hat, atol=1e-6)

# %% [markdown]
# ## Three advantages from the same scores
#
# $$A_i^{\text{mean}} = R_i - \bar R, \qquad
#   A_i^{\text{GRPO}} = \frac{R_i - \bar R}{\operatorname{std}(R_{1..G}) + \epsilon}, \qquad
#   A_i^{\text{RLOO}} = R_i - \frac{1}{G-1} \sum_{j \ne i} R_j,$$
#
# with $\bar R = \frac1G \sum_j R_j$ and the sample standard deviation (Bessel's $G - 1$).
# By hand, for the group of scores $(2, 0.5, 1, 0.5)$: $\bar R = 1$, so
# $A^{\text{mean}} = (1, -0.5, 0, -0.5)$; the std is $\sqrt{(1 + 0.25 + 0 + 0.25)/3} = \sqrt{0.5}$,
# so $A^{\text{GRPO}} = A^{\text{mean}} / (0.70711 + 10^{-4}) = (1.41401, -0.70700, 0, -0.70700)$;
# and the others' means are $(2/3, 7/6, 1, 7/6)$, so $A^{\text{RLOO}} = (4/3, -2/3, 0, -2/3)$.
#
# RLOO is the plain group mean scaled up:
# $R_i - \frac{1}{G-1}(G\bar R - R_i) = \frac{G}{G-1}(R_i - \bar R)$. Every answer's advantage differs by the same factor $G/(G-1)$ — keep it in mind.

# %%
hand = jnp.array([2.0, 0.5, 1.0, 0.5])
a_mean = rl.grpo_advantages(hand, group_size=4, scale_by_std=False)
a_grpo = rl.grpo_advantages(hand, group_size=4)
a_rloo = rl.rloo_advantages(hand, group_size=4)
print("mean:", a_mean, "\nGRPO:", a_grpo, "\nRLOO:", a_rloo)
np.testing.assert_allclose(a_mean, [1.0, -0.5, 0.0, -0.5], atol=1e-6)
np.testing.assert_allclose(
    a_grpo, np.array([1.0, -0.5, 0.0, -0.5]) / (np.sqrt(0.5) + 1e-4), atol=1e-5
)
np.testing.assert_allclose(a_rloo, [4 / 3, -2 / 3, 0.0, -2 / 3], atol=1e-6)
np.testing.assert_allclose(a_rloo, 4 / 3 * a_mean, atol=1e-6)

# %% [markdown]
# ## Why leaving one out keeps the estimate unbiased
#
# Chapter 3's rule: subtracting a baseline $b$ keeps $\hat g$ unbiased as long as $b$ does not
# depend on the action it is subtracted from, because then
#
# $$\mathbb{E}[b\, \nabla \log \pi(y_i \mid x)] = \mathbb{E}[b] \cdot \mathbb{E}[\nabla \log \pi(y_i \mid x)]
#   = \mathbb{E}[b] \cdot \sum_y \nabla \pi(y \mid x) = 0.$$
#
# * RLOO's baseline for $y_i$ is built from the other answers only. They are drawn independently
#   of $y_i$, so the rule applies: $\mathbb{E}[\hat g^{\text{RLOO}}] = \nabla J$.
# * The group mean contains $R_i$ itself. Split it:
#   $R_i - \bar R = \frac{G-1}{G} R_i - \frac1G \sum_{j \ne i} R_j$. The second part is a fair
#   baseline and averages away; the first is the plain estimator shrunk by $\frac{G-1}{G}$. So
#   $\mathbb{E}[\hat g^{\text{mean}}] = \frac{G-1}{G} \nabla J$ — biased, but only in length, by
#   the same factor for every prompt: a learning rate absorbs it.
#
# **Exact check.** For a prompt, a group is an ordered $G$-tuple of its 27 answers; there are
# $27^G$ of them ($531\,441$ for $G = 4$) and the tuple $(y_1, \ldots, y_G)$ has probability
# $\prod_i \pi(y_i \mid x)$. Enumerating them all gives the expectation of any group estimator as
# a finite sum. We also get its variance, from the Gram matrix of the score vectors:
# $\|\hat g\|^2 = \frac{1}{G^2} \sum_{i,j} A_i A_j\, \nabla\log\pi(y_i)^\top \nabla\log\pi(y_j)$.


# %%
@functools.cache
def all_groups(group_size):
    """Every group of answers to each prompt, its probability and its score vectors' Gram matrix."""
    groups = tw.all_groups(K, group_size)  # [M, G] every ordered G-tuple of answers
    prob = jnp.prod(pi[:, groups], axis=-1)  # [X, M] P(group | x) = Πᵢ π(yᵢ|x)
    gram = jnp.einsum("xkp,xlp->xkl", score_fn, score_fn)  # [X, K, K] ∇log π(y)ᵀ ∇log π(y′)
    gram_groups = gram[:, groups[:, :, None], groups[:, None, :]]  # [X, M, G, G]
    return groups, prob, gram_groups


def group_moments(advantage_fn, group_size, group_scores=scores):
    """Exact E ĝ [P] and E‖ĝ − E ĝ‖² of ĝ = (1/G) Σᵢ Aᵢ ∇log π(yᵢ|x), x ~ p(x), yᵢ ~ π(·|x) i.i.d.

    advantage_fn(flat_scores, group_size) maps [M·G] scores (M consecutive groups) to advantages.
    """
    mean, var = _group_moments(advantage_fn, *all_groups(group_size), group_scores)
    return mean, float(var)


@functools.partial(jax.jit, static_argnums=0)
def _group_moments(advantage_fn, groups, prob, gram_groups, group_scores):
    group_size = groups.shape[1]
    mean, second = 0.0, 0.0
    for x in range(X):
        adv = advantage_fn(group_scores[x][groups].ravel(), group_size).reshape(groups.shape)
        weight = jax.ops.segment_sum((prob[x][:, None] * adv).ravel(), groups.ravel(), K)  # [K]
        mean = mean + p_x[x] * (weight @ score_fn[x]) / group_size  # [P]
        norm2 = jnp.einsum("mi,mij,mj->m", adv, gram_groups[x], adv) / group_size**2  # [M] ‖ĝ‖²
        second = second + p_x[x] * jnp.sum(prob[x] * norm2)
    return mean, second - mean @ mean


ADVANTAGES = {
    "no baseline": lambda s, g: s,
    "group mean": lambda s, g: rl.grpo_advantages(s, group_size=g, scale_by_std=False),
    "GRPO (÷ std)": lambda s, g: rl.grpo_advantages(s, group_size=g),
    "RLOO": lambda s, g: rl.rloo_advantages(s, group_size=g),
}
moments = {(name, g): group_moments(fn, g) for g in (2, 3, 4) for name, fn in ADVANTAGES.items()}
unit = grad_J / (grad_J @ grad_J)
for (name, g), (mean, var) in moments.items():
    cos = float(mean @ grad_J / jnp.linalg.norm(mean) / jnp.linalg.norm(grad_J))
    print(
        f"G={g}  {name:<13} E ĝ = {float(mean @ unit):.4f} ∇J (cos {cos:.4f})  variance {var:.3f}"
    )

# %% [markdown]
# Checked for $G = 2, 3, 4$:
#
# * with no baseline and with RLOO the expected gradient *is* $\nabla J$;
# * with the group mean it is exactly $\frac{G-1}{G} \nabla J$: ½, ⅔, ¾;
# * with the std division it is neither: not even parallel to $\nabla J$ (cosine below 1). The
#   next sections say what it weights instead.

# %%
for g in (2, 3, 4):
    np.testing.assert_allclose(moments[("no baseline", g)][0], grad_J, atol=1e-4)
    np.testing.assert_allclose(moments[("RLOO", g)][0], grad_J, atol=1e-4)
    np.testing.assert_allclose(moments[("group mean", g)][0], (g - 1) / g * grad_J, atol=1e-4)
    grpo_mean = moments[("GRPO (÷ std)", g)][0]
    assert grpo_mean @ grad_J / jnp.linalg.norm(grpo_mean) / jnp.linalg.norm(grad_J) < 0.995

# %% [markdown]
# ## The group is the critic
#
# The point of a baseline is variance. Compare, per group of $G$ answers, the estimator with no
# baseline, RLOO, and the best critic there could be — the exact $V(x) = \mathbb{E}[R \mid x]$,
# which we know by enumeration (chapter 3's exact value baseline, at the prompt). RLOO's baseline
# is a noisy estimate of $V(x)$ from $G - 1$ samples, and it pays for that: in each answer's
# weight $R_i - b_i$ the baseline's own noise, $\operatorname{Var}(R \mid x)/(G-1)$, adds to the
# $\mathbb{E}[(R - V)^2 \mid x] = \operatorname{Var}(R \mid x)$ that the perfect critic leaves, so
# the variance grows by roughly $G/(G-1)$ (measured: within 5%). As $G$ grows the price
# vanishes. (The group mean's variance is RLOO's times $((G-1)/G)^2$: the same estimator, shrunk.)

# %%
exact_critic = {
    g: group_moments(ADVANTAGES["no baseline"], g, group_scores=scores - V[:, None])
    for g in (2, 3, 4)
}
for g in (2, 3, 4):
    none, rloo, best = moments[("no baseline", g)][1], moments[("RLOO", g)][1], exact_critic[g][1]
    print(f"G={g}: variance  no baseline {none:.3f}   RLOO {rloo:.3f}   exact V(x) {best:.3f}")
    np.testing.assert_allclose(exact_critic[g][0], grad_J, atol=1e-4)  # a true baseline: unbiased
    assert best < rloo < none
    np.testing.assert_allclose(moments[("group mean", g)][1], ((g - 1) / g) ** 2 * rloo, rtol=1e-3)
price = [moments[("RLOO", g)][1] / exact_critic[g][1] for g in (2, 3, 4)]
print("RLOO's variance / the perfect critic's:", np.round(price, 3))
assert price[0] > price[1] > price[2]
np.testing.assert_allclose(price, [2 / 1, 3 / 2, 4 / 3], rtol=0.05)  # ≈ G/(G−1)
assert moments[("RLOO", 4)][1] < 0.5 * moments[("no baseline", 4)][1]

# %% [markdown]
# ## Dividing by the std: the difficulty bias
#
# GRPO divides each group's advantages by the group's std. With a pass/fail reward (a verifier,
# $R \in \{0, 1\}$) the std of a group with $k$ correct answers out of $G$ is
# $\sqrt{k(G-k)/(G(G-1))}$: largest when half are right, smallest when almost all or almost none
# are. Dividing by it gives the rare correct answer of a nearly impossible prompt, and the rare
# wrong answer of a nearly solved one, a much larger push. For $G = 8$:
#
# | correct | std | $A$ of a correct answer, mean | GRPO |
# |---|---|---|---|
# | 1 of 8 | $\sqrt{7/56} = 0.3536$ | $7/8 = 0.875$ | $0.875/0.3537 = 2.474$ |
# | 4 of 8 | $\sqrt{16/56} = 0.5345$ | $0.5$ | $0.5/0.5346 = 0.935$ |

# %%
G = 8
one_right = rl.grpo_advantages(jnp.array([1.0] + [0.0] * 7), group_size=G)
half_right = rl.grpo_advantages(jnp.array([1.0] * 4 + [0.0] * 4), group_size=G)
print(f"A(correct): 1 of 8 → {float(one_right[0]):.3f},  4 of 8 → {float(half_right[0]):.3f}")
np.testing.assert_allclose(one_right[0], 0.875 / (np.sqrt(7 / 56) + 1e-4), rtol=1e-5)
np.testing.assert_allclose(half_right[0], 0.5 / (np.sqrt(16 / 56) + 1e-4), rtol=1e-5)

# %% [markdown]
# **What it does to the expected gradient.** With a binary reward the expectation has a simple
# form. Given that answer $i$ is right ($R_i = 1$) or wrong ($R_i = 0$), its expected advantage
# $\alpha(R_i) = \mathbb{E}[A_i \mid R_i]$ depends only on how many of the other $G - 1$ answers
# are right, a Binomial$(G-1, p)$ count where $p = P(R = 1 \mid x)$ is the prompt's success
# rate. Then, using $\sum_y \pi(y) \nabla \log \pi(y) = 0$,
#
# $$\mathbb{E}[\hat g \mid x] = \sum_y \pi(y \mid x)\, \alpha(R(y))\, \nabla \log \pi(y \mid x)
#   = \big(\alpha(1) - \alpha(0)\big)\, \nabla_\theta\, p(x) \;=\; w(p)\, \nabla_\theta\, p(x).$$
#
# Each prompt's true gradient $\nabla p(x)$ is multiplied by a weight $w(p)$ that depends on how
# hard the prompt is. For RLOO $w = 1$ and for the group mean $w = (G-1)/G$, whatever $p$: the
# policy gradient. For GRPO the std in the denominator is about $\sqrt{p(1-p)}$, so in large groups
# $w(p) \approx 1/\sqrt{p(1-p)}$: prompts that are almost always or almost never solved are
# up-weighted. In a group of $G$ the std cannot fall below that of one odd answer out,
# $\sqrt{1/G}$ (near $G-1$ of $G$), which caps the weight at the extremes at
# $\frac{G-1}{G} / \sqrt{1/G} = (G-1)/\sqrt{G}$.
#
# Check it on the toy world with a pass/fail reward — an answer is "correct" if it scores
# $R \ge 2$. Prompt 0 is solved 43% of the time, prompt 1 only 20%: by enumeration of all groups
# of four, the expected gradient at each prompt is exactly $w(p_x)\,\nabla p(x)$, with $w$
# computed from the library's advantages of the $G$ possible group compositions.


# %%
def difficulty_weight(advantage_fn, p, group_size):
    """w(p) = E[A₁ | R₁ = 1] − E[A₁ | R₁ = 0], the others' successes j ~ Binomial(G − 1, p)."""
    j = np.arange(group_size)  # [G] how many of the other G − 1 answers are correct
    others = (np.arange(group_size - 1)[None, :] < j[:, None]).astype(np.float32)  # [G, G−1]
    first = np.repeat([[1.0], [0.0]], group_size, axis=0)  # [2G, 1] answer 1: right, then wrong
    groups = np.concatenate([first, np.concatenate([others, others])], axis=1)  # [2G, G]
    adv = advantage_fn(jnp.asarray(groups.ravel()), group_size).reshape(groups.shape)[:, 0]
    right, wrong = np.asarray(adv[:group_size]), np.asarray(adv[group_size:])  # [G] each
    p = np.asarray(p, np.float64)[..., None]
    comb = np.array([math.comb(group_size - 1, k) for k in j])
    binomial = comb * p**j * (1 - p) ** (group_size - 1 - j)  # [..., G]
    return binomial @ (right - wrong)


passed = (scores >= 2.0).astype(jnp.float32)  # [X, K] a verifier's 0/1
success = jnp.sum(pi * passed, axis=1)  # [X] p(x)
grad_p = [(pi[x] * passed[x]) @ score_fn[x] for x in range(X)]  # ∇p(x) = E[1(pass) ∇log π | x]
G = 4
for name in ("RLOO", "group mean", "GRPO (÷ std)"):
    fn = ADVANTAGES[name]
    for x in range(X):
        # the other prompt's answers all score 0: its groups have zero advantages, no gradient
        only_x = jnp.where(jnp.arange(X)[:, None] == x, passed, 0.0)  # [X, K]
        mean, _ = group_moments(fn, G, group_scores=only_x)
        w = float(difficulty_weight(fn, success[x], G))
        print(f"{name:<13} prompt {x} (p = {float(success[x]):.2f}): w = {w:.4f}")
        np.testing.assert_allclose(mean, p_x[x] * w * grad_p[x], atol=2e-5)
w_grpo = difficulty_weight(ADVANTAGES["GRPO (÷ std)"], success, G)
assert w_grpo[1] > w_grpo[0]  # the harder prompt counts more (only a little: neither is extreme)
some_ps = np.array([0.2, 0.6])
np.testing.assert_allclose(difficulty_weight(ADVANTAGES["RLOO"], some_ps, G), 1.0, atol=1e-6)
np.testing.assert_allclose(difficulty_weight(ADVANTAGES["group mean"], some_ps, G), 0.75, atol=1e-6)

# %% [markdown]
# Over the whole range of success rates, for groups of 8 and of 64: GRPO's weight is smallest
# for a half-solved prompt, symmetric (easy counts like hard), and rises towards the cap
# $(G-1)/\sqrt G$ at the extremes — ×1.4 over a half-solved prompt for $G = 8$, ×4 for
# $G = 64$. (Near $p = 0$ or $1$ most groups are unanimous and give no gradient at all; the rare
# informative group gets the large advantage.) RLOO and Dr. GRPO weight every prompt alike.

# %%
ps = np.linspace(0.0, 1.0, 51)
grpo_w = {g: difficulty_weight(ADVANTAGES["GRPO (÷ std)"], ps, g) for g in (8, 64)}
for g, w in grpo_w.items():
    cap = (g - 1) / g / (np.sqrt(1 / g) + 1e-4)  # a lone correct answer's advantage
    edge = difficulty_weight(ADVANTAGES["GRPO (÷ std)"], 1e-6, g)
    print(f"G={g}: w(½) = {w[25]:.3f},  w(p → 0) = {edge:.3f} = the cap {cap:.3f}")
    np.testing.assert_allclose(edge, cap, rtol=1e-3)
    np.testing.assert_allclose(w[1:-1], w[1:-1][::-1], rtol=1e-4)  # symmetric: easy ≡ hard
    assert np.argmin(w[1:-1]) == 24  # smallest at p = ½
middle = slice(10, 41)  # p in [0.2, 0.8]: large groups follow 1/√(p(1−p))
np.testing.assert_allclose(
    grpo_w[64][middle], 1 / np.sqrt(ps[middle] * (1 - ps[middle])), rtol=0.03
)
assert difficulty_weight(ADVANTAGES["GRPO (÷ std)"], 1e-6, 8) / grpo_w[8][25] > 1.4
assert difficulty_weight(ADVANTAGES["GRPO (÷ std)"], 1e-6, 64) / grpo_w[64][25] > 3.9

plt.figure(figsize=(5.5, 3.5))
for g, w in grpo_w.items():
    plt.plot(ps[1:-1], w[1:-1], label=f"GRPO, G = {g}")
plt.plot(ps, difficulty_weight(ADVANTAGES["RLOO"], ps, 8), label="RLOO (any G)")
plt.plot(ps, difficulty_weight(ADVANTAGES["group mean"], ps, 8), label="group mean, G = 8")
plt.xlabel("prompt success rate p")
plt.ylabel("w(p):  E[ĝ | x] = w(p) ∇p(x)")
plt.title("how much a prompt counts in the expected gradient")
plt.legend()
plt.tight_layout()

# %% [markdown]
# ## Dividing by the length: the length bias
#
# GRPO's loss also averages each answer's per-token losses over *its own* length $|y_i|$ before
# averaging over the group (`aggregation="seq_mean_token_mean"`). The policy gradient of chapter
# 2 gives every token of answer $i$ the weight $A_i$; this gives it $A_i / |y_i|$. So the whole
# gradient of an answer is scaled by $1/|y_i|$:
#
# * among **correct** answers ($A > 0$), a short one is reinforced more, per token, than a long one;
# * among **wrong** answers ($A < 0$), a long one is penalised *less*, per token, than a short one —
#   a wrong answer loses less by rambling, and response lengths drift upwards.
#
# Dr. GRPO divides instead by a constant, the number of answers times the padded length $T$
# (`"seq_mean_token_sum_norm"`): the policy gradient up to a constant factor. Check the per-token
# weights, $-\partial L / \partial \log\pi_t$, for a group of two wrong answers of 2 and 8 tokens.

# %%
T = 8
lengths = jnp.array([2, 8])
resp_mask = (jnp.arange(T) < lengths[:, None]).astype(jnp.float32)  # [2, T]
logprobs = jnp.full((2, T), -1.0)  # any values: the ratio is 1
advantages = jnp.full((2, T), -1.0) * resp_mask  # both answers wrong


def token_weights(aggregation):
    loss = lambda lp: rl.ppo_policy_loss(
        lp, lp, advantages, resp_mask, clip_eps=0.2, aggregation=aggregation
    )
    return jax.grad(loss)(logprobs)  # [2, T] = −Aᵢ × the token's weight, 0 on padding


for agg in ("seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean"):
    w = token_weights(agg)
    print(f"{agg:<24} short answer {float(w[0, 0]):.4f} per token, long {float(w[1, 0]):.4f}")
pg = token_weights("seq_mean_token_sum")  # the policy gradient: 1/G per token (G = 2)
grpo = token_weights("seq_mean_token_mean")  # 1/(G·|y|)
dr = token_weights("seq_mean_token_sum_norm")  # 1/(G·T)
np.testing.assert_allclose(pg, resp_mask / 2, atol=1e-7)
np.testing.assert_allclose(grpo, resp_mask / (2 * lengths[:, None]), atol=1e-7)
assert grpo[0, 0] == 4 * grpo[1, 0]  # each token of the short wrong answer is pushed down 4× harder
np.testing.assert_allclose(dr, pg / T, atol=1e-7)  # Dr. GRPO: the policy gradient ÷ a constant

# %% [markdown]
# (`token_mean`, DAPO's choice, weights every token of the batch the same, 1/10 here: no
# per-answer length bias either, but the constant depends on the batch's total token count.)
#
# ## Clip-higher: room for unlikely tokens
#
# PPO's clip stops a token's gradient once its ratio $\pi_\theta / \pi_{\text{old}}$ leaves
# $[1-\epsilon, 1+\epsilon]$ in the direction its advantage favours (chapter 5). For a token with
# $\hat A > 0$ that means one update can raise its probability to at most
# $(1+\epsilon)\,\pi_{\text{old}}$: an absolute gain of $\epsilon\,\pi_{\text{old}}$. A likely token
# at 0.5 may gain 0.1; an unlikely one at 0.01 only 0.002. RL on a language model keeps sharpening
# what is already likely, the entropy of its next-token distributions falls, and exploration dies
# ("entropy collapse"). DAPO (Yu et al. 2025, arXiv:2503.14476) decouples the bounds:
# $\operatorname{clip}(\rho, 1-\epsilon_{\text{low}}, 1+\epsilon_{\text{high}})$ with
# $\epsilon_{\text{high}} = 0.28 > \epsilon_{\text{low}} = 0.2$, more room upwards.
#
# Illustration: one state with next-token probabilities $(0.70, 0.25, 0.04, 0.01)$, one sampled
# token with $\hat A = +1$, and a PPO update run to convergence (many small gradient steps on the
# same sample) with the library's loss. The token's probability stops at
# $(1+\epsilon_{\text{high}})\, \pi_{\text{old}}$, where the gradient becomes exactly zero.

# %%
old_logits = jnp.log(jnp.array([0.70, 0.25, 0.04, 0.01]))  # [V]
old_logp = jax.nn.log_softmax(old_logits)  # [V]


def clipped_loss(logits, token, clip_eps_high):
    """The PPO loss of one sampled token with Â = +1 (a response of length 1)."""
    logp = jax.nn.log_softmax(logits)[token][None]  # [T=1]
    one = jnp.ones(1)
    return rl.ppo_policy_loss(
        logp, old_logp[token][None], one, one, clip_eps=0.2, clip_eps_high=clip_eps_high
    )


def ppo_update(token, clip_eps_high, steps=5000, lr=0.003):
    """Many small gradient steps on the clipped loss of one sample, the old policy fixed."""

    def step(logits, _):
        return logits - lr * jax.grad(clipped_loss)(logits, token, clip_eps_high), None

    logits, _ = jax.lax.scan(step, old_logits, None, length=steps)
    return logits


entropy = {"before": float(rl.token_entropy(old_logits[None])[0])}
print(f"entropy before the update: {entropy['before']:.4f}")
for token in (0, 3):
    for high in (0.2, 0.28):
        new = ppo_update(token, high)
        p_new, p_old = float(jax.nn.softmax(new)[token]), float(jnp.exp(old_logp[token]))
        entropy[token, high] = float(rl.token_entropy(new[None])[0])
        print(
            f"π_old = {p_old:.2f}, ε_high = {high}: π_new = {p_new:.4f} "
            f"(gain {p_new - p_old:+.4f}), entropy {entropy[token, high]:.4f}"
        )
        assert 1 + high <= p_new / p_old < (1 + high) * 1.01  # stopped at the clip ...
        assert jnp.all(jax.grad(clipped_loss)(new, token, high) == 0)  # ... where the gradient is 0
assert entropy[3, 0.28] > entropy[3, 0.2] > entropy["before"]  # raising a rare token: H goes up
assert entropy[0, 0.2] < entropy["before"]  # raising the likely one: H goes down

# %% [markdown]
# The likely token gains 14 points of probability in one update, the rare one 0.2 points. The
# update that raises the rare token is the one that *increases* entropy, and with
# $\epsilon_{\text{high}} = 0.28$ it may go 40% further. Clip-higher widens the room of the
# likely token too (and that update lowers the entropy further); that it slows entropy collapse
# overall is DAPO's measurement on real training runs, not something one update shows. The lower
# bound stays at $1 - 0.2$: widening it too would let an update drive a bad token's probability
# to zero, which collapses entropy just as well.
#
# ## GSPO: one ratio per sequence
#
# The token ratio $\rho_t = \pi_\theta(y_t \mid s_t)/\pi_{\text{old}}(y_t \mid s_t)$ corrects
# each token separately, but the reward belongs to the whole answer, and the sequence's own
# importance weight is the product $\prod_t \rho_t$ — far too noisy for long answers. GSPO (Zheng
# et al. 2025, arXiv:2507.18071) uses its length-normalised version, the geometric mean,
#
# $$s(y) = \Big(\frac{\pi_\theta(y \mid x)}{\pi_{\text{old}}(y \mid x)}\Big)^{1/|y|}
#   = \exp\Big(\frac{1}{|y|} \sum_t \log \rho_t\Big),$$
#
# shares it between the tokens of the answer and clips it as one: an answer is either inside the
# trust region or out of it. Three checks with `importance_level="sequence"`:
#
# 1. answers of one token: the sequence ratio is the token ratio, and the two losses agree;
# 2. for a longer answer every token carries the same ratio, the geometric mean;
# 3. one token that moved a lot ($\rho = 3$) next to three that did not: token-level PPO clips
#    only that token, GSPO clips the whole answer ($3^{1/4} = 1.316 > 1.2$), so with $\hat A > 0$
#    no token of it receives a gradient;
# 4. on fresh samples (ratio 1) nothing changes: the gradient of $s(y)$ spreads
#    $\frac{1}{|y|}\sum_t \nabla \log \pi(y_t)$ over the answer, which is what GRPO's per-answer
#    token mean gives token-level ratios — the two differ only once the policy moves.


# %%
def surrogate(logprobs, old_logprobs, advantages, level):
    """The library's per-token clipped loss and clip indicator, ε = 0.2, every token valid."""
    valid = jnp.ones_like(logprobs)
    return rl.clipped_surrogate(
        logprobs, old_logprobs, advantages, valid, clip_eps=0.2, importance_level=level
    )


lp_old = jnp.array([[-1.0], [-2.0], [-0.5]])  # three one-token answers [B, 1]
lp_new = lp_old + jnp.array([[0.1], [-0.3], [0.25]])  # ratios e^0.1, e^−0.3 (clipped), e^0.25
adv = jnp.array([[1.0], [-1.0], [1.0]])
token_level, sequence_level = (surrogate(lp_new, lp_old, adv, lv) for lv in ("token", "sequence"))
np.testing.assert_allclose(sequence_level[0], token_level[0], atol=1e-7)  # same loss
np.testing.assert_array_equal(sequence_level[1], token_level[1])  # same clipping

lp_old = jnp.array([[-1.0, -2.0, -0.5, -1.5]])  # one answer of four tokens
adv = jnp.ones_like(lp_old)
small = jnp.array([[0.05, -0.02, 0.01, 0.04]])  # a small move: nothing clipped
per_token, _ = surrogate(lp_old + small, lp_old, adv, "sequence")
np.testing.assert_allclose(-per_token, jnp.exp(jnp.mean(small)) * jnp.ones((1, 4)), rtol=1e-6)

moved = jnp.array([[0.0, 0.0, 0.0, jnp.log(3.0)]])  # the last token's ratio is 3
_, token_clipped = surrogate(lp_old + moved, lp_old, adv, "token")
_, seq_clipped = surrogate(lp_old + moved, lp_old, adv, "sequence")
print("clipped, token level:", token_clipped, "  sequence level:", seq_clipped)
np.testing.assert_array_equal(token_clipped, [[0.0, 0.0, 0.0, 1.0]])
np.testing.assert_array_equal(seq_clipped, [[1.0, 1.0, 1.0, 1.0]])
token_grad, seq_grad = (
    jax.grad(lambda lp, lv=lv: surrogate(lp, lp_old, adv, lv)[0].mean())(lp_old + moved)
    for lv in ("token", "sequence")
)
assert jnp.all(seq_grad == 0) and jnp.all(token_grad[0, :3] != 0) and token_grad[0, 3] == 0

lp = jax.random.normal(jax.random.key(2), (2, T)) * resp_mask  # answers of 2 and 8 tokens
adv = jnp.array([[1.0], [-1.0]]) * resp_mask


def fresh_gradient(level):
    """∂L/∂log π at ratio 1 (old = current), GRPO's per-answer token mean."""

    def loss(logprobs):
        return rl.ppo_policy_loss(
            logprobs,
            logprobs,
            adv,
            resp_mask,
            clip_eps=0.2,
            importance_level=level,
            aggregation="seq_mean_token_mean",
        )

    return jax.grad(loss)(lp)


fresh_grad = {level: fresh_gradient(level) for level in ("token", "sequence")}
np.testing.assert_allclose(fresh_grad["sequence"], fresh_grad["token"], atol=1e-7)

# %% [markdown]
# ## Summary
#
# | | baseline | $\mathbb{E}[\hat g]$ (checked exactly above) | loss aggregation |
# |---|---|---|---|
# | REINFORCE | none | $\nabla J$, high variance | per answer |
# | PPO | learned critic $V(s_t)$ | $\nabla J$ if the critic is exact (chapter 3) | per token |
# | RLOO | mean of the other $G-1$ | $\nabla J$ | per answer |
# | Dr. GRPO | group mean | $\frac{G-1}{G} \nabla J$ | ÷ constant |
# | GRPO | group mean, ÷ std | not $\propto \nabla J$; pass/fail: $\mathbb{E}_x[w(p_x) \nabla p(x)]$, extremes up-weighted | ÷ own length |
#
# Clip-higher and GSPO's sequence ratio change the trust region, not the estimator: on fresh
# samples (ratio 1), with the same aggregation, they give token-level PPO's gradient.

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
# # Chapter 12 — Reward over-optimisation, measured
#
# A reward model is a stand-in. It was fitted to a few thousand noisy comparisons of samples
# from the SFT policy, and it is only trustworthy where those samples were. Push a policy hard
# enough against it and the policy finds texts the reward model scores highly for reasons the
# people behind the comparisons would not endorse: the **proxy** reward keeps going up while the
# **gold** reward (what we actually wanted) first rises, then turns down. Chapter 6 showed the
# extreme of this on a toy, and the demo shows it on the review task (PPO with β = 0).
#
# Gao, Schulman & Hilton (2022, arXiv:2210.10760) made it quantitative. They replaced the humans
# with a large "gold" reward model, trained smaller proxy reward models on its labels, optimised
# policies against each proxy and scored them with the gold model. Plotted against the distance
# from the initial policy, $d = \sqrt{\mathrm{KL}(\pi \,\|\, \pi_{\text{init}})}$, the gold
# reward gain followed two simple curves, one per optimiser:
#
# $$\text{best-of-}n:\quad R(d) = d\,(\alpha - \beta\, d), \qquad\qquad
#   \text{RL}:\quad R(d) = d\,(\alpha - \beta \log d).$$
#
# Both start at $R(0) = 0$, rise, peak and fall. Where they peak, the gold optimum, is
# $d^* = \alpha / (2\beta)$ for best-of-$n$ and $d^* = e^{\alpha/\beta - 1}$ for RL.
#
# The demo's review task has the same structure in miniature: its gold reward is a hidden rule
# (net sentiment minus 2 per grammar error, `jaxrlhf.data.demo_task`), simulated annotators label
# pairs with it, and the proxy is the Bradley-Terry reward model of chapter 7 trained on their
# labels. This chapter measures both curves there. First, though, the x-axis: best-of-$n$ has no
# KL of its own to log, and the number everyone quotes for it, $\log n - (n-1)/n$, deserves a
# derivation and an exact check.

# %%
import dataclasses
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import toyworld as tw
from flax import nnx

from jaxrlhf import rl
from jaxrlhf.best_of import best_of_n
from jaxrlhf.data.demo_task import count_errors, sentiment
from jaxrlhf.demo.common import (
    DEMO_PPO,
    DEMO_REWARD,
    DEMO_SFT,
    DemoConfig,
    build_task,
    evaluate,
    run_ppo,
    train_demo_reward_model,
)
from jaxrlhf.models import CausalLM
from jaxrlhf.train.experience import reward_model_fn
from jaxrlhf.train.sft import train_sft

chapter_start = time.perf_counter()

# %% [markdown]
# ## 1. The KL of best-of-n, derived
#
# Fix a prompt. Best-of-$n$ draws $y_1, \dots, y_n$ independently from $\pi$ and keeps the one
# with the highest score $r(y)$; call the distribution of what it keeps $\pi_n$.
#
# **Continuous scores.** Suppose first that $r(Y)$, $Y \sim \pi$, has a continuous distribution,
# with CDF $F$. Then $U = F(r(Y))$ is uniform on $[0, 1]$ (the probability integral transform),
# and keeping the best-scored of $n$ draws keeps the largest of $n$ independent uniforms:
# $P(\max \le u) = u^n$, a density of $n u^{n-1}$. The map $y \mapsto u$ is one to one (almost
# surely), and a KL divergence does not change under a one-to-one map of both distributions, so
# the KL of $\pi_n$ to $\pi$ is the KL of the density $n u^{n-1}$ to the uniform one:
#
# $$\mathrm{KL}(\pi_n \,\|\, \pi) = \int_0^1 n u^{n-1} \log\big(n u^{n-1}\big)\, du
#   = \log n + (n-1) \int_0^1 n u^{n-1} \log u \, du = \log n - \frac{n-1}{n},$$
#
# using $\int_0^1 n u^{n-1} \log u\, du = -1/n$ (integrate by parts). It is 0 at $n = 1$,
# 0.19 nats at $n = 2$, 3.17 at $n = 64$, and grows like $\log n$: $d = \sqrt{\mathrm{KL}}$
# grows like $\sqrt{\log n}$, so every doubling of the compute buys less distance.
#
# **Atoms.** A language model puts probability on individual sequences, and a sequence can be drawn
# twice; then $y \mapsto u$ is not one to one. Make it so with a continuous tie-breaker: draw with
# each sample an independent $V \sim \mathcal U[0, 1]$ and rank by $(r(y), V)$. A pair $(y, v)$
# maps one to one to a quantile $u$ inside $y$'s interval $[a_y, b_y] = [F^-(y), F(y)]$, where
# $F^-(y) = P_\pi(r < r(y))$ and $F(y) = P_\pi(r \le r(y))$; the best of $n$ pairs has exactly the
# KL above; and forgetting $V$ gives $\pi_n$ with ties broken uniformly at random (what
# `rl.best_of_n_probs` computes: $\pi_n(y) = \pi(y)\,(F(y)^n - F^-(y)^n) / (F(y) - F^-(y))$). The
# chain rule splits the pair's KL into the outcome's and the position's inside the atom:
#
# $$\log n - \frac{n-1}{n} = \mathrm{KL}(\pi_n \,\|\, \pi)
#   + \sum_y \pi_n(y)\, \mathrm{KL}\big(\pi_n(u \mid y) \,\|\, \pi(u \mid y)\big).$$
#
# Under $\pi$, $u$ given $y$ is uniform on $[a_y, b_y]$; under $\pi_n$ it has density
# $n u^{n-1} / w_y$, with $w_y = b_y^n - a_y^n$ the mass the best-of-$n$ winner puts on the atom.
# With $G(u) = \int_0^u n t^{n-1} \log(n t^{n-1})\, dt = u^n \big(\log n + (n-1)\log u -
# \tfrac{n-1}{n}\big)$ each atom's term is in closed form,
#
# $$\mathrm{KL}_y = \frac{G(b_y) - G(a_y)}{w_y} - \log \frac{w_y}{b_y - a_y} \;\ge\; 0,$$
#
# so the formula is an **upper bound** on the KL of best-of-$n$ whenever outcomes have mass, with
# equality only as the atoms shrink to nothing (Beirami et al. 2024, arXiv:2401.01879, prove the
# bound and study the gap). Two things to check by exact enumeration: the chain rule adds up to
# the formula, and the gap closes as the policy gets finer.
#
# The policy: the tabular LM of chapters 1–3 (`toyworld`, seed 0), its 27 responses to prompt 0.
# First with a score that never ties, a random real number per response (as a learned reward
# model would give); every response is still an atom of mass $\pi(y)$.

# %%
world = tw.ToyWorld()
prompts, tokens = tw.enumerate_trajectories(world)  # [54], [54, 3]
ids = tw.state_ids(world, prompts, tokens)  # [54, 3]
full = jnp.ones(tokens.shape, jnp.float32)
theta = tw.init_table(world, jax.random.key(0))  # [S, V] the policy of chapter 2
logp = rl.trajectory_logprob(rl.token_logprobs(tw.policy_logits(theta, ids), tokens), full)
pi = np.asarray(jnp.exp(logp[:27]), np.float64)  # [27] π(y | prompt 0)
pi = pi / pi.sum()  # renormalised in float64 (it sums to 1 up to float32 rounding)
toy_scores = np.asarray(jax.random.normal(jax.random.key(1), (27,)))  # [27] no two equal
assert len(np.unique(toy_scores)) == 27


def quantile_intervals(pi, scores):
    """[F⁻(y), F(y)] of every outcome, in float64: P(r < r(y)) and P(r ≤ r(y))."""
    below = scores[None, :] < scores[:, None]  # [K, K]: r_j < r_y at [y, j]
    return (below * pi).sum(-1), ((below | (scores[None, :] == scores[:, None])) * pi).sum(-1)


def kl(p, q):
    """KL(p ‖ q) of two distributions over the same outcomes, in float64 (0 log 0 = 0)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def G(u, n):
    """∫₀ᵘ n tⁿ⁻¹ log(n tⁿ⁻¹) dt = uⁿ (log n + (n−1) log u − (n−1)/n), 0 at u = 0."""
    u = np.asarray(u, np.float64)
    safe = np.where(u > 0, u, 1.0)
    return np.where(u > 0, safe**n * (np.log(n) + (n - 1) * np.log(safe) - (n - 1) / n), 0.0)


def within_atom_kl(a, b, n):
    """KL of the winner's quantile inside the atom [a, b]: density n uⁿ⁻¹/w against 1/(b − a)."""
    w = b**n - a**n
    safe = np.where(w > 0, w, 1.0)
    return np.where(w > 0, (G(b, n) - G(a, n)) / safe - np.log(safe / (b - a)), 0.0)


def formula(n):
    return np.log(n) - (n - 1) / n  # float64 (rl.best_of_n_kl is the float32 one)


a, b = quantile_intervals(pi, toy_scores)
print(" n   KL(π_n‖π) outcome   + within atoms   = total        log n − (n−1)/n")
for n in (1, 2, 4, 16, 64):
    pi_n = np.asarray(rl.best_of_n_probs(jnp.asarray(pi, jnp.float32), toy_scores, n), np.float64)
    oracle = b**n - a**n  # no ties: π_n(y) = F(y)ⁿ − F⁻(y)ⁿ, in float64
    np.testing.assert_allclose(pi_n, oracle, atol=1e-5)  # the library, in float32
    outcome, inside = kl(oracle, pi), float(np.sum(oracle * within_atom_kl(a, b, n)))
    print(f"{n:2d}   {outcome:.6f}            + {inside:.6f}       = {outcome + inside:.12f}"
          f"   {formula(n):.12f}")  # fmt: skip
    assert abs(outcome + inside - formula(n)) < 1e-12  # float64: the chain rule is exact
    assert abs(float(rl.best_of_n_kl(n)) - formula(n)) < 1e-6  # the library's, in float32
    assert n == 1 or inside > 0  # the outcome's KL alone is below the formula

# %% [markdown]
# The outcome KL plus the within-atom terms is the formula to float64 precision (the asserts use
# $10^{-12}$; the library's `best_of_n_probs` runs in float32 and matches the float64
# $F(y)^n - F^-(y)^n$ to $10^{-5}$, so the KLs below are computed from the float64 form). One atom's
# closed form against a numerical integral, to be sure $G$ is right:

# %%
top = int(np.argmax(toy_scores))  # the best response: its atom is the top of [0, 1]
u = np.linspace(a[top], b[top], 200_001)
density = 64 * u**63 / (b[top] ** 64 - a[top] ** 64)  # π_64(u | y), normalised on the atom
integrand = density * np.log(density * (b[top] - a[top]))
numeric = float(np.sum((integrand[1:] + integrand[:-1]) / 2 * np.diff(u)))  # trapezoid rule
print(f"atom [{a[top]:.4f}, {b[top]:.4f}]: closed form {float(within_atom_kl(a[top], b[top], 64)):.8f},"
      f" trapezoid {numeric:.8f}")  # fmt: skip
assert abs(numeric - float(within_atom_kl(a[top], b[top], 64))) < 1e-7

# %% [markdown]
# **Finer policies.** The within-atom term is what an atom of mass $h$ hides; it should vanish as
# $h \to 0$. Take $K$ equally likely outcomes with distinct scores, so that
# $\pi_n(k) = (k/K)^n - ((k-1)/K)^n$, and let $K$ grow:

# %%
fine = {}
for K in (10, 100, 1000):
    p_K, s_K = np.full(K, 1.0 / K), np.arange(K, dtype=np.float32)  # [K]
    lo, hi = quantile_intervals(p_K, s_K)
    for n in (4, 16, 64):
        pi_n = np.asarray(rl.best_of_n_probs(jnp.asarray(p_K, jnp.float32), s_K, n))
        np.testing.assert_allclose(pi_n, hi**n - lo**n, atol=1e-5)
        fine[K, n] = kl(hi**n - lo**n, p_K)
for n in (4, 16, 64):
    gaps = [formula(n) - fine[K, n] for K in (10, 100, 1000)]
    print(f"n = {n:2d}: formula − KL(π_n‖π) = " + ",  ".join(
        f"{g:.2e} (K = {K})" for g, K in zip(gaps, (10, 100, 1000), strict=True)))  # fmt: skip
    assert all(g > 0 for g in gaps) and gaps[0] > gaps[1] > gaps[2]  # from below, closing
    assert gaps[2] < 2e-2 * gaps[1]  # about 1/K²: ×100 smaller for ×10 finer atoms (measured ×99)

# %% [markdown]
# From below, and fast: the gap falls about a hundredfold for each tenfold refinement (it is of
# order $(n h)^2$ for atoms of mass $h$, while $n h \ll 1$), and it grows with $n$, because the
# winner's density $n u^{n-1}$ varies more inside each atom near $u = 1$. At $K = 1000$,
# $n = 64$ the formula is off by $1.7 \cdot 10^{-4}$ nats — float32 would already blur that (the
# library's float32 probabilities give $1.6 \cdot 10^{-4}$), which is why these sums are float64.
#
# **Ties.** Now the toy world's own reward, the return of chapter 1 ($+1$ per favourite token,
# $-0.5$ per repeat, $+1$ for ending on `a`): it takes only 8 values on 27 responses, so
# responses tie. `best_of_n_probs` breaks a tie uniformly at random, as the tie-breaker $V$ does,
# so the atoms of the chain rule are now the **score levels**: every response of a level shares
# the level's interval $[F^-(s), F(s)]$, $\pi_n(y)/\pi(y)$ is the same across a level, and the
# outcome KL equals the KL of the level alone. The formula should be the level's KL plus the
# within-level terms, and strictly above the exact KL.

# %%
returns = np.asarray(rl.discounted_return(tw.rewards(world, prompts, tokens), full, gamma=1.0))
toy_reward = returns[:27]  # [27] R(prompt 0, y)
levels = np.unique(toy_reward)  # [8]
level_of = np.searchsorted(levels, toy_reward)  # [27]
q = np.bincount(level_of, weights=pi)  # [8] π's mass on each level
q_lo = np.concatenate([[0.0], np.cumsum(q)[:-1]])  # [8] F⁻(s)
print(f"{len(levels)} score levels on 27 responses; the top level ({levels[-1]:+.1f}) has mass"
      f" {q[-1]:.4f}")  # fmt: skip
exact_kl = {}
print(" n   exact KL(π_n‖π)   levels' KL   + within levels = total     log n − (n−1)/n")
for n in (2, 4, 16, 64):
    pi_n = np.asarray(rl.best_of_n_probs(jnp.asarray(pi, jnp.float32), toy_reward, n), np.float64)
    lo, hi = quantile_intervals(pi, toy_reward)
    oracle = pi * (hi**n - lo**n) / (hi - lo)  # ties broken uniformly, in float64
    np.testing.assert_allclose(pi_n, oracle, atol=1e-5)
    q_n = (q_lo + q) ** n - q_lo**n  # [8] the winner's level
    exact_kl[n] = kl(oracle, pi)
    inside = float(np.sum(q_n * within_atom_kl(q_lo, q_lo + q, n)))
    print(f"{n:2d}   {exact_kl[n]:.6f}          {kl(q_n, q):.6f}   + {inside:.6f}      ="
          f" {kl(q_n, q) + inside:.6f}  {formula(n):.6f}")  # fmt: skip
    assert abs(exact_kl[n] - kl(q_n, q)) < 1e-12  # ties add nothing beyond the level
    assert abs(kl(q_n, q) + inside - formula(n)) < 1e-12  # the chain rule, levels as atoms
    assert formula(n) - exact_kl[n] > 0.01  # strictly below (measured gaps 0.012 … 0.47)
assert exact_kl[64] < -np.log(q[-1]) < formula(64)  # capped by the top level's mass

# %% [markdown]
# With ties the exact KL is well below the formula: 2.79 nats against 3.17 at $n = 64$. It can
# never exceed $-\log q_{\text{top}} = 3.15$, the KL of the point mass on the top level, which
# best-of-$n$ approaches as $n \to \infty$ while the formula grows without bound. On a real task
# the atoms are sequences of a language model; the formula is then an upper bound on the x-axis
# of the best-of-$n$ curve, close when no single completion is likely. Section 2 measures how
# likely they are.
#
# ## 2. Best-of-n on the review task
#
# The demo's pipeline, with the demo's presets and functions (`jaxrlhf.demo.common`): the task, a
# tiny GPT-2 trained by SFT on the corpus (the base policy $\pi_{\text{SFT}}$), preference pairs of
# its samples labelled by the noisy annotators, and a Bradley-Terry reward model trained on them,
# normalised to mean 0 and standard deviation 1 on the base policy's samples. To keep this
# chapter within the test suite's time, two sizes are smaller than the demo's: 300 SFT steps
# instead of 500 (the loss is flat from about step 200 on) and 1024 annotated pairs instead of 2048
# (a noisier proxy, which over-optimises sooner — the subject of the chapter).

# %%
SFT_STEPS, NUM_PAIRS = 300, 1024
work_dir = tempfile.mkdtemp(prefix="ch12_")  # run_ppo's metrics and the pairs' files go here
demo = DemoConfig(out_dir=work_dir, num_pairs=NUM_PAIRS, eval_every=5, save_models=False)
task, model_config = build_task(demo, DEMO_PPO)
base = CausalLM(model_config, rngs=nnx.Rngs(demo.seed))
sft_config = dataclasses.replace(DEMO_SFT, steps=SFT_STEPS)
base, sft_metrics = train_sft(base, *task.corpus_batch(), sft_config, progress=False)
print(f"SFT: final loss {np.mean(sft_metrics['loss'][-20:]):.3f}")

# %%
reward_model, rm_summary = train_demo_reward_model(
    task, base, demo, DEMO_REWARD, DEMO_PPO, progress=False
)
proxy_fn = reward_model_fn(reward_model)  # the proxy: reward_fn(prompt_ids, prompt_mask, rollout)
print(
    f"reward model: held-out accuracy {rm_summary['held_out_accuracy']:.3f} on the noisy labels"
    f" ({rm_summary['num_train_pairs']} training pairs)"
)
assert rm_summary["held_out_accuracy"] > 0.65  # it learned something (the noise ceiling ≈ 0.76)

# %% [markdown]
# One call of `jaxrlhf.best_of.best_of_n` draws a pool of $N = 64$ completions for each of the
# 128 held-out prompts from $\pi_{\text{SFT}}$ and scores them all with the proxy (rows
# $i \cdot 64 \dots i \cdot 64 + 63$ answer prompt $i$). The gold reward of every candidate comes
# from the task. From one pool, `rl.best_of_n_estimate` gives, for every $n \le 64$ at once, an
# unbiased estimate of the mean of the best-of-$n$ policy: the average over all $\binom{64}{n}$
# subsets of the pool of the value of the subset's proxy-best member (Coste et al. 2023,
# arXiv:2310.02743). The value is the proxy itself (what best-of-$n$ optimises) or the gold
# reward of the proxy's choice (what it achieves).

# %%
POOL = 64
eval_batch = task.prompt_batch(task.eval_prompts)  # [128, P] left-padded
pool = best_of_n(
    base, eval_batch.input_ids, eval_batch.attention_mask, proxy_fn, n=POOL,
    config=DEMO_PPO.sampling, rng=jax.random.PRNGKey(12), eos_token_id=task.eos_token_id,
    pad_token_id=task.pad_token_id,
)  # fmt: skip
B = len(task.eval_prompts)
cand_tokens, cand_mask = np.asarray(pool.candidates.tokens), np.asarray(pool.candidates.mask)
texts = task.decode(cand_tokens, cand_mask)  # B·N texts
finished = task.finished(cand_tokens, cand_mask)  # [B·N]
repeated_prompts = [p for p in task.eval_prompts for _ in range(POOL)]
gold = task.gold_reward(repeated_prompts, texts, finished=finished).reshape(B, POOL)  # [B, N]
proxy = np.asarray(pool.scores)  # [B, N] the reward model's score of every candidate
print(
    f"pool: {B} prompts × {POOL} candidates, shapes {proxy.shape}; {finished.mean():.1%} end in EOS"
)
i = 0
print(f"prompt {task.eval_prompts[i]!r}:\n  first candidate  {texts[i * POOL]!r} (proxy"
      f" {proxy[i, 0]:+.2f}, gold {gold[i, 0]:+.0f})\n  kept (best of 64) {texts[i * POOL + int(pool.best[i])]!r}"
      f" (proxy {proxy[i, int(pool.best[i])]:+.2f}, gold {gold[i, int(pool.best[i])]:+.0f})")  # fmt: skip

# %%
ns = np.arange(1, POOL + 1)  # [64]
bon_d = np.sqrt(np.asarray(rl.best_of_n_kl(ns), np.float64))  # [64] d = √(log n − (n−1)/n)
bon_proxy = np.array([float(rl.best_of_n_estimate(proxy, proxy, int(n)).mean()) for n in ns])
bon_gold = np.array([float(rl.best_of_n_estimate(proxy, gold, int(n)).mean()) for n in ns])
print(" n     d      proxy    gold   (means over the 128 prompts)")
for n in (1, 2, 4, 8, 16, 32, 64):
    print(f"{n:2d}  {bon_d[n - 1]:.3f}  {bon_proxy[n - 1]:+.3f}  {bon_gold[n - 1]:+.3f}")
np.testing.assert_allclose(bon_proxy[0], proxy.mean(), atol=1e-5)  # n = 1: the pool's mean
np.testing.assert_allclose(bon_gold[0], gold.mean(), atol=1e-5)
np.testing.assert_allclose(bon_proxy[-1], proxy.max(-1).mean(), atol=1e-5)  # n = N: the maximum
assert np.all(np.diff(bon_proxy) >= -1e-6)  # the proxy never falls with n (float32 rounding)

# %% [markdown]
# The proxy estimate is non-decreasing in $n$ by construction: with the pool sorted by score, the
# weights $\binom{i-1}{n-1}/\binom{N}{n}$ move up the ranking as $n$ grows. The gold reward of
# the proxy's choice is under no such obligation: it gains a whole point by $n = 8$, then slowly
# gives some back while the proxy goes on rising. Over-optimisation, with nothing but selection.
# Where the turn comes depends on the proxy: with 200 SFT steps instead of 300 (other samples,
# other pairs, another reward model) the gold reward was still rising at $n = 64$.
#
# What does the proxy want that gold does not? The same estimator averages any property of the
# chosen completion; here its length in words and whether it has a grammar error:

# %%
words = np.array([len(t.split()) for t in texts], np.float32).reshape(B, POOL)  # [B, N]
has_error = np.array(
    [count_errors((p + " " + t).split()) > 0 for p, t in zip(repeated_prompts, texts, strict=True)],
    np.float32,
).reshape(B, POOL)  # [B, N] any forbidden transition (the prompt's own words included)
fluent = 1.0 - has_error


def chosen(values, n):
    """E[values of the proxy's best of n], averaged over the prompts."""
    return float(rl.best_of_n_estimate(proxy, values.astype(np.float32), n).mean())


print(" n   words  with an error   gold   = from fluent + from erroneous choices")
for n in (1, 8, 64):
    print(f"{n:2d}   {chosen(words, n):.1f}    {chosen(has_error, n):5.1%}        {bon_gold[n - 1]:+.3f}"
          f" = {chosen(gold * fluent, n):+.3f} + {chosen(gold * has_error, n):+.3f}")  # fmt: skip
kept = np.asarray(pool.best)  # [B]
slips = [j for j in range(B) if has_error[j, kept[j]]]
for j in slips[:4]:
    print(f"  kept with an error: {task.eval_prompts[j]!r} + {texts[j * POOL + kept[j]]!r}"
          f" (proxy {proxy[j, kept[j]]:+.2f}, gold {gold[j, kept[j]]:+.0f})")  # fmt: skip
net = np.array([sentiment(t.split()) for t in texts]).reshape(B, POOL)  # [B, N]
one_word = (fluent > 0) & (net == 1) & (words == 2)  # "tasty ."
two_clauses = (fluent > 0) & (net == 2)  # "great and the food was good ."
empty = np.array([t == "." for t in texts]).reshape(B, POOL)  # "the food was ."
print(f"mean proxy: one positive word {proxy[one_word].mean():+.2f} (gold +1), two positive"
      f" clauses {proxy[two_clauses].mean():+.2f} (gold +2), the empty '.' {proxy[empty].mean():+.2f}"
      f" (gold −2; {empty.mean():.1%} of the pool), the pool {proxy.mean():+.2f}")  # fmt: skip
lost = bon_gold[7] - bon_gold[-1]  # gold given back between n = 8 and n = 64
lost_to_errors = chosen(gold * has_error, 8) - chosen(gold * has_error, 64)
assert 0.5 < lost_to_errors / lost < 0.9  # measured 0.67: the erroneous choices cost most of it

# %% [markdown]
# Two things happen as $n$ grows. The choices get shorter, down to one positive adjective and a
# period (`tasty .`, gold +1): the reward model scores that about as high as a completion that
# chains two positive clauses (gold +2), so selection stops paying for the second clause. And
# past $n \approx 8$ the proxy's choice is more and more often ungrammatical, typically the empty
# completion `.` right after `was`, which the base policy almost never writes, the annotators
# hardly ever compared, and the reward model scores among its very best. Between $n = 8$ and
# $n = 64$ the erroneous choices account for about two thirds of the gold that is lost.
#
# How good is the x-axis? Every candidate's exact log-probability under $\pi_{\text{SFT}}$ is in
# the rollout, so the sizes of the atoms are known:

# %%
log_pi = np.asarray(rl.trajectory_logprob(pool.candidates.logprobs, pool.candidates.mask))  # [B·N]
kept_mass = np.exp(log_pi.reshape(B, POOL)[np.arange(B), np.asarray(pool.best)])  # [B]
distinct = np.mean([len(set(texts[j * POOL : (j + 1) * POOL])) / POOL for j in range(B)])
print(f"π_SFT(y) of a candidate: median {np.exp(np.median(log_pi)):.4f}, largest"
      f" {np.exp(log_pi.max()):.3f}; of the kept ones: median {np.median(kept_mass):.4f};"
      f" {distinct:.0%} of each pool is distinct")  # fmt: skip

# %% [markdown]
# Completions repeat (a pool of 64 holds about three quarters distinct texts), and the ones the
# proxy keeps are among the likeliest: a few percent each, like the atoms of section 1's toy LM,
# where the formula overstated the KL at $n = 64$ by 0.29 nats (ties aside), about 5% in $d$. So
# the large-$n$ points of the best-of-$n$ curve sit somewhat to the left of where the formula
# draws them. We plot against the formula, as Gao et al. do, knowing it is an upper bound.
#
# ## 3. PPO at several β
#
# The same base policy and reward model, and `run_ppo` from the demo: PPO with the demo's preset
# (`DEMO_PPO`: 40 iterations of 64 prompts) and a fixed KL coefficient
# $\beta \in \{0, 0.03, 0.3\}$ (`adaptive_kl=False`): none, a third of the demo's 0.1, three
# times it. Every few iterations `run_ppo` samples one completion for each of the 128 held-out
# prompts and records the gold reward (`gold/score`), the proxy (`eval/learned_score`) and
# `eval/kl`, the k1 estimate of $\mathrm{KL}(\pi \,\|\, \pi_{\text{SFT}})$ per sequence (the
# mean over the samples of $\sum_t \log \pi - \log \pi_{\text{SFT}}$). That estimate is
# unbiased but noisy with one sample per prompt, and can dip below 0 near the start; $d$ is its
# square root, floored at 0. The start point $d = 0$ is the SFT policy scored by the same
# evaluation (same key).
#
# The runs are the most expensive part of the chapter, so there are three values of β, not more,
# each evaluated every 5 iterations; 40 iterations are enough for β = 0 to collapse.


# %%
BETAS = (0.0, 0.03, 0.3)
start = evaluate(task, base, proxy_fn, jax.random.PRNGKey(demo.seed + 2), DEMO_PPO, reference=base)
assert abs(start["kl"]) < 1e-4  # the SFT policy against itself (float32 rounding)


def ppo_curve(beta):
    """PPO at kl_coef = beta from the SFT policy: d, proxy and gold at each evaluation (every
    demo.eval_every = 5 iterations)."""
    config = dataclasses.replace(DEMO_PPO, kl_coef=beta, adaptive_kl=False)
    _, records, _ = run_ppo(f"beta_{beta}", task, base, reward_model, config, demo, progress=False)
    evals = [r for r in records if "gold/score" in r]
    run = {
        "step": np.array([0] + [r["step"] for r in evals]),
        "d": np.sqrt(np.maximum([0.0] + [r["eval/kl"] for r in evals], 0.0)),
        "proxy": np.array([start["learned"]] + [r["eval/learned_score"] for r in evals]),
        "gold": np.array([start["gold"]] + [r["gold/score"] for r in evals]),
    }
    print(f"β = {beta}:  step " + " ".join(f"{s:6d}" for s in run["step"]))
    for key in ("d", "proxy", "gold"):
        print(f"     {key:>6}  " + " ".join(f"{v:6.2f}" for v in run[key]))
    return run


runs = {0.0: ppo_curve(0.0)}

# %%
for beta in BETAS[1:]:
    runs[beta] = ppo_curve(beta)

# %% [markdown]
# With β = 0 the proxy climbs the whole way while gold peaks half-way (iteration 20, $d \approx
# 1.2$) and then collapses: the policy leaves the language the reward model was trained on (runs
# of adjectives, broken grammar), which the proxy extrapolates to be good and the gold reward
# charges 2 per error. β = 0.03 stays much closer ($d = 1.7$ after 40 iterations, against 5.0)
# but its gold has dropped by the last evaluation (0.84 at iteration 30, 0.74 at 35, 0.03 at
# 40); β = 0.3 ends at $d = 0.87$ with its gold gain intact. (Single evaluations are noisy: 128
# samples, one per prompt, and the gold reward of one completion ranges over several points; the
# k1 estimate of the KL too, e.g. β = 0.3's $d = 1.43$ at iteration 20 between 0.72 and 0.79.)
#
# ## 4. Gao's forms, fitted
#
# Both forms are linear in $(\alpha, \beta)$, so least squares fits them exactly: features
# $[d, -d^2]$ for best-of-$n$ and $[d, -d \log d]$ for RL (with $d \log d = 0$ at $d = 0$), on
# the gold gain $R(d) = \text{gold}(d) - \text{gold}(0)$ of each method. Gao et al. fit the RL
# form mainly to runs without a KL penalty; so do we, on the β = 0 run. (These α and β are the
# coefficients of the fitted curves, not the KL coefficient.)


# %%
def fit(features, gain):
    """Least squares gain ≈ features @ (α, β); returns (α, β), the residuals."""
    coef, *_ = np.linalg.lstsq(features, gain, rcond=None)
    return coef, gain - features @ coef


def bon_features(d):
    return np.stack([d, -(d**2)], axis=-1)  # R = αd − βd²


def rl_features(d):
    d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return np.stack([d, -d_log_d], axis=-1)  # R = αd − βd log d


bon_gain = bon_gold - bon_gold[0]  # [64] R(d) of best-of-n
(bon_alpha, bon_beta), bon_res = fit(bon_features(bon_d), bon_gain)
bon_opt = bon_alpha / (2 * bon_beta)

hack = runs[0.0]
rl_gain = hack["gold"] - hack["gold"][0]  # R(d) of PPO with β = 0
(rl_alpha, rl_beta), rl_res = fit(rl_features(hack["d"]), rl_gain)
rl_opt = np.exp(rl_alpha / rl_beta - 1)


def rms_share(residuals, gain):
    return float(np.sqrt(np.mean(residuals**2)) / np.ptp(gain))


n_grid = np.arange(1, 1_000_000)
n_at_opt = int(n_grid[np.searchsorted(formula(n_grid), bon_opt**2)])  # the n with KL = d*²
print(f"best-of-n: R(d) = d ({bon_alpha:.3f} − {bon_beta:.3f} d);  gold optimum d* = {bon_opt:.2f}"
      f" (n ≈ {n_at_opt} by the formula; the pool reaches d = {bon_d[-1]:.2f});"
      f" RMS residual {rms_share(bon_res, bon_gain):.1%} of the gold range")  # fmt: skip
print(f"RL (β = 0): R(d) = d ({rl_alpha:.3f} − {rl_beta:.3f} log d);  gold optimum d* = {rl_opt:.2f}"
      f" (KL {rl_opt**2:.2f});  RMS residual {rms_share(rl_res, rl_gain):.1%} of the gold range")  # fmt: skip
assert bon_beta > 0 and rl_beta > 0  # both curves bend down: each has a gold optimum
assert rms_share(bon_res, bon_gain) < 0.05  # the fits' residuals: measured 2.4 %
assert rms_share(rl_res, rl_gain) < 0.08  # measured 3.5 %
assert 0 < bon_opt < bon_d[-1] and 0 < rl_opt < hack["d"][-1]  # both optima inside the data

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
d_grid = np.linspace(0, 1.15 * bon_d[-1], 200)
left.plot(bon_d, bon_proxy - bon_proxy[0], "C0--", label="best-of-n: proxy gain")
left.plot(bon_d, bon_gain, "C0-", lw=2, label="best-of-n: gold gain")
left.plot(d_grid, bon_features(d_grid) @ (bon_alpha, bon_beta), "k:", label="fit d(α − βd)")
left.axvline(bon_opt, color="k", lw=0.5)
for beta, run in runs.items():
    if beta > 0:
        left.plot(run["d"], run["gold"] - run["gold"][0], "o", ms=4, label=f"PPO β = {beta}: gold")
left.set(xlabel="d = √KL(π ‖ π_SFT)", ylabel="gain over the SFT policy",
         title="best-of-n (n = 1 … 64) and penalised PPO")  # fmt: skip
left.legend(fontsize=8)
d_grid = np.linspace(1e-3, hack["d"].max(), 200)
right.plot(hack["d"], hack["proxy"] - hack["proxy"][0], "C3--o", ms=4, label="PPO β = 0: proxy")
right.plot(hack["d"], rl_gain, "C3-o", ms=4, lw=2, label="PPO β = 0: gold")
right.plot(d_grid, rl_features(d_grid) @ (rl_alpha, rl_beta), "k:", label="fit d(α − β log d)")
right.plot(bon_d, bon_gain, "C0-", lw=2, label="best-of-n: gold")
right.axhline(0, color="k", lw=0.5)
right.set(xlabel="d = √KL(π ‖ π_SFT)", title="PPO without the KL penalty")
right.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Both forms describe their curves to a few percent of the gold range, and both put the gold
# optimum early. For best-of-$n$ the fit's $d^* = 1.31$ (about $n = 15$) sits a little past the
# measured peak at $n = 8$ ($d = 1.10$), where a curve with a flat top is hard to pin down. For
# PPO the fit's $d^* = 0.73$ comes before the measured peak ($d = 1.15$): the steep collapse at
# the end pulls the least-squares curve down early, a sign that $d \log d$ falls more gently than
# this run does. At equal distance best-of-$n$ gains more gold than PPO does here (at
# $d \approx 1.1$: +1.17 against +0.89), and it cannot travel far: $n = 64$ is only $d = 1.78$,
# where the unpenalised PPO run is already past $d = 5$ with its gold reward below the start.

# %% [markdown]
# ## 5. Over-optimisation, asserted
#
# The signature of over-optimisation: past gold's optimum, more optimisation of the proxy keeps
# raising the proxy and lowers the gold. For each method, compare the largest $d$ with the point
# where gold peaked. Best-of-n first (the margins: gold at $n = 64$ is 0.12 below its peak and
# the proxy 0.12 above its value there; pools drawn with two other keys gave 0.09 to 0.19 and
# 0.11 to 0.13, so the asserts ask for 0.05):

# %%
best_n = int(np.argmax(bon_gold))  # index: n = best_n + 1
print(f"best-of-n: gold peaks at n = {best_n + 1} (d = {bon_d[best_n]:.2f}, gold"
      f" {bon_gold[best_n]:+.3f}, proxy {bon_proxy[best_n]:+.3f}); at n = 64 gold"
      f" {bon_gold[-1]:+.3f}, proxy {bon_proxy[-1]:+.3f}")  # fmt: skip
assert 1 < best_n + 1 < POOL  # an interior optimum
assert bon_proxy[-1] > bon_proxy[best_n] + 0.05  # the proxy kept rising …
assert bon_gold[-1] < bon_gold[best_n] - 0.05  # … while gold fell

# %% [markdown]
# And PPO with β = 0 (margins: the proxy rose by 0.45 after gold's peak and gold fell by 7.5):

# %%
peak = int(np.argmax(hack["gold"]))
print(f"β = 0: gold peaks at step {hack['step'][peak]} (d = {hack['d'][peak]:.2f}, gold"
      f" {hack['gold'][peak]:+.2f}, proxy {hack['proxy'][peak]:+.2f}); at the end d ="
      f" {hack['d'][-1]:.2f}, gold {hack['gold'][-1]:+.2f}, proxy {hack['proxy'][-1]:+.2f}")  # fmt: skip
assert hack["d"][-1] > 3 * hack["d"][peak]  # optimised well past gold's peak
assert hack["proxy"][-1] > hack["proxy"][peak] + 0.2  # the proxy kept rising …
assert hack["gold"][-1] < hack["gold"][peak] - 3.0  # … while gold fell far below its best
# the strong penalty holds the policy near the start and keeps its gold gain (measured: d 0.87,
# gain +1.09)
strong = runs[BETAS[-1]]
assert strong["d"][-1] < hack["d"][-1] / 3 and strong["gold"][-1] > strong["gold"][0] + 0.5

shutil.rmtree(work_dir)
print(f"chapter executed in {time.perf_counter() - chapter_start:.0f} s")

# %% [markdown]
# What the chapter measured, in one place:
#
# * **The x-axis of best-of-n.** $\log n - (n-1)/n$ is exact for a continuous score and an upper
#   bound otherwise; the gap is the KL of where the winner sits inside its atom, and by exact
#   enumeration it adds up to the formula to float64 precision, closes like $1/K^2$ as the atoms
#   shrink, and stays open (2.79 vs 3.17 nats at $n = 64$ on the toy LM) when scores tie.
# * **Best-of-n on the review task** raises the gold reward by about a point by $n = 8$, then
#   gives some back while the proxy keeps rising (its favourites are short, and sometimes
#   ungrammatical); $d(\alpha - \beta d)$ fits the gold curve to a few percent of its range.
# * **PPO without a penalty** travels much further in KL, and there the proxy and the gold part
#   ways for good: the proxy rises to the end while gold collapses, and $d(\alpha - \beta \log
#   d)$ follows the shape. With a small penalty (β = 0.03) the gold has begun to fall by the end;
#   a large one (β = 0.3) holds the policy near the start, on the good side of the curve.
#
# Gao et al. go further than this chapter: the coefficients α, β vary smoothly with the proxy's
# size and data, and with a larger, better proxy the gold optimum moves further out.

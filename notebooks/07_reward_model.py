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
# # Chapter 7 — The reward model: Bradley-Terry from pairwise preferences
#
# Every chapter so far assumed a reward. In RLHF nobody writes the reward down: people find it hard
# to give consistent absolute scores to answers, but easy to say which of two answers is better.
# So we collect **comparisons** — a prompt, two responses, and which one a person preferred — and
# fit a model that turns a (prompt, response) into a number consistent with them.
#
# The model (`jaxrlhf.models.RewardModel`) is a transformer like the policy, with the vocabulary
# projection replaced by a linear layer with a *single* output, read at the last real token: one
# score $r_\phi(x, y)$ per sequence.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

from jaxrlhf import rl
from jaxrlhf.models import ModelConfig, RewardModel

# %% [markdown]
# ## The Bradley-Terry model
#
# Bradley and Terry (1952) modelled paired comparisons by giving each item a strength and making
# the probability of winning a logistic function of the difference. With the reward as strength,
#
# $$P(y_c \succ y_r \mid x) = \sigma\big(r_\phi(x, y_c) - r_\phi(x, y_r)\big) = \frac{1}{1 + e^{-(r_c - r_r)}},$$
#
# and fitting it by maximum likelihood on the observed choices ($y_c$ chosen, $y_r$ rejected)
# means minimising
#
# $$L(\phi) = -\mathbb{E}_{(x, y_c, y_r)}\big[\log \sigma(r_c - r_r)\big].$$
#
# By hand, for one pair:
#
# | $r_c$ | $r_r$ | $-\log \sigma(r_c - r_r) = \log(1 + e^{-(r_c - r_r)})$ |
# |---|---|---|
# | 1 | 0 | $\log(1 + e^{-1}) = 0.313262$ — the model agrees with the person: small loss |
# | 0 | 0 | $\log 2 = 0.693147$ — undecided |
# | 0 | 1 | $\log(1 + e) = 1.313262$ — the model disagrees: large loss |
#
# Its gradient with respect to the chosen score is $-\sigma(r_r - r_c)$: $-0.268941$ in the first
# row. The push is strongest on pairs the model gets wrong and fades on pairs it already ranks
# confidently.

# %%
one, zero = jnp.array([1.0]), jnp.array([0.0])
assert jnp.isclose(rl.bradley_terry_loss(one, zero), 0.313262, atol=1e-6)
assert jnp.isclose(rl.bradley_terry_loss(zero, zero), np.log(2), atol=1e-6)
assert jnp.isclose(rl.bradley_terry_loss(zero, one), 1.313262, atol=1e-6)
grad_chosen = jax.grad(lambda c: rl.bradley_terry_loss(c, zero))(one)
assert jnp.isclose(grad_chosen[0], -0.268941, atol=1e-6)
# the loss sees only differences: shifting every score by a constant changes nothing
assert jnp.isclose(rl.bradley_terry_loss(one + 7.0, zero + 7.0), 0.313262, atol=1e-6)
# an optional margin m (Llama 2) asks for a gap of at least m: −log σ(1 − 0.5) = 0.474077
assert jnp.isclose(rl.bradley_terry_loss(one, zero, margin=0.5), 0.474077, atol=1e-6)

# %% [markdown]
# Only differences matter, so a reward model is defined up to an additive constant (trainers
# often normalise its scores afterwards). Nothing pins the scale either, except that the
# differences must be large enough to express how confident the preferences are.
#
# ## A synthetic preference dataset
#
# To check that the model learns the *right* thing we need to know the truth. Each response is 8
# tokens from a small vocabulary of words with a hidden **gold** value ("great" +1 … "awful" −1);
# a response's gold reward is the sum. A simulated annotator compares two responses and prefers
# the first with probability $\sigma(\text{gold}_1 - \text{gold}_2)$ — exactly the Bradley-Terry
# model, so the labels are noisy where the responses are close. No model can predict a noisy label
# better than the gold itself; that ceiling is
# $\mathbb{E}\big[\max(\sigma(\Delta), 1 - \sigma(\Delta))\big]$.

# %%
words = ["<pad>", "<bos>", "great", "good", "fine", "meh", "bad", "awful"]
gold_value = np.array([0.0, 0.0, 1.0, 0.5, 0.0, -0.3, -0.6, -1.0])
rng = np.random.default_rng(0)
n_pairs, length = 2400, 8
a = rng.integers(2, len(words), (n_pairs, length))  # [n, L] response A
b = rng.integers(2, len(words), (n_pairs, length))  # [n, L] response B
gold_a, gold_b = gold_value[a].sum(1), gold_value[b].sum(1)  # [n]
p_a = 1.0 / (1.0 + np.exp(-(gold_a - gold_b)))  # the annotator's P(A ≻ B)
a_wins = rng.random(n_pairs) < p_a
chosen = np.where(a_wins[:, None], a, b)  # [n, L]
rejected = np.where(a_wins[:, None], b, a)
train, test = slice(0, 2000), slice(2000, None)
ceiling = float(np.mean(np.maximum(p_a, 1 - p_a)[test]))
print(
    "example pair:",
    " ".join(words[t] for t in chosen[0]),
    " ≻ ",
    " ".join(words[t] for t in rejected[0]),
)
label_matches_gold = gold_value[chosen].sum(1) > gold_value[rejected].sum(1)  # [n]
print(
    f"labels agree with the gold ordering on {np.mean(label_matches_gold[test]):.1%}"
    f" of test pairs; best achievable label accuracy ≈ {ceiling:.1%}"
)

# %% [markdown]
# ## A tiny reward model, trained
#
# A one-layer GPT-2-style `RewardModel` (width 32), trained with Adam on minibatches of 64 pairs.
# Each step scores the chosen and the rejected responses with the same network and minimises
# `rl.bradley_terry_loss` of the two score vectors.

# %%
config = ModelConfig(
    family="gpt2",
    vocab_size=len(words),
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=length,
)
model = RewardModel(config, rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
full_mask = jnp.ones((64, length), jnp.int32)  # every token is real (fixed-length responses)


@nnx.jit
def train_step(model, optimizer, chosen, rejected):
    def loss_fn(model):
        return rl.bradley_terry_loss(model(chosen, full_mask), model(rejected, full_mask))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def scores(model, ids):
    return model(ids, jnp.ones_like(ids))  # [B] one number per response


def accuracy(model):
    """Held-out accuracy (chosen scores higher) and the correlation of scores with gold."""
    sc, sr = scores(model, jnp.asarray(chosen[test])), scores(model, jnp.asarray(rejected[test]))
    acc = float(jnp.mean(sc > sr))
    corr = np.corrcoef(np.asarray(sc), gold_value[chosen[test]].sum(1))[0, 1]
    return acc, float(corr)


acc0, corr0 = accuracy(model)
losses = []
for step in range(300):
    idx = rng.integers(0, train.stop, 64)
    losses.append(
        float(train_step(model, optimizer, jnp.asarray(chosen[idx]), jnp.asarray(rejected[idx])))
    )
acc, corr = accuracy(model)
print(
    f"before: accuracy {acc0:.1%}   after 300 steps: accuracy {acc:.1%} (ceiling {ceiling:.1%}),"
    f" correlation of scores with gold {corr:.3f}"
)

# %% [markdown]
# What training achieved, checked:
#
# * the loss fell from at least $\log 2$ — for random scores with a symmetric difference $d$,
#   $\mathbb{E}[-\log\sigma(d)] \ge -\log\sigma(\mathbb{E} d) = \log 2$ by convexity — to well below it;
# * held-out accuracy is close to the ceiling set by the annotator's noise, far above chance;
# * the scores are nearly a linear function of the hidden gold reward: the model recovered the
#   word values from comparisons alone, never having seen a single absolute score.

# %%
assert losses[0] > np.log(2) - 0.05  # the first batch, before any update: at best undecided
assert np.mean(losses[-50:]) < 0.5
assert acc > ceiling - 0.05 and acc > 0.7
assert corr > 0.9

plt.figure(figsize=(5, 3.5))
plt.plot(np.convolve(losses, np.ones(10) / 10, mode="valid"))
plt.axhline(np.log(2), color="k", ls=":", label="log 2 (undecided)")
plt.xlabel("step")
plt.ylabel("Bradley-Terry loss (10-step mean)")
plt.legend()
plt.tight_layout()

# %% [markdown]
# Calibration: the fitted scores also give preference *probabilities*, $\sigma(r_a - r_b)$.
# Grouping test pairs by predicted probability, the observed frequency with which the chosen
# side wins should follow the diagonal (a well-specified Bradley-Terry model is calibrated).

# %%
sa, sb = scores(model, jnp.asarray(a[test])), scores(model, jnp.asarray(b[test]))
predicted = np.asarray(jax.nn.sigmoid(sa - sb))  # model's P(A ≻ B)
bins = np.linspace(0, 1, 6)
which = np.digitize(predicted, bins[1:-1])
observed = np.array([a_wins[test][which == k].mean() for k in range(5)])
centres = np.array([predicted[which == k].mean() for k in range(5)])
print("predicted:", np.round(centres, 2), "\nobserved: ", np.round(observed, 2))
assert np.abs(observed - centres).max() < 0.15
plt.figure(figsize=(4, 4))
plt.plot([0, 1], [0, 1], "k:")
plt.plot(centres, observed, "o-")
plt.xlabel("predicted P(A ≻ B) = σ(r_A − r_B)")
plt.ylabel("observed frequency A chosen")
plt.tight_layout()

# %% [markdown]
# **Summary.** The reward model is a transformer with a scalar head, trained on comparisons with the
# Bradley-Terry loss (`rl.bradley_terry_loss`). It learns scores only up to a constant, and on
# this task it recovers the hidden reward almost perfectly. In RLHF it then scores the policy's
# responses (chapter 8) — and, being learned from finite data, it has blind spots the policy can
# exploit (chapter 6).

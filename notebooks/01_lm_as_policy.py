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
# # Chapter 1 — The language model as a policy
#
# Reinforcement learning talks about an *agent* that looks at a *state*, picks an *action* and
# collects a *reward*. RLHF reuses that vocabulary for text generation, and the mapping is exact:
#
# | RL word | in a language model |
# |---|---|
# | state $s_t$ | the prompt $x$ followed by the $t$ tokens generated so far, $y_{<t}$ |
# | action $a_t$ | the next token $y_t$, one of $V$ vocabulary entries |
# | policy $\pi_\theta(a_t \mid s_t)$ | the softmax of the model's logits at position $t$ |
# | transition $P(s_{t+1} \mid s_t, a_t)$ | append the token: $s_{t+1} = s_t \oplus a_t$ (deterministic) |
# | initial state distribution $p(s_0)$ | the distribution of prompts in the dataset |
# | trajectory $\tau$ | a prompt and a complete response |
#
# This chapter builds a language model small enough that every one of its possible responses can be
# listed, and checks each formula against `jaxrlhf.rl`.

# %%

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import toyworld as tw

from jaxrlhf import rl

world = tw.ToyWorld()
print(world)

# %% [markdown]
# ## A tiny, enumerable LM
#
# Our world (in `notebooks/toyworld.py`) has two prompts, asked with probabilities
# $p(s_0) = (0.7, 0.3)$, a vocabulary $\{a, b, c\}$ and responses of exactly $T = 3$ tokens. The
# model is a table of logits with one row per state — every prefix of every prompt — which is the
# most general autoregressive model this world allows. A transformer is one way to fill such a
# table; here we fill it with random numbers, like an untrained LM.

# %%
prompts, tokens = tw.enumerate_trajectories(world)  # [N], [N, T]
ids = tw.state_ids(world, prompts, tokens)  # [N, T] the state in which each token was chosen
table = tw.init_table(world, jax.random.key(0))  # [S, V] the parameters θ
N, T = tokens.shape
print(f"{N} trajectories of {T} tokens; {world.n_states} states; θ has {table.size} numbers")
assert N == world.n_prompts * world.vocab_size**world.horizon == 54

# %% [markdown]
# ## The policy: $\pi_\theta(a_t \mid s_t)$ from logits
#
# The model produces a vector of logits $z_t \in \mathbb{R}^V$ at each position; the policy is its
# softmax, optionally sharpened or flattened by a temperature $\tau$:
#
# $$\log \pi_\theta(a_t \mid s_t) = \frac{z_t[a_t]}{\tau} - \log \sum_{v=1}^{V} \exp\frac{z_t[v]}{\tau}.$$
#
# `rl.token_logprobs(logits, tokens)` evaluates this for every position at once. We check one
# response against an independent computation with NumPy in float64.

# %%
i = 5  # one trajectory: prompt 0, response "a b c"
logits_i = tw.policy_logits(table, ids[i])  # [T, V]
logprobs_i = rl.token_logprobs(logits_i, tokens[i])  # [T]
z = np.asarray(logits_i, np.float64)
softmax = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
oracle = np.log(softmax[np.arange(T), np.asarray(tokens[i])])
print("response:", " ".join(world.vocab[t] for t in tokens[i]), "| log π per token:", logprobs_i)
np.testing.assert_allclose(logprobs_i, oracle, rtol=1e-6, atol=1e-6)

# %% [markdown]
# The temperature rescales the logits before the softmax. Whatever $\tau$ is, each row is still a
# distribution over the vocabulary; as $\tau \to 0$ it concentrates on the arg-max token (greedy
# decoding) and as $\tau$ grows it flattens towards uniform. The rollout and the loss must use the
# **same** temperature, otherwise PPO would compare two different policies.

# %%
all_tokens = jnp.broadcast_to(jnp.arange(world.vocab_size), (T, world.vocab_size))  # [T, V]
for temperature in (0.02, 1.0, 20.0):
    lp = rl.token_logprobs(logits_i[:, None, :].repeat(3, 1), all_tokens, temperature=temperature)
    probs = np.exp(np.asarray(lp))  # [T, V] π(v | s_t) for every v
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    print(f"τ={temperature:>4}: π(·|s₀) = {np.round(probs[0], 3)}")
    if temperature == 0.02:
        assert probs[0].max() > 0.99  # nearly greedy
    if temperature == 20.0:
        assert np.abs(probs[0] - 1 / 3).max() < 0.05  # nearly uniform

# %% [markdown]
# ## The probability of a trajectory
#
# A trajectory is the whole story of one episode, $\tau = (s_0, a_0, s_1, a_1, \ldots, s_{T-1},
# a_{T-1}, s_T)$. It happens when the prompt is drawn, then each token is chosen, then the
# environment moves to the next state. By the chain rule of probability,
#
# $$P(\tau \mid \theta) = p(s_0) \prod_{t=0}^{T-1} \pi_\theta(a_t \mid s_t)\, P(s_{t+1} \mid s_t, a_t).$$
#
# For a language model the transition always appends the chosen token, so
# $P(s_{t+1} \mid s_t, a_t) = 1$ for the state that actually follows, and in log space
#
# $$\log P(\tau \mid \theta) = \log p(s_0) + \sum_{t=0}^{T-1} \log \pi_\theta(a_t \mid s_t).$$
#
# The sum is `rl.trajectory_logprob(logprobs, mask)`: the sum of the per-token log-probs over the
# valid (mask = 1) positions. Only that sum depends on $\theta$ — which is what chapter 2 uses.
#
# Check 1: the product form and the library agree for every trajectory.

# %%
logprobs = rl.token_logprobs(tw.policy_logits(table, ids), tokens)  # [N, T]
mask = jnp.ones_like(logprobs)  # [N, T] every token is valid here
log_p_tau = jnp.log(jnp.asarray(world.prompt_probs))[prompts] + rl.trajectory_logprob(
    logprobs, mask
)  # [N]
product = np.asarray(world.prompt_probs)[np.asarray(prompts)] * np.prod(
    np.exp(np.asarray(logprobs, np.float64)), axis=-1
)  # p(s₀) · Π π · Π 1
np.testing.assert_allclose(np.exp(log_p_tau), product, rtol=1e-5)

# %% [markdown]
# Check 2: the probabilities of all 54 trajectories add up to one — the policy, the prompt
# distribution and the deterministic transitions together define a proper distribution over
# complete episodes.

# %%
p_tau = jnp.exp(log_p_tau)  # [N]
print("Σ_τ P(τ|θ) =", float(p_tau.sum()))
assert abs(float(p_tau.sum()) - 1.0) < 1e-5

# %% [markdown]
# Check 3: generating token by token produces trajectories with exactly these probabilities. We
# sample 40 000 episodes autoregressively — draw a prompt, then at each step look up the state's
# logits and draw a token — and compare the observed frequencies with $P(\tau \mid \theta)$. Each
# frequency should be within a few binomial standard errors of its probability.

# %%
n_samples = 40_000
key_prompt, *step_keys = jax.random.split(jax.random.key(1), T + 1)
sampled_prompts = jax.random.categorical(
    key_prompt, jnp.log(jnp.asarray(world.prompt_probs)), shape=(n_samples,)
)  # [n]
sampled = jnp.zeros((n_samples, 0), jnp.int32)
for t in range(T):  # the rollout loop: state → logits → token → next state
    state = tw.state_ids(world, sampled_prompts, jnp.pad(sampled, ((0, 0), (0, T - t))))[:, t]
    next_token = jax.random.categorical(step_keys[t], table[state])  # [n]
    sampled = jnp.concatenate([sampled, next_token[:, None]], axis=1)  # [n, t+1]
index = np.asarray(sampled_prompts) * world.vocab_size**T + np.asarray(
    sampled @ world.vocab_size ** jnp.arange(T - 1, -1, -1)
)
freq = np.bincount(index, minlength=N) / n_samples
stderr = np.sqrt(np.asarray(p_tau) * (1 - np.asarray(p_tau)) / n_samples)
z_scores = np.abs(freq - np.asarray(p_tau)) / stderr
print(f"largest deviation: {z_scores.max():.2f} standard errors")
assert z_scores.max() < 4.5

plt.figure(figsize=(9, 3))
plt.bar(np.arange(N), np.asarray(p_tau), label="P(τ|θ), exact", alpha=0.6)
plt.plot(np.arange(N), freq, "k.", label="frequency in 40k rollouts")
plt.xlabel("trajectory (prompt 0: 0–26, prompt 1: 27–53)")
plt.ylabel("probability")
plt.legend()
plt.tight_layout()

# %% [markdown]
# ## Variable-length responses: the mask
#
# Real responses stop at an end-of-sequence token, so a batch is padded to a common length and a
# mask marks the valid tokens (1s, then 0s). Padded positions are not actions of the policy and must
# not contribute to $\log P(\tau)$, whatever numbers happen to sit there.

# %%
short_mask = jnp.array([1.0, 1.0, 0.0])  # a two-token response padded to T = 3
garbage = logprobs[i].at[2].set(-1e9)  # junk in the padded slot
assert jnp.allclose(rl.trajectory_logprob(garbage, short_mask), logprobs[i, 0] + logprobs[i, 1])

# %% [markdown]
# ## The same identity for a transformer
#
# The table above is a stand-in. `jaxrlhf.models.CausalLM` is a real (here: tiny, random) GPT-2
# style transformer; with a vocabulary of 3 and a fixed two-token prompt we can still list all
# $3^3 = 27$ responses, run the whole batch through the model once, read the logits at the
# positions that predict each response token, and check that the 27 trajectory probabilities
# form a distribution. (For a real vocabulary of 50 000 tokens the same sum would have
# $50\,000^T$ terms — which is why the next chapter needs sampling.)

# %%
import itertools

from flax import nnx

from jaxrlhf.models import CausalLM, ModelConfig

lm_config = ModelConfig(
    family="gpt2",
    vocab_size=3,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=8,
)
lm = CausalLM(lm_config, rngs=nnx.Rngs(0))
responses = jnp.array(list(itertools.product(range(3), repeat=3)), jnp.int32)  # [27, 3]
prompt = jnp.broadcast_to(jnp.array([2, 0], jnp.int32), (27, 2))  # [27, 2] the same prompt
input_ids = jnp.concatenate([prompt, responses], axis=1)  # [27, 5] prompt ⧺ response
lm_logits = lm(input_ids, jnp.ones_like(input_ids))  # [27, 5, V]
# logits at position t predict token t+1: positions 1..3 predict the three response tokens
lm_logprobs = rl.token_logprobs(lm_logits[:, 1:4], responses)  # [27, 3]
p_response = jnp.exp(rl.trajectory_logprob(lm_logprobs, jnp.ones_like(lm_logprobs)))  # [27]
print(
    f"transformer: Σ over all 27 responses of P(response | prompt) = {float(p_response.sum()):.6f}"
)
assert abs(float(p_response.sum()) - 1.0) < 1e-5

# %% [markdown]
# ## The discounted return
#
# Each step earns a reward $r_t$. In our world a token earns +1 when it is the prompt's favourite
# token, −0.5 when it repeats the previous token, and the last step earns +1 more if the response
# ends with "a". (In RLHF proper, almost all of the reward is the reward model's score at the last
# token; chapter 6 adds a small per-token KL term.) The return of a trajectory adds the rewards,
# each discounted by how late it arrives:
#
# $$R(\tau) = \sum_{t=0}^{T-1} \gamma^t r_t, \qquad 0 \le \gamma \le 1.$$
#
# A hand example with $r = (1, 0, 2)$ and $\gamma = 0.5$: $R = 1 + 0.5 \cdot 0 + 0.25 \cdot 2 = 1.5$.
# The *reward-to-go* $G_t = \sum_{k \ge t} \gamma^{k-t} r_k$ is the same sum started at step $t$;
# here $G = (1.5,\ 1.0,\ 2.0)$, and $G_0 = R(\tau)$.

# %%
r_hand = jnp.array([1.0, 0.0, 2.0])
m_hand = jnp.ones(3)
R_hand = rl.discounted_return(r_hand, m_hand, gamma=0.5)
G_hand = rl.reward_to_go(r_hand, m_hand, gamma=0.5)
print("R =", float(R_hand), " G =", G_hand)
assert jnp.isclose(R_hand, 1.5)
assert jnp.allclose(G_hand, jnp.array([1.5, 1.0, 2.0]))

# %% [markdown]
# The same holds for every trajectory of the toy world: the return is the reward-to-go at $t = 0$.
# The expected return $J(\theta) = \sum_\tau P(\tau \mid \theta) R(\tau)$ is the number RL tries to
# increase; chapter 2 differentiates it.

# %%
r = tw.rewards(world, prompts, tokens)  # [N, T]
for gamma in (0.5, 0.9, 1.0):
    R = rl.discounted_return(r, mask, gamma=gamma)  # [N]
    G = rl.reward_to_go(r, mask, gamma=gamma)  # [N, T]
    assert jnp.allclose(R, G[:, 0], atol=1e-6)
    print(f"γ={gamma}: J(θ) = Σ P(τ)R(τ) = {float(jnp.sum(p_tau * R)):.4f}")
best = int(jnp.argmax(rl.discounted_return(r, mask, gamma=1.0)))
print(
    "best trajectory at γ=1: prompt",
    int(prompts[best]),
    "response",
    " ".join(world.vocab[t] for t in tokens[best]),
)

# %% [markdown]
# ## What $\gamma$ does
#
# The discount weighs a reward $k$ steps ahead by $\gamma^k$.
#
# * **Short- versus far-sighted.** With small $\gamma$ only the next few rewards matter; with
#   $\gamma$ near 1 the whole future counts. Two hand trajectories show the preference flipping:
#   $A$ earns 1 immediately, $B$ earns 2 two steps later. At $\gamma = 0.5$, $R(A) = 1 > R(B) =
#   0.5$; at $\gamma = 0.9$, $R(B) = 1.62 > R(A) = 1$.
# * **Finite sums for endless tasks.** A reward of 1 forever is worth
#   $\sum_t \gamma^t = 1/(1-\gamma)$, finite for $\gamma < 1$: the "effective horizon". For
#   $\gamma = 0.9$ that is 10 steps.
# * **In RLHF** the episode is short and finite and the reward comes at the end, so libraries
#   usually keep $\gamma = 1$ (trl's default): the score must reach the first token undiminished.

# %%
A = jnp.array([1.0, 0.0, 0.0])
B = jnp.array([0.0, 0.0, 2.0])
ones3 = jnp.ones(3)
assert rl.discounted_return(A, ones3, gamma=0.5) > rl.discounted_return(B, ones3, gamma=0.5)
assert rl.discounted_return(B, ones3, gamma=0.9) > rl.discounted_return(A, ones3, gamma=0.9)
assert jnp.isclose(rl.discounted_return(B, ones3, gamma=0.9), 1.62)

long = jnp.ones(2000)  # a reward of 1 at every step, for a long time
for gamma in (0.5, 0.9, 0.99):
    horizon = rl.discounted_return(long, jnp.ones_like(long), gamma=gamma)
    print(f"γ={gamma}: Σγᵗ = {float(horizon):.3f}  (1/(1−γ) = {1 / (1 - gamma):.3f})")
    assert jnp.isclose(horizon, 1 / (1 - gamma), rtol=1e-4)

# %%
steps = np.arange(30)
plt.figure(figsize=(6, 3))
for gamma in (0.5, 0.9, 0.99, 1.0):
    plt.plot(steps, gamma**steps, label=f"γ = {gamma}")
plt.xlabel("steps until the reward arrives, k")
plt.ylabel("weight γᵏ")
plt.legend()
plt.title("How much a later reward counts")
plt.tight_layout()

# %% [markdown]
# **Summary.** A language model is a policy over tokens; a prompt plus a response is a trajectory;
# its probability is the prompt's probability times the product of the token probabilities, so its
# log-probability is a sum of token log-probabilities (`rl.token_logprobs`,
# `rl.trajectory_logprob`). Rewards are accumulated into a discounted return
# (`rl.discounted_return`, `rl.reward_to_go`). Next: how to change $\theta$ so that the expected
# return grows.

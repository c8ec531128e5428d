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
# # Chapter 11 — Tool calls: the environment writes into the trajectory
#
# So far the policy wrote every token of the response: the transition of chapter 1,
# $s_{t+1} = s_t \oplus a_t$, was deterministic and the environment never spoke. An agent that
# uses tools is different. It writes a call, a tool (a calculator, a search engine, a code
# sandbox) runs and its answer is **appended to the sequence as tokens**, then the policy goes on,
# conditioned on what the tool said. One sequence now holds two kinds of token:
#
# * tokens the policy **sampled** — actions $a_t \sim \pi_\theta(\cdot \mid s_t)$;
# * tokens the **environment inserted** — the transition $s_{t+1} \sim P(\cdot \mid s_t, a_t)$,
#   which may be random (a flaky tool, a search index that changes) but never depends on $\theta$.
#
# Chapter 1 wrote the probability of a trajectory with the transitions in it,
#
# $$\log P(\tau \mid \theta) = \log p(s_0) + \sum_t \log \pi_\theta(a_t \mid s_t)
#   + \sum_t \log P(s_{t+1} \mid s_t, a_t),$$
#
# and the policy gradient only ever needs $\nabla_\theta \log P(\tau \mid \theta)$. The first and
# the last sums are constants in $\theta$, so
#
# $$\nabla_\theta \log P(\tau \mid \theta) = \sum_{t \,\in\, \text{policy steps}}
#   \nabla_\theta \log \pi_\theta(a_t \mid s_t).$$
#
# The tool's tokens are state, not actions: they are out of the loss, out of the importance
# ratio, out of the KL, and they are not time steps of the policy. In code that is one mask with
# **holes**: 1 at the policy's tokens, 0 at the tool's (and at the padding), which every function
# of `jaxrlhf.rl` reads that way. (The same mask goes by other names elsewhere: trl's `tool_mask`,
# verl's `response_mask`, tunix's `env_masks`.) This chapter derives each consequence on a world
# small enough to enumerate, and shows, exactly, what goes wrong when the tool's tokens are
# treated as the policy's.

# %%
import jax
import jax.numpy as jnp
import numpy as np
import toyworld as tw
from jax.flatten_util import ravel_pytree

from jaxrlhf import rl

# %% [markdown]
# ## 1. An episode with a tool call
#
# A vocabulary of four tokens, `0`, `1`, `call` and `→`. A prompt $x \in \{0, 1\}$ (each asked
# half the time) asks a question whose answer is the digit $c(x) = x$. The episode:
#
# 1. the policy writes $a_0$. A digit (or `→`) is its answer, and the episode ends;
# 2. if $a_0 = $ `call`, the tool answers with two tokens: `→`, then a digit $d$. The tool is
#    flaky: $d = c(x)$ with probability 0.8, the other digit with probability 0.2 —
#    probabilities fixed by the tool, not by $\theta$;
# 3. the policy, having read the tool's answer, writes its answer $a_1$ and the episode ends.
#
# The reward is paid once, at the end: $R = \mathbb{1}[\text{answer} = c(x)] - 0.1 \cdot
# \mathbb{1}[\text{called}]$ (a call costs a little). A trajectory with a call has four tokens,
#
# | position | 0 | 1 | 2 | 3 |
# |---|---|---|---|---|
# | token | `call` | `→` | $d$ | $a_1$ |
# | written by | policy | tool | tool | policy |
# | mask | 1 | 0 | 0 | 1 |
#
# so two policy steps, $a_0$ at position 0 and $a_1$ at position 3, and one environment
# transition in between, $s_1 = (x, \texttt{call}, \texttt{→}, d)$ with
# $P(s_1 \mid s_0, \texttt{call}) = P_{\text{tool}}(d \mid x)$. A direct answer is one token,
# padded to four (mask $[1, 0, 0, 0]$): padding is a hole with no policy token after it.
#
# The policy is a tabular LM like chapter 1's, with one row of logits for every prefix — the
# prefixes at which the tool writes included: a language model assigns a probability to *every*
# next token, whoever writes it. A real LM also shares its weights between all positions; to keep
# that property we add one output bias $b$ shared by every row:
# $\pi_\theta(\cdot \mid s) = \operatorname{softmax}(\text{table}[s] + b)$, $\theta = (\text{table}, b)$.
# Per prompt there are 5 prefixes: $(x)$, $(x, \texttt{call})$, $(x, \texttt{call}, \texttt{→})$
# and $(x, \texttt{call}, \texttt{→}, d)$ for the two digits.

# %%
VOCAB = ("0", "1", "call", "→")
CALL, ARROW = 2, 3
P_PROMPT = (0.5, 0.5)
TOOL_ACCURACY, CALL_COST = 0.8, 0.1
N_PREFIXES = 5  # per prompt: (x), (x,call), (x,call,→), (x,call,→,0), (x,call,→,1)


def enumerate_episodes():
    """Every episode: prompt, tokens [4], prefix ids [4], masks [4], log P_tool [4], reward."""
    rows = []
    for x in (0, 1):
        s = N_PREFIXES * x  # the prompt's first prefix id
        for a0 in (0, 1, ARROW):  # answer at once (→ is a malformed answer)
            rows.append((x, [a0, 0, 0, 0], [s] * 4, [1, 0, 0, 0], [0] * 4, [0.0] * 4, a0 == x))
        for d in (0, 1):  # the tool's digit
            p_tool = TOOL_ACCURACY if d == x else 1 - TOOL_ACCURACY
            for a1 in range(len(VOCAB)):  # the answer after reading it
                rows.append(
                    (
                        x,
                        [CALL, ARROW, d, a1],
                        [s, s + 1, s + 2, s + 3 + d],
                        [1, 0, 0, 1],  # the policy's tokens
                        [0, 1, 1, 0],  # the tool's tokens
                        [0.0, np.log(1.0), np.log(p_tool), 0.0],  # log P_tool of each
                        (a1 == x) - CALL_COST,
                    )
                )
    cols = list(zip(*rows, strict=True))
    return (
        jnp.array(cols[0], jnp.int32),  # [N] prompt x
        jnp.array(cols[1], jnp.int32),  # [N, 4] tokens
        jnp.array(cols[2], jnp.int32),  # [N, 4] the prefix each token is written after
        jnp.array(cols[3], jnp.float32),  # [N, 4] mask: 1 at the policy's tokens
        jnp.array(cols[4], jnp.float32),  # [N, 4] 1 at the tool's tokens
        jnp.array(cols[5], jnp.float32),  # [N, 4] log P_tool(token | prefix), 0 elsewhere
        jnp.array(cols[6], jnp.float32),  # [N] R(τ)
    )


prompts, tokens, ids, mask, tool_mask, tool_logp, R = enumerate_episodes()
attention = mask + tool_mask  # [N, 4] every token of the episode, whoever wrote it
N = len(R)
log_p0 = jnp.log(jnp.asarray(P_PROMPT))[prompts]  # [N]

k_table, k_bias = jax.random.split(jax.random.key(0))
theta0 = {
    "table": jax.random.normal(k_table, (2 * N_PREFIXES, len(VOCAB))),
    "bias": 0.5 * jax.random.normal(k_bias, (len(VOCAB),)),
}
flat0, unravel = ravel_pytree(theta0)  # θ as one vector of 44 parameters
print(f"{N} episodes, {flat0.size} parameters")


def token_logprobs(flat):
    """log π_θ(token | prefix) at every position [N, 4], the tool's positions included."""
    theta = unravel(flat)
    return rl.token_logprobs(theta["table"][ids] + theta["bias"], tokens)


def log_P(flat):
    """log P(τ|θ) = log p(x) + Σ_policy log π_θ(aₜ|sₜ) + Σ_tool log P_tool: [N]."""
    policy_part = rl.trajectory_logprob(token_logprobs(flat), mask)
    return log_p0 + policy_part + jnp.sum(tool_logp, axis=-1)


P0 = jnp.exp(log_P(flat0))  # [N] P(τ|θ₀)
assert jnp.isclose(jnp.sum(P0), 1.0, atol=1e-6)  # a distribution over the 22 episodes
for i in (0, 3, 4, 8):
    words = [VOCAB[t] if a else "·" for t, a in zip(tokens[i].tolist(), attention[i], strict=True)]
    print(
        f"x={int(prompts[i])}  {' '.join(f'{w:>4}' for w in words)}   mask {mask[i].astype(int)}"
        f"   P = {float(P0[i]):.4f}   R = {float(R[i]):+.1f}"
    )

# %% [markdown]
# Every episode is one of $2 \times (3 + 2 \times 4) = 22$, and their probabilities sum to 1. The
# layout of each is the table above; the mask of a call is $[1, 0, 0, 1]$ and `attention` (every
# token written, by either side) is $[1, 1, 1, 1]$.
#
# ## 2. The exact policy gradient, and the masked loss that gives it
#
# $J(\theta) = \sum_\tau P(\tau \mid \theta) R(\tau)$, a sum over the policy's choices *and* the
# tool's outcomes. Three ways to its gradient, which must agree:
#
# * **autodiff of J** — `jax.grad` of the enumerated sum;
# * **the log-derivative trick**, $\nabla J = \sum_\tau P(\tau)\, R(\tau)\, \nabla \log
#   P(\tau \mid \theta)$, with $\nabla \log P$ the Jacobian of the full $\log P$ above, the tool's
#   $\log P_{\text{tool}}$ included (autodiff finds it constant);
# * **the masked surrogate loss** a trainer builds from the rollout: the per-token
#   $\log \pi_\theta$ of every position, weighted by the (constant) $P(\tau) R(\tau)$, summed over
#   the mask with holes by `rl.masked_sum`,
#   $L(\theta) = -\sum_\tau P(\tau) R(\tau) \sum_t m_t \log \pi_\theta(y_t \mid s_t)$. With
#   samples instead of an enumeration the weights would be $R(\tau_i)/B$: the same expectation.


# %%
def J(flat):
    return jnp.sum(jnp.exp(log_P(flat)) * R)


def surrogate(flat, weights, loss_mask):
    """−Σ_τ w(τ) Σₜ mₜ log π_θ(yₜ|sₜ), with w constant: the policy-gradient loss."""
    return -rl.masked_sum(weights[:, None] * token_logprobs(flat), loss_mask)


def pg_estimate(flat, loss_mask, baseline=0.0):
    """The exact expectation of the policy-gradient estimator that uses ``loss_mask``."""
    weights = jnp.exp(log_P(flat)) * (R - baseline)  # P(τ)(R(τ) − b), constants
    return -jax.grad(surrogate)(flat, weights, loss_mask)


grad_J = jax.grad(J)(flat0)  # [44]
score = jax.jacobian(log_P)(flat0)  # [N, 44] ∇log P(τ|θ) of every episode
log_derivative = (P0 * R) @ score
masked = pg_estimate(flat0, mask)
print(f"J(θ₀) = {float(J(flat0)):.4f},  ‖∇J‖ = {float(jnp.linalg.norm(grad_J)):.4f}")
np.testing.assert_allclose(log_derivative, grad_J, atol=1e-6)
np.testing.assert_allclose(masked, grad_J, atol=1e-6)
# ∇log P(τ) is the gradient of the policy's tokens alone, episode by episode
policy_score = jax.jacobian(lambda f: rl.trajectory_logprob(token_logprobs(f), mask))(flat0)
np.testing.assert_allclose(score, policy_score, atol=1e-6)

# %% [markdown]
# Why the mask has to say so: the *model* has an opinion about the tool's tokens too. At the
# prefix $(x, \texttt{call})$ it predicts `→` with some probability, at
# $(x, \texttt{call}, \texttt{→})$ it predicts a digit — and those log-probabilities depend on
# $\theta$ like any other. The gradient of $\sum_{t \in \text{tool}} \log \pi_\theta(y_t \mid s_t)$
# is not zero in any call episode; nothing but the mask keeps it out of the loss.

# %%
tool_score = jax.jacobian(lambda f: rl.masked_sum(token_logprobs(f), tool_mask, axis=-1))(flat0)
called = tokens[:, 0] == CALL  # [N]
norms = jnp.linalg.norm(tool_score, axis=-1)  # [N] ‖∇ Σ_tool log π_θ‖ per episode
print("‖∇ log π_θ(tool's tokens)‖ per call episode:", np.round(np.asarray(norms[called]), 3))
assert jnp.all(norms[called] > 0.5) and jnp.all(norms[~called] == 0)
model_probs = jnp.exp(token_logprobs(flat0))[4]  # episode x=0: call → 0 …
print(
    f"the model's P(→ | x=0, call) = {float(model_probs[1]):.3f} (the tool: 1), "
    f"P(0 | x=0, call, →) = {float(model_probs[2]):.3f} (the tool: {TOOL_ACCURACY})"
)

# %% [markdown]
# ## 3. What goes wrong when the tool's tokens enter the loss
#
# ### The gradient
#
# Use `attention` (1 at every written token) as the loss mask. The estimator's expectation
# becomes
#
# $$\sum_\tau P(\tau)\, R(\tau) \Big(\nabla \log P(\tau \mid \theta)
#   + \sum_{t \in \text{tool}} \nabla \log \pi_\theta(y_t \mid s_t)\Big):$$
#
# $\nabla J$ plus a term that is a reward-weighted *imitation* of the tool — a push towards
# predicting whatever the tool said in the episodes that went well. It is not part of
# $\nabla J$, and it is not small.

# %%
unmasked = pg_estimate(flat0, attention)
bias_term = pg_estimate(flat0, tool_mask)  # Σ P R Σ_tool ∇log π_θ(tool's tokens)
np.testing.assert_allclose(unmasked, grad_J + bias_term, atol=1e-6)
rel = float(jnp.linalg.norm(unmasked - grad_J) / jnp.linalg.norm(grad_J))
cos = float(unmasked @ grad_J / jnp.linalg.norm(unmasked) / jnp.linalg.norm(grad_J))
bias_true, bias_unmasked = unravel(grad_J)["bias"], unravel(unmasked)["bias"]  # ∂/∂b, shared
print(f"‖unmasked − ∇J‖ / ‖∇J‖ = {rel:.3f},  cosine {cos:.4f}")
print(
    "∂/∂b:  ∇J",
    np.round(np.asarray(bias_true), 4),
    "  unmasked",
    np.round(np.asarray(bias_unmasked), 4),
)
assert rel > 0.1 and cos < 0.995
assert jnp.abs(bias_unmasked - bias_true).max() > 0.01  # the weights every row shares move

# %% [markdown]
# ### The baseline no longer cancels
#
# Chapter 3's baseline rule rests on one identity: for a token the policy sampled,
# $\mathbb{E}_{a \sim \pi_\theta}[\nabla \log \pi_\theta(a \mid s)] = \sum_a \nabla \pi_\theta(a
# \mid s) = 0$, so subtracting any $b$ from $R$ changes nothing in expectation. A tool token is
# drawn from $P_{\text{tool}}$, not from $\pi_\theta$, and
# $\mathbb{E}_{y \sim P_{\text{tool}}}[\nabla \log \pi_\theta(y \mid s)]$ is the gradient of a
# cross-entropy: not zero. With the tool's tokens in the loss, the baseline every trainer uses
# (PPO's critic, GRPO's group mean) changes the expected update. With $b = J(\theta)$ — the exact
# expected group mean:

# %%
b = J(flat0)
np.testing.assert_allclose(pg_estimate(flat0, mask, baseline=b), grad_J, atol=1e-6)
unmasked_b = pg_estimate(flat0, attention, baseline=b)
shift = unmasked_b - unmasked  # = −b · Σ P Σ_tool ∇log π_θ(tool's tokens)
np.testing.assert_allclose(shift, -b * (P0 @ tool_score), atol=1e-6)
print(
    f"with b = J = {float(b):.3f}: the masked estimate does not move; the unmasked one moves by "
    f"{float(jnp.linalg.norm(shift)):.3f} (‖∇J‖ = {float(jnp.linalg.norm(grad_J)):.3f})"
)
assert jnp.linalg.norm(shift) > 0.5 * jnp.linalg.norm(grad_J)
shift_b = unravel(shift)["bias"]  # on the shared bias: `call` up, the tool's three tokens down
print("the baseline's push on the shared bias b:", np.round(np.asarray(shift_b), 4))
assert shift_b[CALL] > 0 and jnp.all(jnp.delete(shift_b, CALL) < 0)

# %% [markdown]
# With $b > 0$ the shift is $-b \sum_\tau P(\tau) \sum_{t \in \text{tool}} \nabla \log
# \pi_\theta(y_t \mid s_t)$: gradient ascent on it *un*-learns the tool's tokens. Through the
# shared bias it pushes down the tool's tokens (`→` and the digits) in every row, and up the one
# token the tool never writes, `call` — in the rows where the policy answers too. Run exact
# gradient ascent, 300 steps of size 1, from $\theta_0$ with each estimator and $b = J(\theta)$
# at each step:


# %%
def ascend(loss_mask, steps=300, lr=1.0):
    def step(flat, _):
        return flat + lr * pg_estimate(flat, loss_mask, baseline=J(flat)), None

    return jax.lax.scan(step, flat0, None, length=steps)[0]


def p_answer_call(flat):
    """π_θ(call | s) at the states where the policy answers after the tool, [2 prompts, 2 digits]."""
    theta = unravel(flat)
    answer_rows = jnp.array([[3, 4], [8, 9]])
    return jax.nn.softmax(theta["table"][answer_rows] + theta["bias"])[..., CALL]


trained = {"mask with holes": ascend(mask), "every token": ascend(attention)}
for name, flat in trained.items():
    print(
        f"{name:<16} J = {float(J(flat)):.4f}   π(call | answering state) ="
        f" {np.round(np.asarray(p_answer_call(flat)).ravel(), 3)}"
    )
assert J(trained["mask with holes"]) > 0.99
assert J(trained["every token"]) < J(flat0)  # worse than where it started
assert jnp.all(p_answer_call(trained["every token"]) > 0.99)  # answers "call" after the tool
assert jnp.argmax(unravel(trained["every token"])["bias"]) == CALL

# %% [markdown]
# The masked run solves the task (in this toy the prompt alone gives the answer, so it learns to
# answer at once and save the call's cost). The unmasked run ends *below* its starting point, its
# shared bias dominated by `call`, with a policy that answers `call` after every tool reply.
#
# ### The ratio
#
# PPO's importance weight of a whole episode, $P_\theta(\tau)/P_{\text{old}}(\tau)$, contains the
# tool's probabilities twice, once above and once below, and they cancel: it is the product of the
# per-token ratios over the **policy's** tokens, $\exp \sum_t m_t (\log \pi_\theta - \log
# \pi_{\text{old}})$. The ratio at a tool token compares two models' guesses of a token neither of
# them chose; multiplying it in gives a weight that is not the episode's.

# %%
flat_new = ascend(mask, steps=3)  # a policy a few updates later
log_ratio = token_logprobs(flat_new) - token_logprobs(flat0)  # [N, 4]
episode_ratio = jnp.exp(log_P(flat_new) - log_P(flat0))  # [N] P_θ(τ)/P_old(τ)
np.testing.assert_allclose(
    jnp.exp(rl.masked_sum(log_ratio, mask, axis=-1)), episode_ratio, rtol=1e-5
)
every_token_ratio = jnp.exp(rl.masked_sum(log_ratio, attention, axis=-1))
off = float(jnp.max(jnp.abs(every_token_ratio / episode_ratio - 1)))
print(f"product of the ratios over every token: up to {100 * off:.0f}% off the episode's ratio")
assert off > 0.05

# %% [markdown]
# ### The KL to the reference
#
# The KL penalty of RLHF is the KL between the two distributions over *episodes*. The tool's
# transitions are the same under both, so they cancel again:
#
# $$\mathrm{KL}\big(P_\theta \,\|\, P_{\text{ref}}\big)
#   = \mathbb{E}_{\tau \sim P_\theta}\Big[\sum_{t} m_t \big(\log \pi_\theta(y_t \mid s_t)
#   - \log \pi_{\text{ref}}(y_t \mid s_t)\big)\Big],$$
#
# the sum of `rl.kl_estimate`'s per-token k1 over the policy's tokens (k3 has the same
# expectation). Over every token, the sum gains
# $\mathbb{E}\big[\sum_{t \in \text{tool}} \log \pi_\theta(y_t) - \log \pi_{\text{ref}}(y_t)\big]$,
# the difference of the two models' cross-entropies on the *tool's* outputs — not a divergence
# of the policy at all: the policy is charged (or paid) for how its guess of the tool's answer
# moved. With k3, $e^{-\ell} - 1 + \ell \ge 0$ at every tool token: a pure penalty for tokens it
# did not write. Reference $\theta_0$, policy $\theta$ after three updates:

# %%
lp, lp_ref = token_logprobs(flat_new), token_logprobs(flat0)
P_new = jnp.exp(log_P(flat_new))
exact_kl = jnp.sum(P_new * (log_P(flat_new) - log_P(flat0)))  # KL over the 22 episodes
expected_kl = {}
for kind in ("k1", "k3"):
    per_token = rl.kl_estimate(lp, lp_ref, kind=kind)  # [N, 4]
    for name, m in (("policy tokens", mask), ("every token", attention)):
        expected_kl[kind, name] = float(P_new @ rl.masked_sum(per_token, m, axis=-1))
        print(f"E[Σ {kind}] over {name:<13} = {expected_kl[kind, name]:.5f}")
print(f"exact KL(P_θ ‖ P_ref) over episodes = {float(exact_kl):.5f}")
np.testing.assert_allclose(expected_kl["k1", "policy tokens"], exact_kl, rtol=1e-4)
np.testing.assert_allclose(expected_kl["k3", "policy tokens"], exact_kl, rtol=1e-3)
tool_k1 = float(P_new @ rl.masked_sum(lp - lp_ref, tool_mask, axis=-1))
np.testing.assert_allclose(expected_kl["k1", "every token"] - exact_kl, tool_k1, atol=1e-6)
assert abs(tool_k1) > 0.1 * float(exact_kl)
assert expected_kl["k3", "every token"] > expected_kl["k3", "policy tokens"] * 1.1

# %% [markdown]
# The same through `rl.kl_penalized_rewards`, the KL-shaped rewards of PPO
# ($r_t = -\beta\,\mathrm{KL}_t$, plus the score at the last policy token): with the mask with
# holes the score lands on $a_1$ (position 3) and $\mathbb{E}[\sum_t r_t] =
# \mathbb{E}[R] - \beta\,\mathrm{KL}$; with every token in it, the tool's tokens carry penalties,
# and they flow, through the returns, into the advantage of the `call` that preceded them.

# %%
beta = 0.1
shaped = {
    name: rl.kl_penalized_rewards(R, lp, lp_ref, m, kl_coef=beta)  # [N, 4]
    for name, m in (("policy tokens", mask), ("every token", attention))
}
np.testing.assert_allclose(
    shaped["policy tokens"][called, 3], R[called] - beta * (lp - lp_ref)[called, 3], atol=1e-6
)  # the score at the last policy token
assert jnp.all(shaped["policy tokens"] * (1 - mask) == 0)  # nothing at the tool's tokens
total = {name: float(P_new @ jnp.sum(r, axis=-1)) for name, r in shaped.items()}
print(
    f"E[Σ rₜ]: policy tokens {total['policy tokens']:.5f}, every token {total['every token']:.5f}"
    f"   (E[R] − β KL = {float(P_new @ R - beta * exact_kl):.5f})"
)
np.testing.assert_allclose(total["policy tokens"], P_new @ R - beta * exact_kl, atol=1e-5)
np.testing.assert_allclose(
    total["every token"] - total["policy tokens"], -beta * tool_k1, atol=1e-5
)
# the call's return (γ = 1) now carries the penalties of the tool's two tokens
to_go = {
    name: rl.reward_to_go(r, m, gamma=1.0)
    for (name, r), m in zip(shaped.items(), (mask, attention), strict=True)
}
np.testing.assert_allclose(
    (to_go["every token"] - to_go["policy tokens"])[called, 0],
    -beta * rl.masked_sum(lp - lp_ref, tool_mask, axis=-1)[called],
    atol=1e-6,
)

# %% [markdown]
# ## 4. GAE over policy steps
#
# A critic $V(s)$ is the value of a state *at which the policy acts*. After the call the next such
# state is $s_1 = (x, \texttt{call}, \texttt{→}, d)$, three positions later, and the TD error of
# the call must read $V(s_1)$ there:
#
# $$\delta_k = r_k + \gamma\, V(s_{k+1}) - V(s_k), \qquad \hat A_k = \delta_k + \gamma\lambda\,
#   \hat A_{k+1},$$
#
# with $k$ counting **policy steps**, not positions: $\gamma$ and $\gamma\lambda$ are applied once
# per action, however many tokens the tool wrote in between. `rl.gae` (like `td_error`,
# `reward_to_go` and `discounted_return`) reads the mask with holes that way: at the policy's
# tokens it gives what it gives on the sequence with the holes cut out.
#
# By hand, an episode with two tool calls: policy tokens at positions 0, 3 and 6, rewards
# $(-0.02, -0.01, 1.0)$ there, critic values $(0.5, 0.6, 0.8)$, $\gamma = 0.9$, $\lambda = 0.95$
# ($\gamma\lambda = 0.855$); whatever sits at the tool's positions (here 3.0 and 9.0) must not
# matter.
#
# | step $k$ (position) | $\delta_k$ | $\hat A_k = \delta_k + 0.855\, \hat A_{k+1}$ |
# |---|---|---|
# | 2 (6) | $1.0 + 0 - 0.8 = 0.2$ | $0.2$ |
# | 1 (3) | $-0.01 + 0.9 \cdot 0.8 - 0.6 = 0.11$ | $0.11 + 0.855 \cdot 0.2 = 0.281$ |
# | 0 (0) | $-0.02 + 0.9 \cdot 0.6 - 0.5 = 0.02$ | $0.02 + 0.855 \cdot 0.281 = 0.260255$ |

# %%
holes = jnp.array([1.0, 0, 0, 1, 0, 0, 1])  # policy, tool, tool, policy, tool, tool, policy
at = jnp.array([0, 3, 6])  # the policy's positions
r7 = jnp.array([-0.02, 3.0, 3.0, -0.01, 3.0, 3.0, 1.0])
v7 = jnp.array([0.5, 9.0, 9.0, 0.6, 9.0, 9.0, 0.8])
adv7, ret7 = rl.gae(r7, v7, holes, gamma=0.9, lam=0.95)
adv3, ret3 = rl.gae(r7[at], v7[at], jnp.ones(3), gamma=0.9, lam=0.95)  # the holes cut out
print(
    "Â with holes:", np.round(np.asarray(adv7), 6), "\nÂ compacted: ", np.round(np.asarray(adv3), 6)
)
np.testing.assert_allclose(adv7[at], [0.260255, 0.281, 0.2], atol=1e-6)
np.testing.assert_allclose(adv7[at], adv3, atol=1e-6)
np.testing.assert_allclose(ret7[at], ret3, atol=1e-6)
np.testing.assert_allclose(rl.td_error(r7, v7, holes, gamma=0.9)[at], [0.02, 0.11, 0.2], atol=1e-6)
assert jnp.all(adv7 * (1 - holes) == 0)  # nothing at the tool's positions
np.testing.assert_allclose(  # whitening over the policy's tokens only
    rl.masked_whiten(adv7, holes)[at], rl.masked_whiten(adv3, jnp.ones(3)), atol=1e-5
)

# %% [markdown]
# **What the contiguous-mask reading would give.** A recursion written for a mask that is one
# contiguous run takes every position for a time step, and masked positions for zeros. It reads
# $V = 0$ at the position after each call — a tool token, masked — so the episode "ends" at every
# tool call: $\delta_0 = -0.02 + 0 - 0.5 = -0.52$. And $\gamma\lambda$ is applied at each tool
# token too, so the future is discounted by $(\gamma\lambda)^3$ across a call of two tokens.
# Written out:


# %%
def every_position_gae(rewards, values, m, gamma, lam):
    """GAE that treats each position as a time step; V and r at masked positions read as 0."""
    rewards, values, m = (np.asarray(a, np.float64) for a in (rewards, values, m))
    rewards, values = rewards * m, values * m
    advantages, next_value, next_advantage, next_m = np.zeros_like(rewards), 0.0, 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = m[t] * (rewards[t] + gamma * next_m * next_value - values[t])
        advantage = delta + gamma * lam * next_advantage
        advantages[t] = m[t] * advantage
        next_value, next_advantage, next_m = values[t], advantage, m[t]
    return advantages


naive7 = every_position_gae(r7, v7, holes, 0.9, 0.95)
print("Â, every position a step:", np.round(naive7[np.asarray(at)], 6))
np.testing.assert_allclose(naive7[np.asarray(at)], [-0.823135, -0.484995, 0.2], atol=1e-6)
assert np.all(np.abs(naive7[np.asarray(at)][:2] - np.asarray(adv3[:2])) > 0.7)

# %% [markdown]
# Both calls now look terrible: the critic's 0.6 and 0.8 for what comes after them never enter
# their TD errors. The same holds for the return: $\gamma$ counts actions. By hand,
# $G_0 = -0.02 + 0.9 \cdot (-0.01) + 0.9^2 \cdot 1.0 = 0.781$, where counting positions would
# give $-0.02 + 0.9^3 \cdot (-0.01) + 0.9^6 \cdot 1.0 = 0.504151$.

# %%
G7 = rl.reward_to_go(r7, holes, gamma=0.9)
np.testing.assert_allclose(G7[at], rl.reward_to_go(r7[at], jnp.ones(3), gamma=0.9), atol=1e-6)
np.testing.assert_allclose(rl.discounted_return(r7, holes, gamma=0.9), 0.781, atol=1e-6)
by_position = float(np.sum(0.9 ** np.arange(7) * np.asarray(r7 * holes)))
np.testing.assert_allclose(by_position, 0.504151, atol=1e-6)

# %% [markdown]
# **On the toy world, with the exact critic.** Chapter 4 showed that with the true $V^\pi$ the
# GAE advantage is, for every $\lambda$, an unbiased estimate of $A^\pi(s, a)$ given the state
# and action. That survives the tool — the expectation now also runs over the tool's answer — if
# $V$ is read at the next *policy* state. Take $\gamma = 1$ (the score is not discounted), the
# rewards of `rl.kl_penalized_rewards` with $\beta = 0$ (the score at the last policy token),
# $V^\pi$ and $Q^\pi$ by enumeration under $\theta_0$ with `toyworld.conditional_mean`, and check
# $\mathbb{E}[\hat A \mid s, a] = A^\pi(s, a)$ at both policy steps. The every-position recursion
# instead credits the call as if the episode ended there: it is off by exactly the value of the
# state the tool's answer leads to,
# $\mathbb{E}[\hat A_0 \mid x, \texttt{call}] = A^\pi(x, \texttt{call}) -
# \mathbb{E}[V^\pi(s_1) \mid x, \texttt{call}]$ at $\lambda = 0$.

# %%
rewards = rl.kl_penalized_rewards(R, lp_ref, lp_ref, mask, kl_coef=0.0)  # [N, 4] R at the end
G = rl.reward_to_go(rewards, mask, gamma=1.0)  # [N, 4]
n_states = 2 * N_PREFIXES
other = n_states * len(VOCAB)  # one extra id for every masked position
state_key = jnp.where(mask > 0, ids, n_states)  # [N, 4]
action_key = jnp.where(mask > 0, ids * len(VOCAB) + tokens, other)
V_pi = tw.conditional_mean(P0, G, state_key, n_states + 1) * mask  # V^π(sₜ) at the policy's tokens
Q_pi = tw.conditional_mean(P0, G, action_key, other + 1) * mask
A_pi = Q_pi - V_pi
for lam in (0.0, 0.95, 1.0):
    adv, _ = rl.gae(rewards, V_pi, mask, gamma=1.0, lam=lam)
    mean_given_sa = tw.conditional_mean(P0, adv, action_key, other + 1) * mask
    np.testing.assert_allclose(mean_given_sa, A_pi, atol=1e-5)

naive = jnp.stack(
    [jnp.asarray(every_position_gae(rewards[i], V_pi[i], mask[i], 1.0, 0.0)) for i in range(N)]
).astype(jnp.float32)  # [N, 4]
naive_mean = tw.conditional_mean(P0, naive, action_key, other + 1) * mask
for x in (0, 1):
    row = int(jnp.argmax(called & (prompts == x)))  # any call episode of prompt x
    value_after = float(
        jnp.sum(jnp.where(called & (prompts == x), P0 * V_pi[:, 3], 0.0))
        / jnp.sum(jnp.where(called & (prompts == x), P0, 0.0))
    )
    print(
        f"x={x}: A(x, call) = {float(A_pi[row, 0]):+.4f},  every-position E[Â₀] = "
        f"{float(naive_mean[row, 0]):+.4f},  E[V(s₁) | call] = {value_after:.4f}"
    )
    np.testing.assert_allclose(naive_mean[row, 0], A_pi[row, 0] - value_after, atol=1e-5)

# %% [markdown]
# ## 5. How jaxrlhf records a multi-turn episode
#
# The rollout in turns, `jaxrlhf.tools.sample_turns`, writes exactly the layout of this chapter.
# At each step a row either samples a token from the policy — mask 1, its log-probability
# recorded — or, while a tool's answer is queued for it, takes the next token of that answer —
# mask 0, no log-probability: a transition. The `Rollout` it returns carries the mask with holes
# as `mask`, and a second mask, `attention`, that is 1 at every token of the episode, the tool's
# included: the re-scoring passes (policy, reference, critic) attend to the tool's answer, because
# the policy's next tokens were conditioned on it — it is part of the state. So the two masks go
# to two places: `attention` to the model's forward passes, `mask` to the functions of
# `jaxrlhf.rl`, which read it as this chapter did — the loss, the ratio and the KL at the policy's
# tokens only, GAE and the returns over policy steps.

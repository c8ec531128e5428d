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
# # Chapter 8 — One PPO iteration, traced end to end
#
# The previous chapters derived each piece on its own. Here they run together, on tiny transformers,
# through the library's own trainer functions (`jaxrlhf.train.ppo`). We follow one batch from the
# prompts to a gradient step and print the shape of every array on the way:
#
# ```
# prompts [B, P] ─ sample(actor)   ─▶ responses [B, N], mask [B, N], logprobs [B, N]
#     reward model(prompt ⧺ response) ─▶ scores [B]
#     actor-critic(prompt ⧺ response) ─▶ logprobs [B, N], values [B, N]
#     reference(prompt ⧺ response)    ─▶ ref_logprobs [B, N]
#     rl.kl_penalized_rewards ─▶ rewards [B, N];  rl.gae ─▶ advantages, returns [B, N]
# Experience ─▶ PPO loss (policy + value − entropy) ─▶ gradient ─▶ Adam step
# ```
#
# Four models take part, as in every RLHF setup: the **actor** (the policy being trained), the
# **critic** (here a value head on the actor's trunk), the frozen **reference** (the actor before
# RL) and the frozen **reward model**.

# %%
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrlhf import rl
from jaxrlhf.models import CausalLM, ModelConfig, RewardModel, num_params
from jaxrlhf.rollout import SamplingConfig, concat_prompt_response, sample
from jaxrlhf.train import PPOLoss, init_policy, init_train_state, make_experience, train_step


def shapes(**arrays):
    for name, x in arrays.items():
        print(f"  {name:<14} {x.dtype!s:<8} {tuple(x.shape)}")


config = ModelConfig(
    family="gpt2",
    vocab_size=16,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=16,
)
PAD, EOS = 0, 1
sft = CausalLM(config, rngs=nnx.Rngs(0))  # stands in for the supervised fine-tuned model
reference = nnx.clone(sft)  # frozen copy: π_ref
policy = init_policy(sft, rngs=nnx.Rngs(1))  # ActorCritic: the SFT weights + a zero value head
reward_model = RewardModel(config, rngs=nnx.Rngs(2))  # untrained here; chapter 7 trains one
print(type(policy).__name__, "with", num_params(policy), "parameters")

# %% [markdown]
# ## Stage 1 — rollout
#
# Four prompts of different lengths, **left**-padded to $P = 4$ so that every prompt ends at the
# same position and generation continues from there. The actor samples $N = 6$ tokens per prompt
# with a KV cache (`jaxrlhf.rollout.sample`). A response that emits EOS stops: its later positions hold
# the pad token and have mask 0.

# %%
prompt_ids = jnp.array(
    [[PAD, 5, 6, 7], [PAD, PAD, 8, 9], [10, 11, 12, 13], [PAD, PAD, PAD, 14]], jnp.int32
)  # [B, P]
prompt_mask = (prompt_ids != PAD).astype(jnp.int32)  # [B, P]
rollout = sample(
    policy,
    prompt_ids,
    prompt_mask,
    SamplingConfig(max_new_tokens=6, temperature=1.0),
    jax.random.key(3),
    eos_token_id=EOS,
    pad_token_id=PAD,
)
B, P = prompt_ids.shape
N = rollout.tokens.shape[1]
shapes(
    prompt_ids=prompt_ids,
    prompt_mask=prompt_mask,
    tokens=rollout.tokens,
    mask=rollout.mask,
    logprobs=rollout.logprobs,
)
print(rollout.tokens, rollout.mask, sep="\n")
assert rollout.tokens.shape == rollout.mask.shape == rollout.logprobs.shape == (B, N)
# after a row's EOS: pad tokens, mask 0, and log-prob 0
after_eos = rollout.mask == 0
assert jnp.all(jnp.where(after_eos, rollout.tokens, PAD) == PAD)
assert jnp.all(jnp.where(after_eos, rollout.logprobs, 0.0) == 0.0)

# %% [markdown]
# ## Stage 2 — scoring
#
# The reward model reads prompt ⧺ response and returns one number per sequence, taken at the last
# real token. The responses' padding is at the right, so the concatenated mask has holes only at
# the left (prompt padding) and at the right (after EOS).

# %%
input_ids, attention_mask = concat_prompt_response(
    prompt_ids, prompt_mask, rollout.tokens, rollout.mask
)  # [B, P + N]
scores = reward_model(input_ids, attention_mask)  # [B]
shapes(input_ids=input_ids, attention_mask=attention_mask, scores=scores)
assert input_ids.shape == (B, P + N) and scores.shape == (B,)

# %% [markdown]
# ## Stage 3 — log-probs, reference log-probs and values: `make_experience`
#
# One forward pass of the actor-critic over prompt ⧺ response gives logits $[B, P+N, V]$ and values
# $[B, P+N]$; the positions that *predict* the response are $P-1, \ldots, P+N-2$ (logits at $t$
# predict token $t+1$), so the trainer slices those out. The reference does the same without a
# value head. Then the rewards and advantages are computed (stage 4), and everything is frozen into
# an `Experience`, the data of the whole update.

# %%
kl_coef, gamma, lam = 0.1, 1.0, 0.95
experience = make_experience(
    policy,
    reference,
    prompt_ids,
    prompt_mask,
    rollout.tokens,
    rollout.mask,
    scores,
    kl_coef=kl_coef,
    gamma=gamma,
    lam=lam,
)
print("Experience:")
shapes(**{f.name: getattr(experience, f.name) for f in experience.__dataclass_fields__.values()})
mask = experience.response_mask  # [B, N]

# The log-probs recomputed by a full forward pass equal those the sampler produced (the first
# ratio of PPO is exactly 1) ...
assert jnp.allclose(experience.logprobs, rollout.logprobs * mask, atol=1e-4)
# ... and by hand: slice the actor's logits and take rl.token_logprobs
logits, values = policy(input_ids, attention_mask)  # [B, P+N, V], [B, P+N]
shapes(logits=logits, values=values)
by_hand = rl.token_logprobs(logits[:, P - 1 : P - 1 + N], rollout.tokens) * mask  # [B, N]
assert jnp.allclose(experience.logprobs, by_hand, atol=1e-5)
assert jnp.allclose(experience.values, values[:, P - 1 : P - 1 + N] * mask, atol=1e-5)
# At the first iteration the actor *is* the reference, so the KL is exactly 0.
assert jnp.allclose(experience.ref_logprobs, experience.logprobs, atol=1e-5)

# %% [markdown]
# ## Stage 4 — KL-shaped rewards, GAE and whitening
#
# $r_t = -\beta\, \mathrm{KL}_t + \mathbb{1}[t = t_{\text{last}}]\, r_\phi$ (chapter 6), then GAE with
# the critic's values (chapter 4), then the advantages are *whitened* — shifted and scaled to mean 0
# and variance 1 over the valid tokens of the batch (`rl.masked_whiten`), which keeps the step size
# independent of the reward model's scale. Each checked against the library functions directly.

# %%
rewards = rl.kl_penalized_rewards(
    scores, experience.logprobs, experience.ref_logprobs, mask, kl_coef=kl_coef
)  # [B, N]
advantages, returns = rl.gae(rewards, experience.values, mask, gamma=gamma, lam=lam)  # [B, N]
shapes(rewards=rewards, advantages=advantages, returns=returns)
print("rewards:\n", np.round(np.asarray(rewards), 3))
assert jnp.allclose(experience.rewards, rewards, atol=1e-5)
# with KL = 0, the only reward is the score, at each row's last valid token
last = jnp.sum(mask, axis=1).astype(jnp.int32) - 1  # [B]
assert jnp.allclose(rewards[jnp.arange(B), last], scores, atol=1e-5)
assert jnp.allclose(rewards.sum(axis=1), scores, atol=1e-5)
assert jnp.allclose(experience.returns, returns, atol=1e-5)
assert jnp.allclose(experience.advantages, rl.masked_whiten(advantages, mask), atol=1e-5)
assert abs(float(rl.masked_mean(experience.advantages, mask))) < 1e-5
assert abs(float(rl.masked_var(experience.advantages, mask)) - 1.0) < 1e-3

# %% [markdown]
# ## Stage 5 — the loss
#
# `PPOLoss` — the trainer's own loss — runs the actor-critic again on the minibatch (here: the
# whole batch) and returns each term as a *(sum, count)* pair: sums and counts add across devices,
# so the train step can split a batch over devices and still divide once by the global count. The
# objective is $L = \sum_k w_k \, S_k / C_k$ with the weights in `loss.weights`: $1$ for the policy
# term, $c_1$ for the value loss, $-c_2$ for the entropy. Before any update the ratio is 1, so the
# policy term is minus the mean advantage — zero, since the advantages were just whitened — and the
# clip fraction is 0.

# %%
graphdef, params = nnx.split(policy)
loss = PPOLoss(
    graphdef=graphdef, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1, ent_coef=0.01, temperature=1.0
)


def objective(params):
    """(L, the mean of every term) — what the train step computes on one device."""
    means = {name: total / count for name, (total, count) in loss(params, experience).items()}
    return sum(w * means[name] for name, w in loss.weights), means


total, metrics = objective(params)
print(f"loss {float(total):.5f}   (weights {loss.weights})")
for k, v in metrics.items():
    print(f"  {k:<30} {float(v):.5f}")
assert abs(float(metrics["loss/policy_avg"])) < 1e-5
assert float(metrics["policy/clipfrac_avg"]) == 0.0 and abs(float(metrics["val/ratio"]) - 1) < 1e-5
# the value term is rl.value_loss, and the total is what rl.ppo_loss computes from the same pieces
value_term = rl.value_loss(
    experience.values, experience.values, experience.returns, mask, clip_eps=0.2
)
assert jnp.isclose(metrics["loss/value_avg"], value_term, atol=1e-5)
logits, values = policy(input_ids, attention_mask)
expected, _ = rl.ppo_loss(
    rl.token_logprobs(logits[:, P - 1 : P - 1 + N], rollout.tokens),
    experience.logprobs,
    experience.advantages,
    values[:, P - 1 : P - 1 + N],
    experience.values,
    experience.returns,
    mask,
    rl.token_entropy(logits[:, P - 1 : P - 1 + N]),
    clip_eps=0.2,
    value_clip_eps=0.2,
    vf_coef=0.1,
    ent_coef=0.01,
)
assert jnp.isclose(total, expected, atol=1e-5)

# %% [markdown]
# ## Stage 6 — one gradient step
#
# `train_step` (the one step every trainer uses) differentiates the loss with respect to every
# parameter of the actor-critic (the trunk, the LM head and the value head) and applies one
# optimiser update. The gradient tree has the shape of the parameter tree (`jax.eval_shape` lists
# the shapes without computing anything). The trainer uses Adam; here one small plain gradient
# step makes the first-order decrease of the loss easy to check. The optimiser is passed as a small
# hashable config with a `build()` method, like the loss, so `jax.jit` can take both as static.


# %%
@dataclasses.dataclass(frozen=True)
class SGD:
    learning_rate: float

    def build(self):
        return optax.sgd(self.learning_rate)


state = init_train_state(params, SGD(1e-3))
grads = jax.eval_shape(jax.grad(lambda p: objective(p)[0]), params)
for path, g in list(jax.tree_util.tree_leaves_with_path(grads))[:6]:
    print(f"  ∇ {jax.tree_util.keystr(path):<55} {tuple(g.shape)}")
print(f"  ... {len(jax.tree.leaves(grads))} parameter arrays in all")
assert jax.tree.structure(grads) == jax.tree.structure(params)
new_state, step_metrics = jax.jit(train_step, static_argnums=(2, 3))(
    state, experience, loss, SGD(1e-3)
)
print(
    f"step {int(new_state.step)}: loss {float(step_metrics['loss']):.5f}, "
    f"grad norm {float(step_metrics['grad_norm']):.4f}"
)
assert int(new_state.step) == 1 and float(step_metrics["grad_norm"]) > 0
assert jnp.isclose(step_metrics["loss"], total, atol=1e-6)

# %% [markdown]
# ## After the step
#
# Evaluated again on the *same* experience: the policy has moved (the ratio is no longer 1, the
# approximate KL from $\pi_{\text{old}}$ is positive), the surrogate loss has gone down, and the
# policy is no longer identical to the reference — from the next rollout on, the KL penalty is
# active.

# %%
total_after, metrics_after = objective(new_state.params)
print(
    f"loss {float(total):.5f} → {float(total_after):.5f};  policy loss "
    f"{float(metrics['loss/policy_avg']):.5f} → {float(metrics_after['loss/policy_avg']):.5f};  "
    f"approx KL {float(metrics_after['policy/approxkl_avg']):.2e}"
)
assert total_after < total
assert metrics_after["loss/policy_avg"] < metrics["loss/policy_avg"]
assert metrics_after["policy/approxkl_avg"] > 0
updated = nnx.merge(graphdef, new_state.params)
logits_new, _ = updated(input_ids, attention_mask)
new_logprobs = rl.token_logprobs(logits_new[:, P - 1 : P - 1 + N], rollout.tokens) * mask
kl_to_ref = rl.masked_mean(rl.kl_estimate(new_logprobs, experience.ref_logprobs, kind="k3"), mask)
print(f"KL(π‖π_ref) per token (k3) after one step: {float(kl_to_ref):.2e}")
assert kl_to_ref > 0

# %% [markdown]
# That is one PPO iteration. The trainer (`jaxrlhf.train.PPOTrainer`, whose `iteration` method is these stages in order) repeats it: a new rollout with the
# updated actor, several epochs of minibatch steps on each `Experience`, metrics under trl's names,
# and optionally an adaptive $\beta$ (`rl.adaptive_kl_update`) that steers the KL towards a target.

"""Each prompt run once for its group of G responses (sampling, the reward model, the GRPO loss),
the explicit LayerNorm backward, and GRPO's one-program iteration: every fast path against the plain
computation it replaces."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils as tu
from flax import nnx
from jax.test_util import check_grads

from jaxrlhf import rl
from jaxrlhf.models import CausalLM, RewardModel
from jaxrlhf.models.heads import with_settings
from jaxrlhf.models.layers import layer_norm
from jaxrlhf.rollout import (
    Rollout,
    SamplingConfig,
    concat_prompt_response,
    first_argmax,
    response_slice,
    sample,
)
from jaxrlhf.train.experience import reward_model_fn
from jaxrlhf.train.grpo import GroupBatch, GroupLoss, GRPOTrainer
from jaxrlhf.train.grpo_config import GRPOConfig

G = 3


def grouped_batch(seed: int = 0, *, num_prompts: int = 4, prompt_len: int = 5, n: int = 6):
    """Left-padded prompts [B, P] (one with padding), G responses each [B·G, N] ending in padding
    (one response empty, one a single token)."""
    ids, mask = tu.tiny_prompts(num=num_prompts, length=prompt_len, seed=seed)
    rng = np.random.default_rng(seed + 1)
    responses = rng.integers(2, tu.VOCAB, size=(num_prompts * G, n)).astype(np.int32)
    lengths = rng.integers(1, n + 1, size=num_prompts * G)
    lengths[0], lengths[1] = 0, 1
    response_mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
    return ids, mask, np.where(response_mask > 0, responses, tu.PAD), response_mask


def full_pass_logits(lm, prompt_ids, prompt_mask, response_ids, response_mask):
    """The plain computation: every prompt ⧺ response through the whole model, then the slice."""
    ids, attention_mask = concat_prompt_response(
        prompt_ids, prompt_mask, response_ids, response_mask
    )
    return response_slice(lm(ids, attention_mask), prompt_ids.shape[1], response_ids.shape[1])


def test_layer_norm_backward_matches_autodiff_and_finite_differences():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 8)) * 3.0 + 1.0
    w = 1.0 + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (8,))
    b = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (8,))
    dy = jax.random.normal(jax.random.PRNGKey(3), (3, 4, 8))

    def plain(x, w, b):  # the textbook formula, differentiated by autodiff
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * w + b

    ours = lambda x, w, b: layer_norm(x, w, b, 1e-5)
    np.testing.assert_allclose(ours(x, w, b), plain(x, w, b), atol=1e-5)
    grads = jax.vjp(ours, x, w, b)[1](dy)
    expected = jax.vjp(plain, x, w, b)[1](dy)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    check_grads(ours, (x, w, b), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    y16 = layer_norm(x.astype(jnp.bfloat16), w, b, 1e-5)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(y16.astype(jnp.float32), plain(x, w, b), atol=0.05)


def test_first_argmax_is_argmax_with_ties_going_to_the_first_index():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 7, 33))
    np.testing.assert_array_equal(first_argmax(x), jnp.argmax(x, axis=-1))
    tied = jnp.array([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    np.testing.assert_array_equal(first_argmax(tied), [1, 0])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_response_logits_of_shared_prompts_equal_the_full_pass(family):
    lm = CausalLM(tu.tiny_config(family), rngs=nnx.Rngs(0))
    prompt_ids, prompt_mask, responses, response_mask = grouped_batch()
    per_row = [np.repeat(a, G, axis=0) for a in (prompt_ids, prompt_mask)]
    want = full_pass_logits(lm, *per_row, responses, response_mask)  # [R, N, V]
    got = lm.response_logits(prompt_ids, prompt_mask, responses, response_mask, group_size=G)
    valid = response_mask[..., None] > 0
    np.testing.assert_allclose(jnp.where(valid, got, 0), jnp.where(valid, want, 0), atol=2e-5)
    # G = 1: the same function with one response per prompt row
    alone = lm.response_logits(*per_row, responses, response_mask)
    np.testing.assert_allclose(jnp.where(valid, alone, 0), jnp.where(valid, want, 0), atol=2e-5)
    # one-token responses: only the prompt's last position is run past the prompt
    first = lm.response_logits(prompt_ids, prompt_mask, responses[:, :1], response_mask[:, :1],
                               group_size=G)  # fmt: skip
    np.testing.assert_allclose(first, want[:, :1], atol=2e-5)

    graphdef, params = nnx.split(lm)

    def objective(params, shared: bool):  # Σ log π over valid tokens, gradient through the prompt
        model = nnx.merge(graphdef, params)
        if shared:
            logits = model.response_logits(
                prompt_ids, prompt_mask, responses, response_mask, group_size=G
            )
        else:
            logits = full_pass_logits(model, *per_row, responses, response_mask)
        return jnp.sum(rl.token_logprobs(logits, responses) * response_mask)

    expected = jax.grad(objective)(params, False)
    # Also with activation checkpointing, and over a list of blocks (remat around each block).
    for model in (
        lm,
        with_settings(lm, remat=True),
        with_settings(lm, remat=True, scan_layers=False),
    ):
        graphdef, params = nnx.split(model)
        grads = jax.jit(jax.grad(objective), static_argnums=1)(params, True)
        if not model.config.scan_layers:  # back to the stacked layout to compare leaf by leaf
            grads = nnx.state(with_settings(nnx.merge(graphdef, grads), scan_layers=True))
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_reward_model_scores_shared_prompts_like_the_full_pass():
    rm = RewardModel(tu.tiny_config(), rngs=nnx.Rngs(3))
    prompt_ids, prompt_mask, responses, response_mask = grouped_batch(seed=4)
    per_row = [np.repeat(a, G, axis=0) for a in (prompt_ids, prompt_mask)]
    ids, mask = concat_prompt_response(*per_row, responses, response_mask)
    want = rm(ids, mask)  # [R]: the head at the last real token (the prompt's, for row 0)
    got = rm.score_responses(prompt_ids, prompt_mask, responses, response_mask, group_size=G)
    np.testing.assert_allclose(got, want, atol=1e-5)
    reward_fn = reward_model_fn(rm)
    rollout = Rollout(tokens=responses, mask=response_mask, logprobs=jnp.zeros_like(response_mask))
    np.testing.assert_allclose(reward_fn(*per_row, rollout, group_size=G), want, atol=1e-5)
    np.testing.assert_allclose(reward_fn(*per_row, rollout), want, atol=1e-5)
    with pytest.raises(ValueError, match="group_size"):
        rm.score_responses(
            prompt_ids, prompt_mask, responses[:-1], response_mask[:-1], group_size=G
        )


def test_sampling_a_group_prefills_each_prompt_once_with_the_same_samples():
    lm = CausalLM(tu.tiny_config(), rngs=nnx.Rngs(0))
    prompt_ids, prompt_mask = tu.tiny_prompts(num=4, length=5, seed=2)
    config = SamplingConfig(max_new_tokens=7, temperature=1.0)
    key = jax.random.PRNGKey(5)
    once = sample(lm, prompt_ids, prompt_mask, config, key, eos_token_id=tu.EOS, group_size=G)
    repeated = sample(lm, np.repeat(prompt_ids, G, 0), np.repeat(prompt_mask, G, 0), config, key,
                      eos_token_id=tu.EOS)  # fmt: skip
    assert once.tokens.shape == (4 * G, 7)
    np.testing.assert_array_equal(once.tokens, repeated.tokens)
    np.testing.assert_array_equal(once.mask, repeated.mask)
    np.testing.assert_allclose(once.logprobs, repeated.logprobs, atol=1e-5)
    assert len({tuple(row) for row in np.asarray(once.tokens[:G])}) > 1  # G distinct draws
    with pytest.raises(ValueError, match="group_size"):
        sample(lm, prompt_ids, prompt_mask, config, key, group_size=0)


def test_group_loss_on_policy_and_shared_prompts_give_the_plain_gradient():
    """GroupLoss with log π_old taken from its own pass (on_policy) and each prompt run once
    (group_size G) against log π_old from a separate pass and every row run whole."""
    lm = CausalLM(tu.tiny_config(), rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(lm)
    prompt_ids, prompt_mask, responses, response_mask = grouped_batch(seed=7)
    per_row = [np.repeat(a, G, axis=0) for a in (prompt_ids, prompt_mask)]
    logprobs = rl.token_logprobs(
        full_pass_logits(lm, *per_row, responses, response_mask), responses
    )
    logprobs = jnp.where(response_mask > 0, logprobs, 0.0)
    advantages = (
        jax.random.normal(jax.random.PRNGKey(0), (len(responses),))[:, None] * response_mask
    )
    batch = GroupBatch(
        prompt_ids=per_row[0], prompt_mask=per_row[1], response_ids=responses,
        response_mask=response_mask, response_attention=response_mask, logprobs=logprobs,
        rollout_logprobs=logprobs - 0.01,
        ref_logprobs=jnp.zeros_like(logprobs), advantages=advantages,
    )  # fmt: skip
    common = {"graphdef": graphdef, "clip_eps": 0.2, "clip_eps_high": None,
              "importance_level": "token", "aggregation": "token_mean", "kl_coef": 0.0,
              "with_reference": False, "temperature": 1.0, "tis_cap": 2.0}  # fmt: skip
    plain = GroupLoss(**common)
    fast = GroupLoss(**common, group_size=G, on_policy=True)

    def objective(loss):
        def f(params):
            total, count = loss(params, batch)["loss/policy"]
            return total / count

        return f

    np.testing.assert_allclose(objective(fast)(params), objective(plain)(params), atol=1e-6)
    for got, want in zip(
        jax.tree.leaves(jax.grad(objective(fast))(params)),
        jax.tree.leaves(jax.grad(objective(plain))(params)),
    ):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    gap_sum, tokens = fast(params, batch)["tis/mean_abs_logprob_diff"]
    np.testing.assert_allclose(gap_sum / tokens, 0.01, atol=1e-5)


def grpo_run(reward_fn, **overrides):
    ids, mask = tu.tiny_prompts(num=8, length=4, seed=3)
    sft = CausalLM(tu.tiny_config(), rngs=nnx.Rngs(0))
    fields = {"num_iterations": 2, "batch_size": 4, "group_size": 4, "max_new_tokens": 5,
              "learning_rate": 1e-2, "lr_schedule": "constant", "seed": 1}  # fmt: skip
    config = GRPOConfig(**{**fields, **overrides})
    trainer = GRPOTrainer.from_sft(config, sft, ids, mask, reward_fn=reward_fn, eos_token_id=tu.EOS)
    history = trainer.train(progress=False)
    return trainer, history


@pytest.mark.parametrize("overrides", [{}, {"num_minibatches": 2, "epochs": 2, "kl_coef": 0.05}])
def test_one_program_iteration_equals_the_step_by_step_iteration(overrides):
    """A reward model runs the whole iteration as one jitted program; the same reward behind a plain
    Python function runs it piece by piece (and each prompt once per row): same updates."""
    rm_fn = reward_model_fn(RewardModel(tu.tiny_config(), rngs=nnx.Rngs(9)))
    fused, fused_history = grpo_run(rm_fn, **overrides)
    plain, plain_history = grpo_run(lambda p, m, r: rm_fn(p, m, r), **overrides)
    assert fused.one_program and not plain.one_program
    for a, b in zip(fused_history, plain_history):
        for name in ("reward", "loss", "grad_norm", "tis/mean_abs_logprob_diff"):
            np.testing.assert_allclose(a[name], b[name], atol=1e-4, rtol=1e-4, err_msg=name)
    # (Adam divides by √v: rounding-level gradient differences move a parameter by up to ~1% of
    # an lr = 1e-2 step)
    fused_params, plain_params = fused.state.train.params, plain.state.train.params
    for a, b in zip(jax.tree.leaves(fused_params), jax.tree.leaves(plain_params)):
        np.testing.assert_allclose(a, b, atol=2e-4)
    assert fused_history[-1]["reward"] != fused_history[0]["reward"]  # it did update


def test_one_program_iteration_on_a_mesh_equals_one_device():
    """The whole iteration as one program over a (data, fsdp, tensor) mesh of the 8 CPU devices:
    sampling, the reward model and the train step partitioned by GSPMD, same updates."""
    rm_fn = reward_model_fn(RewardModel(tu.tiny_config(), rngs=nnx.Rngs(9)))
    one, one_history = grpo_run(rm_fn, batch_size=8)
    mesh, mesh_history = grpo_run(
        rm_fn, batch_size=8, parallelism="mesh", mesh="data=2,fsdp=2,tensor=2"
    )
    assert mesh.one_program
    for a, b in zip(mesh_history, one_history):
        for name in ("reward", "loss", "grad_norm"):
            np.testing.assert_allclose(a[name], b[name], atol=1e-4, rtol=1e-4, err_msg=name)
    kernel = mesh.state.train.params["model"]["h"]["mlp"]["c_fc"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8  # the parameters stayed sharded
    for a, b in zip(
        jax.tree.leaves(mesh.state.train.params), jax.tree.leaves(one.state.train.params)
    ):
        np.testing.assert_allclose(a, b, atol=2e-4)


def test_one_program_run_resumes_from_its_checkpoint_like_an_uninterrupted_run(tmp_path):
    rm_fn = reward_model_fn(RewardModel(tu.tiny_config(), rngs=nnx.Rngs(9)))
    straight, straight_history = grpo_run(rm_fn, num_iterations=3)
    first, _ = grpo_run(rm_fn, num_iterations=2, checkpoint_dir=str(tmp_path))
    ids, mask = tu.tiny_prompts(num=8, length=4, seed=3)
    config = dataclasses.replace(first.config, num_iterations=3)
    resumed = GRPOTrainer.from_sft(config, CausalLM(tu.tiny_config(), rngs=nnx.Rngs(0)), ids, mask,
                                   reward_fn=rm_fn, eos_token_id=tu.EOS)  # fmt: skip
    assert resumed.restore(str(tmp_path)) == 2
    history = resumed.train(progress=False)
    assert len(history) == 1
    np.testing.assert_allclose(history[0]["reward"], straight_history[2]["reward"], atol=1e-6)
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight.state)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_device_slices_without_whole_groups_run_each_prompt_per_row(parallelism):
    """shard_map / pmap split a minibatch's 8 rows (2 groups of 4) over 8 devices, one row each: the
    loss then runs the prompt per row, and the updates equal one device's."""
    rm_fn = reward_model_fn(RewardModel(tu.tiny_config(), rngs=nnx.Rngs(9)))
    one, one_history = grpo_run(rm_fn, batch_size=2)
    split, split_history = grpo_run(rm_fn, batch_size=2, parallelism=parallelism)
    assert split.loss.group_size == 1 and one.loss.group_size == 4
    for a, b in zip(split_history, one_history):
        np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(split.state.train.params), jax.tree.leaves(one.state.train.params)
    ):
        np.testing.assert_allclose(a, b, atol=2e-4)

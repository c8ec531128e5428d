"""PPO: the config's validation, make_experience by hand and by composition, and a learning run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils as tu

from jaxrlhf import rl
from jaxrlhf.rollout import response_slice
from jaxrlhf.train import PPOConfig, PPOLoss, PPOTrainer
from jaxrlhf.train.experience import make_experience, missing_eos_penalty
from jaxrlhf.train.ppo import PolicyWithCritic, init_policy, prompt_batch_indices

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 0),
        ("num_minibatches", 3),  # does not divide batch_size = 64
        ("clip_eps", 1.5),
        ("temperature", 0.0),
        ("kl_estimator", "k7"),
        ("loss_aggregation", "sum"),
        ("parallelism", "tpu"),
        ("lam", 1.2),
        ("top_p", 0.0),
        ("lr_schedule", "step"),
        ("critic_init", "random"),
        ("missing_eos_penalty", -1.0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"PPOConfig\.{field} = "):
        PPOConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("top_k", 1), ("top_p", 0.9)])
def test_config_refuses_filtered_sampling_and_says_why(field, value):
    with pytest.raises(ValueError, match=rf"PPOConfig\.{field} = .*off-policy"):
        PPOConfig(**{field: value})


def test_config_critic_from_the_reward_model_needs_a_separate_critic():
    with pytest.raises(ValueError, match=r"PPOConfig\.critic_init = 'reward_model': .*separate"):
        PPOConfig(critic_init="reward_model")
    assert PPOConfig(critic_init="reward_model", separate_critic=True).critic_init == "reward_model"


def test_config_defaults_penalise_a_missing_eos():
    assert PPOConfig().missing_eos_penalty == 1.0


def test_config_devices_must_divide_the_minibatch():
    with pytest.raises(ValueError, match=r"PPOConfig\.num_devices = 3"):
        PPOConfig(batch_size=8, num_minibatches=2, parallelism="pmap", num_devices=3)


def test_config_is_frozen_with_help_texts():
    config = PPOConfig()
    with pytest.raises(AttributeError):
        config.clip_eps = 0.1  # type: ignore[misc]
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(PPOConfig))


# ----------------------------------------------------------------------------- make_experience

PROMPT_IDS = jnp.array([[0, 1], [1, 1]], jnp.int32)  # [B=2, P=2]
PROMPT_MASK = jnp.array([[0, 1], [1, 1]], jnp.int32)
RESPONSE_IDS = jnp.array([[1, 0, 1], [0, 1, 0]], jnp.int32)  # [B, N=3]
RESPONSE_MASK = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32)  # row 2 ended after 2 tokens
SCORES = jnp.array([1.0, -0.5])


def test_make_experience_hand_derived():
    # V = 2. The policy is uniform: log π = −log 2 for every token. The reference has logits
    # [log 3, 0]: π_ref(0) = 3/4, π_ref(1) = 1/4. So the k1 KL of token 0 is log(1/2) − log(3/4) =
    # log(2/3), of token 1 log(1/2) − log(1/4) = log 2. The critic says V = 0.5 everywhere.
    def policy_apply(ids, mask):
        B, T = ids.shape
        return jnp.zeros((B, T, 2)), jnp.full((B, T), 0.5)

    def reference_apply(ids, mask):
        B, T = ids.shape
        return jnp.broadcast_to(jnp.array([math.log(3.0), 0.0]), (B, T, 2))

    beta = 0.1
    exp = jax.jit(
        lambda *arrays: make_experience(
            policy_apply, reference_apply, *arrays, kl_coef=beta, gamma=1.0, lam=1.0
        )
    )(PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK, SCORES)
    l2, l23 = math.log(2.0), math.log(2.0 / 3.0)
    np.testing.assert_allclose(exp.logprobs, [[-l2] * 3, [-l2, -l2, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(
        exp.ref_logprobs,
        [[math.log(0.25), math.log(0.75), math.log(0.25)], [math.log(0.75), math.log(0.25), 0]],
        rtol=1e-6,
    )
    # rₜ = −β KLₜ, plus the score at the last valid token.
    rewards = np.array(
        [[-beta * l2, -beta * l23, -beta * l2 + 1.0], [-beta * l23, -beta * l2 - 0.5, 0.0]]
    )
    np.testing.assert_allclose(exp.rewards, rewards, rtol=1e-6, atol=1e-7)
    # γ = λ = 1: the GAE sum telescopes, Âₜ = Σ_{l≥t} r_l − V(sₜ) and Rₜ = Σ_{l≥t} r_l.
    rtg = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1] * np.asarray(RESPONSE_MASK)
    np.testing.assert_allclose(exp.returns, rtg, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(exp.values, 0.5 * np.asarray(RESPONSE_MASK))
    raw = (rtg - 0.5)[np.asarray(RESPONSE_MASK) > 0]  # the 5 valid advantages
    whitened = (raw - raw.mean()) / math.sqrt(raw.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(exp.advantages[np.asarray(RESPONSE_MASK) > 0], whitened, rtol=1e-5)
    assert float(exp.advantages[1, 2]) == 0.0


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_make_experience_is_the_composition_of_the_rl_functions():
    # Position-dependent random logits/values: catches an off-by-one in which positions score the
    # response (token j is predicted by position P − 1 + j).
    rng = np.random.default_rng(0)
    B, P, N, V = 2, 2, 3, 5
    logits = rng.normal(size=(B, P + N, V)).astype(np.float32)
    ref_logits = rng.normal(size=(B, P + N, V)).astype(np.float32)
    values = rng.normal(size=(B, P + N)).astype(np.float32)
    response_ids = jnp.array([[4, 0, 3], [2, 1, 0]], jnp.int32)
    tau, beta, gamma, lam = 0.7, 0.2, 0.9, 0.8

    def run(prompt_ids, prompt_mask, response_ids, response_mask, scores):
        return make_experience(
            lambda ids, m: (jnp.asarray(logits), jnp.asarray(values)),
            lambda ids, m: jnp.asarray(ref_logits),
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            scores,
            kl_coef=beta,
            kl_estimator="k3",
            gamma=gamma,
            lam=lam,
            temperature=tau,
        )

    exp = jax.jit(run)(PROMPT_IDS, PROMPT_MASK, response_ids, RESPONSE_MASK, SCORES)

    mask = np.asarray(RESPONSE_MASK)
    rows = np.arange(B)[:, None]
    cols = P - 1 + np.arange(N)[None, :]
    ids = np.asarray(response_ids)
    logprobs = _log_softmax(logits / tau)[rows, cols, ids] * mask  # [B, N] (NumPy oracle)
    ref_logprobs = _log_softmax(ref_logits / tau)[rows, cols, ids] * mask
    old_values = values[:, P - 1 : P - 1 + N] * mask
    rewards = rl.kl_penalized_rewards(
        SCORES,
        jnp.asarray(logprobs),
        jnp.asarray(ref_logprobs),
        RESPONSE_MASK,
        kl_coef=beta,
        kind="k3",
    )
    advantages, returns = rl.gae(
        rewards, jnp.asarray(old_values), RESPONSE_MASK, gamma=gamma, lam=lam
    )
    np.testing.assert_allclose(exp.logprobs, logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp.ref_logprobs, ref_logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp.values, old_values, rtol=1e-6)
    np.testing.assert_allclose(exp.rewards, rewards, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp.returns, returns, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        exp.advantages, rl.masked_whiten(advantages, RESPONSE_MASK), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("separate_critic", [False, True])
def test_score_rollout_from_hidden_states_equals_make_experience_on_full_logits(separate_critic):
    """The PPO loop's jitted scoring reads the LM head at the response positions only, a chunk of
    3 tokens at a time (a vocabulary and a length that 3 does not divide): the Experience of
    make_experience on the models' full [B, T, V] logits, to float32 rounding."""
    from jaxrlhf.rollout import sample
    from jaxrlhf.train.experience import score_rollout

    config = tu.tiny_ppo_config(temperature=0.7, separate_critic=separate_critic)
    trainer = tu.tiny_trainer(config)
    ids, mask = trainer.prompt_batch(0)
    params = trainer.state.train.params
    policy = tu.nnx.merge(trainer.graphdef, params)
    reference = tu.nnx.merge(trainer.reference_graphdef, trainer.reference_state)
    rollout = sample(policy.lm, ids, mask, config.sampling, jax.random.key(1), eos_token_id=tu.EOS)
    assert 0 < float(rollout.mask.mean()) < 1  # some responses end early: masks matter
    scores = tu.target_fraction_reward(ids, mask, rollout)
    settings = {"kl_estimator": "k3", "gamma": 0.9, "lam": 0.8, "temperature": 0.7,
                "whiten_rewards": False}  # fmt: skip
    got, _ = score_rollout(
        params, trainer.reference_state, ids, mask, rollout, scores, 0.1,
        policy_graphdef=trainer.graphdef, reference_graphdef=trainer.reference_graphdef,
        use_sampler_logprobs=False, eos_token_id=tu.EOS, logits_chunk_size=3, **settings,
    )  # fmt: skip
    want = make_experience(
        policy, reference, ids, mask, rollout.tokens, rollout.mask, scores, kl_coef=0.1, **settings
    )
    for field in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        np.testing.assert_allclose(
            getattr(got, field), getattr(want, field), atol=1e-5, rtol=1e-5, err_msg=field
        )


def test_make_experience_can_reuse_the_samplers_logprobs():
    # recompute_logprobs=False: log π_old is the rollout's, the actor's logits are not used.
    sampler = jnp.array([[-0.5, -1.0, -2.0], [-0.25, -0.75, 123.0]])  # garbage where masked

    def policy_apply(ids, mask):
        B, T = ids.shape
        return jnp.full((B, T, 2), jnp.nan), jnp.zeros((B, T))  # NaN logits must not leak

    exp = jax.jit(
        lambda *arrays: make_experience(
            policy_apply,
            lambda ids, m: jnp.zeros((*ids.shape, 2)),  # π_ref uniform: log π_ref = −log 2
            *arrays[:-1],
            kl_coef=1.0,
            gamma=1.0,
            lam=1.0,
            rollout_logprobs=arrays[-1],
        )
    )(PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK, SCORES, sampler)
    np.testing.assert_allclose(exp.logprobs, [[-0.5, -1.0, -2.0], [-0.25, -0.75, 0.0]])
    l2 = math.log(2.0)  # rₜ = −(log π − log π_ref) + score at the end
    want = [
        [-(-0.5 + l2), -(-1.0 + l2), -(-2.0 + l2) + 1.0],
        [-(-0.25 + l2), -(-0.75 + l2) - 0.5, 0],
    ]
    np.testing.assert_allclose(exp.rewards, want, rtol=1e-6)


def test_missing_eos_penalty_hand_values():
    eos = 1
    ids = jnp.array([[3, 1, 0], [3, 3, 3], [1, 0, 0], [3, 3, 0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], jnp.float32)
    # Rows 0 and 2 end with EOS; rows 1 and 3 do not (row 3 has no EOS among its valid tokens).
    penalise = jax.jit(lambda *a: missing_eos_penalty(*a, eos_token_id=eos, penalty=1.0))
    out = penalise(jnp.array([0.5, 0.5, -1.0, 2.0]), ids, mask)
    np.testing.assert_allclose(out, [0.5, -0.5, -1.0, 1.0])


class FixedOutputs(PPOLoss):
    """PPOLoss whose policy outputs fixed (logits, values), to compare with rl.ppo_loss by hand."""

    def response_outputs(self, params, batch):
        logits, values = params  # [b, T, V], [b, T]
        P, N = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
        logits, values = response_slice(logits, P, N), response_slice(values, P, N)
        logprobs = rl.token_logprobs(logits / self.temperature, batch.response_ids)
        return logprobs, rl.token_entropy(logits / self.temperature), values


def combine(means, weights):
    """L = Σ_k w_k S_k / C_k of a loss table on one device (what train_step differentiates)."""
    return sum(w * means[k][0] / jnp.maximum(means[k][1], 1.0) for k, w in weights)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_the_minibatch_loss_table_is_rl_ppo_loss(aggregation):
    rng = np.random.default_rng(1)
    B, P, N, V = 2, 2, 3, 5
    logits = jnp.asarray(rng.normal(size=(B, P + N, V)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(B, P + N)), jnp.float32)
    exp = jax.jit(
        lambda *arrays: make_experience(
            lambda ids, m: (1.5 * logits, values - 0.2),  # the "old" policy differs from the new
            lambda ids, m: logits,
            *arrays,
            kl_coef=0.1,
        )
    )(PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK, SCORES)
    loss = FixedOutputs(graphdef=None, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1,
                        ent_coef=0.01, temperature=1.0, aggregation=aggregation)  # fmt: skip
    means = jax.jit(lambda exp: loss((logits, values), exp))(exp)
    sl = slice(P - 1, P - 1 + N)
    expected, parts = jax.jit(
        lambda: rl.ppo_loss(
            rl.token_logprobs(logits[:, sl], RESPONSE_IDS),
            exp.logprobs,
            exp.advantages,
            values[:, sl],
            exp.values,
            exp.returns,
            RESPONSE_MASK,
            rl.token_entropy(logits[:, sl]),
            clip_eps=0.2,
            value_clip_eps=0.2,
            vf_coef=0.1,
            ent_coef=0.01,
            aggregation=aggregation,
        )
    )()

    def mean(name):
        return float(means[name][0] / means[name][1])

    np.testing.assert_allclose(combine(means, loss.weights), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mean("loss/policy_avg"), parts["policy"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mean("loss/value_avg"), parts["value"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mean("policy/entropy_avg"), parts["entropy"], rtol=1e-6)
    assert float(parts["value"]) > 0.01 and abs(float(parts["policy"])) > 1e-3  # non-trivial
    assert mean("val/ratio") != 1.0
    # trl's clipfrac: tokens where the min takes the clipped term (NumPy oracle).
    lp = np.asarray(rl.token_logprobs(logits[:, sl], RESPONSE_IDS))
    ratio = np.exp(lp - np.asarray(exp.logprobs))
    adv, m = np.asarray(exp.advantages), np.asarray(RESPONSE_MASK)
    taken = (-adv * np.clip(ratio, 0.8, 1.2)) > (-adv * ratio)
    np.testing.assert_allclose(mean("policy/clipfrac_avg"), (taken * m).sum() / m.sum(), rtol=1e-6)
    outside = np.abs(ratio - 1) > 0.2
    np.testing.assert_allclose(
        mean("policy/ratio_outside_clip_avg"), (outside * m).sum() / m.sum(), rtol=1e-6
    )


@pytest.mark.parametrize("separate_critic", [False, True])
def test_the_hidden_state_loss_is_the_full_logits_loss(separate_critic):
    """PPOLoss on a model (LM head at response positions, 2 tokens a chunk) = the loss table on
    the model's full [b, T, V] logits: values and parameter gradients."""
    policy, _ = tu.tiny_models(separate_critic=separate_critic)
    graphdef, params = tu.nnx.split(policy, tu.nnx.Param)
    exp = make_experience(
        lambda ids, m: (policy(ids, m)[0] * 1.2, policy(ids, m)[1] + 0.1),
        lambda ids, m: policy(ids, m)[0],
        PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK, SCORES,
        kl_coef=0.1,
    )  # fmt: skip
    settings = {"clip_eps": 0.2, "value_clip_eps": 0.2, "vf_coef": 0.1, "ent_coef": 0.01}
    settings["temperature"] = 0.7
    chunked = PPOLoss(graphdef=graphdef, logits_chunk_size=2, **settings)
    full = FixedOutputs(graphdef=None, **settings)

    def full_loss(params, exp):
        ids = jnp.concatenate([PROMPT_IDS, RESPONSE_IDS], 1)
        mask = jnp.concatenate([PROMPT_MASK, RESPONSE_MASK], 1)
        return full(tu.nnx.merge(graphdef, params)(ids, mask), exp)

    got, want = jax.jit(chunked)(params, exp), jax.jit(full_loss)(params, exp)
    for name in want:
        np.testing.assert_allclose(got[name][0], want[name][0], rtol=1e-5, atol=1e-6, err_msg=name)
    grads = [
        jax.grad(lambda p, f=f: combine(f(p, exp), chunked.weights))(params)
        for f in (chunked, full_loss)
    ]
    for g, w in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0])) > 1e-4  # non-trivial


def test_prompt_batches_cover_each_shuffle_and_are_reproducible():
    first = [prompt_batch_indices(10, 3, i, seed=4) for i in range(3)]  # 3 batches per shuffle
    assert len(set(np.concatenate(first))) == 9  # no repeats within a shuffle
    again = [prompt_batch_indices(10, 3, i, seed=4) for i in range(3)]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(prompt_batch_indices(10, 3, 3, seed=4), first[0])  # new shuffle
    with pytest.raises(ValueError, match="batch_size = 11"):
        prompt_batch_indices(10, 11, 0, seed=0)


# ----------------------------------------------------------------------------- models & learning


def test_init_policy_copies_the_sft_model():
    sft = tu.CausalLM(tu.tiny_config(), rngs=tu.nnx.Rngs(0))
    sft_params = tu.nnx.state(sft, tu.nnx.Param)
    shared = init_policy(sft, rngs=tu.nnx.Rngs(1))
    separate = init_policy(sft, separate_critic=True, rngs=tu.nnx.Rngs(1))
    assert isinstance(separate, PolicyWithCritic)
    for policy in (shared, separate):
        # A copy with its own Variables, not an alias of the frozen reference's.
        assert policy.lm.model.wte.embedding is not sft.model.wte.embedding
        chex_equal = jax.tree.map(np.array_equal, tu.nnx.state(policy.lm, tu.nnx.Param), sft_params)
        assert all(jax.tree.leaves(chex_equal))
    trunk = jax.tree.map(
        np.array_equal,
        tu.nnx.state(separate.critic.model, tu.nnx.Param),
        tu.nnx.state(sft.model, tu.nnx.Param),
    )
    assert all(jax.tree.leaves(trunk))
    assert separate.critic.model.wte.embedding is not separate.lm.model.wte.embedding
    assert set(tu.nnx.state(separate, tu.nnx.Param).keys()) == {"lm", "critic"}
    # A fresh value head starts at zero: V = 0 everywhere before the first update.
    for head in (shared.value_head, separate.critic.value_head):
        assert not np.any(np.asarray(head.kernel[...])) and not np.any(np.asarray(head.bias[...]))
    # The separate critic answers like an ActorCritic: (logits of the actor, values of the critic).
    ids, mask = (jnp.asarray(a) for a in tu.tiny_prompts(num=2))
    graphdef, state = tu.nnx.split(separate)

    @jax.jit
    def forward(state):
        policy = tu.nnx.merge(graphdef, state)
        return policy(ids, mask), policy.lm(ids, mask), policy.critic(ids, mask)

    (logits, values), lm_logits, critic_values = forward(state)
    np.testing.assert_array_equal(logits, lm_logits)
    np.testing.assert_array_equal(values, critic_values)
    assert logits.shape == (*ids.shape, tu.VOCAB) and values.shape == ids.shape


def test_ppo_raises_the_reward():
    history = tu.uninterrupted_run().history
    scores = [m["objective/scores"] for m in history]
    # Reward = fraction of TARGET tokens; a random 16-token policy starts near 1/16.
    assert np.mean(scores[:2]) < 0.15
    assert np.mean(scores[-3:]) > 0.4, scores
    for m in history:
        for name in tu.TRL_METRICS:
            assert math.isfinite(m[name]), name
    # Each update starts at the rollout policy: the first minibatch has ratio exactly 1.
    assert all(0.5 < m["val/ratio"] < 1.5 for m in history)


def test_a_critic_from_the_reward_model_starts_with_its_scores():
    from jaxrlhf.train import reward_model_from_policy

    sft = tu.CausalLM(tu.tiny_config(), rngs=tu.nnx.Rngs(0))
    rm = reward_model_from_policy(tu.CausalLM(tu.tiny_config(), rngs=tu.nnx.Rngs(5)), seed=3)
    policy = init_policy(sft, separate_critic=True, critic_init=rm, rngs=tu.nnx.Rngs(1))
    ids, mask = (jnp.asarray(a) for a in tu.tiny_prompts(num=3))
    # V(sₜ) = the reward model's head applied at every position (its score where the text ends).
    np.testing.assert_allclose(policy.critic(ids, mask), rm.token_scores(ids, mask), rtol=1e-6)
    with pytest.raises(ValueError, match="separate_critic"):
        init_policy(sft, critic_init=rm, rngs=tu.nnx.Rngs(1))


def test_from_sft_builds_the_run_the_config_describes():
    from jaxrlhf.train import reward_model_from_policy

    ids, mask = tu.tiny_prompts()
    sft = tu.CausalLM(tu.tiny_config(), rngs=tu.nnx.Rngs(0))
    rm = reward_model_from_policy(sft, seed=0)
    config = tu.tiny_ppo_config(separate_critic=True, critic_init="reward_model")
    trainer = PPOTrainer.from_sft(config, sft, ids, mask, reward_model=rm, eos_token_id=tu.EOS)
    policy = trainer.policy()
    assert isinstance(policy, PolicyWithCritic)
    np.testing.assert_array_equal(policy.critic.value_head.kernel[...], rm.score.kernel[...])
    shared = PPOTrainer.from_sft(tu.tiny_ppo_config(), sft, ids, mask, reward_model=rm)
    assert not isinstance(shared.policy(), PolicyWithCritic)
    with pytest.raises(ValueError, match="separate_critic = False but the policy is a Policy"):
        PPOTrainer(tu.tiny_ppo_config(), policy, sft, tu.target_fraction_reward, ids, mask)
    with pytest.raises(ValueError, match="exactly one of reward_model and reward_fn"):
        PPOTrainer.from_sft(config, sft, ids, mask)


def test_the_missing_eos_penalty_reaches_the_scores():
    # Every response of a 1-token budget that is not EOS is penalised by exactly 1.
    config = tu.tiny_ppo_config(max_new_tokens=1, missing_eos_penalty=1.0, num_iterations=1)
    zero = lambda prompt_ids, prompt_mask, rollout: jnp.zeros(prompt_ids.shape[0])
    trainer = tu.tiny_trainer(config, reward_fn=zero)
    metrics = trainer.step()
    eos_fraction = metrics["val/num_eos_tokens"] / config.batch_size
    np.testing.assert_allclose(metrics["objective/scores"], -(1.0 - eos_fraction), rtol=1e-6)
    with pytest.warns(UserWarning, match="no EOS token"):
        PPOTrainer.from_sft(
            config, tu.CausalLM(tu.tiny_config(), rngs=tu.nnx.Rngs(0)), *tu.tiny_prompts(),
            reward_fn=zero,
        )  # fmt: skip


@pytest.mark.parametrize("num_devices", [2, 8])
def test_ppo_iterations_under_pmap_equal_one_device(num_devices):
    """Each iteration puts the state on pmap's devices again (run_steps): the arrays computed from
    the previous iteration's pmapped outputs must be placed as pmap expects."""
    fields = {"num_iterations": 3, "batch_size": 16, "num_minibatches": 2}
    pmapped = tu.tiny_trainer(
        tu.tiny_ppo_config(parallelism="pmap", num_devices=num_devices, **fields)
    )
    single = tu.tiny_trainer(tu.tiny_ppo_config(**fields))
    for a, b in zip(pmapped.train(progress=False), single.train(progress=False)):
        np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(pmapped.state.train.params), jax.tree.leaves(single.state.train.params)
    ):
        np.testing.assert_allclose(a, b, atol=1e-4)

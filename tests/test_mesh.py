"""Training on a (data, fsdp, tensor) device mesh: the sharded step equals the one-device step for
PPO, SFT and the reward model (GPT-2 and a GQA Llama), parameters are really split, generation and
checkpoints work across meshes. tests/conftest.py forces 8 CPU devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils as tu
from flax import nnx

from jaxrlhf.models import CausalLM, ModelConfig
from jaxrlhf.models.sharding import logical_axes, make_mesh, param_shardings, parse_mesh
from jaxrlhf.train import state as st

MESHES = ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"]


def gqa_llama() -> ModelConfig:
    """A Llama with grouped-query attention: 4 query heads share 2 key/value heads."""
    return tu.tiny_config("llama", num_heads=4, num_kv_heads=2, intermediate_size=32)


def close_trees(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the rules


def test_mesh_specs_parse_and_must_cover_the_devices():
    assert parse_mesh("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh(None) == {"data": 8, "fsdp": 1, "tensor": 1}  # all devices on data
    assert make_mesh("fsdp=4,tensor=2").shape == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="multiply to 4, but there are 8 devices"):
        make_mesh("data=2,tensor=2")
    with pytest.raises(ValueError, match="expected comma-separated AXIS=SIZE"):
        parse_mesh("pipeline=2")
    with pytest.raises(ValueError, match=r"PPOConfig\.mesh = 'data=two': .*AXIS=SIZE"):
        tu.tiny_ppo_config(parallelism="mesh", mesh="data=two")
    with pytest.raises(ValueError, match=r"PPOConfig\.mesh = 'data=3': .*multiply to 3"):
        tu.tiny_trainer(tu.tiny_ppo_config(parallelism="mesh", mesh="data=3"))


def test_every_weight_has_logical_axes_megatron_style():
    # Column-parallel in, row-parallel out; FSDP on the model width; GQA's k/v on their own heads.
    # Block parameters are stacked [L, ...] (scanned layers): a leading "layers" axis, unsplit.
    assert logical_axes("lm/model/layers/self_attn/q_proj/kernel", 3) == (
        "layers",
        "embed",
        "heads",
    )
    assert logical_axes("lm/model/layers/self_attn/k_proj/kernel", 3) == (
        "layers", "embed", "kv_heads",
    )  # fmt: skip
    assert logical_axes("lm/model/layers/self_attn/o_proj/kernel", 3) == (
        "layers",
        "heads",
        "embed",
    )
    assert logical_axes("model/layers/mlp/down_proj/kernel", 3) == ("layers", "mlp", "embed")
    assert logical_axes("model/layers/input_layernorm/weight", 2) == ("layers", "embed")
    assert logical_axes("lm/model/h/attn/c_attn/kernel", 3) == ("layers", "embed", "heads")
    assert logical_axes("lm/model/h/mlp/c_proj/kernel", 3) == ("layers", "mlp", "embed")
    assert logical_axes("lm/model/norm/weight", 1) == ("embed",)
    assert logical_axes("lm/model/wte/embedding", 2) == ("vocab", "embed")
    # A list of blocks (scan_layers off): block l's parameters, named as a stacked one's, no layer axis.
    assert logical_axes("lm/model/layers/1/self_attn/k_proj/kernel", 2) == ("embed", "kv_heads")
    assert logical_axes("lm/model/h/0/mlp/c_fc/kernel", 2) == ("embed", "mlp")
    mesh = make_mesh("fsdp=4,tensor=2")
    for family_config in (tu.tiny_config(), gqa_llama(), gqa_llama().replace(scan_layers=False)):
        model = CausalLM(family_config, rngs=nnx.Rngs(0))
        shardings = param_shardings(nnx.state(model), mesh)
        specs = {
            "/".join(str(getattr(k, "key", k)) for k in path): s.spec
            for path, s in jax.tree_util.tree_leaves_with_path(shardings)
        }
        big = {k: v for k, v in specs.items() if k.endswith(("kernel", "embedding"))}
        # every matrix is split over both axes
        assert all(set(spec) == {"fsdp", "tensor"} for spec in big.values()), big


def test_parameters_and_adam_state_are_really_split():
    # A model whose matrices dominate (norms and biases stay ~2% of it): per-device bytes of the
    # parameters + Adam moments ≤ 1.1 × total / (fsdp × tensor).
    config = tu.tiny_config("llama", vocab_size=256, hidden_size=64, num_heads=8, num_kv_heads=4,
                            intermediate_size=128, num_layers=2)  # fmt: skip
    model = CausalLM(config, rngs=nnx.Rngs(0))
    params = nnx.state(model)
    optimizer = tu.tiny_ppo_config().optimizer
    stepper = st.make_train_step(None, optimizer, parallelism="mesh",
                                 mesh=make_mesh("fsdp=4,tensor=2"), params=params)  # fmt: skip
    state = stepper.put_state(st.init_train_state(params, optimizer))
    leaves = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    total = sum(x.nbytes for x in leaves)
    device = jax.devices()[0]
    on_device = sum(
        s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device
    )
    assert on_device <= 1.1 * total / 8, (on_device, total / 8)


# ----------------------------------------------------------------------------- one step, any mesh


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("mesh", MESHES)
def test_a_ppo_update_on_a_mesh_equals_one_device(family, mesh):
    # The same Experience and shuffles, 2 epochs × 2 minibatches, on one device and on the mesh.
    config = tu.learning_config()
    model_config = tu.tiny_config() if family == "gpt2" else gqa_llama()
    ids, mask = tu.tiny_prompts()
    sft = CausalLM(model_config, rngs=nnx.Rngs(0))
    trainer = tu.PPOTrainer.from_sft(
        config, sft, ids, mask, reward_fn=tu.target_fraction_reward, eos_token_id=tu.EOS
    )
    exp, perms = experience_of(trainer)
    minibatches = np.asarray(perms).reshape(-1, config.minibatch_size)
    params = trainer.state.train.params
    single = st.make_train_step(trainer.loss, config.optimizer)
    sharded = st.make_train_step(trainer.loss, config.optimizer, parallelism="mesh",
                                 mesh=make_mesh(mesh), params=params)  # fmt: skip
    copy = lambda t: jax.tree.map(jnp.copy, t)  # the steps donate their input
    want, want_metrics = st.run_steps(single, copy(trainer.state.train), exp, minibatches)
    got, metrics = st.run_steps(sharded, sharded.put_state(copy(trainer.state.train)), exp,
                                minibatches)  # fmt: skip
    close_trees(got.params, want.params)
    close_trees(got.opt_state, want.opt_state, rtol=1e-4, atol=1e-7)
    for name in want_metrics:
        np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-4, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(want.params), jax.tree.leaves(params))) > 1e-4  # fmt: skip
    # The new parameters stay where the rules put them.
    kernel = got.params["lm"]["model"]["layers" if family == "llama" else "h"]
    assert any(s.spec != jax.sharding.PartitionSpec() for s in
               [x.sharding for x in jax.tree.leaves(kernel)])  # fmt: skip


def experience_of(trainer):
    from test_train_state import _experience

    return _experience(trainer)


@pytest.mark.parametrize("mesh", MESHES)
def test_sft_and_reward_model_steps_on_a_mesh_equal_one_device(mesh):
    from data_utils import small_task, tiny_lm, tokenizer
    from test_reward import _easy_pairs

    from jaxrlhf.train import (
        RewardConfig,
        SFTConfig,
        reward_model_from_policy,
        train_reward_model,
        train_sft,
    )

    task = small_task()
    ids, mask = (a[:32] for a in task.corpus_batch())
    model = tiny_lm(task.vocab_size)
    pairs = _easy_pairs(16, seed=0)
    rm = reward_model_from_policy(tiny_lm(len(tokenizer())), seed=0)
    runs = {}
    for mode, spec in (("single", None), ("mesh", mesh)):
        sft = SFTConfig(steps=2, batch_size=16, warmup_steps=1, parallelism=mode, mesh=spec)
        rm_config = RewardConfig(epochs=1, batch_size=8, warmup_steps=1, eval_fraction=0.0,
                                 parallelism=mode, mesh=spec)  # fmt: skip
        runs[mode] = (train_sft(model, ids, mask, sft, progress=False),
                      train_reward_model(rm, pairs, rm_config, progress=False))  # fmt: skip
    for (want, want_m), (got, got_m) in zip(runs["single"], runs["mesh"]):
        np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-5)
        np.testing.assert_allclose(got_m["grad_norm"], want_m["grad_norm"], rtol=1e-4)
        close_trees(nnx.state(got), nnx.state(want), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- whole runs


def test_generate_on_a_sharded_model_equals_one_device():
    from jaxrlhf.rollout import SamplingConfig, sample

    model = CausalLM(gqa_llama(), rngs=nnx.Rngs(0))
    ids, mask = tu.tiny_prompts()
    config = SamplingConfig(max_new_tokens=8, greedy=True)
    want = sample(model, ids, mask, config, jax.random.PRNGKey(0), eos_token_id=tu.EOS)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, param_shardings(state, mesh)))
    ids, mask = st.put_batch((ids, mask), mesh)
    got = sample(sharded, ids, mask, config, jax.random.PRNGKey(0), eos_token_id=tu.EOS)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-6)


def test_a_run_saved_on_one_mesh_resumes_on_another(tmp_path):
    mesh_run = {"parallelism": "mesh", "checkpoint_dir": str(tmp_path)}
    full = tu.tiny_trainer(tu.learning_config(num_iterations=4))
    full_history = full.train(progress=False)
    first = tu.tiny_trainer(tu.learning_config(num_iterations=4, mesh="fsdp=8", **mesh_run))
    first_history = first.train(2, progress=False)  # saves its checkpoint at iteration 2
    second = tu.tiny_trainer(
        dataclasses.replace(first.config, mesh="data=2,fsdp=2,tensor=2"), policy_seed=5
    )
    assert second.restore(str(tmp_path)) == 2
    leaf = jax.tree.leaves(second.state.train.params)[-2]
    assert leaf.sharding.mesh.shape["tensor"] == 2  # read straight into the new layout
    history = first_history + second.train(progress=False)
    # Same samples, same continuous metrics. (The clip fractions count tokens on either side of
    # a threshold: float rounding of another reduction order may move one token across it.)
    continuous = [m for m in tu.TRL_METRICS if "clipfrac" not in m]
    for got, want in zip(history, full_history, strict=True):
        for name in continuous:
            np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got["val/clipfrac_avg"], want["val/clipfrac_avg"], atol=0.05)
    close_trees(second.state.train.params, full.state.train.params, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- loading, saving


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_sharded_loading_reads_each_block_into_place(name, monkeypatch, tmp_path):
    from models_utils import hf_checkpoint, jit_apply, left_padded_batch

    from jaxrlhf.models import hf

    reads = []
    read = hf.LazyTensor.read

    def counting_read(self, index=()):
        block = read(self, index)
        reads.append((self.key, block.size, int(np.prod(self.shape))))
        return block

    monkeypatch.setattr(hf.LazyTensor, "read", counting_read)
    path = hf_checkpoint(name)
    mesh = make_mesh("fsdp=4,tensor=2")
    sharded = hf.from_pretrained(path, mesh=mesh)
    whole = hf.from_pretrained(path)
    # Every matrix was read block by block, never whole (blocks of 1/8, or 1/4 where a dimension
    # does not split); the parameters sit in their shardings.
    matrices = [r for r in reads if "norm" not in r[0] and "bias" not in r[0] and r[2] > 64]
    assert matrices and all(size < total for _, size, total in matrices)
    for x in jax.tree.leaves(nnx.state(sharded)):
        assert x.sharding.mesh.shape == mesh.shape
    ids, mask = left_padded_batch()
    np.testing.assert_allclose(
        jit_apply(sharded, ids, mask), jit_apply(whole, ids, mask), rtol=1e-5, atol=1e-5
    )
    # Saving gathers the shards: the same files as from the unsharded model.
    hf.save_pretrained(sharded, tmp_path / "sharded")
    hf.save_pretrained(whole, tmp_path / "whole")
    a, b = hf.read_safetensors(tmp_path / "sharded"), hf.read_safetensors(tmp_path / "whole")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))

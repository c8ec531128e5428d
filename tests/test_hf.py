"""Hugging Face parity: our logits equal transformers' (the oracle), save/load both ways, bad checkpoints."""

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from models_utils import (
    PAD,
    TINY_CONFIGS,
    hf_checkpoint,
    hf_model,
    jit_apply,
    left_padded_batch,
    torch_logits,
)
from safetensors.numpy import load_file, save_file

from jaxrlhf.models import ActorCritic, CausalLM, ModelConfig, RewardModel, ValueModel
from jaxrlhf.models import hf as hf_io
from jaxrlhf.models.hf import CheckpointError, from_pretrained, save_pretrained

IDS, MASK = left_padded_batch()  # [4, 7], rows with 7, 4, 1, 5 real tokens
VALID = MASK.astype(bool)


def torch_scores(model, ids, mask) -> np.ndarray:
    ids_t = torch.tensor(ids, dtype=torch.long)
    mask_t = torch.tensor(mask, dtype=torch.long)
    with torch.no_grad():
        out = model(
            input_ids=ids_t,
            attention_mask=mask_t,
            position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0),
        )
    return out.logits[:, 0].float().numpy()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_match_transformers_on_left_padded_batch(name):
    ours = from_pretrained(hf_checkpoint(name))
    logits = np.asarray(jit_apply(ours, IDS, MASK))  # [B, T, V]
    expected = torch_logits(hf_model(name), IDS, MASK)
    np.testing.assert_allclose(logits[VALID], expected[VALID], atol=1e-4)
    # A padded row equals transformers on the same row without padding (its default positions).
    with torch.no_grad():
        row = hf_model(name)(input_ids=torch.tensor(IDS[1:2, 3:], dtype=torch.long)).logits
    np.testing.assert_allclose(logits[1, 3:], row[0].numpy(), atol=1e-4)
    if ours.config.rope_scaling is not None:  # the scaling matters: without it the logits differ
        plain = from_pretrained(hf_checkpoint(name), rope_scaling=None)
        assert np.abs(np.asarray(jit_apply(plain, IDS, MASK))[VALID] - expected[VALID]).max() > 1e-3


TINY = {
    "vocab_size": 97,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "max_position_embeddings": 64,
}
EXPORT_CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", **TINY),
    "llama": ModelConfig(family="llama", num_kv_heads=2, tie_word_embeddings=False, **TINY),
    "qwen2": ModelConfig(
        family="llama", num_kv_heads=1, attention_bias=True, hf_model_type="qwen2", **TINY
    ),
    "llama_rope_llama3": ModelConfig(
        family="llama",
        rope_theta=500.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 2.0,
            "original_max_position_embeddings": 16,
        },
        **TINY,
    ),
}


def _randomise_biases(model, seed=0):
    """Our inits give zero biases; make them random so a mis-exported bias shows."""
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(
        model, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state)
    )


@pytest.mark.parametrize("name", list(EXPORT_CONFIGS))
def test_save_then_transformers_loads_the_same_logits(name, tmp_path):
    model = CausalLM(EXPORT_CONFIGS[name], rngs=nnx.Rngs(0))
    _randomise_biases(model)
    save_pretrained(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    expected = torch_logits(hf, IDS, MASK)
    np.testing.assert_allclose(
        np.asarray(jit_apply(model, IDS, MASK))[VALID], expected[VALID], atol=1e-4
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reward_model_export_and_import(family, tmp_path):
    name = family
    # transformers' reward model → ours: the same scores.
    ours = from_pretrained(hf_checkpoint(name, "seqcls"), head="reward")
    scores = np.asarray(jit_apply(ours, IDS, MASK))  # [B]
    np.testing.assert_allclose(scores, torch_scores(hf_model(name, "seqcls"), IDS, MASK), atol=1e-4)
    # ours → transformers' AutoModelForSequenceClassification: the same scores.
    model = RewardModel(EXPORT_CONFIGS[name], rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="pad token id"):
        save_pretrained(model, tmp_path / "no-pad")
    save_pretrained(model, tmp_path / "rm", pad_token_id=PAD)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["num_labels"] == 1 and config["pad_token_id"] == PAD
    assert config["architectures"][0].endswith("ForSequenceClassification")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    np.testing.assert_allclose(torch_scores(hf, IDS, MASK), jit_apply(model, IDS, MASK), atol=1e-4)
    back = from_pretrained(tmp_path / "rm", head="reward")
    np.testing.assert_allclose(jit_apply(back, IDS, MASK), jit_apply(model, IDS, MASK), atol=1e-6)


def test_actor_critic_round_trip_keeps_the_value_head(tmp_path):
    model = ActorCritic(EXPORT_CONFIGS["llama"], rngs=nnx.Rngs(2))
    _randomise_biases(model)
    save_pretrained(model, tmp_path / "ac")
    back = from_pretrained(tmp_path / "ac", head="actor_critic")
    for a, b in zip(jit_apply(back, IDS, MASK), jit_apply(model, IDS, MASK)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The value head of a plain LM checkpoint is fresh: N(0, 1/(D+1)), zero bias.
    fresh = from_pretrained(hf_checkpoint("gpt2"), head="actor_critic")
    np.testing.assert_array_equal(fresh.value_head.bias[...], [0.0])


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_value_model_and_score_bias_round_trip(tmp_path, capsys):
    config = EXPORT_CONFIGS["gpt2"]
    critic = ValueModel(config, rngs=nnx.Rngs(3))
    save_pretrained(critic, tmp_path / "critic", pad_token_id=PAD)
    _assert_same_params(from_pretrained(tmp_path / "critic", head="value"), critic)
    # A reward head with a bias (e.g. after reward normalisation): kept for us, and one plain line
    # on stderr (no Python warning) says where it went.
    reward = RewardModel(config, rngs=nnx.Rngs(4))
    reward.score.bias.set_value(jnp.array([0.5]))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_pretrained(reward, tmp_path / "rm", pad_token_id=PAD)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bias 0.5 saved as score.bias" in err
    assert "jaxrlhf_score_bias" in err and "warn" not in err.lower()
    assert "score.bias" in load_file(str(tmp_path / "rm" / "model.safetensors"))
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["jaxrlhf_score_bias"] == 0.5
    _assert_same_params(from_pretrained(tmp_path / "rm", head="reward"), reward)
    # A non-finite bias is a broken model, not information: that stays a warning.
    reward.score.bias.set_value(jnp.array([jnp.nan]))
    with pytest.warns(UserWarning, match="bias nan: every score"):
        save_pretrained(reward, tmp_path / "rm_nan", pad_token_id=PAD)


def test_sharded_checkpoint_and_bfloat16(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = from_pretrained(tmp_path / "sharded")
    expected = torch_logits(hf, IDS, MASK)
    np.testing.assert_allclose(
        np.asarray(jit_apply(ours, IDS, MASK))[VALID], expected[VALID], atol=1e-4
    )
    half = from_pretrained(tmp_path / "sharded", dtype="bfloat16")
    assert half.model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    logits = np.asarray(jit_apply(half, IDS, MASK))
    assert logits.dtype == np.float32
    # Logits of size ~5 through two bfloat16 layers: a few hundredths of error.
    np.testing.assert_allclose(logits[VALID], expected[VALID], atol=0.25)


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_give_errors_naming_the_problem(tmp_path):
    src = hf_checkpoint("gpt2")
    unknown = _copy_checkpoint(src, tmp_path / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        from_pretrained(unknown)

    tensors = load_file(os.path.join(src, "model.safetensors"))
    missing = _copy_checkpoint(src, tmp_path / "missing")
    save_file(
        {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"},
        missing / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias.*missing"):
        from_pretrained(missing)

    shape = _copy_checkpoint(src, tmp_path / "shape")
    bad = dict(tensors, **{"transformer.wpe.weight": np.zeros((10, 32), np.float32)})
    save_file(bad, shape / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"transformer\.wpe\.weight.*\(10, 32\).*\(64, 32\)"):
        from_pretrained(shape)

    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text(
        (unknown / "config.json").read_text().replace("bert", "gpt2")
    )
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, pickle / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors.*Convert"):
        from_pretrained(pickle)

    with pytest.raises(ValueError, match="head must be one of"):
        from_pretrained(src, head="policy")


def test_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    model = CausalLM(EXPORT_CONFIGS["gpt2"], rngs=nnx.Rngs(0))
    save_pretrained(model, path)
    (path / "tokenizer.json").write_text("{}")
    good = (path / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    other = CausalLM(EXPORT_CONFIGS["gpt2"], rngs=nnx.Rngs(1))
    monkeypatch.setattr(hf_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(other, path)
    assert (path / "model.safetensors").read_bytes() == good  # the good checkpoint is untouched
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
    monkeypatch.undo()

    save_pretrained(other, path)
    assert (path / "tokenizer.json").read_text() == "{}"  # files we do not write are kept
    assert (path / "model.safetensors").read_bytes() != good
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_list_of_blocks_loads_and_exports_the_same_tensors(name, tmp_path):
    """scan_layers off: an HF checkpoint loads block by block into the list layout (transformers'
    logits), and exports the very tensors the stacked layout exports."""
    listed = from_pretrained(hf_checkpoint(name), scan_layers=False)
    assert isinstance(listed.model.__dict__[listed.model.BLOCKS], nnx.List)
    expected = torch_logits(hf_model(name), IDS, MASK)
    np.testing.assert_allclose(
        np.asarray(jit_apply(listed, IDS, MASK))[VALID], expected[VALID], atol=1e-4
    )
    got, _ = hf_io.hf_tensors(listed)
    want, _ = hf_io.hf_tensors(from_pretrained(hf_checkpoint(name)))
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    save_pretrained(listed, tmp_path / "out")
    again = from_pretrained(tmp_path / "out", scan_layers=False)
    np.testing.assert_array_equal(jit_apply(again, IDS, MASK), jit_apply(listed, IDS, MASK))

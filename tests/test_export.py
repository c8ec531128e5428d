"""Exports that behave in transformers with no extra arguments (transformers + torch are the oracle).

* ``generate()`` stops at EOS: config.json and generation_config.json carry the tokenizer's special
  token ids. The model is made to emit EOS on its greedy path by relabelling tokens: swapping two
  rows of the token embedding (and of an untied LM head) swaps the two ids everywhere, so the greedy
  path of the swapped model is the original path with those two ids exchanged — exactly.
* A reward model's score in transformers equals ours on prompt ⧺ response ⧺ EOS (the token ids our
  preference data and rollouts score), plus config.json's ``jaxrlhf_score_bias``.
"""

import functools
import json
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from models_utils import hf_scores, padded_batch

from jaxrlhf.models import CausalLM, ModelConfig, RewardModel, from_pretrained, save_pretrained
from jaxrlhf.models.hf import special_token_ids
from jaxrlhf.models.tokenizer import train_bpe_tokenizer
from jaxrlhf.rollout import score_sequences

SENTENCES = [
    "the food was great .",
    "the staff was very nice .",
    "the room was lovely .",
    "the food was bad .",
    "the staff was rude .",
    "the room was dirty .",
]
PAD, BOS, EOS = 0, 1, 2  # train_bpe_tokenizer's special ids
NEW_TOKENS = 20
FAMILIES = {
    "gpt2": {"family": "gpt2"},
    "llama": {"family": "llama", "num_kv_heads": 1, "tie_word_embeddings": False},
}


@functools.cache
def tokenizer():
    return train_bpe_tokenizer(SENTENCES, 300)


def tiny_config(family: str) -> ModelConfig:
    fields = {"vocab_size": len(tokenizer()), "hidden_size": 32, "num_layers": 1, "num_heads": 2}
    return ModelConfig(**FAMILIES[family], **fields, max_position_embeddings=48)


def randomised(model, seed: int):
    """Every parameter + N(0, 0.3²): a greedy path that wanders instead of repeating one token."""
    rng = np.random.default_rng(seed)  # numpy: no compile per parameter shape
    state = nnx.state(model, nnx.Param)
    noise = lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    nnx.update(model, jax.tree.map(noise, state))
    return model


def swap_tokens(model: CausalLM, a: int, b: int) -> CausalLM:
    """The model with token ids a and b exchanged: embedding rows, and untied LM head columns."""
    trunk = model.model
    embedding = trunk.wte.embedding if hasattr(trunk, "wte") else trunk.embed_tokens.embedding
    embedding.set_value(embedding[...].at[jnp.array([a, b])].set(embedding[...][jnp.array([b, a])]))
    if model.lm_head is not None:
        kernel = model.lm_head.kernel  # [D, V]
        kernel.set_value(
            kernel[...].at[:, jnp.array([a, b])].set(kernel[...][:, jnp.array([b, a])])
        )
    return model


def hf_greedy(path, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation of ``prompt`` with no EOS / pad argument: new tokens."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def first_new_token(path: list[int], banned: set[int]) -> int:
    """The first step k ≥ 2 whose token is new on the path and not special or in the prompt."""
    for k in range(2, len(path)):
        if path[k] not in path[:k] and path[k] not in banned:
            return k
    raise AssertionError(f"no usable step on the greedy path {path}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_policy_stops_at_eos_in_transformers(family, tmp_path):
    tok = tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    prompt = tok.encode("the room was")
    model = randomised(CausalLM(tiny_config(family), rngs=nnx.Rngs(0)), seed=1)
    save_pretrained(model, tmp_path / "plain")  # no tokenizer: no EOS id known, none written
    path = hf_greedy(tmp_path / "plain", prompt)
    assert len(path) == NEW_TOKENS
    k = first_new_token(path, {PAD, BOS, EOS, *prompt})
    # Relabel path[k] ↔ EOS: the greedy path now reaches EOS first at step k.
    swap = {path[k]: EOS, EOS: path[k]}
    relabelled = [swap.get(t, t) for t in path]
    assert relabelled[k] == EOS and EOS not in relabelled[:k]
    swap_tokens(model, path[k], EOS)

    # Without the tokenizer's ids (as every export was before): transformers runs past EOS.
    save_pretrained(model, tmp_path / "no_ids")
    assert json.loads((tmp_path / "no_ids" / "config.json").read_text())["eos_token_id"] is None
    assert hf_greedy(tmp_path / "no_ids", prompt) == relabelled  # 20 tokens, EOS inside

    # Saved with its tokenizer: config.json and generation_config.json carry the ids, and
    # generate() stops at the first EOS with no argument.
    save_pretrained(model, tmp_path / "export", tokenizer=tok)
    ids = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert {name: config[name] for name in ids} == ids
    generation = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert {name: generation[name] for name in ids} == ids
    assert hf_greedy(tmp_path / "export", prompt) == relabelled[: k + 1]  # ends at its EOS

    # Loaded back and saved again without a tokenizer: the ids come from the loaded config.json.
    again = from_pretrained(tmp_path / "export")
    assert (again.config.bos_token_id, again.config.eos_token_id) == (BOS, EOS)
    save_pretrained(again, tmp_path / "again")
    generation = json.loads((tmp_path / "again" / "generation_config.json").read_text())
    assert {name: generation[name] for name in ids} == ids


def test_special_token_ids_order_and_a_foreign_tokenizer():
    config = tiny_config("gpt2").replace(bos_token_id=5, eos_token_id=6)
    assert special_token_ids(config) == {"bos_token_id": 5, "eos_token_id": 6}
    tok = tokenizer()  # its ids win over the config's; pad_token_id= wins over both
    assert special_token_ids(config, tok) == {"bos_token_id": BOS, "eos_token_id": EOS,
                                              "pad_token_id": PAD}  # fmt: skip
    assert special_token_ids(config, tok, pad_token_id=7)["pad_token_id"] == 7
    foreign = types.SimpleNamespace(eos_token_id=config.vocab_size)  # a bigger vocabulary
    with pytest.raises(ValueError, match=r"tokenizer\.eos_token_id=300 is outside .*\[0, 300\)"):
        special_token_ids(config, foreign)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reward_score_in_transformers_is_ours_on_prompt_response_eos(family, tmp_path, capsys):
    tok = tokenizer()
    reward_model = randomised(RewardModel(tiny_config(family), rngs=nnx.Rngs(2)), seed=3)
    reward_model.score.bias.set_value(jnp.array([0.25]))  # as after train-rm's normalisation
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note, not a warning
        save_pretrained(reward_model, tmp_path / "rm", tokenizer=tok)
    assert "bias 0.25 saved as score.bias" in capsys.readouterr().err
    bias = json.loads((tmp_path / "rm" / "config.json").read_text())["jaxrlhf_score_bias"]
    assert bias == 0.25

    # What jaxrlhf scores (preference data and rollouts alike): left-padded prompts ⧺ responses
    # that end in EOS, then padding.
    prompts = [tok.encode(p) for p in ("the food was", "the staff was", "the room was")]
    responses = [tok.encode(r) for r in (" great .", " very nice .", " dirty .")]
    prompt_ids, prompt_mask = padded_batch(prompts, left=True)
    response_ids, response_mask = padded_batch([r + [EOS] for r in responses], left=False)
    ours = np.asarray(
        score_sequences(reward_model, prompt_ids, prompt_mask, response_ids, response_mask)
    )  # [B]

    # transformers on prompt ⧺ response ⧺ EOS (right-padded, no position_ids) + the bias: equal.
    with_eos = hf_scores(tmp_path / "rm", [p + r + [EOS] for p, r in zip(prompts, responses)])
    np.testing.assert_allclose(with_eos + bias, ours, atol=1e-5)
    # Without the EOS, or without the bias, the scores differ: both are needed.
    without_eos = hf_scores(tmp_path / "rm", [p + r for p, r in zip(prompts, responses)])
    assert np.all(np.abs(without_eos + bias - ours) > 1e-3)
    np.testing.assert_allclose(ours - with_eos, bias, atol=1e-5)

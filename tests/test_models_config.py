"""ModelConfig ↔ HF config.json: the branches of each family's converter, and errors naming field and file."""

import json
import warnings

import pytest

from jaxrlhf.models import ModelConfig

TINY = {"vocab_size": 64, "hidden_size": 32, "num_layers": 1, "num_heads": 4}
GPT2 = ModelConfig(family="gpt2", **TINY)


def _llama(hf_model_type, **kwargs):
    return ModelConfig(
        family="llama", num_kv_heads=2, hf_model_type=hf_model_type, **TINY, **kwargs
    )


EXPORTABLE = {
    "gpt2": GPT2,
    "llama": _llama("llama", attention_bias=True, attention_out_bias=True, mlp_bias=True),
    "qwen2": _llama("qwen2", attention_bias=True),
    "mistral": _llama("mistral", rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
@pytest.mark.parametrize("architecture", ["CausalLM", "SequenceClassification"])
def test_every_model_type_round_trips(name, architecture):
    config = EXPORTABLE[name]
    hf = config.to_hf(architecture=architecture)
    assert hf["model_type"] == name
    if architecture == "SequenceClassification":
        assert (
            hf["architectures"][0].endswith("ForSequenceClassification") and hf["num_labels"] == 1
        )
    assert ModelConfig.from_hf(hf) == config


@pytest.mark.parametrize(
    "base, change, field",
    [
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights"),
        ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
        ("gpt2", {"tie_word_embeddings": False}, "tie_word_embeddings"),
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_unsupported_hf_configs_name_the_field(base, change, field):
    with pytest.raises(ValueError, match=f"unsupported {base} config: {field}"):
        ModelConfig.from_hf({**EXPORTABLE[base].to_hf(), **change})


@pytest.mark.parametrize(
    "config, message",
    [
        (_llama("qwen2"), "qwen2 export needs attention_bias=True"),
        (_llama("qwen2", attention_bias=True, mlp_bias=True), "qwen2 export needs"),
        (_llama("llama", attention_bias=True), "attention_bias == attention_out_bias"),
        (_llama("mistral", mlp_bias=True), "mistral export cannot have biases"),
    ],
)
def test_biases_an_hf_model_type_cannot_express_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        config.to_hf()


def test_bad_architecture_is_refused():
    with pytest.raises(ValueError, match="architecture must be"):
        GPT2.to_hf(architecture="TokenClassification")


def test_a_list_of_eos_ids_keeps_the_first():
    hf = {**GPT2.to_hf(), "eos_token_id": [3, 4], "bos_token_id": []}
    config = ModelConfig.from_hf(hf)
    assert (config.eos_token_id, config.bos_token_id) == (3, None)


def test_errors_from_a_config_json_name_the_file_and_the_field(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    path.write_text(json.dumps({**GPT2.to_hf(), "add_cross_attention": True}))
    with pytest.raises(ValueError, match=rf"{path}: unsupported gpt2 config: add_cross_attention"):
        ModelConfig.from_hf(tmp_path)
    # A value ModelConfig refuses: its field name, after the file.
    path.write_text(json.dumps({**GPT2.to_hf(), "vocab_size": 0}))
    with pytest.raises(ValueError, match=rf"{path}: ModelConfig.vocab_size"):
        ModelConfig.from_hf(path)
    hf = GPT2.to_hf()
    del hf["n_embd"]
    path.write_text(json.dumps(hf))
    with pytest.raises(KeyError, match=rf"{path}: missing field 'n_embd'"):
        ModelConfig.from_hf(path)
    # A dict has no file: the error is the converter's own.
    with pytest.raises(KeyError, match="^'n_embd'$"):
        ModelConfig.from_hf(hf)


def test_sliding_window_warning_points_at_the_caller():
    hf = {**EXPORTABLE["mistral"].to_hf(), "sliding_window": 16}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ModelConfig.from_hf(hf)
    assert len(caught) == 1 and "sliding_window=16" in str(caught[0].message)
    assert caught[0].filename == __file__

"""ModelConfig: one frozen description of a decoder-only transformer (GPT-2 or Llama family).

The same dataclass describes a tiny random model built in a test and a pretrained checkpoint read from
a Hugging Face ``config.json`` (:meth:`ModelConfig.from_hf`); :meth:`ModelConfig.to_hf` writes the
``config.json`` that ``transformers`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

FAMILIES = ("gpt2", "llama")
# HF model_type -> our family. Qwen2 and Mistral are Llama-shaped (RMSNorm, RoPE, SwiGLU, GQA).
HF_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama"}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16")
LORA_TARGETS = {  # the HF names of the blocks' projections (GPT-2's c_proj: attention's and MLP's)
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
HIDDEN_ACTS = {"gpt2": ("gelu_new", "gelu_pytorch_tanh", "gelu"), "llama": ("silu",)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only transformer; every field is validated in ``__post_init__``."""

    family: str
    """Architecture family: "gpt2" (LayerNorm, learned positions, GELU) or "llama" (RMSNorm, RoPE, SwiGLU)."""
    vocab_size: int
    """Number of token ids."""
    hidden_size: int
    """Width D of the residual stream."""
    num_layers: int
    """Number of transformer blocks."""
    num_heads: int
    """Number of query heads."""
    num_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means num_heads (multi-head)."""
    head_dim: int | None = None
    """Width of one head; None means hidden_size // num_heads."""
    intermediate_size: int | None = None
    """Width of the MLP; None means 4 * hidden_size."""
    max_position_embeddings: int = 1024
    """Longest sequence (prompt + response). GPT-2 has one learned position vector per slot."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm (gpt2) or RMSNorm (llama)."""
    hidden_act: str | None = None
    """MLP activation: gpt2 "gelu_new" (tanh approximation, the default) or "gelu"; llama "silu"."""
    rope_theta: float = 10000.0
    """RoPE base θ (llama family only)."""
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    """RoPE scaling as sorted (key, value) pairs (a dict is accepted): {"rope_type": "linear", "factor"}
    or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}; None for plain RoPE."""
    tie_word_embeddings: bool = True
    """LM head shares the token embedding matrix (always true for gpt2)."""
    attention_bias: bool = False
    """q/k/v projections have a bias (llama family; Qwen2 sets it; gpt2 always has biases)."""
    attention_out_bias: bool = False
    """The attention output projection has a bias (llama family with attention_bias=True in HF)."""
    mlp_bias: bool = False
    """The llama MLP projections have biases."""
    dropout: float = 0.0
    """Dropout rate (embeddings, attention probabilities, residual branches). Off by default: RL needs
    log-probs that do not change between rollout and training. Applied only when a dropout_rng is
    passed to the forward pass."""
    dtype: str = "float32"
    """Parameter dtype, "float32" or "bfloat16" (the master weights when training)."""
    compute_dtype: str | None = None
    """Activation and matmul dtype, "float32" or "bfloat16" (None: the parameter dtype). bf16
    compute with fp32 parameters is mixed precision: weights are cast per use, and logits, values,
    log-probs and losses stay float32."""
    remat: bool = False
    """Recompute each transformer block's activations in the backward pass (activation
    checkpointing, jax.checkpoint): less memory for one more forward pass; same results."""
    scan_layers: bool = True
    """Hold the blocks' parameters stacked [num_layers, ...] and run the trunk as a ``jax.lax.scan``
    (one block compiled whatever the depth; over a mesh one layer's weights gathered at a time).
    False: a list of blocks run in a Python loop, which XLA compiles unrolled: compile time grows
    with depth, but small models train faster on CPU (``benchmarks/bench_ppo.py --no-scan-layers``).
    Same weights and results either way; Hugging Face checkpoints load into and export from both."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of weight matrices."""
    lora_rank: int = 0
    """Rank r of the LoRA adapters on the blocks' projections (``models.lora``); 0: none."""
    lora_alpha: float = 32.0
    """LoRA's α: an adapter adds (α / r) · B · A to its projection."""
    lora_targets: tuple[str, ...] | None = None
    """The HF names of the projections with adapters (``LORA_TARGETS``); None: all (``all-linear``)."""
    hf_model_type: str | None = None
    """The HF model_type written by to_hf ("gpt2", "llama", "qwen2", "mistral"); None means family."""
    pad_token_id: int | None = None
    """Padding token id (written to config.json; HF reward models use it to find the last token)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id (metadata for export)."""
    eos_token_id: int | None = None
    """End-of-sequence token id (metadata for export)."""

    def __post_init__(self):
        # Fields left to their None default and filled in below; replace() recomputes them.
        derived = ("num_kv_heads", "head_dim", "intermediate_size", "hidden_act", "hf_model_type",
                   "lora_targets")  # fmt: skip
        object.__setattr__(self, "_derived", tuple(n for n in derived if getattr(self, n) is None))
        self._check_shapes()
        self._check_hyperparameters()
        self._check_hf_metadata()

    def _check_shapes(self):
        """family, sizes, heads and widths; fills num_kv_heads, head_dim, intermediate_size."""
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads ({self.num_kv_heads}) must be positive and divide "
                f"num_heads ({self.num_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                    f"({self.num_heads}) when head_dim is not given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0:
            raise ValueError(f"ModelConfig.head_dim must be positive, got {self.head_dim}")
        if self.family == "gpt2" and self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError("ModelConfig.head_dim * num_heads must equal hidden_size for gpt2")
        if self.family == "gpt2" and self.num_kv_heads != self.num_heads:
            raise ValueError("ModelConfig.num_kv_heads must equal num_heads for gpt2")
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        if self.intermediate_size <= 0:
            raise ValueError("ModelConfig.intermediate_size must be positive")

    def _check_hyperparameters(self):
        """Positions, norm, activation, RoPE, tying, dropout, dtype, init; fills hidden_act and
        normalises rope_scaling."""
        if self.max_position_embeddings <= 0:
            raise ValueError("ModelConfig.max_position_embeddings must be positive")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
        if self.hidden_act is None:
            object.__setattr__(self, "hidden_act", HIDDEN_ACTS[self.family][0])
        if self.hidden_act not in HIDDEN_ACTS[self.family]:
            raise ValueError(
                f"ModelConfig.hidden_act must be one of {HIDDEN_ACTS[self.family]} for "
                f"{self.family}, got {self.hidden_act!r}"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        object.__setattr__(self, "rope_scaling", _normalise_rope_scaling(self.rope_scaling))
        if self.family == "gpt2" and not self.tie_word_embeddings:
            raise ValueError("ModelConfig.tie_word_embeddings must be True for gpt2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.compute_dtype not in (None, *DTYPES):
            raise ValueError(
                f"ModelConfig.compute_dtype must be None or one of {DTYPES}, "
                f"got {self.compute_dtype!r}"
            )
        if not self.initializer_range > 0:
            raise ValueError("ModelConfig.initializer_range must be > 0")
        self._check_lora()

    def _check_lora(self):
        """lora_rank ≥ 0, α > 0 and the target names of the family; fills lora_targets."""
        if not (isinstance(self.lora_rank, int) and self.lora_rank >= 0 and self.lora_alpha > 0):
            raise ValueError(f"ModelConfig.lora_rank ({self.lora_rank!r}) must be an int ≥ 0 and "
                             f"lora_alpha ({self.lora_alpha}) > 0")  # fmt: skip
        names = LORA_TARGETS[self.family]
        targets = names if self.lora_targets is None else tuple(self.lora_targets)
        if not targets or not set(targets) <= set(names):
            raise ValueError(f"ModelConfig.lora_targets {targets}: a {self.family} model's "
                             f"projections are {', '.join(names)}")  # fmt: skip
        object.__setattr__(self, "lora_targets", targets)

    def _check_hf_metadata(self):
        """hf_model_type (filled from family) and the special token ids."""
        if self.hf_model_type is None:
            object.__setattr__(self, "hf_model_type", self.family)
        if HF_MODEL_TYPES.get(self.hf_model_type) != self.family:
            raise ValueError(
                f"ModelConfig.hf_model_type {self.hf_model_type!r} is not a {self.family} model type"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"ModelConfig.{name}={value} is outside [0, {self.vocab_size})")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """rope_scaling as a dict (or None)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again); fields that were derived from others
        (head_dim, intermediate_size, ...) are derived again unless given."""
        reset = {name: None for name in self._derived if name not in changes}
        return dataclasses.replace(self, **reset, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf(cls, config: dict | str | os.PathLike, **overrides) -> ModelConfig:
        """Build a ModelConfig from an HF config dict, a config.json path or a checkpoint directory.

        ``overrides`` replace fields after conversion (e.g. ``dtype="bfloat16"``, ``dropout=0.1``).
        Dropout is 0.0 unless overridden, whatever the checkpoint's *_pdrop says. Errors name the
        offending field and, when the config was read from a file, start with that file's path.
        """
        config, path = _read_hf_config(config)
        try:
            return cls(**{**_fields_from_hf(config), **overrides})
        except (KeyError, ValueError) as error:
            if path is None:
                raise
            if isinstance(error, KeyError):
                raise KeyError(f"{path}: missing field {error.args[0]!r}") from error
            raise ValueError(f"{path}: {error}") from error

    def to_hf(self, *, architecture: str = "CausalLM") -> dict[str, Any]:
        """The HF config.json dict of this model; ``architecture`` is "CausalLM" or
        "SequenceClassification" (a reward model: num_labels=1, a "score" head)."""
        if architecture not in ("CausalLM", "SequenceClassification"):
            raise ValueError(
                f"architecture must be CausalLM or SequenceClassification, got {architecture!r}"
            )
        out: dict[str, Any] = {
            "architectures": [_hf_architecture(self.hf_model_type, architecture)],
            "model_type": self.hf_model_type,
            "vocab_size": self.vocab_size,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "dtype": self.dtype,
        }
        out.update(_TO_HF[self.family](self))
        if architecture == "SequenceClassification":
            out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return out


# ----------------------------------------------------------------------------- HF config.json → fields


def _read_hf_config(config: dict | str | os.PathLike) -> tuple[dict, str | None]:
    """The config dict and the config.json it was read from (None when given a dict)."""
    if isinstance(config, dict):
        return config, None
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f), path
        except ValueError as err:  # not JSON, or not UTF-8
            raise ValueError(f"{path}: not a valid JSON file ({err})") from err


def _fields_from_hf(config: dict) -> dict[str, Any]:
    """ModelConfig fields of an HF config dict: the shared ones, then those of its family."""
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture: model_type={model_type!r} "
            f"(architectures={config.get('architectures')}); supported model types: "
            f"{sorted(HF_MODEL_TYPES)}"
        )
    common = {
        "vocab_size": config["vocab_size"],
        "initializer_range": config.get("initializer_range", 0.02),
        "hf_model_type": model_type,
        "pad_token_id": _single_id(config.get("pad_token_id")),
        "bos_token_id": _single_id(config.get("bos_token_id")),
        "eos_token_id": _single_id(config.get("eos_token_id")),
    }
    return {**common, **_FROM_HF[HF_MODEL_TYPES[model_type]](config)}


def _gpt2_from_hf(config: dict) -> dict[str, Any]:
    """Fields of a GPT-2 config.json (n_embd, n_layer, ...); refuses attention variants we lack."""
    if config.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("unsupported gpt2 config: scale_attn_by_inverse_layer_idx=True")
    if not config.get("scale_attn_weights", True):
        raise ValueError("unsupported gpt2 config: scale_attn_weights=False")
    if config.get("add_cross_attention", False):
        raise ValueError("unsupported gpt2 config: add_cross_attention=True")
    if not config.get("tie_word_embeddings", True):
        raise ValueError("unsupported gpt2 config: tie_word_embeddings=False")
    return {
        "family": "gpt2",
        "hidden_size": config["n_embd"],
        "num_layers": config["n_layer"],
        "num_heads": config["n_head"],
        "intermediate_size": config.get("n_inner"),
        "max_position_embeddings": config.get("n_positions", 1024),
        "norm_eps": config.get("layer_norm_epsilon", 1e-5),
        "hidden_act": config.get("activation_function", "gelu_new"),
        "tie_word_embeddings": True,
    }


def _llama_from_hf(config: dict) -> dict[str, Any]:
    """Fields of a Llama, Qwen2 or Mistral config.json."""
    model_type = config["model_type"]
    if model_type == "qwen2" and config.get("use_sliding_window", False):
        raise ValueError("unsupported qwen2 config: use_sliding_window=True")
    window = config.get("sliding_window") if model_type == "mistral" else None
    max_positions = config.get("max_position_embeddings", 2048)
    if window is not None and window < max_positions:  # a window ≥ every sequence is exact
        warnings.warn(  # a possibly wrong result, not information: a real warning
            f"mistral sliding_window={window} is not implemented: attention is full, which is "
            f"exact only for sequences of at most {window} tokens (max_position_embeddings="
            f"{max_positions})",
            stacklevel=4,  # the caller of ModelConfig.from_hf
        )
    num_heads = config["num_attention_heads"]
    return {
        "family": "llama",
        "hidden_size": config["hidden_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": num_heads,
        "num_kv_heads": config.get("num_key_value_heads") or num_heads,
        "head_dim": config.get("head_dim"),
        "intermediate_size": config["intermediate_size"],
        "max_position_embeddings": max_positions,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "hidden_act": config.get("hidden_act", "silu"),
        **_rope_from_hf(config),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        **_llama_biases_from_hf(config),
    }


def _rope_from_hf(config: dict) -> dict[str, Any]:
    """rope_theta and rope_scaling from transformers 5.x's rope_parameters or 4.x's rope_theta +
    rope_scaling (the 4.x keys win)."""
    rope = dict(config.get("rope_parameters") or {})
    if config.get("rope_scaling"):  # transformers 4.x layout
        rope.update(config["rope_scaling"])
    rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return {
        "rope_theta": float(rope_theta),
        "rope_scaling": None if rope_type == "default" else rope,
    }


def _llama_biases_from_hf(config: dict) -> dict[str, bool]:
    """Llama has attention_bias (q/k/v and output) and mlp_bias; Qwen2 always has q/k/v biases only;
    Mistral has none."""
    model_type = config["model_type"]
    llama = model_type == "llama"
    return {
        "attention_bias": True if model_type == "qwen2" else config.get("attention_bias", False),
        "attention_out_bias": config.get("attention_bias", False) if llama else False,
        "mlp_bias": config.get("mlp_bias", False) if llama else False,
    }


# ----------------------------------------------------------------------------- fields → HF config.json


def _hf_architecture(hf_model_type: str, architecture: str) -> str:
    """The HF class name, e.g. GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForSequenceClassification."""
    if hf_model_type == "gpt2" and architecture == "CausalLM":
        return "GPT2LMHeadModel"
    class_prefix = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
    return f"{class_prefix[hf_model_type]}For{architecture}"


def _gpt2_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The GPT-2 keys of config.json."""
    return {
        "n_embd": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.intermediate_size,
        "n_positions": config.max_position_embeddings,
        "layer_norm_epsilon": config.norm_eps,
        "activation_function": config.hidden_act,
        "attn_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def _llama_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The keys of a Llama, Qwen2 or Mistral config.json (per config.hf_model_type)."""
    _check_llama_export_biases(config)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope.update(config.rope_scaling_dict)
    out = {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": config.hidden_act,
        "rope_parameters": rope,
        "attention_dropout": config.dropout,
    }
    if config.hf_model_type == "llama":
        out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    if config.hf_model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    if config.hf_model_type == "mistral":
        out.update(sliding_window=None)
    return out


def _check_llama_export_biases(config: ModelConfig) -> None:
    """Each HF model type can express only some of our three bias flags."""
    biases = (config.attention_bias, config.attention_out_bias, config.mlp_bias)
    if config.hf_model_type == "qwen2" and (not biases[0] or any(biases[1:])):
        raise ValueError("a qwen2 export needs attention_bias=True and no other biases")
    if config.hf_model_type == "llama" and config.attention_bias != config.attention_out_bias:
        raise ValueError(
            "a llama export needs attention_bias == attention_out_bias (HF has one flag); "
            "use hf_model_type='qwen2' for q/k/v-only biases"
        )
    if config.hf_model_type == "mistral" and any(biases):
        raise ValueError("a mistral export cannot have biases")


# One converter per family in each direction (Qwen2 and Mistral are read and written as llama).
_FROM_HF = {"gpt2": _gpt2_from_hf, "llama": _llama_from_hf}
_TO_HF = {"gpt2": _gpt2_to_hf, "llama": _llama_to_hf}


def _single_id(value):
    """HF allows a list of EOS ids; we keep the first one."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _normalise_rope_scaling(rope_scaling) -> tuple[tuple[str, Any], ...] | None:
    """Validate rope_scaling and store it as hashable sorted pairs (the config lives in the graphdef)."""
    if rope_scaling is None:
        return None
    scaling = dict(rope_scaling)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"ModelConfig.rope_scaling: rope_type {rope_type!r} is not supported "
            f"(supported: {ROPE_TYPES})"
        )
    if rope_type == "default":
        return None
    required = {
        "linear": ("factor",),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
    }[rope_type]
    for key in required:
        if key not in scaling:
            raise ValueError(f"ModelConfig.rope_scaling ({rope_type}) needs the key {key!r}")
        if not (isinstance(scaling[key], (int, float)) and math.isfinite(scaling[key])):
            raise ValueError(f"ModelConfig.rope_scaling[{key!r}] must be a number")
    if not scaling["factor"] > 0:
        raise ValueError("ModelConfig.rope_scaling['factor'] must be > 0")
    return tuple(sorted((k, v) for k, v in scaling.items() if k in required + ("rope_type",)))

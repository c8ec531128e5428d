"""The four RLHF models: one decoder-only trunk (gpt2.py / llama.py) with different heads.

    CausalLM     actor / reference:   logits = trunk(x) · W_lmᵀ                       [B, T, V]
    ActorCritic  actor + value head:  (logits [B, T, V], values = trunk(x) · w_v + b_v  [B, T])
    ValueModel   separate critic:     values [B, T]
    RewardModel  reward model:        score = trunk(x)[last real token] · w + b         [B]

Every forward pass is pure (it reads parameters, mutates nothing), so the models can be split with
``nnx.split`` and merged inside ``jax.jit`` / ``jax.grad``. Logits, values and scores are float32
whatever the parameter dtype. Dropout (config.dropout > 0) is applied only when a ``dropout_rng`` key
is passed.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.gpt2 import GPT2Model
from jaxrlhf.models.layers import (
    KVCache,
    causal_mask,
    fold_rng,
    jnp_dtype,
    positions_from_mask,
    stack_list,
    unstack_blocks,
)
from jaxrlhf.models.llama import LlamaModel
from jaxrlhf.models.lm_head import head_logprobs
from jaxrlhf.models.lora import LoRAParam


def make_trunk(config: ModelConfig, *, rngs: nnx.Rngs):
    """The family's trunk: GPT2Model or LlamaModel."""
    return {"gpt2": GPT2Model, "llama": LlamaModel}[config.family](config, rngs=rngs)


def trunk_hidden(trunk, input_ids, attention_mask, *, dropout_rng=None):
    """Final-norm hidden states [B, T, D] of a (left-)padded batch without a cache."""
    chex.assert_rank([input_ids, attention_mask], 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    positions = positions_from_mask(attention_mask)  # [B, T]
    mask = causal_mask(attention_mask, input_ids.shape[1])  # [B, T, T]
    hidden, _ = trunk(input_ids, positions, mask, dropout_rng=dropout_rng)
    return hidden


def response_hidden(
    trunk, prompt_ids, prompt_mask, response_ids, response_mask, *, group_size: int = 1,
    dropout_rng=None,
):  # fmt: skip
    """The hidden states that score responses: the last prompt position, then the N response
    positions → [R, N + 1, D]. h[:, j] (j < N) predicts response token j; h[:, n] is the last real
    token of a response with n tokens (responses end in padding). (Scoring the tokens of a response
    needs h[:, :N] only: pass its first N − 1 tokens, as ``CausalLM.response_logits`` does.)

    Each prompt is run once for its ``group_size`` responses: prompt_ids, prompt_mask [R / G, P]
    (left-padded), response_ids, response_mask [R, N] with the G responses of prompt i in rows
    i·G … i·G + G − 1. The prompt's keys and values (a KV cache of P slots) are repeated G times and
    the responses attend to them, so a group of G costs P + G·N token passes instead of G·(P + N):
    the same values as running every prompt ⧺ response (``trunk_hidden``), up to float rounding, and
    differentiable through the shared prompt.
    """
    B, P = prompt_ids.shape
    R, N = response_ids.shape
    chex.assert_rank([prompt_ids, prompt_mask, response_ids, response_mask], 2)
    if R != B * group_size:
        raise ValueError(
            f"{R} responses are not {group_size} per prompt for {B} prompts (group_size)"
        )
    prompt_mask = prompt_mask.astype(jnp.int32)
    cache = KVCache.zeros(trunk.config, B, P)
    prompt_hidden, cache = trunk(
        prompt_ids,
        positions_from_mask(prompt_mask),
        causal_mask(prompt_mask, P),
        cache=cache,
        dropout_rng=fold_rng(dropout_rng, 0),
        remat=trunk.config.remat,
    )  # [B, P, D], cache of P slots

    def per_response(x):  # [B, ...] → [R, ...]: row i repeated G times
        return x if group_size == 1 else jnp.repeat(x, group_size, axis=0)

    cache = cache.repeat(group_size).grow(P + N)
    kv_mask = jnp.concatenate(
        [per_response(prompt_mask), response_mask.astype(jnp.int32)], axis=1
    )  # [R, P + N]
    hidden, _ = trunk(
        response_ids,
        positions_from_mask(kv_mask)[:, P:],
        causal_mask(kv_mask, N, P),
        cache=cache,
        cache_index=P,
        dropout_rng=fold_rng(dropout_rng, 1),
        remat=trunk.config.remat,
    )  # [R, N, D]
    return jnp.concatenate([per_response(prompt_hidden[:, -1:]), hidden], axis=1)  # [R, N + 1, D]


def scalar_head(config: ModelConfig, *, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    """Linear D → 1, weight ~ N(0, std²), zero bias."""
    dtype = jnp_dtype(config)
    return nnx.Linear(
        config.hidden_size,
        1,
        kernel_init=nnx.initializers.normal(std),
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=dtype,
        rngs=rngs,
    )


def _scalar(head: nnx.Linear, hidden):
    """Apply a D → 1 head in float32: [..., D] → [...]."""
    kernel = head.kernel[...].astype(jnp.float32)  # [D, 1]
    bias = head.bias[...].astype(jnp.float32)  # [1]
    return (hidden.astype(jnp.float32) @ kernel + bias)[..., 0]


class CausalLM(nnx.Module):
    """The actor (and the frozen reference): token ids → next-token logits."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = make_trunk(config, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            dtype = jnp_dtype(config)
            self.lm_head = nnx.Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                kernel_init=nnx.initializers.normal(config.initializer_range),
                dtype=dtype,
                param_dtype=dtype,
                rngs=rngs,
            )

    def hidden(self, input_ids, attention_mask, *, dropout_rng=None):
        """Final-norm hidden states [B, T, D]."""
        return trunk_hidden(self.model, input_ids, attention_mask, dropout_rng=dropout_rng)

    def logits_from_hidden(self, hidden):
        """LM head in float32: hidden [B, T, D] → logits [B, T, V]."""
        if self.lm_head is None:
            w = self.model.token_embedding().astype(hidden.dtype)  # [V, D] in compute dtype
            return jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...].astype(hidden.dtype)  # [D, V]
        return jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)

    def head_weight(self):
        """The LM head as [V, D]: the tied token embedding, or the untied kernel transposed."""
        if self.lm_head is None:
            return self.model.token_embedding()
        return self.lm_head.kernel[...].T

    def token_logprobs(self, hidden, tokens, *, temperature=1.0, logits_chunk_size=None,
                       entropy=False, entropy_grad=False):  # fmt: skip
        """(log π(tokens), entropy) [..., T] from hidden states [..., T, D]: the values of
        ``rl.token_logprobs`` / ``rl.token_entropy`` on ``logits_from_hidden(hidden)``, with the
        head applied ``logits_chunk_size`` tokens at a time (``models.lm_head.head_logprobs``)."""
        return head_logprobs(
            hidden, self.head_weight(), tokens, temperature=temperature,
            logits_chunk_size=logits_chunk_size, entropy=entropy, entropy_grad=entropy_grad,
        )  # fmt: skip

    def __call__(self, input_ids, attention_mask, *, dropout_rng=None):
        """input_ids [B, T] int, attention_mask [B, T] (1 = real token, left padding) → logits
        [B, T, V] float32; logits[:, t] predict token t + 1."""
        return self.logits_from_hidden(
            self.hidden(input_ids, attention_mask, dropout_rng=dropout_rng)
        )

    def response_logits(
        self, prompt_ids, prompt_mask, response_ids, response_mask, *, group_size: int = 1,
        dropout_rng=None,
    ):  # fmt: skip
        """Logits [R, N, V] (float32) that score each response token: logits[:, j] predict response
        token j. Only what they need is run: the last prompt position and the first N − 1 response
        tokens (the last token predicts nothing here), the LM head on those N positions, and each
        prompt [R / G, P] once for its ``group_size`` responses (``response_hidden``)."""
        hidden = response_hidden(
            self.model, prompt_ids, prompt_mask, response_ids[:, :-1], response_mask[:, :-1],
            group_size=group_size, dropout_rng=dropout_rng,
        )  # fmt: skip
        return self.logits_from_hidden(hidden)  # [R, N, V] from hidden [R, N, D]

    def response_logprobs(
        self, prompt_ids, prompt_mask, response_ids, response_mask, *, group_size: int = 1,
        temperature=1.0, logits_chunk_size=None, entropy=False, entropy_grad=False,
        dropout_rng=None,
    ):  # fmt: skip
        """(log π, entropy) [R, N] of each response token: ``response_logits`` through
        ``rl.token_logprobs`` / ``rl.token_entropy``, without the [R, N, V] logits
        (:meth:`token_logprobs`)."""
        hidden = response_hidden(
            self.model, prompt_ids, prompt_mask, response_ids[:, :-1], response_mask[:, :-1],
            group_size=group_size, dropout_rng=dropout_rng,
        )  # [R, N, D]  # fmt: skip
        return self.token_logprobs(
            hidden, response_ids, temperature=temperature, logits_chunk_size=logits_chunk_size,
            entropy=entropy, entropy_grad=entropy_grad,
        )  # fmt: skip

    # ------------------------------------------------------------------ used by rollout.generate

    def unstack_layers(self) -> CausalLM:
        """This model, changed in place, with its trunk's blocks held as a list of L blocks
        (``layers.unstack_blocks``), and returned: the form generate decodes with, on a model merged
        inside ``jax.jit``. Each layer's weights are sliced out of the stack once, before the decode
        loop, rather than at every step (``layers.KVCache`` says what that cost)."""
        trunk = self.model
        blocks = getattr(trunk, trunk.BLOCKS)
        if not isinstance(blocks, nnx.List):  # scan_layers off: a list already
            setattr(trunk, trunk.BLOCKS, unstack_blocks(blocks))
        return self

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An all-zero KV cache of ``length`` slots."""
        return KVCache.zeros(self.config, batch, length)

    def forward_cached(
        self, input_ids, positions, kv_mask, cache: KVCache, cache_index, *, last_only=False
    ):
        """Run T new tokens through the model, reading and writing the KV cache.

        Args:
          input_ids, positions: [B, T]; kv_mask: [B, S] which cache slots hold real tokens;
          cache: KVCache with S slots; cache_index: slot of the first new token.
          last_only: return only the last position's logits [B, 1, V] (all that generation needs
            from a prompt: the LM head is not run on the other T − 1 positions).
        Returns (logits [B, T, V] float32 ([B, 1, V] with last_only), the updated cache).
        """
        mask = causal_mask(kv_mask, input_ids.shape[1], cache_index)  # [B, T, S]
        hidden, cache = self.model(input_ids, positions, mask, cache=cache, cache_index=cache_index)
        if last_only:
            hidden = hidden[:, -1:]  # [B, 1, D]
        return self.logits_from_hidden(hidden), cache


class ActorCritic(nnx.Module):
    """An actor with a value head on its trunk (like trl's AutoModelForCausalLMWithValueHead).

    One trunk pass gives logits [B, T, V] and per-token values [B, T]; values[:, t] estimates the
    return from the state that ends with token t.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.lm = CausalLM(config, rngs=rngs)
        self.value_head = scalar_head(
            config, std=1.0 / math.sqrt(config.hidden_size + 1), rngs=rngs
        )

    def hidden_and_values(self, input_ids, attention_mask, *, dropout_rng=None):
        """(the actor's hidden states [B, T, D], values [B, T]) of one trunk pass."""
        hidden = self.lm.hidden(input_ids, attention_mask, dropout_rng=dropout_rng)  # [B, T, D]
        return hidden, _scalar(self.value_head, hidden)

    def __call__(self, input_ids, attention_mask, *, dropout_rng=None):
        hidden, values = self.hidden_and_values(input_ids, attention_mask, dropout_rng=dropout_rng)
        return self.lm.logits_from_hidden(hidden), values


class ValueModel(nnx.Module):
    """A separate critic: its own trunk and a value head → values [B, T]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = make_trunk(config, rngs=rngs)
        self.value_head = scalar_head(
            config, std=1.0 / math.sqrt(config.hidden_size + 1), rngs=rngs
        )

    def __call__(self, input_ids, attention_mask, *, dropout_rng=None):
        hidden = trunk_hidden(self.model, input_ids, attention_mask, dropout_rng=dropout_rng)
        return _scalar(self.value_head, hidden)  # [B, T]


def last_token_index(attention_mask):
    """Index of the last position where attention_mask == 1: [B, T] → [B] (0 for an empty row)."""
    T = attention_mask.shape[-1]
    return jnp.max(jnp.arange(T) * (attention_mask > 0), axis=-1)


class RewardModel(nnx.Module):
    """Trunk + scalar head read at the last real token → one score per sequence [B].

    The head is initialised N(0, 1/(D+1)) with zero bias (Ziegler et al. 2019, lm-human-preferences).
    Exported as HF ``*ForSequenceClassification`` (num_labels=1, "score"), which reads the last token
    that is not pad_token_id: the two agree when the pad token is used only for padding.
    jaxrlhf's responses (preference data, rollouts) end in EOS, so their score is read at the EOS:
    in transformers feed prompt ⧺ response ⧺ EOS and add config.json's ``jaxrlhf_score_bias``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = make_trunk(config, rngs=rngs)
        self.score = scalar_head(config, std=1.0 / math.sqrt(config.hidden_size + 1), rngs=rngs)

    def token_scores(self, input_ids, attention_mask, *, dropout_rng=None):
        """The head applied at every position: [B, T] float32."""
        hidden = trunk_hidden(self.model, input_ids, attention_mask, dropout_rng=dropout_rng)
        return _scalar(self.score, hidden)

    def __call__(self, input_ids, attention_mask, *, dropout_rng=None):
        scores = self.token_scores(input_ids, attention_mask, dropout_rng=dropout_rng)  # [B, T]
        last = last_token_index(attention_mask)  # [B]
        return jnp.take_along_axis(scores, last[:, None], axis=-1)[:, 0]  # [B]

    def score_responses(
        self, prompt_ids, prompt_mask, response_ids, response_mask, *, group_size: int = 1
    ):
        """The score of each prompt ⧺ response [R], each prompt [R / G, P] run once for its
        ``group_size`` responses (``response_hidden``): the head at the response's last real
        token (the last prompt token for an empty response)."""
        hidden = response_hidden(
            self.model,
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            group_size=group_size,
        )  # [R, N + 1, D]
        length = jnp.sum(response_mask > 0, axis=-1)  # [R]
        last = jnp.take_along_axis(hidden, length[:, None, None], axis=1)[:, 0]  # [R, D]
        return _scalar(self.score, last)


def with_settings(
    model: nnx.Module,
    *,
    param_dtype: str | None = None,
    compute_dtype: str | None = None,
    remat: bool | None = None,
    scan_layers: bool | None = None,
) -> nnx.Module:
    """The same model (same weights) rebuilt with another parameter dtype (the weights are cast),
    compute dtype, activation checkpointing or block layout (``ModelConfig.dtype / compute_dtype /
    remat / scan_layers``; None keeps the model's).

    Works on CausalLM, ActorCritic, ValueModel, RewardModel and on any module whose children are
    those (e.g. a policy with a separate critic). Nothing is initialised: the new module's
    structure comes from ``nnx.eval_shape`` and its values from ``model``.
    """
    changes = {"dtype": param_dtype, "compute_dtype": compute_dtype, "remat": remat,
               "scan_layers": scan_layers}  # fmt: skip
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return model
    config = getattr(model, "config", None)
    if config is None:  # a container of models (PolicyWithCritic): rebuild each child
        clone = nnx.clone(model)
        for name, child in vars(model).items():
            if isinstance(child, nnx.Module):
                rebuilt = with_settings(
                    child, param_dtype=param_dtype, compute_dtype=compute_dtype, remat=remat,
                    scan_layers=scan_layers,
                )  # fmt: skip
                setattr(clone, name, rebuilt)
        return clone
    new_config = config.replace(**changes)
    rebuilt = nnx.eval_shape(lambda: type(model)(new_config, rngs=nnx.Rngs(0)))
    if new_config.scan_layers != config.scan_layers:
        model = _with_block_layout(model, stacked=new_config.scan_layers)
    dtype = jnp_dtype(new_config)
    base = jax.tree.map(lambda x: jnp.asarray(x, dtype), nnx.state(model, nnx.Not(LoRAParam)))
    nnx.update(rebuilt, base, nnx.state(model, LoRAParam))  # adapters stay float32
    return rebuilt


def _with_block_layout(model: nnx.Module, *, stacked: bool) -> nnx.Module:
    """A copy of ``model`` whose trunk holds its blocks stacked (``layers.stack_list``) or as a list
    (``layers.unstack_blocks``): the state of the other ``scan_layers`` (its config unchanged)."""
    clone = nnx.clone(model)
    trunks = [node for _, node in nnx.iter_graph(clone) if hasattr(type(node), "BLOCKS")]
    for trunk in trunks:
        blocks = getattr(trunk, trunk.BLOCKS)
        setattr(trunk, trunk.BLOCKS, stack_list(blocks) if stacked else unstack_blocks(blocks))
    return clone

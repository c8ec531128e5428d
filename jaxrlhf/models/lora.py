"""LoRA (Hu et al. 2021): a frozen projection W plus a trainable low-rank update.

    y = x W + b + (α / r) · (x A) B          A [d_in, r],  B [r, d_out],  r ≪ min(d_in, d_out)

so the layer's weight is W + ΔW with ΔW = (α / r) · A B, of rank ≤ r. A starts as peft starts it
(Kaiming-uniform, A ~ U(−1/√d_in, 1/√d_in)) and B = 0: ΔW = 0 at step 0, so the adapted model *is*
the base model until the first update (in PPO the first ratio π_θ / π_old is exactly 1). Only A and
B (and the heads) are trained: the optimiser holds state for r · (d_in + d_out) numbers per
projection instead of d_in · d_out, and the base may stay in bfloat16 while the adapters are float32.

**The reference for free.** π_ref is the initial policy = the base = the adapted model with ΔW
switched off. :func:`adapters_off` gives that model's graph (α / r = 0) over the *same* parameters,
so PPO, GRPO and DPO hold no second copy of the base.

**Why our own module and not qwix.** Google's qwix (what tunix uses) adds LoRA by intercepting a
Flax model's ``nnx.Linear`` / ``nnx.Einsum`` calls and rewriting them (a model surgery keyed on
module paths). Our projections are few and named by the Hugging Face names (``LORA_TARGETS``), and
the PEFT export needs exactly those names, so a ``nnx.Linear`` subclass built by
``layers.dense`` is shorter than the interception, keeps parameter paths (``…/q_proj/kernel``,
``…/q_proj/lora_a``) that the sharding rules and the Hugging Face tables read, and stacks with the
scanned blocks like any other parameter ([L, d_in, r]).

    model = with_lora(model, rank=8, alpha=32)       # adapters on every projection of the blocks
    graphdef, params, frozen = split_trainable(model)  # params: adapters (+ heads); frozen: the base
    merged = merge_lora(model)                        # W + (α / r) A B, no adapters: HF export
    save_adapter(model, "out/policy_adapter")         # PEFT's adapter_config.json + safetensors
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.config import LORA_TARGETS, ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BASE = "jaxrlhf_base.json"  # the shape of the base the adapter was trained on
PEFT_PREFIX = "base_model.model."  # what peft puts before the base model's own tensor names
HEAD_NAMES = ("value_head", "score")  # trained with the adapters (a fresh head has no base value)


class LoRAParam(nnx.Param):
    """A LoRA adapter's parameter (A or B): with the heads, what a LoRA model trains."""


class LoRALinear(nnx.Linear):
    """``nnx.Linear`` (the frozen W, b) plus an adapter: y = x W + b + (α / r) · (x A) B.

    A [d_in, r] float32 ~ U(−1/√d_in, 1/√d_in), B [r, d_out] float32 zeros; the update is computed
    in the layer's compute dtype. ``scale`` = α / r is static (part of the graph, not a parameter).
    """

    def __init__(self, d_in: int, d_out: int, *, rank: int, alpha: float, rngs: nnx.Rngs, **kw):
        super().__init__(d_in, d_out, rngs=rngs, **kw)
        if rank > min(d_in, d_out):
            raise ValueError(
                f"lora_rank {rank} is larger than a projection's dimensions [{d_in}, {d_out}]: a "
                f"rank above {min(d_in, d_out)} adds nothing a full update would not"
            )
        self.lora_a = LoRAParam(lora_a_init(rngs.params(), (d_in, rank)))
        self.lora_b = LoRAParam(jnp.zeros((rank, d_out), jnp.float32))
        self.scale = alpha / rank

    def __call__(self, x):  # [..., d_in] → [..., d_out]
        y = super().__call__(x)
        if self.scale == 0.0:  # adapters off (the reference): exactly the base projection
            return y
        dtype = y.dtype
        update = (x.astype(dtype) @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return y + (self.scale * update).astype(dtype)


def lora_a_init(key, shape):
    """peft's A: ``kaiming_uniform_(a=√5)`` on torch's [r, d_in], i.e. U(−1/√d_in, 1/√d_in); here
    [..., d_in, r] (a leading layer axis when the blocks are stacked)."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def is_target(config: ModelConfig, name: str) -> bool:
    """Whether the projection called ``name`` (its Hugging Face name) gets an adapter."""
    return config.lora_rank > 0 and name in config.lora_targets


def parse_targets(text: str | None, family: str) -> tuple[str, ...] | None:
    """``"q_proj,v_proj"`` → ("q_proj", "v_proj"); None / "" / "all-linear" → None (every one).
    An unknown name is refused with the family's names."""
    if text is None or text.strip() in ("", "all-linear"):
        return None
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in LORA_TARGETS[family]]
    if unknown:
        raise ValueError(
            f"lora_targets: unknown {', '.join(unknown)}; a {family} model's projections are "
            f"{', '.join(LORA_TARGETS[family])} (or all-linear)"
        )
    return names


def has_lora(model: nnx.Module) -> bool:
    """Whether any part of ``model`` holds adapters."""
    return any(isinstance(node, LoRALinear) for _, node in nnx.iter_graph(model))


def model_configs(model: nnx.Module) -> list[ModelConfig]:
    """The ModelConfig of a model, or of each model in a container of them."""
    config = getattr(model, "config", None)
    if config is not None:
        return [config]
    return [c for child in vars(model).values() if isinstance(child, nnx.Module)
            for c in model_configs(child)]  # fmt: skip


def _rebuild(model: nnx.Module, change, state) -> nnx.Module:
    """``type(model)(change(config))`` as an abstract module (nothing allocated) with ``state``
    put in; containers of models (a policy with a separate critic) child by child."""
    config = getattr(model, "config", None)
    if config is None:
        clone = nnx.clone(model)
        for name, child in vars(model).items():
            if isinstance(child, nnx.Module):
                setattr(clone, name, _rebuild(child, change, state[name]))
        return clone
    rebuilt = nnx.eval_shape(lambda: type(model)(change(config), rngs=nnx.Rngs(0)))
    nnx.update(rebuilt, state)
    return rebuilt


def with_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float = 32.0,
    targets: tuple[str, ...] | None = None,
    seed: int = 0,
) -> nnx.Module:
    """``model`` with adapters of rank ``rank`` on its ``targets`` (Hugging Face names; None: every
    projection of the blocks): the same base weights, A drawn from ``seed``, B = 0, so its outputs
    equal ``model``'s. The heads and A, B are float32 (the trained parameters); the base keeps its
    dtype. Works on every head type and on a container of them; either block layout."""
    if rank <= 0:
        raise ValueError(f"lora_rank must be ≥ 1 to add adapters, got {rank}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters (merge_lora first, or train them)")

    def change(config):
        return config.replace(lora_rank=rank, lora_alpha=float(alpha), lora_targets=targets)

    rebuilt = _rebuild(model, change, nnx.state(model))
    key = jax.random.key(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(rebuilt, LoRAParam))
    values = [  # A drawn (one key per adapter parameter, in order), B = 0
        lora_a_init(jax.random.fold_in(key, i), leaf.shape)
        if any(getattr(k, "key", None) == "lora_a" for k in path)
        else jnp.zeros(leaf.shape, jnp.float32)
        for i, (path, leaf) in enumerate(flat)
    ]
    nnx.update(rebuilt, jax.tree.unflatten(treedef, values))
    _heads_to_float32(rebuilt)
    return rebuilt


def _heads_to_float32(model: nnx.Module) -> None:
    for path, node in nnx.iter_graph(model):
        if path and path[-1] in HEAD_NAMES and isinstance(node, nnx.Linear):
            for name in ("kernel", "bias"):
                param = getattr(node, name, None)
                if param is not None:
                    param.set_value(jnp.asarray(param[...], jnp.float32))


def trainable_filter(model: nnx.Module):
    """What a trainer updates: every parameter, or with adapters the adapters and the heads."""
    if not has_lora(model):
        return nnx.Param
    return nnx.Any(LoRAParam, *(nnx.PathContains(name) for name in HEAD_NAMES))


def split_trainable(model: nnx.Module):
    """(graphdef, trained parameters, frozen state): the frozen state is empty without adapters;
    ``nnx.merge(graphdef, params, frozen)`` is the model again."""
    return nnx.split(model, trainable_filter(model), ...)


def adapters_off(model: nnx.Module) -> nnx.Module:
    """The same model (the same parameter arrays, nothing copied) with every adapter's α / r set
    to 0: the base model exactly. Its graphdef merged with the adapted model's parameters is the
    reference policy, for free."""
    clone = nnx.clone(model)
    for _, node in nnx.iter_graph(clone):
        if isinstance(node, LoRALinear):
            node.scale = 0.0
    return clone


def reference_parts(actor: nnx.Module, reference: nnx.Module | None):
    """(graphdef, state) of a trainer's reference policy: ``reference`` split; without one (LoRA)
    ``actor``'s adapters-off graph and None, read by the trainers as "the actor's own parameters"."""
    if reference is not None:
        return nnx.split(reference)
    return nnx.graphdef(adapters_off(actor)), None


def merge_lora(model: nnx.Module) -> nnx.Module:
    """The model without adapters whose every adapted kernel is W + (α / r) · A B (in float32, then
    W's dtype): the same function, as a plain model (``lora_rank`` 0) for export and generation."""
    if not has_lora(model):
        return model
    clone = nnx.clone(model)
    for _, node in nnx.iter_graph(clone):
        if isinstance(node, LoRALinear):
            kernel = node.kernel[...]
            delta = jnp.einsum(
                "...ir,...ro->...io", node.lora_a[...], node.lora_b[...],
                precision=jax.lax.Precision.HIGHEST,
            )  # fmt: skip
            node.kernel.set_value(
                (kernel.astype(jnp.float32) + node.scale * delta).astype(kernel.dtype)
            )
    base = nnx.state(clone, nnx.Not(LoRAParam))
    return _rebuild(clone, lambda c: c.replace(lora_rank=0), base)

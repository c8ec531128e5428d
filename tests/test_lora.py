"""LoRA (models/lora.py): adapters equal the base at step 0, merge and the adapters-off reference are
exact, peft's own LoRA gives our logits, every trainer trains adapters only, bad input is refused."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_utils import (
    hf_checkpoint,
    hf_model,
    jit_apply,
    left_padded_batch,
    make_hf_model,
    torch_logits,
)

from jaxrlhf.cli import main
from jaxrlhf.data.demo_task import sample_corpus, sample_prompts
from jaxrlhf.models import CausalLM, ModelConfig, RewardModel
from jaxrlhf.models.heads import with_settings
from jaxrlhf.models.hf import from_pretrained, save_pretrained
from jaxrlhf.models.lora import (
    LoRAParam,
    adapters_off,
    has_lora,
    merge_lora,
    split_trainable,
    with_lora,
)
from jaxrlhf.models.peft_adapter import load_adapter, save_adapter
from jaxrlhf.models.sharding import logical_axes
from jaxrlhf.models.tokenizer import load_tokenizer, train_bpe_tokenizer
from jaxrlhf.train.sft import SFTConfig

DATA_FLAGS = ["--data-max-prompt-length", "20", "--data-max-response-length", "8"]


def tiny(family: str, *, scan_layers: bool = True, **kw):
    extra = {"num_kv_heads": 2, "intermediate_size": 48} if family == "llama" else {}
    config = ModelConfig(family=family, vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                         scan_layers=scan_layers, **extra, **kw)  # fmt: skip
    return CausalLM(config, rngs=nnx.Rngs(0))


def perturbed(model, seed: int, scale: float = 0.3):
    """``model`` with random adapters (both A and B non-zero): ΔW ≠ 0."""
    graphdef, params, frozen = split_trainable(model)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), params)
    return nnx.merge(graphdef, params, frozen)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_adapters_start_at_the_base_and_merge_exactly(family, scan_layers):
    base = tiny(family, scan_layers=scan_layers)
    ids, mask = left_padded_batch(1)
    ids = ids % 61
    want = np.asarray(jit_apply(base, ids, mask))
    adapted = with_lora(base, rank=4, alpha=8.0)
    np.testing.assert_allclose(np.asarray(jit_apply(adapted, ids, mask)), want, atol=1e-6)  # B = 0

    trained = perturbed(adapted, seed=1)
    got = np.asarray(jit_apply(trained, ids, mask))
    assert np.abs(got - want).max() > 1e-2  # the adapters change the function
    merged = merge_lora(trained)
    assert not has_lora(merged) and merged.config.lora_rank == 0
    np.testing.assert_allclose(np.asarray(jit_apply(merged, ids, mask)), got, atol=2e-5)
    off = adapters_off(trained)  # the reference: the same arrays, α / r = 0
    np.testing.assert_array_equal(np.asarray(jit_apply(off, ids, mask)), want)

    # ΔW of one projection is (α / r) A B: a hand check on layer 0's first adapted kernel
    proj, merged_proj = first_projection(trained), first_projection(merged)
    a, b = np.asarray(proj.lora_a[...]), np.asarray(proj.lora_b[...])
    w_base, w_merged = np.asarray(proj.kernel[...]), np.asarray(merged_proj.kernel[...])
    if scan_layers:  # layer 0 of the stack
        a, b, w_base, w_merged = a[0], b[0], w_base[0], w_merged[0]
    np.testing.assert_allclose(w_merged - w_base, (8.0 / 4) * a @ b, atol=1e-6)


def first_projection(model):
    """c_attn (GPT-2) or q_proj (Llama) of the first block (the stacked block when scanned)."""
    blocks = model.model.h if model.config.family == "gpt2" else model.model.layers
    block = blocks[0] if isinstance(blocks, nnx.List) else blocks
    return block.attn.c_attn if model.config.family == "gpt2" else block.self_attn.q_proj


def test_only_adapters_and_heads_are_trained_and_a_is_peft_init():
    model = with_lora(tiny("llama"), rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    _graphdef, params, frozen = split_trainable(model)
    paths = {"/".join(str(getattr(k, "key", k)) for k in p[:-1])
             for p, _ in jax.tree_util.tree_leaves_with_path(params)}  # fmt: skip
    assert paths == {f"model/layers/self_attn/{m}/lora_{x}" for m in ("q_proj", "v_proj")
                     for x in "ab"}  # fmt: skip
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    a = np.asarray(model.model.layers.self_attn.q_proj.lora_a[...])  # [L, D, r]
    assert a.shape == (2, 32, 2) and np.abs(a).max() <= 1 / np.sqrt(32) and a.std() > 0.05
    assert np.all(np.asarray(model.model.layers.self_attn.q_proj.lora_b[...]) == 0)
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    assert n_frozen == sum(x.size for x in jax.tree.leaves(nnx.state(tiny("llama"))))
    # a reward model trains its score head with the adapters
    rm = with_lora(RewardModel(tiny("llama").config, rngs=nnx.Rngs(0)), rank=2)
    _, params, _ = split_trainable(rm)
    assert "score" in params and "model" in params
    # the mesh rules: A is split like the kernel's rows, B like its columns
    assert logical_axes("model/layers/self_attn/q_proj/lora_a", 3) == ("layers", "embed", None)
    assert logical_axes("model/layers/0/mlp/down_proj/lora_b", 2) == (None, "embed")
    assert logical_axes("model/h/attn/c_attn/lora_b", 3) == ("layers", None, "heads")


@pytest.mark.parametrize(
    ("name", "scan_layers"), [("llama", True), ("gpt2", True), ("llama", False)]
)
def test_peft_loads_our_adapter_with_our_logits(name, scan_layers, tmp_path):
    """transformers' model + peft's LoRA from our adapter directory = our adapted model, 1e-4;
    and load_adapter reads it back into the same model (either block layout)."""
    from peft import PeftModel

    base = with_settings(from_pretrained(hf_checkpoint(name)), scan_layers=scan_layers)
    adapted = perturbed(with_lora(base, rank=4, alpha=16.0), seed=2, scale=0.2)
    save_adapter(adapted, tmp_path / "adapter", base_model=hf_checkpoint(name))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16.0 and config["peft_type"] == "LORA"
    ids, mask = left_padded_batch(3)
    ours = np.asarray(jit_apply(adapted, ids, mask))
    base_logits = torch_logits(hf_model(name), ids, mask)
    assert np.abs(ours - base_logits)[mask.astype(bool)].max() > 1e-2
    fresh = make_hf_model(name)  # (peft changes the model it wraps: not the cached one)
    fresh.load_state_dict(hf_model(name).state_dict())
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    real = mask.astype(bool)  # (padding positions' logits are not defined the same way)
    theirs = torch_logits(peft_model, ids, mask)
    np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4)
    loaded = load_adapter(base, tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(jit_apply(loaded, ids, mask)), ours, atol=1e-6)
    # the merged export is what transformers reads as a plain model
    save_pretrained(adapted, tmp_path / "merged")
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(torch_logits(merged, ids, mask)[real], ours[real], atol=1e-4)


def test_bad_lora_input_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="lora_alpha.*lora_rank"):
        SFTConfig(lora_alpha=8.0)
    with pytest.raises(ValueError, match="lora_rank"):
        SFTConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="lora_dropout"):
        SFTConfig(lora_rank=4, lora_dropout=0.1)
    model = tiny("llama")
    with pytest.raises(ValueError, match="lora_targets.*q_proj, k_proj"):
        SFTConfig(lora_rank=2, lora_targets="q_proj,c_attn").trainable(model)
    with pytest.raises(ValueError, match="lora_rank.*larger than.*32"):
        SFTConfig(lora_rank=33).trainable(model)
    with pytest.raises(ValueError, match="lora_rank must be ≥ 1"):
        with_lora(model, rank=0)
    with pytest.raises(ValueError, match="already has LoRA"):
        with_lora(with_lora(model, rank=2), rank=2)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(model, tmp_path / "none")
    assert not os.path.exists(tmp_path / "none")
    # an adapter for another base: refused, naming the file
    save_adapter(with_lora(model, rank=2), tmp_path / "ad")
    other = CausalLM(
        model.config.replace(hidden_size=16, num_heads=2, num_kv_heads=1), rngs=nnx.Rngs(0)
    )
    with pytest.raises(
        ValueError,
        match="jaxrlhf_base.json: the adapter was made for another base model .hidden_size 32, this model 16",
    ):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="SFTConfig.adapter: .* not a RewardModel's"):
        SFTConfig(adapter=str(tmp_path / "ad")).trainable(
            RewardModel(model.config, rngs=nnx.Rngs(0))
        )


@pytest.fixture(scope="module")
def llama_workspace(tmp_path_factory):
    """A tiny Llama (untied head, GQA) saved with a BPE tokenizer, prompts, pairs, SFT rows."""
    root = tmp_path_factory.mktemp("lora")
    rng = np.random.default_rng(0)
    tokenizer = train_bpe_tokenizer(sample_corpus(rng, 300), 384)
    config = ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=16, num_layers=2,
                         num_heads=2, num_kv_heads=1, intermediate_size=32,
                         max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    save_pretrained(CausalLM(config, rngs=nnx.Rngs(0)), root / "base", tokenizer=tokenizer)
    prompts = sample_prompts(rng, 16)
    rows = {
        "prefs": [{"prompt": p, "chosen": " great .", "rejected": " awful ."} for p in prompts],
        "prompts": [{"prompt": p} for p in prompts],
        "sft": [{"prompt": p, "completion": " great food ."} for p in prompts],
    }
    for name, lines in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def _peft_and_merged_logits(base_dir, out):
    import transformers
    from peft import PeftModel

    ids, mask = left_padded_batch(4, lengths=(6, 3, 5), width=6)
    auto = transformers.AutoModelForCausalLM
    base = auto.from_pretrained(base_dir).eval()
    base_logits = torch_logits(base, ids, mask)
    peft_model = PeftModel.from_pretrained(base, str(out / "policy_adapter")).eval()
    merged = auto.from_pretrained(out / "policy").eval()
    real = mask.astype(bool)  # the logits of real positions
    logits = (torch_logits(m, ids, mask)[real] for m in (peft_model, merged))
    return (base_logits[real], *logits)


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo"])
def test_trainers_with_lora_rank_4_write_policy_and_a_peft_adapter(llama_workspace, command,
                                                                   capsys):  # fmt: skip
    ws, out = llama_workspace, llama_workspace / f"{command}_lora"
    base = str(ws / "base")
    argv = {
        "sft": ["sft", "--data", str(ws / "sft.jsonl"), "--model", base, "--sft-steps", "4",
                "--sft-learning-rate", "1e-2"],
        "dpo": ["dpo", "--data", str(ws / "prefs.jsonl"), "--model", base, "--dpo-batch-size",
                "4", "--dpo-learning-rate", "1e-2"],
        "grpo": ["grpo", "--prompts", str(ws / "prompts.jsonl"), "--policy", base,
                 "--reward-fn", "test_cli:length_reward", "--grpo-num-iterations", "2",
                 "--grpo-batch-size", "2", "--grpo-group-size", "4", "--grpo-max-new-tokens", "4",
                 "--grpo-kl-coef", "0.05", "--grpo-learning-rate", "1e-2"],
    }[command]  # fmt: skip
    assert main([*argv, "--out", str(out), "--quiet", "--lora-rank", "4", *DATA_FLAGS]) == 0
    capsys.readouterr()
    assert (out / "policy" / "model.safetensors").exists()
    assert (out / "policy_adapter" / "adapter_model.safetensors").exists()
    base_logits, peft_logits, merged_logits = _peft_and_merged_logits(base, out)
    np.testing.assert_allclose(peft_logits, merged_logits, atol=1e-4)
    assert np.abs(merged_logits - base_logits).max() > 1e-3  # trained: not the base any more
    if command == "grpo":  # the run resumes its adapters-only checkpoint, and refuses a new base
        import orbax.checkpoint as ocp

        checkpoint = next((out / "checkpoints").iterdir())
        saved = str(ocp.StandardCheckpointer().metadata(checkpoint / "state"))
        assert "lora_a" in saved and "embed_tokens" not in saved  # adapters only, not the base
        other = from_pretrained(base)
        nnx.update(other, jax.tree.map(lambda x: x * 1.01, nnx.state(other)))
        save_pretrained(other, ws / "other_base", tokenizer=load_tokenizer(base))
        assert main([*argv[:4], str(ws / "other_base"), *argv[5:], "--out", str(out), "--quiet",
                     "--lora-rank", "4", *DATA_FLAGS]) == 2  # fmt: skip
        assert "adapters were trained on another base model" in capsys.readouterr().err
        assert main([*argv, "--out", str(out), "--quiet", "--lora-rank", "2", *DATA_FLAGS]) == 2
        assert "lora_rank (checkpoint 4, now 2)" in capsys.readouterr().err
        # GRPO on top of the SFT adapter (--adapter): it starts from the SFT run's function
        start = ws / "grpo_on_sft"
        sft_out = ws / "sft_lora"
        if (sft_out / "policy_adapter").exists():
            assert main([*argv, "--out", str(start), "--quiet", "--adapter",
                         str(sft_out / "policy_adapter"), "--grpo-num-iterations", "1",
                         *DATA_FLAGS]) == 0  # fmt: skip
            capsys.readouterr()
            cfg = json.loads((start / "policy_adapter" / "adapter_config.json").read_text())
            assert cfg["r"] == 4


def test_lora_flags_unprefixed_on_a_trainer_and_the_demos_own():
    """`--lora-rank` is `--grpo-lora-rank` on grpo (one trainer per command); on the demo it is the
    demo's own (the RL stage), beside each stage's prefixed flag."""
    from jaxrlhf.cli.common import get_config
    from jaxrlhf.cli.main import build_parser
    from jaxrlhf.demo import DemoConfig
    from jaxrlhf.train.grpo_config import GRPOConfig

    parser = build_parser()
    args = parser.parse_args(["grpo", "--prompts", "p", "--policy", "m", "--out", "o",
                              "--reward-fn", "a:b", "--lora-rank", "3", "--lora-targets", "q_proj"])  # fmt: skip
    config = get_config(args, GRPOConfig)
    assert config.lora_rank == 3 and config.lora_targets == "q_proj" and config.uses_lora
    args = parser.parse_args(["demo", "--lora-rank", "1", "--sft-lora-rank", "0"])
    assert get_config(args, DemoConfig).lora_rank == 1
    with pytest.raises(ValueError, match="lora_rank"):
        DemoConfig(lora_rank=-1)


def test_ppo_with_lora_trains_adapters_on_a_frozen_base_and_its_reference_is_free():
    """PPO (shared critic) with lora_rank 2: no reference copy is held; after two iterations the
    base weights are the SFT model's, bit for bit, the adapters and value head have moved, and
    the first iteration's KL to the reference is 0 (B = 0: the policy is the base)."""
    from jaxrlhf.train import PPOConfig, PPOTrainer

    sft = tiny("gpt2")
    prompts = np.random.default_rng(0).integers(3, 61, size=(8, 5)).astype(np.int32)

    def reward_fn(prompt_ids, prompt_mask, rollout):
        return jnp.mean((rollout.tokens == 7) * rollout.mask, axis=-1)  # likes token 7

    config = PPOConfig(lora_rank=2, batch_size=8, num_minibatches=2, max_new_tokens=4,
                       num_iterations=2, learning_rate=1e-2, kl_coef=0.1)  # fmt: skip
    trainer = PPOTrainer.from_sft(config, sft, prompts, np.ones_like(prompts), reward_fn=reward_fn)
    assert trainer.reference_state is None and trainer.state.train.frozen is not None
    history = trainer.train(progress=False)
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    policy = trainer.policy()
    for now, before in zip(jax.tree.leaves(nnx.state(policy.lm, nnx.Not(LoRAParam))),
                           jax.tree.leaves(nnx.state(sft))):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(now), np.asarray(before))
    adapters = jax.tree_util.tree_leaves_with_path(nnx.state(policy.lm, LoRAParam))
    moved = [float(jnp.abs(x).max()) for p, x in adapters if "lora_b" in str(p)]  # B started at 0
    assert (
        len(moved) == 4
        and min(moved) > 0
        and float(jnp.abs(policy.value_head.kernel[...]).max()) > 0
    )


def test_arithmetic_demo_with_rank_1_lora_matches_the_full_fine_tune(tmp_path):
    """`jaxrlhf demo --task arithmetic --algo grpo` with and without `--lora-rank 1`, the presets
    as they ship (the LoRA run at lora_lr_scale × the preset's rate): the held-out accuracies
    after GRPO within 0.05 ("LoRA Without Regret": rank 1 is enough for RL). Measured, seed 0:
    0.205 → 0.45 full, → 0.46 with rank 1 (seeds 1, 2: 0.365 / 0.36, 0.325 / 0.325)."""
    from jaxrlhf.demo import DemoConfig, run_demo

    after = {}
    for rank in (0, 1):
        demo = DemoConfig(task="arithmetic", algo="grpo", lora_rank=rank,
                          out_dir=str(tmp_path / f"r{rank}"), save_models=False)  # fmt: skip
        summary = run_demo(demo, progress=False, echo=lambda line: None)
        accuracy = summary["held_out_accuracy"]
        assert accuracy["after"] >= accuracy["before"] + 0.15, (rank, accuracy)
        after[rank] = accuracy["after"]
    assert abs(after[1] - after[0]) <= 0.05, after

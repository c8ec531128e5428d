"""Tool use: the tool runtime (errors, timeouts, caps), the calculator, and the rollout in turns.

The rollout tests use a random tiny GPT-2 and a call end marker the model samples often (the digit
"7"), so that episodes with calls happen without training a model to make them.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.cli.main import main
from jaxrlhf.config import ConfigError
from jaxrlhf.models import CausalLM
from jaxrlhf.models.hf import save_pretrained
from jaxrlhf.rl import masked_sum
from jaxrlhf.rollout import SamplingConfig, sample
from jaxrlhf.tasks.arithmetic_problems import char_tokenizer
from jaxrlhf.tools import Toolbox, ToolConfig, calculator, call_text, load_tool, sample_turns
from jaxrlhf.train.grpo import GRPOTrainer, text_reward_fn
from jaxrlhf.train.grpo_config import GRPOConfig
from jaxrlhf.train.sft import tiny_model_config

MARKERS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


def tail(call: str) -> str:
    """A tool for these tests: the last two characters of the call, after a '+'."""
    return "+" + call[-2:]


def boom(call: str) -> str:
    raise RuntimeError("the tool broke")


def sleepy(call: str) -> str:
    time.sleep(2.0)
    return "late"


def not_text(call: str):
    return 42


@pytest.fixture(scope="module")
def world():
    tokenizer = char_tokenizer("0123456789+*=")
    tokenizer.add_tokens(MARKERS)
    lm = CausalLM(tiny_model_config(len(tokenizer), max_position_embeddings=64), rngs=nnx.Rngs(0))
    enc = tokenizer(["12+3=", "7*8=", "40+2="], padding=True, return_tensors="np")
    return tokenizer, lm, enc["input_ids"], enc["attention_mask"]


# ---------------------------------------------------------------------- the tool runtime


def test_calculator_is_exact_integer_arithmetic_and_nothing_else():
    assert calculator("123*45") == "5535"
    assert calculator(" (7 - 10) * 3 + 100 // 7 ") == str((7 - 10) * 3 + 100 // 7)
    assert calculator("84/12") == "7"
    assert calculator('{"name": "calculator", "arguments": {"expression": "6*7"}}') == "42"
    for bad in ("2**100000", "__import__('os')", "1/0", "7/2", "1.5*2", "x+1", "9*" * 40 + "9"):
        with pytest.raises(ValueError):
            calculator(bad)


def test_a_failing_slow_or_odd_tool_answers_with_an_error_text():
    config = ToolConfig(timeout_s=0.2, max_response_chars=5)
    assert Toolbox([boom], config)("x") == "error"[:5]
    full = Toolbox([boom, sleepy, not_text, tail], ToolConfig(timeout_s=0.2))
    assert full('{"name": "boom"}') == "error: RuntimeError: the tool broke"
    start = time.perf_counter()
    assert full("sleepy now") == "error: sleepy timed out after 0.2 s"
    assert time.perf_counter() - start < 1.5  # the call was not waited for
    assert full("not_text") == "error: not_text returned int, not str"
    assert full("nope 1+1").startswith("error: no tool named 'nope'")
    assert full('{"name": "tail", "arguments": {}}') == "+}}"  # the whole call reaches the tool
    assert Toolbox([tail], ToolConfig(max_response_chars=2))("abc") == "+b"


def test_tool_flags_and_configs_are_checked():
    assert load_tool("jaxrlhf.tools:calculator") is calculator
    for spec, match in (("nocolon", "module:function"), ("no_such_module:f", "cannot import"),
                        ("jaxrlhf.tools:nothing", "no function")):  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=match):
            load_tool(spec)
    for field, value in (("max_turns", 0), ("call_end", ""), ("timeout_s", 0.0)):
        with pytest.raises(ConfigError, match=field):
            ToolConfig(**{field: value})
    with pytest.raises(ValueError, match="share a name"):
        Toolbox([tail, tail])


def test_call_text_is_the_text_of_the_call_that_just_closed():
    c = ToolConfig()
    assert call_text("think<tool_call>12*3</tool_call>", c) == "12*3"
    text = (
        "<tool_call>1+1</tool_call><tool_response>2</tool_response> then <tool_call>2*5</tool_call>"
    )
    assert call_text(text, c) == "2*5"
    assert call_text("<tool_response>2</tool_response>3*3</tool_call>", c) == "3*3"
    assert call_text("4*4</tool_call>", c) == "4*4"


# ---------------------------------------------------------------------- the rollout in turns


def turns(world, toolbox, *, n=30, group_size=3, seed=1):
    tokenizer, lm, ids, mask = world
    return sample_turns(lm, ids, mask, SamplingConfig(max_new_tokens=n), jax.random.key(seed),
                        toolbox=toolbox, tokenizer=tokenizer, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=0, group_size=group_size)  # fmt: skip


def test_without_a_call_the_episode_is_exactly_what_sample_draws(world):
    tokenizer, lm, ids, mask = world
    never = Toolbox([tail], ToolConfig(call_end="9999999999"))
    r = turns(world, never)
    plain = sample(lm, ids, mask, SamplingConfig(max_new_tokens=30), jax.random.key(1),
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=0, group_size=3)  # fmt: skip
    np.testing.assert_array_equal(r.tokens, plain.tokens)
    np.testing.assert_array_equal(r.mask, plain.mask)
    np.testing.assert_array_equal(r.attention, plain.mask)
    np.testing.assert_allclose(r.logprobs, plain.logprobs, atol=1e-6)
    assert int(jnp.sum(r.tool_calls)) == 0


def _expected_inserts(tokenizer, toolbox, tokens, attention, mask):
    """Replay an episode on the host: after each answered call, the tokens the tool should add."""
    real = [int(t) for t, a in zip(tokens, attention) if a]
    policy = [bool(m) for m, a in zip(mask, attention) if a]
    expected, calls, j = [], 0, 0
    while j < len(real):
        expected.append(True)
        closes = tokenizer.decode(real[: j + 1]).endswith(toolbox.config.call_end)
        if policy[j] and closes and calls < toolbox.config.max_turns:
            answer = toolbox(call_text(tokenizer.decode(real[: j + 1]), toolbox.config))
            inserted = tokenizer.encode(toolbox.wrap(answer), add_special_tokens=False)
            inserted = inserted[: toolbox.config.max_response_tokens]
            n = min(len(inserted), len(real) - j - 1)
            assert real[j + 1 : j + 1 + n] == inserted[:n]
            expected += [False] * n
            j, calls = j + n, calls + 1
        j += 1
    return expected, calls


def test_tool_tokens_are_inserted_with_mask_0_and_read_as_the_training_pass_reads_them(world):
    tokenizer, lm, ids, mask = world
    box = Toolbox([tail], ToolConfig(call_end="7", max_turns=2, max_response_tokens=6,
                                     response_start="=", response_end="="))  # fmt: skip
    r = turns(world, box)
    calls = np.asarray(r.tool_calls)
    assert calls.sum() >= 2 and calls.max() <= 2  # (this seed makes calls; at most max_turns)
    for row in range(len(calls)):
        tokens, attention, policy = (np.asarray(x[row]) for x in (r.tokens, r.attention, r.mask))
        expected, n_calls = _expected_inserts(tokenizer, box, tokens, attention, policy)
        assert [bool(m) for m, a in zip(policy, attention) if a] == expected
        assert n_calls == calls[row]
        assert np.all(policy <= attention)  # a hole is a tool's token, never padding
    # log π at the policy's tokens, re-scored from the whole episode (the tools' tokens attended
    # to, as the trainer does), equals what the KV-cache rollout recorded: the same conditioning.
    rescored, _ = lm.response_logprobs(jnp.asarray(ids), jnp.asarray(mask), r.tokens, r.attention,
                                       group_size=3)  # fmt: skip
    gap = jnp.where(r.mask > 0, rescored - r.logprobs, 0.0)
    assert float(jnp.max(jnp.abs(gap))) < 1e-4
    assert float(jnp.sum(r.attention - r.mask)) > 0  # some tokens were the tool's


def test_a_tool_that_raises_gives_the_policy_an_error_text_and_the_run_goes_on(world):
    tokenizer = world[0]
    box = Toolbox([boom], ToolConfig(call_end="7", max_turns=1, max_response_tokens=64))
    r = turns(world, box)
    rows = np.flatnonzero(np.asarray(r.tool_calls))
    assert len(rows)
    for row in rows:
        hole = (np.asarray(r.attention[row]) > 0) & (np.asarray(r.mask[row]) == 0)
        inserted = tokenizer.decode(np.asarray(r.tokens[row])[hole])
        # the char tokenizer has no letters: the error text arrives as <unk>s between the markers
        assert inserted.startswith("<tool_response>") and "<unk>" in inserted


# ---------------------------------------------------------------------- training with tools


def test_grpo_trains_on_episodes_with_tool_calls(world):
    tokenizer, lm, ids, mask = world
    import functools

    box = Toolbox([tail], ToolConfig(call_end="7", max_turns=1, max_response_tokens=5))
    sampler = functools.partial(sample_turns, toolbox=box, tokenizer=tokenizer)
    reward = text_reward_fn([lambda p, c: [float(c.count("+")) for c in c]], tokenizer)
    config = GRPOConfig(num_iterations=2, batch_size=3, group_size=4, max_new_tokens=12,
                        learning_rate=1e-3)  # fmt: skip
    trainer = GRPOTrainer.from_sft(config, lm, ids, mask, reward_fn=reward, sampler=sampler,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=0)  # fmt: skip
    assert not trainer.one_program  # the host answers the calls
    history = trainer.train(progress=False)
    assert all(np.isfinite(m["loss/policy"]) for m in history)
    assert any(m["tools/calls_per_episode"] > 0 for m in history)
    # the mean length counts the policy's tokens only, never the tool's
    prompts = jnp.repeat(jnp.asarray(ids), 4, axis=0)
    groups = trainer._sample_groups(trainer.state.train.model_params(), np.arange(3), 0,
                                    [jax.random.key(0)])[0]  # fmt: skip
    rollout = groups[2]
    assert groups[0].shape == prompts.shape
    assert float(masked_sum(rollout.mask, rollout.mask)) < float(jnp.sum(rollout.attention))


def test_the_grpo_command_runs_with_a_tool(tmp_path, capsys):
    tokenizer = char_tokenizer("0123456789+*=")
    tokenizer.add_tokens(MARKERS)
    lm = CausalLM(tiny_model_config(len(tokenizer), max_position_embeddings=64), rngs=nnx.Rngs(0))
    save_pretrained(lm, tmp_path / "base", tokenizer=tokenizer)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in ("12*3=", "7*8=", "4+4=", "9*9="))
    out = tmp_path / "out"
    argv = [
        "grpo",
        "--prompts",
        str(tmp_path / "prompts.jsonl"),
        "--policy",
        str(tmp_path / "base"),
    ]
    argv += ["--reward-fn", "test_tools:plus_count", "--out", str(out), "--quiet"]
    argv += ["--tool", "test_tools:tail", "--tool-call-end", "7", "--max-turns", "1"]
    argv += ["--grpo-num-iterations", "2", "--grpo-batch-size", "2", "--grpo-group-size", "4"]
    argv += ["--grpo-max-new-tokens", "12", "--log-samples-every", "1"]
    assert main(argv) == 0
    last = json.loads(capsys.readouterr().out)
    assert "tools/calls_per_episode" in last
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    calls = [json.loads(line)["tools/calls_per_episode"] for line in metrics]
    assert len(calls) == 2 and max(calls) > 0
    assert "<tool_response>" in (out / "report.md").read_text()  # the samples show the turns
    with pytest.raises(SystemExit, match="module:function"):
        main([*argv[:7], "--tool", "nocolon", "--out", str(tmp_path / "x")])


def test_the_ppo_command_runs_with_a_tool(tmp_path, capsys):
    """`jaxrlhf ppo --tool`: PPO's episodes in turns, against a reward model on disk."""
    from jaxrlhf.models import RewardModel

    tokenizer = char_tokenizer("0123456789+*=")
    tokenizer.add_tokens(MARKERS)
    config = tiny_model_config(len(tokenizer), max_position_embeddings=64)
    save_pretrained(CausalLM(config, rngs=nnx.Rngs(0)), tmp_path / "base", tokenizer=tokenizer)
    save_pretrained(RewardModel(config, rngs=nnx.Rngs(1)), tmp_path / "rm", tokenizer=tokenizer)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in ("12*3=", "7*8=", "4+4=", "9*9="))
    out = tmp_path / "out"
    argv = ["ppo", "--prompts", str(tmp_path / "prompts.jsonl"), "--policy", str(tmp_path / "base")]
    argv += ["--reward-model", str(tmp_path / "rm"), "--out", str(out), "--quiet"]
    argv += ["--tool", "test_tools:tail", "--tool-call-end", "7", "--max-turns", "1"]
    argv += ["--ppo-num-iterations", "2", "--ppo-batch-size", "4", "--ppo-num-minibatches", "1"]
    argv += ["--ppo-max-new-tokens", "12", "--log-samples-every", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    calls = [m["tools/calls_per_episode"] for m in metrics]
    assert len(calls) == 2 and max(calls) > 0 and max(calls) <= 1
    assert "<tool_response>" in (out / "report.md").read_text()


def plus_count(prompts, completions):
    """A --reward-fn for the command test: the '+' signs of each transcript."""
    return [float(c.count("+")) for c in completions]


def test_ppo_trains_on_episodes_with_tool_calls(world):
    """PPO with the rollout in turns: the critic's values and the log-probs are read at the
    policy's tokens of the whole episode; the tools' tokens get no reward, value or advantage."""
    import functools

    from jaxrlhf.train.experience import score_rollout
    from jaxrlhf.train.ppo import PPOTrainer
    from jaxrlhf.train.ppo_config import PPOConfig

    tokenizer, lm, ids, mask = world
    box = Toolbox([tail], ToolConfig(call_end="7", max_turns=1, max_response_tokens=5))
    sampler = functools.partial(sample_turns, toolbox=box, tokenizer=tokenizer)
    reward = text_reward_fn([lambda p, c: [float(c.count("+")) for c in c]], tokenizer)
    config = PPOConfig(num_iterations=2, batch_size=3, max_new_tokens=16, kl_coef=0.1,
                       missing_eos_penalty=None)  # fmt: skip
    trainer = PPOTrainer.from_sft(config, lm, ids, mask, reward_fn=reward, sampler=sampler,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=0)  # fmt: skip
    history = trainer.train(progress=False)
    assert all(np.isfinite(m["loss/policy_avg"]) for m in history)
    assert "tools/calls_per_episode" in history[-1]
    # one rollout with calls, scored as the trainer scores it
    rollout = sampler(lm, ids, mask, config.sampling, jax.random.key(1), pad_token_id=0,
                      eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    assert int(jnp.sum(rollout.tool_calls)) > 0
    c, params = trainer.config, trainer.state.train.model_params()
    exp, _ = score_rollout(
        params, trainer.reference_state, jnp.asarray(ids), jnp.asarray(mask), rollout,
        jnp.ones((3,)), 0.1, policy_graphdef=trainer.graphdef,
        reference_graphdef=trainer.reference_graphdef, kl_estimator=c.kl_estimator, gamma=c.gamma,
        lam=c.lam, temperature=c.temperature, whiten_rewards=False, use_sampler_logprobs=False,
        eos_token_id=None,
    )  # fmt: skip
    holes = np.asarray((rollout.attention > 0) & (rollout.mask == 0))
    for name in ("logprobs", "values", "rewards", "advantages", "returns"):
        assert np.all(np.asarray(getattr(exp, name))[holes] == 0), name
    np.testing.assert_array_equal(exp.attention_mask, rollout.attention)


def test_a_chat_template_that_takes_tools_is_given_their_schemas():
    from jaxrlhf.data.preference import DataConfig, tokenize_prompts
    from jaxrlhf.tools import tool_schema

    tokenizer = char_tokenizer("0123456789+*=:abcdefghijklmnopqrstuvwxyz ")
    tokenizer.chat_template = (
        "{% for t in tools or [] %}tools:{{ t['function']['name'] }} {% endfor %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    chats = [{"prompt": [{"role": "user", "content": "12*3="}]}]
    config = DataConfig(max_prompt_length=64)
    with_tools = tokenize_prompts(chats, tokenizer, config, tools=[tool_schema(calculator)])
    plain = tokenize_prompts(chats, tokenizer, config)
    decode = tokenizer.decode
    assert (
        decode(with_tools.input_ids[0][with_tools.attention_mask[0] > 0])
        == "tools:calculator 12*3="
    )
    assert decode(plain.input_ids[0][plain.attention_mask[0] > 0]) == "12*3="

"""The calculator task: tokenizer with single-token markers, problems, exact reward, SFT examples."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrlhf.tasks.calculator_task import (
    MARKERS,
    answer,
    build_calculator_task,
    calculator_tokenizer,
    correctness_reward,
    demonstration,
    final_answer,
    format_reward,
    reward,
)


@pytest.fixture(scope="module")
def task():
    return build_calculator_task(0, num_train=300, num_eval=50)


def test_markers_are_single_tokens_and_round_trip():
    tok = calculator_tokenizer()
    ids = {tok.encode(m, add_special_tokens=False)[0] for m in MARKERS}
    assert all(len(tok.encode(m, add_special_tokens=False)) == 1 for m in MARKERS)
    assert len(ids) == 4 and len(tok) == 22
    text = "123*45=<tool_call>123*45</tool_call><tool_response>5535</tool_response>5535"
    ids = tok.encode(text + "<eos>", add_special_tokens=False)
    assert len(ids) == 7 + 1 + 6 + 1 + 1 + 4 + 1 + 4 + 1
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text  # markers kept, EOS dropped


def test_reward_reads_the_final_answer_after_the_last_tool_response():
    p = ["123*45="] * 6
    c = [
        "5535",  # direct, right
        "<tool_call>123*45</tool_call><tool_response>5535</tool_response>5535",  # after the tool
        "5536",  # wrong number
        "<tool_call>123*45</tool_call><tool_response>5535</tool_response>",  # only the tool said it
        "<tool_call>123*45</tool_call><tool_response>5535</tool_response>55 35",
        "<tool_call>123*45</tool_call>",  # a call left unanswered
    ]
    assert answer("123*45=") == "5535"
    assert correctness_reward(p, c) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert format_reward(p, c) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert reward(p, c) == pytest.approx([1.1, 1.1, 0.1, 0.0, 0.0, 0.0])
    assert final_answer("<tool_response>1</tool_response>7<eos>9") == "7"
    with pytest.raises(ValueError):
        correctness_reward(p, c[:2])


def test_splits_are_seeded_disjoint_products(task):
    again = build_calculator_task(0, num_train=300, num_eval=50)
    assert again.train_prompts == task.train_prompts and again.eval_prompts == task.eval_prompts
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert len(set(task.train_prompts)) == 300 and len(task.eval_prompts) == 50
    for p in task.train_prompts[:50]:
        a, b = p[:-1].split("*")
        assert 100 <= int(a) <= 999 and 10 <= int(b) <= 99
    assert build_calculator_task(1, num_train=300, num_eval=50).train_prompts != task.train_prompts


def test_sft_examples_mask_the_tool_response_out_of_the_loss(task):
    ids, mask, loss_mask, _ = task.sft_batch(tool_rate=0.4)
    P, tok = task.max_prompt_length, task.tokenizer
    assert ids.shape == (300, P + task.max_new_tokens) == loss_mask.shape
    uses = task.tool_choices(300, 0.4)
    assert 0.3 < uses.mean() < 0.5
    for i in range(20):
        prompt = task.train_prompts[i]
        call, response, result = demonstration(prompt, bool(uses[i]))
        row = ids[i][mask[i] > 0].tolist()
        assert (
            tok.decode(row, skip_special_tokens=False)
            == prompt + call + response + result + "<eos>"
        )
        learnt = tok.decode(ids[i][loss_mask[i] > 0].tolist(), skip_special_tokens=False)
        assert learnt == call + result + "<eos>"  # the policy's tokens only
    np.testing.assert_array_equal(loss_mask[:, :P], 0)
    assert set(np.unique(loss_mask)) <= {0, 1} and np.all(loss_mask <= mask)


def test_evaluate_runs_greedy_tool_episodes(task):
    from flax import nnx

    from jaxrlhf.models import CausalLM
    from jaxrlhf.train.sft import tiny_model_config

    width = task.max_prompt_length + task.max_new_tokens
    lm = CausalLM(
        tiny_model_config(task.vocab_size, max_position_embeddings=width), rngs=nnx.Rngs(0)
    )
    prompts = task.eval_prompts[:6]
    result = task.evaluate(lm, prompts, batch_size=4)
    assert set(result) == {"accuracy", "tool_calls"}
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["tool_calls"] <= 1.0
    muted = task.evaluate(lm, prompts, toolbox=task.toolbox(mute_tool=True), batch_size=4)
    assert muted["tool_calls"] == result["tool_calls"]  # greedy: the same calls, up to the answer


def test_the_calculator_demo_learns_to_call_the_tool(tmp_path):
    """``jaxrlhf demo --task calculator --algo grpo`` with its presets (about a minute): the issue's
    bar — accuracy after ≥ 0.6 and ≥ before + 0.2, more calls, and without the tool ≤ after − 0.3."""
    import json

    from jaxrlhf.demo import DemoConfig, run_demo

    demo = DemoConfig(task="calculator", algo="grpo", out_dir=str(tmp_path))
    summary = run_demo(demo, progress=False, echo=lambda line: None)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    accuracy, calls = summary["held_out_accuracy"], summary["tool_calls_per_episode"]
    assert accuracy["after"] >= max(0.6, accuracy["before"] + 0.2), summary
    assert calls["after"] > calls["before"], summary
    assert summary["held_out_accuracy_without_tool"] <= accuracy["after"] - 0.3, summary
    report = (tmp_path / "report.md").read_text()
    assert "&lt;tool_response>" in report  # the episodes shown hold the calculator's turns
    assert (tmp_path / "plots" / "tool_calls.png").exists()

"""Best-of-n sampling: the library function (jaxrlhf.best_of) and ``jaxrlhf generate --best-of``.

transformers is the oracle of the scores: the exported reward model, run by transformers on each
candidate's prompt ⧺ response tokens, gives the score ``generate`` reports and keeps the best by.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from models_utils import hf_scores

from jaxrlhf.best_of import best_of_n
from jaxrlhf.cli import main
from jaxrlhf.data.demo_task import sample_corpus
from jaxrlhf.data.preference import DataConfig, tokenize_prompts
from jaxrlhf.models import CausalLM, RewardModel, from_pretrained, save_pretrained
from jaxrlhf.models.tokenizer import load_tokenizer, train_bpe_tokenizer
from jaxrlhf.rollout import SamplingConfig
from jaxrlhf.train.experience import reward_model_fn
from jaxrlhf.train.sft import tiny_model_config

PROMPTS = ["the food was", "the staff", "our room was very"]
N, NEW = 6, 5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny policy and a tiny reward model (random, sharing a BPE tokenizer), saved."""
    root = tmp_path_factory.mktemp("best_of")
    tokenizer = train_bpe_tokenizer(sample_corpus(np.random.default_rng(0), 200), 320)
    config = tiny_model_config(len(tokenizer), hidden_size=16, num_layers=1,
                               max_position_embeddings=32)  # fmt: skip
    save_pretrained(CausalLM(config, rngs=nnx.Rngs(0)), root / "policy", tokenizer=tokenizer)
    reward_model = RewardModel(config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)  # a head that tells candidates apart
    state = nnx.state(reward_model, nnx.Param)
    nnx.update(reward_model, jax.tree.map(lambda x: x + rng.normal(0, 0.3, x.shape), state))
    save_pretrained(reward_model, root / "rm", tokenizer=tokenizer)
    return root


def length_reward(prompts, completions):
    """A rule: the number of characters (a --reward-fn for the tests)."""
    return [float(len(c)) for c in completions]


def generate(workspace, *flags):
    argv = ["generate", "--model", str(workspace / "policy"), "--max-new-tokens", str(NEW)]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    return main([*argv, *flags])


def test_generate_best_of_keeps_the_highest_score_and_transformers_agrees(workspace, capsys):
    out = workspace / "best.jsonl"
    flags = ["--best-of", str(N), "--reward-model", str(workspace / "rm"), "--out", str(out)]
    assert generate(workspace, *flags) == 0
    assert capsys.readouterr().out == ""  # the lines went to --out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == PROMPTS
    for row in rows:
        scores = [c["score"] for c in row["candidates"]]
        assert len(scores) == N and len(set(scores)) == N  # distinct: the argmax is unambiguous
        best = int(np.argmax(scores))
        assert row["score"] == max(scores)
        assert row["completion"] == row["candidates"][best]["completion"]

    # The same draw through the library (what generate runs): its token ids, scored by transformers.
    tokenizer = load_tokenizer(workspace / "policy")
    batch = tokenize_prompts({"prompt": PROMPTS}, tokenizer, DataConfig())
    reward_model = from_pretrained(workspace / "rm", head="reward")
    result = best_of_n(
        from_pretrained(workspace / "policy"), batch.input_ids, batch.attention_mask,
        reward_model_fn(reward_model), n=N, config=SamplingConfig(max_new_tokens=NEW),
        rng=jax.random.PRNGKey(0), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    reported = np.array([[c["score"] for c in row["candidates"]] for row in rows])
    np.testing.assert_allclose(np.asarray(result.scores), reported, rtol=1e-6)
    prompt_ids, prompt_mask = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
    tokens, mask = np.asarray(result.candidates.tokens), np.asarray(result.candidates.mask)
    sequences = [
        prompt_ids[r // N][prompt_mask[r // N] > 0].tolist() + tokens[r][mask[r] > 0].tolist()
        for r in range(len(PROMPTS) * N)
    ]
    bias = json.loads((workspace / "rm" / "config.json").read_text()).get("jaxrlhf_score_bias", 0)
    theirs = hf_scores(workspace / "rm", sequences).reshape(len(PROMPTS), N) + bias
    np.testing.assert_allclose(theirs, reported, atol=1e-4)
    np.testing.assert_array_equal(np.argmax(theirs, axis=1), [np.argmax(s) for s in reported])
    kept = np.asarray(result.kept.tokens)
    np.testing.assert_array_equal(
        kept, tokens[np.arange(len(PROMPTS)) * N + np.asarray(result.best)]
    )


def test_generate_best_of_with_a_reward_function_on_stdout(workspace, capsys):
    assert generate(workspace, "--best-of", "4", "--reward-fn", "test_best_of:length_reward") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(PROMPTS)
    for row in rows:
        lengths = [len(c["completion"]) for c in row["candidates"]]
        assert [c["score"] for c in row["candidates"]] == [float(x) for x in lengths]
        assert len(row["completion"]) == max(lengths) and row["score"] == max(lengths)


def test_generate_best_of_bad_flags(workspace, tmp_path):
    rm = ["--reward-model", str(workspace / "rm")]
    with pytest.raises(SystemExit, match="--best-of 0: must be ≥ 1"):
        generate(workspace, "--best-of", "0", *rm)
    with pytest.raises(SystemExit, match="--best-of 3 keeps the best-scored .* --reward-model"):
        generate(workspace, "--best-of", "3")
    with pytest.raises(SystemExit, match="not both"):
        generate(workspace, "--best-of", "2", *rm, "--reward-fn", "test_best_of:length_reward")
    with pytest.raises(SystemExit, match="does not exist"):
        generate(workspace, "--best-of", "2", *rm, "--out", str(tmp_path / "no" / "x.jsonl"))
    with pytest.raises(SystemExit, match="is a directory"):
        generate(workspace, "--best-of", "2", *rm, "--out", str(tmp_path))
    with pytest.raises(ValueError, match="n=0"):
        best_of_n(None, np.zeros((1, 2), np.int32), np.ones((1, 2), np.int32), length_reward,
                  n=0, config=SamplingConfig(), rng=jax.random.PRNGKey(0))  # fmt: skip


def test_an_existing_out_file_is_replaced_whole(workspace):
    out = workspace / "replaced.jsonl"
    out.write_text("old line\n" * 10)
    assert generate(workspace, "--out", str(out)) == 0  # plain sampling writes to --out too
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == PROMPTS and "score" not in rows[0]
    assert not list(workspace.glob("replaced.jsonl.*.tmp"))

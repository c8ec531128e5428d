"""Two-iteration smoke runs of every `jaxrlhf` command, end to end through the real code path."""

import json
import os
import shlex
import shutil

import numpy as np
import pytest
from flax import nnx

from jaxrlhf.cli import main
from jaxrlhf.data.demo_task import sample_corpus, sample_prompts
from jaxrlhf.logging import read_metrics
from jaxrlhf.models import CausalLM
from jaxrlhf.models.hf import from_pretrained, save_pretrained
from jaxrlhf.models.tokenizer import train_bpe_tokenizer
from jaxrlhf.train.sft import tiny_model_config

DATA_FLAGS = ["--data-max-prompt-length", "20", "--data-max-response-length", "8"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base LM (HF directory with tokenizer), preference pairs and prompts, on disk."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    corpus = sample_corpus(rng, 300)
    tokenizer = train_bpe_tokenizer(corpus, 384)
    model = CausalLM(
        tiny_model_config(len(tokenizer), hidden_size=16, num_layers=1, max_position_embeddings=32),
        rngs=nnx.Rngs(0),
    )
    save_pretrained(model, root / "base", tokenizer=tokenizer)
    prompts = sample_prompts(rng, 16)
    with open(root / "prefs.jsonl", "w") as f:
        f.writelines(
            json.dumps({"prompt": p, "chosen": " great .", "rejected": " awful ."}) + "\n"
            for p in prompts
        )
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    return root


def test_generate(workspace, capsys):
    argv = ["generate", "--model", str(workspace / "base"), "--prompt", "the food was"]
    assert (
        main([*argv, "--prompt", "the room was", "--max-new-tokens", "4", "--greedy", *DATA_FLAGS])
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["the food was", "the room was"]
    assert all(isinstance(line["completion"], str) for line in lines)


def test_train_rm_then_ppo_then_resume(workspace, capsys):
    rm_out, ppo_out = workspace / "rm", workspace / "ppo"
    argv = [
        "train-rm",
        "--data",
        str(workspace / "prefs.jsonl"),
        "--model",
        str(workspace / "base"),
    ]
    argv += ["--out", str(rm_out), "--rm-epochs", "2", "--rm-batch-size", "4", "--quiet"]
    assert main(argv + DATA_FLAGS) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_train_pairs"] + summary["num_eval_pairs"] == 16
    assert len(read_metrics(rm_out / "metrics.jsonl")) == 2 * (summary["num_train_pairs"] // 4)
    reward_model = from_pretrained(rm_out / "reward_model", head="reward")
    assert reward_model.config.vocab_size == from_pretrained(workspace / "base").config.vocab_size

    ppo = [
        "ppo",
        "--prompts",
        str(workspace / "prompts.jsonl"),
        "--policy",
        str(workspace / "base"),
    ]
    ppo += ["--reward-model", str(rm_out / "reward_model"), "--out", str(ppo_out), "--quiet"]
    ppo += ["--ppo-batch-size", "4", "--ppo-max-new-tokens", "4", "--ppo-epochs", "1"]
    ppo += ["--ppo-lr-schedule", "constant"]  # so that the run may be extended on resume
    assert main([*ppo, "--ppo-num-iterations", "2", *DATA_FLAGS]) == 0
    records = read_metrics(ppo_out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["objective/kl"]) for r in records)
    assert os.path.exists(ppo_out / "report.md") and os.path.exists(ppo_out / "policy/config.json")
    # Asking for 3 iterations in the same directory resumes from the checkpoint at 2.
    assert main([*ppo, "--ppo-num-iterations", "3", *DATA_FLAGS]) == 0
    assert [r["step"] for r in read_metrics(ppo_out / "metrics.jsonl")] == [1, 2, 3]
    capsys.readouterr()
    # A setting that changes the run is refused on resume, naming it (the checkpoints survive).
    assert main([*ppo, "--ppo-num-iterations", "4", "--ppo-seed", "7", *DATA_FLAGS]) == 2
    assert "seed (checkpoint 0, now 7)" in capsys.readouterr().err
    # --no-resume over an earlier run's checkpoints: refused, nothing deleted.
    with pytest.raises(SystemExit, match="holds the checkpoints of an earlier run"):
        main([*ppo, "--no-resume", *DATA_FLAGS])
    assert sorted(os.listdir(ppo_out / "checkpoints")) == ["2", "3"]
    # A linear learning-rate decay is laid out over num_iterations: extending it is refused.
    linear = [a if a != "constant" else "linear" for a in ppo]
    linear[linear.index("--out") + 1] = str(workspace / "ppo_linear")
    assert main([*linear, "--ppo-num-iterations", "1", *DATA_FLAGS]) == 0
    assert main([*linear, "--ppo-num-iterations", "2", *DATA_FLAGS]) == 2
    assert "num_iterations (checkpoint 1, now 2)" in capsys.readouterr().err


def test_bad_flag_value_names_the_field(workspace, capsys):
    argv = [
        "ppo",
        "--prompts",
        str(workspace / "prompts.jsonl"),
        "--policy",
        str(workspace / "base"),
    ]
    argv += ["--reward-model", str(workspace / "base"), "--out", str(workspace / "bad")]
    assert main([*argv, "--ppo-clip-eps", "1.5"]) == 2
    assert capsys.readouterr().err == "error: --ppo-clip-eps 1.5: must be in (0, 1)\n"
    # Every invalid flag at once, each by its flag (the doubled --ppo-ppo-epochs is --ppo-epochs).
    assert main([*argv, "--ppo-clip-eps", "1.5", "--ppo-epochs", "0", "--ppo-gamma", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for part in ("--ppo-clip-eps 1.5: ", "--ppo-epochs 0: ", "--ppo-gamma 2.0: "):
        assert part in err


def test_bad_data_names_the_row_and_column(workspace, capsys):
    bad = workspace / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "the food was", "chosen": " good .", "rejected": ""}) + "\n"
    )
    argv = ["train-rm", "--data", str(bad), "--model", str(workspace / "base"), "--out", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "rejected" in err and "row 0" in err


# ------------------------------------------------------------------- the formats, through the CLI


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """A tiny LM with 128 positions on the data tests' tokenizer, and a file in each format."""
    from data_utils import TEXT_ROWS, tokenizer, write
    from test_data_formats import HH_ROWS, UF_ROWS
    from test_data_sft import CHATS, COMPLETIONS, TEXT

    root = tmp_path_factory.mktemp("formats")
    tok = tokenizer()
    config = tiny_model_config(len(tok), hidden_size=16, num_layers=1, max_position_embeddings=128)
    save_pretrained(CausalLM(config, rngs=nnx.Rngs(0)), root / "base", tokenizer=tok)
    renamed = [
        {"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in TEXT_ROWS
    ]
    files = {
        "hh": HH_ROWS,
        "uf": UF_ROWS,
        "renamed": renamed,
        "text": TEXT,
        "completions": COMPLETIONS,
        "chats": CHATS,
    }
    for name, rows in files.items():
        os.makedirs(root / name)
        files[name] = write(rows, str(root / name), "parquet" if name == "uf" else "jsonl")
    files["base"] = str(root / "base")
    files["root"] = root
    return files


@pytest.mark.parametrize(
    "name, flags, line, pairs",
    [
        ("hh", ["--data-max-prompt-length", "64"], "implicit-prompt format (text)", 2),
        ("uf", ["--rm-margin-from-scores"], "1 pair with equal scores dropped; 2 pairs", 2),
        (
            "renamed",
            ["--data-prompt-column", "question", "--data-chosen-column", "good"]
            + ["--data-rejected-column", "bad"],
            "explicit-prompt format (text): columns 'question', 'good', 'bad'; 3 pairs",
            3,
        ),
    ],
)
def test_train_rm_one_step_on_each_preference_format(formats, capsys, name, flags, line, pairs):
    out = formats["root"] / f"rm_{name}"
    argv = ["train-rm", "--data", formats[name], "--model", formats["base"], "--out", str(out)]
    argv += ["--rm-batch-size", str(pairs), "--rm-epochs", "1", "--rm-eval-fraction", "0"]
    assert main([*argv, "--no-normalize", "--quiet", *flags]) == 0
    captured = capsys.readouterr()
    assert line in captured.err
    summary = json.loads(captured.out)
    assert summary["num_train_pairs"] == pairs and summary["num_eval_pairs"] == 0
    assert len(read_metrics(out / "metrics.jsonl")) == 1
    assert line in (out / "report.md").read_text()
    from_pretrained(out / "reward_model", head="reward")


def test_margin_from_scores_needs_scores(formats):
    argv = ["train-rm", "--data", formats["hh"], "--model", formats["base"], "--out", "x"]
    with pytest.raises(SystemExit, match="--rm-margin-from-scores needs scored data"):
        main([*argv, "--rm-margin-from-scores"])


@pytest.mark.parametrize(
    "name, fmt", [("text", "text"), ("completions", "prompt-completion"), ("chats", "messages")]
)
def test_sft_one_step_on_each_format_then_resume(formats, capsys, name, fmt):
    out = formats["root"] / f"sft_{name}"
    argv = ["sft", "--data", formats[name], "--model", formats["base"], "--out", str(out)]
    argv += ["--sft-batch-size", "2", "--sft-warmup-steps", "0", "--sft-checkpoint-every", "1"]
    argv += ["--sft-learning-rate", "1e-2", "--sft-eval-fraction", "0", "--quiet"]
    assert main([*argv, "--sft-steps", "1"]) == 0
    captured = capsys.readouterr()
    assert f"SFT {fmt} format" in captured.err
    summary = json.loads(captured.out)
    assert summary["format"] == fmt and summary["steps"] == 1 and summary["num_train"] == 2
    assert os.path.exists(out / "report.md") and os.listdir(out / "checkpoints") == ["1"]
    policy = from_pretrained(out / "policy")
    assert policy.config.max_position_embeddings == 128
    if name != "chats":
        return
    # A two-step run interrupted after its first checkpoint resumes from it.
    shutil.rmtree(out)
    assert main([*argv, "--sft-steps", "2"]) == 0
    first = read_metrics(out / "metrics.jsonl")
    shutil.rmtree(out / "checkpoints" / "2")
    capsys.readouterr()
    assert main([*argv, "--sft-steps", "2"]) == 0
    assert "resuming from" in capsys.readouterr().err
    again = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2]
    np.testing.assert_allclose(again[1]["train/loss"], first[1]["train/loss"], rtol=1e-5)
    # Other settings are refused, naming them; --no-resume refuses to start over a run.
    assert main([*argv, "--sft-steps", "3"]) == 2
    assert "steps (checkpoint 2, now 3)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--sft-checkpoint-dir"):
        main([*argv, "--sft-steps", "2", "--no-resume"])


def test_sft_on_a_folder_with_a_test_split_reports_the_held_out_loss(formats, capsys):
    from test_data_sft import COMPLETIONS

    folder = formats["root"] / "sft_folder"
    os.makedirs(folder)
    for split, rows in (("train", COMPLETIONS * 2), ("test", COMPLETIONS)):
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    out = formats["root"] / "sft_held_out"
    argv = ["sft", "--data", str(folder), "--model", formats["base"], "--out", str(out)]
    argv += ["--sft-steps", "2", "--sft-batch-size", "4", "--sft-warmup-steps", "0", "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "4 examples + 2 held out (split 'test')" in captured.err
    summary = json.loads(captured.out)
    assert summary["num_train"] == 4 and summary["num_eval"] == 2
    assert np.isfinite(summary["eval_loss"])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r] == [2]


def test_bad_sft_data_names_file_row_and_column(formats, capsys):
    bad = formats["root"] / "bad_sft.jsonl"
    bad.write_text(
        "\n".join(json.dumps(r) for r in [{"prompt": "a", "completion": "b"}] * 2)
        + "\n"
        + json.dumps({"prompt": "the food was", "completion": ""})
        + "\n"
    )
    argv = ["sft", "--data", str(bad), "--model", formats["base"], "--out", "x"]
    assert main(argv) == 2
    assert f"error: {bad}: row 2, column 'completion': empty text" in capsys.readouterr().err


# ------------------------------------------------------------------- lengths, before any training


def test_lengths_that_do_not_fit_the_model_name_the_flags(workspace, formats):
    base = str(workspace / "base")  # max_position_embeddings = 32
    ppo = ["ppo", "--prompts", str(workspace / "prompts.jsonl"), "--policy", base]
    ppo += ["--reward-model", base, "--out", str(workspace / "too_long")]
    with pytest.raises(SystemExit) as error:
        main([*ppo, "--ppo-max-new-tokens", "30"])
    message = str(error.value)
    assert (
        "prompts padded to 16 tokens (the longest has 9) + --ppo-max-new-tokens 30: 46 positions"
        in message
    )
    assert "max_position_embeddings=32" in message and "--data-max-prompt-length" in message
    assert not os.path.exists(workspace / "too_long" / "checkpoints")
    # The defaults fit: three-token prompts are padded to 8, not to --data-max-prompt-length 32.
    gen = ["generate", "--model", base, "--prompt", "the food was", "--greedy"]
    assert main([*gen, "--max-new-tokens", "24"]) == 0
    with pytest.raises(SystemExit, match=r"\+ --max-new-tokens 25: 33 positions.*--max-new-tokens"):
        main([*gen, "--max-new-tokens", "25"])
    rm = ["train-rm", "--data", formats["hh"], "--model", base, "--out", "x"]
    rm += ["--data-max-prompt-length", "64"]
    with pytest.raises(SystemExit, match=r"prompt \+ response padded to .*--data-max-response-len"):
        main(rm)
    sft = ["sft", "--data", formats["chats"], "--model", base, "--out", "x"]
    with pytest.raises(
        SystemExit,
        match=r"SFT sequences padded to 56 tokens \(the longest has 53\): 56 positions.*--data-truncate",
    ):
        main(sft)


# ------------------------------------------------------------------------------- Hub model ids


def test_a_hub_model_id_resolves_offline_through_the_hub_cache(
    workspace, tmp_path, monkeypatch, capsys
):
    import huggingface_hub
    from test_data_formats import _hub_snapshot

    cache = str(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    base = workspace / "base"
    _hub_snapshot(
        cache,
        "model",
        "someone/tiny-lm",
        {name: lambda path, n=name: shutil.copy(base / n, path) for name in os.listdir(base)},
    )
    argv = ["generate", "--model", "someone/tiny-lm", "--prompt", "the food was"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "the food was"
    # A model id in no cache: one line naming it (the tests run offline: no HTTP retries).
    assert main(["generate", "--model", "someone/missing", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'someone/missing': no such directory, and not in the local")
    assert main(["generate", "--model", "./no/such/dir", "--prompt", "x"]) == 2
    assert "error: model './no/such/dir': no such directory" in capsys.readouterr().err


README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_commands(section: str = "## Using it") -> list[list[str]]:
    """The `jaxrlhf` command lines of the first bash block of a README section, as argv lists
    (continuation lines joined, comments dropped)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    block = text.split(section, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            assert argv[0] == "jaxrlhf", line
            commands.append(argv[1:])
    return commands


@pytest.mark.slow
def test_demo_smoke_then_the_readme_examples_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [c[0] for c in commands] == [
        "demo", "sft", "train-rm", "ppo", "generate", "generate", "<command>"
    ]  # fmt: skip
    assert commands[0] == ["demo", "--out-dir", "runs/demo"]
    # The demo, tiny (the README's other commands then run on its outputs with their defaults).
    argv = ["demo", "--out-dir", "runs/demo", "--quiet", "--hidden-size", "16"]
    argv += ["--num-layers", "1", "--num-sentences", "200", "--num-prompts", "64"]
    argv += ["--num-eval-prompts", "8", "--num-pairs", "48", "--eval-every", "1"]
    argv += ["--sft-steps", "80", "--sft-warmup-steps", "5", "--sft-batch-size", "32"]
    argv += ["--rm-epochs", "1", "--rm-batch-size", "8", "--rm-eval-fraction", "0.25"]
    argv += ["--ppo-num-iterations", "2", "--ppo-batch-size", "8", "--ppo-max-new-tokens", "24"]
    argv += ["--ppo-separate-critic", "--ppo-critic-init", "reward_model"]
    argv += ["--ppo-checkpoint-dir", str(tmp_path / "ckpt")]
    assert main(argv) == 0
    demo = tmp_path / "runs" / "demo"
    # Each PPO run checkpoints into a directory of its own.
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["kl", "no_kl"]
    assert os.listdir(tmp_path / "ckpt" / "kl") == ["2"]
    summary = json.loads((demo / "summary.json").read_text())
    assert set(summary["policies"]) == {"base policy (SFT)", "PPO, β = 0.1", "PPO, β = 0"}
    assert 0.0 <= summary["reward_model"]["held_out_accuracy"] <= 1.0
    report = (demo / "report.md").read_text()
    assert "Held-out pairwise accuracy" in report and "![reward](plots/reward.png)" in report
    assert [r["step"] for r in read_metrics(demo / "metrics_no_kl.jsonl")] == [1, 2]
    assert os.path.exists(demo / "policy" / "model.safetensors")
    # The demo's data, as user files.
    lines = {
        n: (demo / "data" / f"{n}.jsonl").read_text().splitlines()
        for n in ("sft", "prefs", "prompts")
    }
    assert len(lines["sft"]) == 200 and len(lines["prefs"]) == 48 and len(lines["prompts"]) == 64
    assert set(json.loads(lines["prefs"][0])) == {"prompt", "chosen", "rejected"}
    capsys.readouterr()
    # The README's pipeline, as written (default flags).
    for command in commands[1:-1]:
        assert main(command) == 0, command
    out = capsys.readouterr().out
    assert os.path.exists(tmp_path / "runs/sft/policy/model.safetensors")
    assert os.path.exists(tmp_path / "runs/rm/reward_model/config.json")
    assert [r["step"] for r in read_metrics(tmp_path / "runs/ppo/metrics.jsonl")][-1] == 100
    assert json.loads(out.strip().splitlines()[-1])["prompt"] == "the food was"
    best = json.loads((tmp_path / "runs/best_of_8.jsonl").read_text())  # one prompt, one line
    assert len(best["candidates"]) == 8
    assert best["score"] == max(c["score"] for c in best["candidates"])
    with pytest.raises(SystemExit):  # `jaxrlhf <command> --help`: help for each command
        main(["sft", "--help"])


def test_grpo_with_python_rewards_and_dpo_on_preference_pairs(workspace, capsys):
    out = workspace / "grpo"
    argv = [
        "grpo",
        "--prompts",
        str(workspace / "prompts.jsonl"),
        "--policy",
        str(workspace / "base"),
    ]
    argv += ["--reward-fn", "test_cli:length_reward:0.5", "--reward-fn", "test_cli:has_great"]
    argv += ["--out", str(out), "--quiet", "--grpo-num-iterations", "2", "--grpo-batch-size", "2"]
    argv += ["--grpo-group-size", "4", "--grpo-max-new-tokens", "4", "--grpo-advantage", "rloo"]
    assert main(argv + DATA_FLAGS) == 0
    last = json.loads(capsys.readouterr().out)
    assert set(last) >= {"reward", "frac_reward_zero_std"} and np.isfinite(last["reward"])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert os.path.exists(out / "policy" / "model.safetensors")
    with pytest.raises(SystemExit, match="module:function"):
        main(["grpo", *argv[1:5], "--reward-fn", "nocolon", "--out", str(out / "x")])

    dpo = ["dpo", "--data", str(workspace / "prefs.jsonl"), "--model", str(workspace / "base")]
    dpo += ["--out", str(workspace / "dpo"), "--quiet", "--dpo-batch-size", "4"]
    dpo += ["--dpo-eval-fraction", "0.25"]
    assert main(dpo + DATA_FLAGS) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_train_pairs"] == 12 and summary["num_eval_pairs"] == 4
    assert 0.0 <= summary["eval_implicit_reward_accuracy"] <= 1.0
    np.testing.assert_allclose(
        read_metrics(workspace / "dpo/metrics.jsonl")[0]["loss"], np.log(2.0), rtol=1e-5
    )  # fmt: skip  (policy = reference at first)


def length_reward(prompts, completions):
    """A --reward-fn for the test above: the number of characters of each completion."""
    return [float(len(c)) for c in completions]


def has_great(prompts, completions):
    return [1.0 if "great" in c else 0.0 for c in completions]


def test_ppo_with_a_mesh_alone_runs_on_8_devices_and_equals_one_device(workspace, capsys):
    """`--ppo-mesh data=2,fsdp=2,tensor=2` alone implies --ppo-parallelism mesh: the 8 forced CPU
    devices run the same 2 iterations as one device. Also: the sample table every iteration (log
    and report.md) and the last line naming what was written."""
    import jax

    from jaxrlhf.models.tokenizer import load_tokenizer
    from jaxrlhf.train.reward import reward_model_from_policy

    assert jax.device_count() == 8
    rm_dir = workspace / "rm_for_mesh"  # an untrained reward head: any score will do
    reward_model = reward_model_from_policy(from_pretrained(workspace / "base"), seed=1)
    save_pretrained(reward_model, rm_dir, tokenizer=load_tokenizer(workspace / "base"))
    runs = {}
    for name, extra in (("one", []), ("mesh", ["--ppo-mesh", "data=2,fsdp=2,tensor=2"])):
        out = workspace / f"ppo_{name}"
        argv = ["ppo", "--prompts", str(workspace / "prompts.jsonl"), "--policy",
                str(workspace / "base"), "--reward-model", str(rm_dir), "--out", str(out),
                "--quiet", "--ppo-batch-size", "8", "--ppo-max-new-tokens", "4",
                "--ppo-num-iterations", "2", "--log-samples-every", "1", "--log-samples", "2",
                *DATA_FLAGS, *extra]  # fmt: skip
        assert main(argv) == 0
        err = capsys.readouterr().err
        runs[name] = (read_metrics(out / "metrics.jsonl"), from_pretrained(out / "policy"))
        assert err.count("samples at iteration") == 2 and "| prompt | completion | reward |" in err
        assert err.strip().splitlines()[-1] == (
            f"wrote {out}: policy {out}/policy, report {out}/report.md, metrics {out}/metrics.jsonl"
        )
        report = (out / "report.md").read_text()
        assert "## Samples" in report and "**iteration 2**" in report
    (one, one_policy), (mesh, mesh_policy) = runs["one"], runs["mesh"]
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
        np.testing.assert_allclose([r[key] for r in mesh], [r[key] for r in one], rtol=1e-3,
                                   atol=1e-5, err_msg=key)  # fmt: skip
    for a, b in zip(
        jax.tree.leaves(nnx.state(mesh_policy)), jax.tree.leaves(nnx.state(one_policy))
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)

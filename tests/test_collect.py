"""`jaxrlhf collect` without a browser: candidate pairs, the crash-safe store, labelers, the HTTP API,
and the command end to end with a rule labeler and a reward-model labeler.
(The page in a real browser: test_collect_browser.py.)"""

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from jaxrlhf.cli import main
from jaxrlhf.collect import CollectConfig, LabelServer, LabelStore, demo_annotator, pair_up
from jaxrlhf.collect.labelers import load_labeler
from jaxrlhf.collect.store import (
    OutputLock,
    candidates_path,
    check_sampling,
    read_jsonl,
    skipped_path,
    write_candidates,
)

SAMPLING = {"policy": "p", "prompts": "f", "num_samples": 2, "temperature": 1.0,
            "max_new_tokens": 16, "seed": 0}  # fmt: skip
WAIT_S = 30  # how long to wait for the page or the server to respond (a bound, not a timing test)
PAIRS = [
    {"prompt": "the food was", "a": " good .", "b": " awful ."},
    {"prompt": "the room was", "a": " clean .", "b": " dirty ."},
    {"prompt": "the staff was", "a": " kind .", "b": " rude ."},
]


def collect_workspace(root, num_prompts: int):
    """(policy dir, prompts file): the demo's SFT policy (a tiny GPT-2 that ends its sentences with
    EOS, shared with the SFT tests) saved with its tokenizer, and the first prompts of its task."""
    from data_utils import sft_policy, small_task

    from jaxrlhf.models.hf import save_pretrained

    task = small_task()
    _, policy, _, _ = sft_policy()
    save_pretrained(policy, root / "policy", tokenizer=task.tokenizer)
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in task.prompts[:num_prompts])
    return str(root / "policy"), str(root / "prompts.jsonl")


class Collect:
    """``jaxrlhf collect`` as a child process: its URL (read from stderr) and its output."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxrlhf", "collect", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.err = []
        for line in self.proc.stderr:
            self.err.append(line)
            found = re.search(r" at (http://127\.0\.0\.1:(\d+)/) ", line)
            if found:
                self.url, self.port = found.group(1), int(found.group(2))
                break
        else:
            self.proc.wait()
            pytest.fail(f"collect exited ({self.proc.returncode}):\n{''.join(self.err)}")
        self.reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr))
        self.reader.start()

    def finish(self) -> tuple[int, str]:
        out = self.proc.stdout.read()
        code = self.proc.wait(timeout=WAIT_S)
        self.reader.join(timeout=WAIT_S)
        return code, out

    def kill(self) -> None:
        self.proc.kill()
        self.finish()


# ---------------------------------------------------------------------------- candidate pairs


def test_pair_up_pairs_every_distinct_sample_once():
    # K = 4 samples, one duplicate: 3 distinct texts → C(3, 2) = 3 pairs, in first-seen order.
    assert pair_up(["x", "y", "x", "z"]) == [("x", "y"), ("x", "z"), ("y", "z")]
    assert pair_up(["x", "x"]) == []  # two equal samples: no preference to ask for


def test_collect_config_names_the_field():
    with pytest.raises(ValueError, match=r"CollectConfig.num_samples = 1: must be >= 2"):
        CollectConfig(num_samples=1)
    with pytest.raises(ValueError, match=r"CollectConfig.temperature = 0.0"):
        CollectConfig(temperature=0.0)
    assert CollectConfig(temperature=1.2).sampling().temperature == 1.2


def test_samples_cut_off_before_eos_are_dropped():
    from data_utils import sft_policy, small_task

    from jaxrlhf.collect import sample_candidates
    from jaxrlhf.data import DataConfig

    task = small_task()
    _, policy, _, _ = sft_policy()
    prompts = list(task.prompts[:4])
    # One new token: a sample is EOS alone (empty) or one word cut off before EOS: none is usable.
    config = CollectConfig(num_samples=2, max_new_tokens=1)
    pairs, dropped = sample_candidates(policy, task.tokenizer, prompts, config, DataConfig())
    assert pairs == [] and dropped == 4 * 2


# -------------------------------------------------------------------------------------- store


def test_store_labels_undoes_and_reopens(tmp_path):
    out = str(tmp_path / "prefs.jsonl")
    write_candidates(out, PAIRS, SAMPLING)
    store = LabelStore(out)
    assert [r["pair_id"] for r in store.pending()] == [0, 1, 2]
    store.label(0, "right", labeler="human")
    store.label(1, "tie", labeler="human")
    with pytest.raises(ValueError, match="pair 0 is already labelled"):
        store.label(0, "left", labeler="human")
    with pytest.raises(ValueError, match="choice 'up'"):
        store.label(2, "up", labeler="human")
    # right: b ≻ a, so chosen is b.
    (row,) = read_jsonl(out)
    assert (row["prompt"], row["chosen"], row["rejected"]) == (
        "the food was",
        " awful .",
        " good .",
    )
    assert row["labeler"] == "human" and row["policy"] == "p" and row["temperature"] == 1.0
    assert row["labeled_at"] >= row["sampled_at"]
    (tie,) = read_jsonl(skipped_path(out))
    assert (tie["pair_id"], tie["label"], tie["a"], tie["b"]) == (1, "tie", " clean .", " dirty .")
    assert store.counts() == {"labeled": 2, "total": 3, "preferences": 1, "ties": 1, "skips": 0}

    # A new store (a restart) sees the same labels; undo removes the newest one, the tie.
    store = LabelStore(out)
    assert [r["pair_id"] for r in store.pending()] == [2]
    assert store.undo() == 1
    assert read_jsonl(skipped_path(out)) == [] and len(read_jsonl(out)) == 1
    assert store.undo() == 0 and read_jsonl(out) == []
    assert store.undo() is None
    assert [r["pair_id"] for r in LabelStore(out).pending()] == [0, 1, 2]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_the_labels_read_as_preference_data_text_and_chat(tmp_path):
    from jaxrlhf.collect.candidates import as_response
    from jaxrlhf.collect.server import display_text
    from jaxrlhf.data.formats import preference_rows

    chat = [{"role": "user", "content": "How was the food?"}]
    pairs = [
        PAIRS[0],
        {"prompt": chat, "a": as_response(chat, "Good."), "b": as_response(chat, "Bad.")},
    ]
    assert pairs[1]["a"] == [{"role": "assistant", "content": "Good."}]
    assert display_text(chat) == "user: How was the food?" and display_text("x") == "x"
    text_out, chat_out = str(tmp_path / "text.jsonl"), str(tmp_path / "chat.jsonl")
    for out, pair in ((text_out, pairs[0]), (chat_out, pairs[1])):
        write_candidates(out, [pair], SAMPLING)
        LabelStore(out).label(0, "left", labeler="human")
    rows, fmt, _ = preference_rows(read_jsonl(text_out), source=text_out)
    assert rows == [{"prompt": "the food was", "chosen": " good .", "rejected": " awful ."}]
    assert (fmt.implicit, fmt.kind) == (False, "text")
    rows, fmt, _ = preference_rows(read_jsonl(chat_out), source=chat_out)
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Good."}]
    assert (fmt.implicit, fmt.kind) == (False, "chat")


def test_a_torn_last_line_is_dropped_and_a_bad_line_named(tmp_path, capsys):
    out = str(tmp_path / "prefs.jsonl")
    write_candidates(out, PAIRS, SAMPLING)
    LabelStore(out).label(2, "left", labeler="human")
    with open(out, "a") as f:
        f.write('{"prompt": "the room was", "cho')  # a crash inside the write of pair 1
    store = LabelStore(out)
    assert "dropping a torn last line" in capsys.readouterr().err
    assert [r["pair_id"] for r in store.pending()] == [0, 1]
    assert [r["pair_id"] for r in read_jsonl(out)] == [2]  # the file is repaired
    with open(out, "a") as f:
        f.write("not json\n" + json.dumps({"pair_id": 0}) + "\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl: line 2 is not JSON"):
        LabelStore(out)


def test_labels_of_another_run_and_other_settings_are_refused(tmp_path):
    out = str(tmp_path / "prefs.jsonl")
    rows = write_candidates(out, PAIRS, SAMPLING)
    with open(out, "w") as f:
        f.write(json.dumps({"pair_id": 7, "prompt": "x", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: pair_id 7 is not in .*candidates.jsonl"):
        LabelStore(out)
    with pytest.raises(ValueError, match=r"temperature \(candidates 1.0, now 1.2\)"):
        check_sampling(out, rows, {**SAMPLING, "temperature": 1.2})
    with OutputLock(out), pytest.raises(ValueError, match="another `jaxrlhf collect`"):  # noqa: SIM117
        with OutputLock(out):
            pass


# ----------------------------------------------------------------------------------- labelers


def first_wins(prompt, a, b):
    return 0 if "good" in a or "clean" in a else None


def says_yes(prompt, a, b):
    return True


def test_rule_labeler_maps_indices_and_rejects_other_returns():
    labeler = load_labeler("rule:test_collect:first_wins")
    assert labeler.name == "rule:test_collect:first_wins"
    assert labeler.choose(PAIRS) == ["left", "left", "tie"]
    with pytest.raises(ValueError, match=r"returned True for pair None: expected 0"):
        load_labeler("rule:test_collect:says_yes").choose(PAIRS)
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        load_labeler("rule:test_collect:nope")
    with pytest.raises(ValueError, match="expected rule:module:function or reward-model:DIR"):
        load_labeler("oracle:x")


def test_demo_annotator_follows_the_gold_reward():
    from jaxrlhf.data.demo_task import gold_reward

    # gold(" very good .") − gold(" bad bad bad") is large (sentiment and grammar both favour it):
    # σ(Δ/τ) ≈ 1, so the annotator picks a, both ways round, and the same pair gets the same coin.
    prompt, good, bad = "the food was", " very good .", " bad bad bad"
    gap = gold_reward([prompt], [good])[0] - gold_reward([prompt], [bad])[0]
    assert gap > 8
    assert demo_annotator(prompt, good, bad) == 0 and demo_annotator(prompt, bad, good) == 1
    # Equal gold (1 = one positive word, no error): P(a ≻ b) = σ(0) = 1/2, a coin per pair.
    prompts = [f"the {noun} was" for noun in ("food", "room", "staff", "pizza", "coffee")] * 8
    prompts = [p + " good and" * (i // 5) for i, p in enumerate(prompts)]  # 40 distinct prompts
    assert gold_reward(prompts[:1], [" good ."]) == gold_reward(prompts[:1], [" great ."])
    picks = [demo_annotator(p, " good .", " great .") for p in prompts]
    assert 5 < sum(picks) < 35  # Binomial(40, 1/2): outside (5, 35) with probability < 1e-6


# ---------------------------------------------------------------------------------- HTTP API


def _request(url, method, path, body=None, headers=None):
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    payload = None if body is None else json.dumps(body)
    conn.request(method, path, payload, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_the_api_labels_undoes_and_refuses_foreign_requests(tmp_path):
    out = str(tmp_path / "prefs.jsonl")
    write_candidates(out, PAIRS[:2], SAMPLING)
    server = LabelServer(LabelStore(out), port=0)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        url = server.url
        status, page = _request(url, "GET", "/")
        assert status == 200 and b'id="left"' in page and b"<kbd>1</kbd>" in page
        status, data = _request(url, "GET", "/api/state")
        state = json.loads(data)
        assert state["pair"] == {"pair_id": 0, "prompt": "the food was", "a": " good .",
                                 "b": " awful ."}  # fmt: skip
        assert state["counts"]["labeled"] == 0 and not state["can_undo"]
        label = {"pair_id": 0, "choice": "left"}
        # Another site's page can send only "simple" requests (text/plain), or comes by another Host.
        assert _request(url, "POST", "/api/label", label, {"Content-Type": "text/plain"})[0] == 415
        assert _request(url, "POST", "/api/label", label, {"Host": "evil.example:80"})[0] == 403
        assert read_jsonl(out) == []
        status, data = _request(url, "POST", "/api/label", label)
        assert status == 200 and json.loads(data)["pair"]["pair_id"] == 1
        status, data = _request(url, "POST", "/api/label", label)  # a double click
        assert status == 409 and json.loads(data)["counts"]["labeled"] == 1
        assert _request(url, "POST", "/api/label", {"pair_id": 1, "choice": "up"})[0] == 400
        status, data = _request(url, "POST", "/api/undo", {})
        assert json.loads(data)["undone"] == 0 and read_jsonl(out) == []
        _request(url, "POST", "/api/label", {"pair_id": 0, "choice": "skip"})
        status, data = _request(url, "POST", "/api/label", {"pair_id": 1, "choice": "right"})
        assert json.loads(data)["done"]
        thread.join(timeout=10)  # the last label stops the server
        assert server.finished.is_set() and not thread.is_alive()
    finally:
        server.shutdown()
        server.server_close()
    assert [(r["chosen"], r["rejected"]) for r in read_jsonl(out)] == [(" dirty .", " clean .")]
    assert [(r["pair_id"], r["label"]) for r in read_jsonl(skipped_path(out))] == [(0, "skip")]


# ------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    policy, prompts = collect_workspace(root, 12)
    return root, policy, prompts


def test_collect_with_the_demo_annotators_then_restart_adds_nothing(workspace, capsys):
    root, policy, prompts = workspace
    out = str(root / "rule" / "prefs.jsonl")
    argv = ["collect", "--policy", policy, "--prompts", prompts, "--out", out,
            "--collect-max-new-tokens", "16", "--collect-temperature", "1.1"]  # fmt: skip
    labeler = "rule:jaxrlhf.collect.labelers:demo_annotator"
    assert main([*argv, "--labeler", labeler]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    candidates = read_jsonl(candidates_path(out))
    assert "12 prompts" in captured.err and f"{len(candidates)} candidate pairs" in captured.err
    assert summary["total"] == len(candidates) >= 8 and summary["pending"] == 0
    assert [c["pair_id"] for c in candidates] == list(range(len(candidates)))
    for c in candidates:  # two distinct non-empty samples of one of the prompts
        assert c["a"] != c["b"] and c["a"].strip() and c["b"].strip()
        assert c["temperature"] == 1.1 and c["policy"] == os.path.abspath(policy)
    rows = read_jsonl(out)
    assert [r["pair_id"] for r in rows] == [c["pair_id"] for c in candidates]
    for row, c in zip(rows, candidates):
        winner = demo_annotator(c["prompt"], c["a"], c["b"])  # the oracle: the rule itself
        assert (row["chosen"], row["rejected"]) == ((c["a"], c["b"]) if winner == 0
                                                    else (c["b"], c["a"]))  # fmt: skip
        assert row["labeler"] == labeler and row["prompt"] == c["prompt"]
    # Running it again: the same candidates, nothing left to label, the file unchanged.
    assert main([*argv, "--labeler", labeler]) == 0
    assert read_jsonl(out) == rows and read_jsonl(candidates_path(out)) == candidates
    # Other sampling settings over the same --out are refused, naming the setting.
    assert main([*argv[:-2], "--collect-temperature", "0.7", "--labeler", labeler]) == 2
    assert "temperature (candidates 1.1, now 0.7)" in capsys.readouterr().err
    # Labels whose candidates file is gone are never matched to new samples.
    os.rename(candidates_path(out), candidates_path(out) + ".moved")
    assert main([*argv, "--labeler", labeler]) == 2
    assert "holds labels but" in capsys.readouterr().err
    os.rename(candidates_path(out) + ".moved", candidates_path(out))


def test_collect_with_a_reward_model_prefers_the_higher_score(workspace, capsys):
    from data_utils import small_task
    from flax import nnx

    from jaxrlhf.data.preference import encode, right_pad
    from jaxrlhf.models.hf import from_pretrained, save_pretrained

    root, policy, prompts = workspace
    tokenizer = small_task().tokenizer
    reward_model = from_pretrained(policy, head="reward", seed=3, allow_new_head=True)  # random
    save_pretrained(reward_model, root / "rm", tokenizer=tokenizer)
    out = str(root / "rm_labels" / "prefs.jsonl")
    os.makedirs(root / "rm_labels")
    # The candidates sampled by the rule test (same flags): labelled again, by the reward model.
    shutil.copy(candidates_path(str(root / "rule" / "prefs.jsonl")), candidates_path(out))
    argv = ["collect", "--policy", policy, "--prompts", prompts, "--out", out,
            "--collect-max-new-tokens", "16", "--collect-temperature", "1.1"]  # fmt: skip
    assert main([*argv, "--labeler", f"reward-model:{root / 'rm'}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows, ties = read_jsonl(out), read_jsonl(skipped_path(out))
    assert summary["preferences"] == len(rows) >= 1 and len(rows) + len(ties) == summary["total"]

    # Oracle: every sequence (prompt tokens + response tokens + EOS) right-padded to one width
    # and scored in one call, unlike the labeler's left-padded prompts and per-batch widths.
    def scores(prompts, responses):
        eos = tokenizer.eos_token_id
        rows = [
            encode(tokenizer, p) + encode(tokenizer, r) + [eos] for p, r in zip(prompts, responses)
        ]
        ids, mask = right_pad(rows, 48, tokenizer.pad_token_id)  # [N, 48]
        return np.asarray(nnx.jit(lambda m, x, k: m(x, k))(reward_model, ids, mask))  # [N]

    chosen = scores([r["prompt"] for r in rows], [r["chosen"] for r in rows])  # [M]
    rejected = scores([r["prompt"] for r in rows], [r["rejected"] for r in rows])  # [M]
    assert np.all(chosen > rejected)
    assert {r["labeler"] for r in rows} == {f"reward-model:{root / 'rm'}"}


def test_ctrl_c_stops_the_server_cleanly_and_keeps_the_labels(workspace):
    root, policy, prompts = workspace
    out = str(root / "interrupted" / "prefs.jsonl")
    os.makedirs(root / "interrupted")
    shutil.copy(candidates_path(str(root / "rule" / "prefs.jsonl")), candidates_path(out))
    server = Collect(["--policy", policy, "--prompts", prompts, "--out", out,
                      "--collect-max-new-tokens", "16", "--collect-temperature", "1.1"])  # fmt: skip
    status, _ = _request(server.url, "POST", "/api/label", {"pair_id": 0, "choice": "right"})
    assert status == 200
    server.proc.send_signal(signal.SIGINT)  # Ctrl-C
    code, stdout = server.finish()
    assert code == 0 and "stopped; run the same command again to continue" in "".join(server.err)
    summary = json.loads(stdout)
    assert summary["labeled"] == 1 and summary["pending"] == summary["total"] - 1
    assert [r["pair_id"] for r in read_jsonl(out)] == [0]

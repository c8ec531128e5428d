"""`jaxrlhf collect`'s page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium, against the command run as a separate process.

A person labels by clicks and keys, undoes, reloads the page, the server is killed (SIGKILL) and
started again, and labelling finishes; then the files are checked line by line against what was
clicked, and ``train-rm`` trains on the result. Missing browser → the test fails naming
``.ci/install-browser.sh`` (it is never skipped).

``python tests/test_collect_browser.py docs/collect.png`` takes the README's screenshot.
"""

import json
import os
import shutil
import sys

import pytest
from test_collect import WAIT_S, Collect, collect_workspace

from jaxrlhf.cli import main
from jaxrlhf.collect.store import candidates_path, read_jsonl, skipped_path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = ".ci/install-browser.sh"


def browser():
    """A headless Chromium WebDriver (Debian's binaries: selenium-manager never downloads)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        pytest.fail(f"the browser test needs {', '.join(missing)}: run {INSTALL} (as root)")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,760", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def page_state(driver) -> tuple[str, int | None]:
    from selenium.webdriver.common.by import By

    pair = driver.find_element(By.TAG_NAME, "body").get_attribute("data-pair-id")
    return driver.find_element(By.ID, "count").text, int(pair) if pair else None


def wait_for_count(driver, labeled: int, total: int) -> int | None:
    """Wait until the page says ``labeled of total``; the pair it then shows."""
    from selenium.webdriver.support.ui import WebDriverWait

    text = f"{labeled} labeled of {total}"
    WebDriverWait(driver, WAIT_S).until(lambda d: page_state(d)[0] == text)
    return page_state(driver)[1]


def press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def click(driver, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, element_id).click()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect_browser")
    policy, prompts = collect_workspace(root, 8)
    return root, policy, prompts


def test_label_in_a_browser_with_reload_kill_and_restart(workspace, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root, policy, prompts = workspace
    out = str(root / "labels" / "prefs.jsonl")
    argv = [
        "--policy",
        policy,
        "--prompts",
        prompts,
        "--out",
        out,
        "--collect-max-new-tokens",
        "16",
    ]
    driver = browser()
    server = Collect(argv)
    try:
        candidates = read_jsonl(candidates_path(out))
        by_id = {c["pair_id"]: c for c in candidates}
        N = len(candidates)
        assert N >= 6, "the test needs 6 pairs (sampled from 8 prompts)"
        driver.get(server.url)
        assert wait_for_count(driver, 0, N) == 0
        assert driver.title == "jaxrlhf collect"
        for element_id in ("prompt", "a", "b"):  # exactly the sampled texts, spaces included
            shown_text = driver.find_element(By.ID, element_id).get_attribute("textContent")
            assert shown_text == by_id[0][element_id]
        assert not driver.find_element(By.ID, "undo").is_enabled()

        done = []  # (pair_id, choice) as labelled, in order, undone ones removed
        actions = [(click, "left", "left"), (press, "2", "right"), (press, "0", "tie"),
                   (click, "skip", "skip")]  # fmt: skip
        shown = 0
        for do, what, choice in actions:
            do(driver, what)
            done.append((shown, choice))
            shown = wait_for_count(driver, len(done), N)
        press(driver, "u")  # undo the skip: that pair is shown again
        done.pop()
        assert wait_for_count(driver, 3, N) == 3
        assert read_jsonl(skipped_path(out))[-1]["label"] == "tie"
        click(driver, "undo")  # and the tie
        done.pop()
        assert wait_for_count(driver, 2, N) == 2 and read_jsonl(skipped_path(out)) == []
        driver.refresh()  # a reload shows the same state
        assert wait_for_count(driver, 2, N) == 2 and driver.find_element(By.ID, "undo").is_enabled()
        press(driver, "1")
        done.append((2, "left"))
        assert wait_for_count(driver, 3, N) == 3

        server.kill()  # SIGKILL: no chance to flush anything
        press(driver, "2")  # the page says so, and nothing is recorded
        error = driver.find_element(By.ID, "error")
        WebDriverWait(driver, WAIT_S).until(lambda d: error.is_displayed())
        assert "server is not running" in error.text
        assert page_state(driver) == (f"3 labeled of {N}", 3)
        assert [r["pair_id"] for r in read_jsonl(out)] == [0, 1, 2]

        server = Collect([*argv, "--port", str(server.port)])  # the same flags, the same page
        assert "continuing, 3 of" in "".join(server.err)
        driver.refresh()
        assert wait_for_count(driver, 3, N) == 3
        assert not driver.find_element(By.ID, "error").is_displayed()
        shown = 3
        keys = ["s", "2", "1", "0"]
        for i in range(3, N):
            key = keys[i % len(keys)]
            press(driver, key)
            done.append((shown, {"1": "left", "2": "right", "0": "tie", "s": "skip"}[key]))
            shown = wait_for_count(driver, i + 1, N)
        assert shown is None
        assert driver.find_element(By.ID, "done").is_displayed()
        code, stdout = server.finish()  # the last label stops the server
        assert code == 0, "".join(server.err)
    finally:
        driver.quit()
        if server.proc.poll() is None:
            server.kill()

    summary = json.loads(stdout)
    assert summary["labeled"] == summary["total"] == N and summary["pending"] == 0
    # The files, line by line: every left/right in OUT in the order made, ties and skips beside it.
    preferences = [(i, c) for i, c in done if c in ("left", "right")]
    rows = read_jsonl(out)
    assert [r["pair_id"] for r in rows] == [i for i, _ in preferences]
    for row, (i, choice) in zip(rows, preferences):
        a, b = by_id[i]["a"], by_id[i]["b"]
        assert (row["chosen"], row["rejected"]) == ((a, b) if choice == "left" else (b, a))
        assert row["prompt"] == by_id[i]["prompt"] and row["labeler"] == "human"
        assert row["policy"] == os.path.abspath(policy) and row["temperature"] == 1.0
        assert row["sampled_at"] <= row["labeled_at"]
    others = [(i, c) for i, c in done if c not in ("left", "right")]
    assert [(r["pair_id"], r["label"]) for r in read_jsonl(skipped_path(out))] == others
    with open(out) as f:
        assert f.read().endswith("\n")  # complete lines only

    # train-rm reads the file as it is (the extra provenance columns are ignored).
    rm_out = root / "rm"
    argv = ["train-rm", "--data", out, "--model", policy, "--out", str(rm_out), "--quiet"]
    argv += ["--rm-batch-size", str(len(rows)), "--rm-epochs", "1", "--rm-eval-fraction", "0"]
    assert main([*argv, "--no-normalize"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_train_pairs"] == len(rows) and result["num_eval_pairs"] == 0
    assert os.path.exists(rm_out / "reward_model" / "config.json")


def screenshot(path: str) -> None:
    """The README's screenshot: the page with a pair of the demo policy's samples."""
    import pathlib
    import tempfile

    root = pathlib.Path(tempfile.mkdtemp())
    try:
        policy, prompts = collect_workspace(root, 24)
        out = str(root / "prefs.jsonl")
        server = Collect(["--policy", policy, "--prompts", prompts, "--out", out,
                          "--collect-max-new-tokens", "16", "--collect-temperature", "1.1"])  # fmt: skip
        driver = browser()
        try:
            driver.get(server.url)
            N = len(read_jsonl(candidates_path(out)))
            wait_for_count(driver, 0, N)
            for i, key in enumerate("1212"):  # a few labels, so that the progress bar shows
                press(driver, key)
                wait_for_count(driver, i + 1, N)
            driver.save_screenshot(path)
        finally:
            driver.quit()
            server.kill()
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    import conftest  # noqa: F401 (the test environment: CPU, offline)

    screenshot(sys.argv[1])

"""Nothing leaves the machine and no pickle is read: the tiny demo under a socket and pickle guard.

The guard records (and refuses) every Python-level connection attempt to an address that is not
this machine's loopback, every DNS lookup of another host, and every pickle / torch / numpy-pickle
load, while the smallest demo runs in-process with the Hugging Face offline switches turned OFF
(so a library that would fetch something really tries, and is caught). Connections made by C code
below Python's socket module are outside its reach.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import pickle
import socket

import numpy as np
import pytest

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _is_local(address) -> bool:
    """Whether a socket address (AF_UNIX path, (host, port, ...) tuple) stays on this machine."""
    if not isinstance(address, tuple):  # AF_UNIX path, abstract socket
        return True
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode()
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name
        return False


@pytest.fixture
def guard(monkeypatch):
    """The list of forbidden attempts (what, where); every one also raises where it happens."""
    attempts: list[tuple[str, str]] = []

    def refuse(what: str, where) -> None:
        attempts.append((what, repr(where)))
        raise ConnectionRefusedError(f"test_offline_guard: {what} to {where!r} refused")

    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    create_connection, getaddrinfo = socket.create_connection, socket.getaddrinfo

    def guarded_connect(self, address):
        if not _is_local(address):
            refuse("socket.connect", address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        if not _is_local(address):
            refuse("socket.connect_ex", address)
        return connect_ex(self, address)

    def guarded_create_connection(address, *args, **kwargs):
        if not _is_local(address):
            refuse("socket.create_connection", address)
        return create_connection(address, *args, **kwargs)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_local((host,)):
            refuse("socket.getaddrinfo", host)
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)

    def recorder(name: str):
        def load(*args, **kwargs):
            attempts.append((name, ""))
            raise pickle.UnpicklingError(f"test_offline_guard: {name} refused")

        return load

    class GuardedUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            attempts.append(("pickle.Unpickler", ""))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pickle, "load", recorder("pickle.load"))
    monkeypatch.setattr(pickle, "loads", recorder("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", GuardedUnpickler)
    import torch

    monkeypatch.setattr(torch, "load", recorder("torch.load"))
    try:
        import dill
    except ImportError:  # not installed: nothing to guard
        pass
    else:
        monkeypatch.setattr(dill, "load", recorder("dill.load"))
        monkeypatch.setattr(dill, "loads", recorder("dill.loads"))
    numpy_load = np.load

    def guarded_numpy_load(*args, allow_pickle=False, **kwargs):
        if allow_pickle:
            attempts.append(("numpy.load(allow_pickle=True)", repr(args[:1])))
        return numpy_load(*args, allow_pickle=allow_pickle, **kwargs)

    monkeypatch.setattr(np, "load", guarded_numpy_load)
    return attempts


def _online(monkeypatch) -> None:
    """Turn the Hugging Face offline switches (set by conftest) off, in the environment and in the
    libraries' already-imported constants, so that nothing is kept offline by them alone."""
    import datasets
    import huggingface_hub.constants as hub_constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False, raising=False)


def test_the_guard_catches_a_connection_and_a_pickle(guard):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(pickle.dumps({"a": 1}))
    assert [what for what, _ in guard] == ["socket.create_connection", "pickle.loads"]
    assert not _is_local(("8.8.8.8", 53)) and _is_local(("127.0.0.1", 80))
    assert _is_local(("::1", 80, 0, 0)) and _is_local("/tmp/socket")


def test_the_tiny_demo_makes_no_connection_and_loads_no_pickle(guard, tmp_path, monkeypatch):
    from jaxrlhf.demo import DEMO_PPO, DEMO_REWARD, DEMO_SFT, DemoConfig, run_demo
    from jaxrlhf.models.hf import from_pretrained

    _online(monkeypatch)
    out = tmp_path / "demo"
    demo = DemoConfig(out_dir=str(out), hidden_size=16, num_layers=1, num_sentences=200,
                      num_prompts=8, num_eval_prompts=8, num_pairs=16, eval_every=1,
                      run_without_kl=False, num_samples_shown=2)  # fmt: skip
    sft = dataclasses.replace(DEMO_SFT, steps=80, batch_size=32, warmup_steps=5)
    reward = dataclasses.replace(DEMO_REWARD, epochs=1, batch_size=8, eval_fraction=0.25)
    ppo = dataclasses.replace(DEMO_PPO, num_iterations=1, batch_size=8, num_minibatches=1,
                              ppo_epochs=1, max_new_tokens=24)  # fmt: skip
    summary = run_demo(demo, sft, reward, ppo, progress=False, echo=lambda line: None)
    assert guard == []
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # The exported models are read back through the same guard: safetensors, no pickle.
    from_pretrained(out / "policy")
    from_pretrained(out / "reward_model", head="reward")
    assert guard == []
    assert os.path.exists(out / "report.md")
    # The report's over-optimisation plot: gold and proxy against √KL of the held-out samples.
    assert "](plots/gold_vs_kl.png)" in (out / "report.md").read_text()
    record = json.loads((out / "metrics_kl.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["eval/kl"]) and record["eval/kl"] > -0.5  # an estimate: mean k1

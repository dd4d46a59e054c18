"""Offline with a hub id: detected once, mockable, one line fast; bad paths name themselves."""

from __future__ import annotations

import time

import pytest

from loralab.config import ModelConfig
from loralab.errors import UserError
from loralab.model import hub
from loralab.model.load import resolve_model_path, resolve_tokenizer_path


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """The hub unreachable (a mocked connect), an empty HF cache; offline mode undone after."""
    from huggingface_hub import constants

    calls = []

    def refuse(host, port, tls=True, timeout=hub.CONNECT_TIMEOUT_S):
        calls.append((host, port))
        return False

    monkeypatch.setattr(hub, "can_connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "_switched_offline", False)
    hub.hub_reachable.cache_clear()
    yield calls
    hub.hub_reachable.cache_clear()


@pytest.mark.parametrize("resolve", [resolve_model_path, resolve_tokenizer_path])
def test_unreachable_hub_fails_in_one_line_and_switches_hf_offline(no_network, resolve):
    from huggingface_hub import constants

    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        resolve(ModelConfig(path="Qwen/Nope-7B"))
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "\n" not in message and "Qwen/Nope-7B" in message and "hub is unreachable" in message
    assert constants.HF_HUB_OFFLINE is True  # huggingface_hub will not retry anything now
    assert len(no_network) == 1


def test_offline_is_decided_once_per_process(no_network):
    for _ in range(3):
        with pytest.raises(UserError):
            resolve_tokenizer_path(ModelConfig(path="Qwen/Nope-7B"))
    assert len(no_network) == 1


def test_hf_hub_offline_set_by_the_user_skips_the_connect(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        resolve_model_path(ModelConfig(path="Qwen/Nope-7B"))
    assert no_network == []


def test_a_cached_tokenizer_is_found_offline(no_network, tmp_path):
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer_config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cached" / "refs" / "main").write_text("abc123")
    assert resolve_tokenizer_path(ModelConfig(path="org/cached")) == "org/cached"
    with pytest.raises(UserError, match="org/other not found"):
        resolve_tokenizer_path(ModelConfig(path="org/other"))


@pytest.mark.parametrize("path", ["/data/models/nope", "./nope", "a/b/c", "~/nope", "org/na--me"])
def test_a_missing_path_that_is_no_hub_id_is_named(no_network, path):
    for resolve in (resolve_model_path, resolve_tokenizer_path):
        with pytest.raises(UserError, match="no such folder, and not a hub id") as err:
            resolve(ModelConfig(path=path))
        assert path in str(err.value)
    assert no_network == []  # refused before any connect


def test_repo_ids():
    assert hub.is_repo_id("Qwen/Qwen2.5-7B-Instruct") and hub.is_repo_id("gpt2")
    for bad in ("/abs/path", "a/b/c", "../x", "org/", "a..b/c", "x" * 97):
        assert not hub.is_repo_id(bad), bad


def test_can_connect_needs_an_answer_within_its_timeout():
    """A port that accepts connections but never answers TLS (what a blocking proxy does)
    and a closed port both count as offline, within the timeout."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        started = time.perf_counter()
        assert hub.can_connect("127.0.0.1", silent.getsockname()[1], timeout=0.3) is False
        assert time.perf_counter() - started < 1.0
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
    assert hub.can_connect("127.0.0.1", port, timeout=0.3) is False
    with socket.socket() as plain:  # without TLS, an accepted connection is enough
        plain.bind(("127.0.0.1", 0))
        plain.listen(1)
        assert hub.can_connect("127.0.0.1", plain.getsockname()[1], tls=False, timeout=0.3)

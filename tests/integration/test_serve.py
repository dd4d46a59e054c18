"""`loralab serve` on tiny trained runs (CPU): answers equal `loralab predict`, the command's
user errors, and the command itself serving on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from loralab.cli import main
from loralab.io import read_jsonl

NEW = 12


@pytest.fixture(scope="module")
def runs(train_tiny_run):
    return {"fast": train_tiny_run("serve_fast", "train.lr=0.05", "train.max_steps=1")[0],
            "slow": train_tiny_run("serve_slow", "train.lr=0.01", "lora.r=4",
                                   "train.max_steps=1")[0]}


def test_each_adapter_answers_as_loralab_predict(runs, tiny_base, small_data, tmp_path):
    from openai import OpenAI

    from loralab.evaluate.inputs import read_inputs
    from loralab.serve.server import RunningServer, ServeOptions, build_state

    inputs = read_inputs(small_data)[:3]
    predicted = {}
    for name, run in runs.items():
        out = tmp_path / f"{name}.jsonl"
        assert main(["predict", "--adapter", str(run), "--input", str(small_data), "--limit",
                     "3", "--max-new-tokens", str(NEW), "--device", "cpu", "--out",
                     str(out)]) == 0
        predicted[name] = [row["generation"] for row in read_jsonl(out)]
    state = build_state(tiny_base.model, tiny_base.tokenizer, "base", "builtin:tiny-qwen2",
                        list(runs.items()), ServeOptions(max_len=1024))
    with RunningServer(state) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["base", "fast", "slow"]
        for name in runs:
            got = [client.chat.completions.create(
                model=name, messages=x["messages"], temperature=0,
                max_tokens=NEW).choices[0].message.content for x in inputs]
            assert got == predicted[name], name


def test_user_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    assert main(["serve"]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["serve", "--adapters", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err
    assert main(["serve", "--base", "builtin:tiny-qwen2", "--max-rows", "0"]) == 2
    assert "--max-rows" in capsys.readouterr().err
    from loralab.commands import serve as serve_cli

    monkeypatch.setattr(serve_cli, "missing_packages", lambda: ["fastapi", "sse_starlette"])
    assert main(["serve", "--adapters", str(runs["fast"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'loralab[serve]'" in err


def one_line(capsys, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_bad_host_port_and_device_are_one_line_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.delenv("LORALAB_API_KEY", raising=False)
    base = ["serve", "--base", "builtin:tiny-qwen2"]
    assert main([*base, "--port", "70000"]) == 2
    one_line(capsys, "--port 70000")
    assert main([*base, "--host", "0.0.0.0", "--port", "0"]) == 2
    one_line(capsys, "--api-key", "--insecure-no-api-key")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main([*base, "--port", port]) == 2
        one_line(capsys, f"127.0.0.1:{port}", "--port")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        assert main([*base, "--port", "0", "--device", device]) == 2
        one_line(capsys, f"--device {device}", "no CUDA device")
    assert main([*base, "--port", "0", "--device", "gpu"]) == 2
    one_line(capsys, "--device gpu")


def test_a_kv_cache_too_large_is_one_line_naming_the_flags(capsys, monkeypatch):
    assert main(["serve", "--base", "builtin:tiny-qwen2", "--port", "0", "--device", "cpu",
                 "--max-len", str(10**9)]) == 2
    one_line(capsys, "--max-rows 64", "--max-len 1000000000", "GiB")
    # memory the check did not see (another process took it): the allocation's own error
    import torch

    from loralab.serve import server

    monkeypatch.setattr(server, "free_memory", lambda device: None)

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr("loralab.engine.continuous.ContinuousBatch", fail)
    assert main(["serve", "--base", "builtin:tiny-qwen2", "--port", "0", "--device", "cpu",
                 "--max-rows", "8"]) == 2
    one_line(capsys, "--max-rows 8", "lower --max-rows or --max-len")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_command_serves_a_run_on_localhost(runs):
    port = free_port()
    env = {**os.environ, "LORALAB_DEBUG": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loralab.cli", "serve", "--adapters", f"mine={runs['fast']}",
         "--port", str(port), "--device", "cpu", "--max-len", "512", "--api-key", "k"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        models = httpx.get(url + "/v1/models", headers=headers).json()
        assert [m["id"] for m in models["data"]] == ["builtin:tiny-qwen2", "mine"]
        reply = httpx.post(url + "/v1/completions", headers=headers, timeout=60, json={
            "model": "mine", "prompt": "hello", "max_tokens": 4, "temperature": 0}).json()
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

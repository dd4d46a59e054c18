"""Several training processes on CPU (gloo): the same training as one process, one writer.

Each run is real: `loralab train --nproc 2` starts two processes that each load the tiny model,
share every optimizer step's sequences and sum their LoRA gradients.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralab.commands.train import demo_config_path


def _cmd(overrides, *extra):
    return [sys.executable, "-m", "loralab.cli", "train", str(demo_config_path()), *overrides,
            "--quiet", *extra]


def _run(overrides, *extra, env=None, timeout=240):
    proc = subprocess.run(_cmd(overrides, *extra), capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    return proc


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_adapter(a: Path, b: Path) -> None:
    """Equal up to summation order: processes add their gradients in another order than one
    process does (seen: 1.4e-7 on weights of ~4e-3); one Adam step here moves a weight by 2e-3."""
    wa = load_file(str(a / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=1e-5, atol=1e-6), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """The same 3-step training in one process and in two (global batch 8 both ways)."""
    root = tmp_path_factory.mktemp("mp")
    common = [
        f"data.path={small_data}", "data.max_length=256", "lora.dropout=0", "train.lr=2e-3",
        "train.batch_size=4", "train.grad_accum=2", "train.max_steps=3", "train.save_every=1",
        "tracking.backend=tensorboard", f"tracking.log_dir={root / 'tb'}",
    ]
    out = {}
    for name, more, extra in (("one", [], []), ("two", [], ["--nproc", "2"]),
                              ("fsdp", ["train.strategy=fsdp"], ["--nproc", "2"])):
        proc = _run([*common, *more, f"output_dir={root / name}"], *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = root / name
    return common, root, out


def test_two_processes_train_as_one(runs):
    _, root, out = runs
    one, two = _metrics(out["one"]), _metrics(out["two"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        # Loss, gradient norm and token counts are the whole step's, not one process's share.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["labelled_tokens"] == a["labelled_tokens"]
    _assert_same_adapter(out["one"], out["two"])
    result = json.loads((out["two"] / "result.json").read_text())
    assert result["status"] == "done" and result["processes"] == 2
    # One tracker run per training run, written by the main process only.
    assert sorted(p.name for p in (root / "tb").iterdir()) == ["fsdp", "one", "two"]
    assert len(list((root / "tb" / "two").iterdir())) == 1


def test_fsdp_shards_the_layers_and_trains_as_one_process(runs):
    """train.strategy=fsdp: each process holds half of the decoder layers' weights, and the
    training is the one-process training (the LoRA weights stay whole on every process)."""
    _, _, out = runs
    one, fsdp = _metrics(out["one"]), _metrics(out["fsdp"])
    for a, b in zip(one, fsdp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    _assert_same_adapter(out["one"], out["fsdp"])
    sharding = json.loads((out["fsdp"] / "result.json").read_text())["fsdp"]
    assert sharding["sharded_layers"] == 2 and sharding["processes"] == 2
    assert 0 < sharding["sharded_bytes_per_process"] <= sharding["sharded_bytes"] / 2 + 4096


def test_fsdp_with_uneven_shares_does_not_hang(runs, tmp_path):
    """3 micro-batches a step on 2 processes: one runs 2, the other 1 plus a zero-weight pass
    (under FSDP every layer is a collective). Same losses as one process; no hang."""
    common, _, _ = runs
    uneven = [o for o in common if not o.startswith(("train.batch_size", "train.grad_accum",
                                                     "tracking."))]
    uneven += ["train.batch_size=1", "train.grad_accum=3", "tracking.backend=none"]
    env = {"LORALAB_DIST_TIMEOUT": "60"}  # a hang fails the test in a minute
    for name, more in (("one", []), ("fsdp", ["train.strategy=fsdp", "--nproc", "2"])):
        proc = _run([*uneven, f"output_dir={tmp_path / name}"], *more, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "fsdp"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["labelled_tokens"] == a["labelled_tokens"]


def test_two_processes_resume_to_the_same_adapter(runs):
    """Dropout on: each process's RNG state is checkpointed and restored, not only rank 0's."""
    common, root, _ = runs
    common = [*common, "lora.dropout=0.1"]
    straight = root / "straight"
    proc = _run([*common, f"output_dir={straight}"], "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = root / "killed"
    # kill_at_step/sitecustomize.py: both ranks SIGKILL themselves at the end of step 2.
    killer = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "kill_at_step"),
                                             os.environ.get("PYTHONPATH")])),
              "KILL_AT_STEP": "2"}
    proc = _run([*common, f"output_dir={killed}"], "--nproc", "2", env=killer)
    assert proc.returncode != 0
    assert "of 2 was killed by SIGKILL" in proc.stderr, proc.stderr[-2000:]
    assert not (killed / "adapter_model.safetensors").exists()
    proc = _run([*common, f"output_dir={killed}"], "--nproc", "2", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_adapter(killed, straight)


def test_two_machines_on_localhost_train_as_one(runs):
    """--nnodes 2: one launcher per 'machine', static rendezvous at --master-addr/--master-port."""
    from loralab.train.launch import free_port

    common, root, out = runs
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            _cmd([*common, f"output_dir={root / 'nodes'}"], "--nproc", "1", "--nnodes", "2",
                 "--node-rank", str(k), "--master-addr", "127.0.0.1", "--master-port", port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=240)
        assert node.returncode == 0, err[-3000:]
    _assert_same_adapter(root / "nodes", out["one"])


def test_a_killed_rank_ends_the_job(runs, tmp_path):
    common, _, _ = runs
    run = tmp_path / "long"
    overrides = [o for o in common if not o.startswith(("train.max_steps", "train.save_every"))]
    proc = subprocess.Popen(
        _cmd([*overrides, "train.max_steps=2000", f"output_dir={run}"], "--nproc", "2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run / "metrics.jsonl").is_file(), "training did not start"
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - killed_at < 60
    assert proc.returncode != 0
    assert "rank 1 of 2 was killed by SIGKILL" in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]  # the surviving rank says one line, or nothing


def _rank_pid(parent: int, rank: int) -> int:
    """The child of `parent` whose environment says RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under {parent}")


META_WORKER = '''
import json, sys, tempfile
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, Qwen2Config

from loralab.config import load_config
from loralab.model.load import TINY_QWEN2
from loralab.model.tokenizer import builtin_tokenizer_dir, load_tokenizer
from loralab.commands.train import demo_config_path
from loralab.train.dist import from_env, shutdown
from loralab.train.loop import Base, train_adapter

dist = from_env()
with init_empty_weights():  # weights on the meta device: nothing allocated on the host
    model = AutoModelForCausalLM.from_config(Qwen2Config(**TINY_QWEN2))
model.requires_grad_(False)
out = dist.share(tempfile.mkdtemp())
cfg = load_config(demo_config_path(), [f"data.path={sys.argv[1]}", f"output_dir={out}",
                  "train.strategy=fsdp", "train.max_steps=2", "tracking.backend=none",
                  "data.max_length=256", "train.batch_size=4", "train.grad_accum=1"])
_, result = train_adapter(cfg, Base(model, load_tokenizer(str(builtin_tokenizer_dir())),
                          torch.device("cpu")), show_progress=False, dist=dist)
if dist.is_main:
    print("RESULT " + json.dumps(result))
shutdown()
'''


def test_fsdp_materialises_a_meta_base_shard_by_shard(tmp_path, small_data):
    """A base built on the meta device (a model too big for the host) trains under fsdp: each
    process allocates only its shards of the decoder layers."""
    script = tmp_path / "worker.py"
    script.write_text(META_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(script), str(small_data)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, "\n".join(x for x in proc.stderr.splitlines() if "rank1" in x)[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["status"] == "done" and result["steps"] == 2
    assert all(map(lambda x: x == x and x < 100, (result["first_loss"], result["final_loss"])))
    sharding = result["fsdp"]
    assert 0 < sharding["sharded_bytes_per_process"] <= sharding["sharded_bytes"] / 2 + 4096

"""Issue 15 through the CLI on the tiny model: never delete a user's files, never run code from a
run folder, one line for corrupt weights and a full disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from loralab.cli import main
from loralab.commands.train import demo_config_path


class Payload:
    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("loralab: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def train(*args) -> int:
    return main(["train", str(demo_config_path()), *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def checkpointed_run(train_tiny_run):
    """A finished 2-step run with checkpoints/step-0000001 (trained once for this module)."""
    return train_tiny_run("safety", "train.save_every=1")


def copy_run(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


# ---------------------------------------------------------------- the user's files


def test_overwrite_never_empties_a_folder_that_is_not_a_run(capsys, tmp_path, overrides):
    d = tmp_path / "d"
    (d / "thesis").mkdir(parents=True)
    (d / "notes.txt").write_text("precious")
    assert train(*overrides, f"output_dir={d}", "--overwrite") == 2
    one_line(capsys, "not a loralab run")
    assert (d / "notes.txt").read_text() == "precious" and (d / "thesis").is_dir()


def test_a_non_empty_folder_is_not_written_into_without_overwrite(capsys, tmp_path, overrides):
    d = tmp_path / "d"
    d.mkdir()
    (d / "README.md").write_text("mine")
    (d / "tokenizer_config.json").write_text("{}")
    assert train(*overrides, f"output_dir={d}") == 2
    one_line(capsys, "not a loralab run")
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "tokenizer_config.json"]
    assert (d / "README.md").read_text() == "mine"


def test_overwrite_refuses_the_working_directory_and_its_parents(capsys, tmp_path, overrides,
                                                                 monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for target in (".", "..", "../.."):
        assert train(*overrides, f"output_dir={target}", "--overwrite") == 2
        one_line(capsys, "--overwrite refuses")
    assert (work / "keep.txt").is_file()


def test_sweep_overwrite_refuses_a_folder_that_is_not_a_sweep(capsys, tmp_path):
    import yaml

    out = tmp_path / "sw"
    out.mkdir()
    (out / "data.csv").write_text("1,2")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": str(demo_config_path()), "output_dir": str(out),
                                    "grid": {"lora.r": [2, 4]}}))
    assert main(["sweep", str(path), "train.max_steps=1", "tracking.backend=none",
                 "--overwrite", "--quiet"]) == 2
    one_line(capsys, "not a loralab sweep")
    assert sorted(p.name for p in out.iterdir()) == ["data.csv"]


# ---------------------------------------------------------------- nothing is executed


def test_a_pickle_payload_in_a_checkpoint_never_runs_on_resume(capsys, tmp_path, checkpointed_run,
                                                               overrides):
    run, cfg = checkpointed_run
    copy = copy_run(run, tmp_path)  # a moved run folder resumes where it is
    proof = tmp_path / "pwned"
    state = copy / "checkpoints" / "step-0000001" / "trainer_state.pt"
    torch.save({"step": Payload(proof)}, state)
    result = json.loads((copy / "result.json").read_text())  # as if killed: a finished run
    (copy / "result.json").write_text(json.dumps({**result, "status": "running"}))  # never resumes
    args = [f"data.path={cfg.data.path}", f"output_dir={copy}", "tracking.backend=none",
            "train.max_steps=2", "train.save_every=1", "train.batch_size=4",
            "train.grad_accum=1", "data.max_length=256"]
    assert train(*args, "--resume") == 2
    one_line(capsys, "trainer_state.pt", "weights_only")
    assert not proof.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "bad_header"])
def test_damaged_adapter_weights_are_one_line_for_merge(capsys, tmp_path, checkpointed_run, damage):
    copy = copy_run(checkpointed_run[0], tmp_path)
    file = copy / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "bad_header": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}"}[damage])
    assert main(["merge", "--adapter", str(copy), "--out", str(tmp_path / "m")]) == 2
    one_line(capsys, "adapter_model.safetensors")
    assert not (tmp_path / "m").exists()


def test_damaged_adapter_weights_are_one_line_for_eval_and_predict(capsys, tmp_path,
                                                                   checkpointed_run, small_data):
    copy = copy_run(checkpointed_run[0], tmp_path)
    file = copy / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-16])
    assert main(["predict", "--adapter", str(copy), "--input", str(small_data), "--limit", "1",
                 "--out", str(tmp_path / "p.jsonl")]) == 2
    one_line(capsys, "adapter_model.safetensors")
    assert main(["eval", "--adapters", str(copy), "--data", str(small_data), "--limit", "2",
                 "--out", str(tmp_path / "cmp")]) == 2
    one_line(capsys, "adapter_model.safetensors")


def test_a_pickle_payload_in_an_adapter_bin_never_runs(capsys, tmp_path, checkpointed_run):
    copy = copy_run(checkpointed_run[0], tmp_path)
    (copy / "adapter_model.safetensors").unlink()
    proof = tmp_path / "pwned"
    torch.save({"w": Payload(proof)}, copy / "adapter_model.bin")
    assert main(["merge", "--adapter", str(copy), "--out", str(tmp_path / "m")]) == 2
    one_line(capsys, "adapter_model.bin")
    assert not proof.exists()


# ---------------------------------------------------------------- a full disk

FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from loralab.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    sys.exit(main(sys.argv[2:]))
""")


def full_disk_train(tmp_path, overrides, limit: int, *extra: str) -> tuple[int, list[str], dict]:
    args = ["train", str(demo_config_path()), *overrides, *extra, "--quiet"]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), *args],
                          capture_output=True, text=True, timeout=300)
    run = tmp_path / "run"
    assert not any(p.name.startswith(".") and p.name.endswith(".tmp") for p in run.iterdir())
    return proc.returncode, proc.stderr.strip().splitlines(), json.loads(
        (run / "result.json").read_text())


def test_disk_full_in_a_checkpoint_is_one_line_and_result_json_says_failed(tmp_path, overrides,
                                                                           tiny_base):
    # The tiny model is cached (tiny_base); 10 kB holds config.yaml and result.json, not the
    # first checkpoint's adapter.
    code, lines, result = full_disk_train(tmp_path, overrides, 10_000, "train.save_every=1")
    assert code == 2 and len(lines) == 1, lines
    assert "File too large" in lines[0] and "ulimit" in lines[0], lines
    assert result["status"] == "failed" and "File too large" in result["error"], result


def test_disk_full_in_the_final_save_says_failed_in_result_json(tmp_path, overrides, tiny_base):
    # 1 MB: every file but the 7 MB tokenizer.json of the final save fits.
    code, lines, result = full_disk_train(tmp_path, overrides, 1_000_000)
    assert code == 2 and len(lines) == 1 and "File too large" in lines[0], lines
    assert result["status"] == "failed" and "File too large" in result["error"], result

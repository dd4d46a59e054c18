"""Issue 15: loralab deletes only what it wrote, runs no code from a run folder, one writer per
folder, files with the user's umask. Function-level; the CLI cases are in
tests/integration/test_safety.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from loralab import io as lio
from loralab import rundir
from loralab.errors import UserError
from loralab.train import checkpoint as ckpt


class Payload:
    """Unpickling this creates `path`: proof that code from the file ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def write_payload(file: Path, proof: Path) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": Payload(proof)}, file)  # what torch.load(weights_only=False) runs


def make_run(folder: Path, marker: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("output_dir: x\nlora: {r: 8}\n")
    (folder / "result.json").write_text('{"status": "done"}')
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    (folder / "checkpoints" / "step-0000001").mkdir(parents=True)
    if marker:
        rundir.claim(folder, "run")
    return folder


# ---------------------------------------------------------------- what may be cleared


def test_the_root_is_refused_directly():
    with pytest.raises(UserError, match="file-system root"):
        rundir.refuse_precious(Path("/"))


def test_home_cwd_and_parents_of_the_cwd_are_refused(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "home" / "proj" / "sub"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for folder, why in [(home, "home folder"), (work, "working directory"), (Path("."), "working"),
                        (work.parent, "parent of the working"), (Path(".."), "parent"),
                        (tmp_path, "parent")]:
        with pytest.raises(UserError, match=why):
            ckpt.check_run_dir(folder, resume=False, overwrite=True)
    rundir.refuse_precious(work / "runs" / "r1")  # a folder of its own is fine


def test_a_non_empty_folder_that_is_not_a_run_is_refused_with_and_without_overwrite(tmp_path):
    folder = tmp_path / "d"
    (folder / "thesis").mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a loralab run"):
            ckpt.check_run_dir(folder, resume=False, overwrite=overwrite)
    with pytest.raises(UserError, match="not a loralab run"):
        ckpt.clear_run_dir(folder)  # checked again at the moment of deleting
    assert (folder / "notes.txt").read_text() == "precious" and (folder / "thesis").is_dir()


def test_overwrite_removes_only_what_loralab_wrote(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "mine").mkdir()
    ckpt.check_run_dir(run, resume=False, overwrite=True)
    ckpt.clear_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == [rundir.MARKER, "mine", "notes.txt"]


def test_a_run_needs_overwrite_and_a_new_or_empty_folder_does_not(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(UserError, match="already holds a run"):
        ckpt.check_run_dir(run, resume=False, overwrite=False)
    ckpt.check_run_dir(run, resume=True, overwrite=False)
    ckpt.check_run_dir(tmp_path / "new", resume=False, overwrite=False)
    (tmp_path / "empty").mkdir()
    ckpt.check_run_dir(tmp_path / "empty", resume=False, overwrite=False)
    with pytest.raises(UserError, match="nothing to resume"):
        ckpt.check_run_dir(tmp_path / "empty", resume=True, overwrite=False)


def test_an_older_loralab_run_without_marker_is_a_run_only_if_both_files_are_loralabs(tmp_path):
    legacy = make_run(tmp_path / "legacy", marker=False)
    assert ckpt.is_run_dir(legacy)
    ckpt.clear_run_dir(legacy)
    assert not (legacy / "config.yaml").exists()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.yaml").write_text("name: my project\n")  # not loralab's keys
    (fake / "result.json").write_text('{"status": "done"}')
    assert not ckpt.is_run_dir(fake)
    half = make_run(tmp_path / "half", marker=False)
    (half / "result.json").unlink()
    assert not ckpt.is_run_dir(half)


def test_a_sweep_folder_is_not_a_run(tmp_path):
    sweep = tmp_path / "sweep"
    rundir.mark(sweep, "sweep")
    (sweep / "sweep.json").write_text("{}")
    with pytest.raises(UserError, match="holds a loralab sweep, not a run"):
        ckpt.check_run_dir(sweep, resume=False, overwrite=True)


def test_stale_temporary_files_are_cleaned_at_the_next_start(tmp_path):
    run = make_run(tmp_path / "run")
    litter = [run / ".adapter.abc123", run / "checkpoints" / ".step-0000002.xyz",
              run / ".result.json.q1w2.tmp"]
    litter[0].mkdir()
    litter[1].mkdir()
    litter[2].write_text("{")
    rundir.claim(run, "run")
    assert not any(p.exists() for p in litter)
    assert (run / "checkpoints" / "step-0000001").is_dir() and (run / "result.json").is_file()


# ---------------------------------------------------------------- one writer per folder

HOLDER = textwrap.dedent("""
    import sys, time
    from loralab.rundir import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_dead_ones_lock_is_taken_over(
        tmp_path):
    folder = tmp_path / "run"
    proc = _holder(folder, 60)
    try:
        with pytest.raises(UserError, match=f"in use by PID {proc.pid}"), rundir.folder_lock(folder):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert rundir.lock_holder(folder) == proc.pid  # kill -9: its lock file stays behind
    with rundir.folder_lock(folder):
        assert rundir.lock_holder(folder) == os.getpid()
    assert not (folder / rundir.LOCK).exists(), "released: the lock file goes"
    with rundir.folder_lock(tmp_path / "unused"):
        pass
    assert not (tmp_path / "unused").exists(), "a folder the lock created and nothing used goes"


def test_two_processes_racing_for_one_folder_exactly_one_proceeds(tmp_path):
    folder = tmp_path / "run"
    script = textwrap.dedent("""
        import sys, time
        from loralab.errors import UserError
        from loralab.rundir import folder_lock  # no torch: both are up long before the start
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
        try:
            with folder_lock(sys.argv[1]):
                print("proceeds", flush=True)
                time.sleep(6)  # held well past the other's try, even on a loaded machine
        except UserError as exc:
            print("refused:", exc, flush=True)
    """)
    start = str(time.time() + 5)  # both interpreters up, then both go at the same instant
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder), start],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs[0] == "proceeds" and outs[1].startswith("refused:") and "in use by PID" in outs[1]


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with rundir.folder_lock(tmp_path / "r"), rundir.folder_lock(tmp_path / "r"):
        assert rundir.lock_holder(tmp_path / "r") == os.getpid()


# ---------------------------------------------------------------- nothing is executed


class FakePeft:
    """save_pretrained like PEFT's, for checkpoint tests without a model."""

    def __init__(self) -> None:
        self.weight = torch.nn.Parameter(torch.randn(4, 4))

    def save_pretrained(self, folder, safe_serialization=True, save_embedding_layers=False):
        from safetensors.torch import save_file

        save_file({"w": self.weight.detach()}, str(Path(folder) / "adapter_model.safetensors"))
        (Path(folder) / "adapter_config.json").write_text("{}")


def real_state() -> dict:
    """The loop's trainer state: AdamW after a step, LambdaLR with a lambda, RNG, floats."""
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return {"step": 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": ckpt.rng_state(), "losses": [2.5], "tokens": 10, "train_seconds": 0.5}


def test_the_trainer_state_round_trips_with_weights_only(tmp_path):
    state = real_state()
    path = ckpt.save_checkpoint(tmp_path, 1, FakePeft(), state)
    loaded = ckpt.read_trainer_state(path / ckpt.STATE_FILE)
    assert loaded["scheduler"] == state["scheduler"] and loaded["losses"] == [2.5]
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


def test_a_pickle_payload_in_trainer_state_never_runs(tmp_path):
    proof = tmp_path / "pwned"
    file = tmp_path / "step-0000001" / ckpt.STATE_FILE
    write_payload(file, proof)
    with pytest.raises(UserError, match="trainer_state.pt") as info:
        ckpt.read_trainer_state(file)
    assert "\n" not in str(info.value)
    assert not proof.exists()


def test_a_pickle_payload_as_rng_state_inside_a_torch_checkpoint_never_runs(tmp_path):
    proof = tmp_path / "pwned"
    state = {**real_state(), "rng": {"torch": Payload(proof)}}
    torch.save(state, tmp_path / ckpt.STATE_FILE)
    with pytest.raises(UserError, match="weights_only"):
        ckpt.read_trainer_state(tmp_path / ckpt.STATE_FILE)
    assert not proof.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "bad_header"])
def test_a_damaged_checkpoint_safetensors_is_one_line_naming_it(tmp_path, damage):
    path = ckpt.save_checkpoint(tmp_path, 1, FakePeft(), real_state())
    file = path / "adapter_model.safetensors"
    _damage(file, damage)
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        ckpt.read_safetensors(file)


def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "empty":
        file.write_bytes(b"")
    elif how == "truncated":
        file.write_bytes(data[: len(data) - 8])
    else:
        file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}" + data[24:])


@pytest.mark.parametrize("damage", ["empty", "truncated", "bad_header"])
def test_check_adapter_file_names_a_damaged_safetensors(tmp_path, damage):
    from loralab.engine.lora_weights import check_adapter_file

    FakePeft().save_pretrained(tmp_path)
    _damage(tmp_path / "adapter_model.safetensors", damage)
    with pytest.raises(UserError, match="adapter_model.safetensors") as info:
        check_adapter_file(tmp_path)
    assert "\n" not in str(info.value)


def test_an_adapter_bin_with_a_pickle_payload_never_runs(tmp_path):
    from loralab.engine.lora_weights import check_adapter_file

    proof = tmp_path / "pwned"
    write_payload(tmp_path / "adapter_model.bin", proof)
    with pytest.raises(UserError, match="adapter_model.bin"):
        check_adapter_file(tmp_path)
    assert not proof.exists()
    torch.save({"w": torch.zeros(2)}, tmp_path / "adapter_model.bin")  # plain tensors: fine
    assert check_adapter_file(tmp_path).name == "adapter_model.bin"


# ---------------------------------------------------------------- disk full, modes


def test_a_full_disk_in_safetensors_becomes_an_oserror(tmp_path):
    import errno

    with pytest.raises(OSError) as info, ckpt.os_errors(tmp_path):
        raise RuntimeError("Error while serializing: I/O error: No space left (os error 28)")
    assert info.value.errno == errno.ENOSPC


def test_a_checkpoint_write_past_the_file_size_limit_is_efbig_not_a_torch_error(tmp_path):
    script = textwrap.dedent("""
        import errno, resource, signal, sys, torch
        from pathlib import Path
        sys.path.insert(0, sys.argv[2])
        from test_safety_rundir import FakePeft, real_state
        from loralab.train import checkpoint as ckpt
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        state = {**real_state(), "big": torch.zeros(100_000)}
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            ckpt.save_checkpoint(Path(sys.argv[1]), 1, FakePeft(), state)
        except OSError as exc:
            print("errno", exc.errno == errno.EFBIG)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "errno True", out.stderr[-2000:]
    assert not ckpt.list_checkpoints(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_and_folders_get_the_users_umask(tmp_path, monkeypatch, umask):
    monkeypatch.setattr(lio, "_UMASK", None)
    old = os.umask(umask)
    try:
        lio.write_json(tmp_path / "result.json", {"a": 1})
        folder = ckpt.save_checkpoint(tmp_path, 1, FakePeft(), real_state())
        ckpt.save_adapter_files(FakePeft(), None, tmp_path / "run")
    finally:
        os.umask(old)
        lio._UMASK = None
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (folder / ckpt.STATE_FILE).stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "run" / "adapter_config.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert json.loads((tmp_path / "result.json").read_text()) == {"a": 1}


def test_a_folder_replaced_whole_is_locked_beside_it(tmp_path):
    """loralab merge swaps its output folder in by a rename: its lock sits beside it."""
    out = tmp_path / "merged"
    with rundir.sibling_lock(out):
        script = ("import sys; from loralab.rundir import sibling_lock\n"
                  "from loralab.errors import UserError\n"
                  "try:\n    sibling_lock(sys.argv[1]).__enter__(); print('proceeds')\n"
                  "except UserError as exc: print('refused:', exc)")
        other = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                               text=True, timeout=60)
        assert other.stdout.startswith("refused:") and "in use by PID" in other.stdout
        assert not out.exists()  # the folder itself is left to the rename
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock

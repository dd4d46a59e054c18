"""`loralab train --nproc N`: start N training processes on this machine and watch them.

The same environment torchrun and `accelerate launch` give (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), with a static rendezvous: for several machines run
the same command on each with --nnodes, --node-rank and the first machine's --master-addr.
When one process fails, the others are stopped at once (a rank waiting in a collective for a
dead peer would otherwise hang), and one line says which rank failed and how.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

GRACE_SECONDS = 10  # between SIGTERM and SIGKILL when stopping the other ranks


@dataclass
class Topology:
    """Where this machine's processes sit in the job."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port (one machine only)

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(top: Topology, local_rank: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(top.node_rank * top.nproc + local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(top.world),
        LOCAL_WORLD_SIZE=str(top.nproc),
        MASTER_ADDR=top.master_addr,
        MASTER_PORT=str(port),
        # N processes on shared cores: one thread each unless told otherwise.
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // top.nproc))),
    )
    return env


def launch(argv: list[str], top: Topology) -> int:
    """Run `loralab <argv>` as this machine's ranks; the job's exit code (0 when all succeed)."""
    if top.nnodes > 1 and not top.master_port:
        raise ValueError("several machines need --master-port (the same on every machine)")
    port = top.master_port or free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", "loralab.cli", *argv], env=rank_env(top, k, port),
                         preexec_fn=_die_with_parent)
        for k in range(top.nproc)
    ]
    # SIGTERM/SIGHUP (kill, timeout, a cancelled CI job, a closed terminal) stop the ranks too.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    try:
        return _watch(procs, top)
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)
        return 130


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _die_with_parent() -> None:
    """In each rank, before it starts: the kernel sends it SIGTERM if the launcher dies
    (even by SIGKILL), so no rank trains on alone holding the run folder's lock."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the signal handlers above still apply
        pass


def _watch(procs: list[subprocess.Popen], top: Topology) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(k, c) for k, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            local, code = failed[0]
            _stop(procs, signal.SIGTERM)
            if code != 2:  # 2: the rank already said what was wrong, in one line
                rank = top.node_rank * top.nproc + local
                print(f"loralab: error: rank {rank} of {top.world} {_how(code)}; the other ranks "
                      "were stopped (--resume continues from the last checkpoint)", file=sys.stderr)
            return code if code > 0 else 1
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def _how(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of host memory?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"failed with exit code {code} (its error is above)"


def _stop(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

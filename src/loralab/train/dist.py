"""The processes of one training job: who this process is, and the few things they agree on.

loralab's data parallelism is plain: every process holds the frozen base and the LoRA weights,
trains its share of each optimizer step's sequences, and the LoRA gradients are summed over the
processes in one flat all-reduce after the step's backward passes. LoRA gradients are small
(20 M numbers for 7B at r=8: ~80 MB, well under a millisecond over NVLink), so DDP's bucketed
hooks, no_sync() and its zero-weight dummy pass for idle processes buy nothing here, and the
sum makes the gradient exactly the one-process gradient (DDP averages, which halves it on 2).

Works under `loralab train --nproc N`, `torchrun` and `accelerate launch` alike: they all set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which is all this module reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

# A collective that waits this long has lost a peer: end the job rather than hang for NCCL's
# default of 10 minutes (the launcher stops the others sooner when a rank dies).
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("LORALAB_DIST_TIMEOUT", "300")))


class PeerFailed(Exception):
    """Raised on the other processes when the main process refused the run (it says why)."""


@dataclass
class Dist:
    """This process's place in the job; with world == 1 every method is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes (float64: token counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over the processes: one all-reduce per dtype.

        A process that had no sequence this step has no gradients: it contributes zeros.
        """
        if self.world == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            torch.distributed.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    def same_start(self, params: list[torch.nn.Parameter]) -> None:
        """Every process starts from the main process's LoRA weights (seeded init already
        agrees; this makes it a guarantee, not a property of each card's RNG)."""
        if self.world > 1:
            for p in params:
                torch.distributed.broadcast(p.data, src=0)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (on every process)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def share(self, obj: Any) -> Any:
        """The main process's `obj` on every process (decisions that must not diverge)."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def main_decides(self, check: Any) -> None:
        """Run `check()` on the main process only; if it raises, every process stops.

        The main process re-raises its own error (one line to the user); the others raise
        PeerFailed, which the command turns into a quiet non-zero exit.
        """
        error = None
        if self.is_main:
            try:
                check()
            except Exception as exc:
                error = exc
        if self.world > 1:
            message = self.share(None if error is None else f"{type(error).__name__}: {error}")
            if message is not None and not self.is_main:
                raise PeerFailed(message)
        if error is not None:
            raise error


def from_env() -> Dist:
    """This process's Dist; joins the process group when launched as one of several.

    Sets the CUDA device to LOCAL_RANK before anything is put on a GPU (else every process
    would load its base model onto GPU 0).
    """
    from loralab.rundir import job_size, process_rank

    world, rank = job_size(), process_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            from loralab.errors import UserError

            raise UserError(f"process {rank} wants GPU {local_rank} but "
                            f"{torch.cuda.device_count()} are visible: use fewer processes")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"timeout": COLLECTIVE_TIMEOUT}
        if device.type == "cuda":
            kwargs["device_id"] = device
        torch.distributed.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return Dist(rank, world, local_rank, device)


def lost_a_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another process of the job died."""
    from loralab.rundir import job_size

    if job_size() == 1:
        return False
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(exc)
    return isinstance(exc, dist_error) or (isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer",
                            "NCCL communicator was aborted", "Timed out", "Broken pipe")))


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

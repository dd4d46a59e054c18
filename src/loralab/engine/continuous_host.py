"""Host buffers for the continuous batch's steps, taken in turn so that steps can be launched
back to back (continuous_step.py).

A step's inputs go host -> device and its tokens device -> host through pinned host memory, so
both copies are asynchronous on CUDA: the host goes on while they wait their turn on the
stream. With one buffer, launching step k+1 would rewrite the inputs that step k's copy may
not have read yet, and step k+1's tokens would land where step k's still wait to be read. So a
HostRing holds two buffers used in turn, each with the CUDA event recorded after the last copy
that used it: taking a buffer again first waits on that event (in a steady loop it is long
done).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TURNS = 2  # buffers per ring: the step being collected and the one just launched


@dataclass
class Ticket:
    """Where one download's values land: the ring's buffer `index`, the first `size` of it,
    and `serial`, which download it was (a later one through the same buffer overwrites it)."""

    index: int
    size: int
    serial: int
    buffer: Any  # the host tensor, for reading (and for tests: which buffer a step owns)


class HostRing:
    """`turns` host int64 buffers of `size` values (pinned on CUDA), used in turn by upload()
    and download(); on the CPU the copies are synchronous and the events absent."""

    def __init__(self, size: int, device: Any, turns: int = TURNS) -> None:
        import torch

        cuda = device.type == "cuda"
        self.buffers = [torch.zeros(size, dtype=torch.long, pin_memory=cuda)
                        for _ in range(turns)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(turns)]
        self.serials = [0] * turns  # the serial of each buffer's last download
        self.copies = 0

    def upload(self, values: list[int], target: Any) -> None:
        """target (a device tensor of `size`) <- values, through the next buffer, without
        waiting for the copy."""
        import torch

        index, buffer = self._take()
        buffer.copy_(torch.tensor(values, dtype=torch.long))
        target.copy_(buffer, non_blocking=True)
        self._record(index)

    def download(self, source: Any) -> Ticket:
        """Enqueue source (a device tensor, at most `size` values) -> the next buffer, without
        waiting for it; read(ticket) gives the values."""
        index, buffer = self._take()
        size = len(source)
        buffer[:size].copy_(source, non_blocking=True)
        self._record(index)
        self.serials[index] = self.copies
        return Ticket(index, size, self.copies, buffer)

    def read(self, ticket: Ticket) -> list[int]:
        """The values of download `ticket`, once its copy is done. Waiting on the event lets go
        of the GIL (a .tolist() of a device tensor waits holding it), so the server's HTTP
        thread runs meanwhile."""
        if self.serials[ticket.index] != ticket.serial:
            raise RuntimeError("a later download overwrote these values: read them before "
                               f"{len(self.buffers)} more downloads")
        event = self.events[ticket.index]
        if event is not None:
            event.synchronize()
        return ticket.buffer[:ticket.size].tolist()

    def _take(self) -> tuple[int, Any]:
        """The next buffer, once the last copy through it is done."""
        index = self.copies % len(self.buffers)
        self.copies += 1
        event = self.events[index]
        if event is not None:
            event.synchronize()
        return index, self.buffers[index]

    def _record(self, index: int) -> None:
        event = self.events[index]
        if event is not None:
            event.record()  # on the current stream, after the copy just enqueued

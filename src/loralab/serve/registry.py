"""Adapters the server knows: name -> folder, training system prompt, engine id, bytes.

Adapters come from `NAME=DIR`, a run folder (its name) or a sweep folder (every finished trial
under its trial name) at start, and from POST /v1/adapters at run time. Loading reads the
files outside the scheduler thread and only swaps the engine's factors between two decode
steps; the count and the bytes they take are bounded (--max-adapters, --adapter-memory-gb).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.errors import UserError
from loralab.serve.schemas import ServeError


@dataclass
class Adapter:
    name: str
    path: Path
    id: int  # the engine's adapter index (≥ 1; 0 is the base model)
    system_prompt: str | None
    nbytes: int


def adapter_specs(items: list[str]) -> list[tuple[str | None, Path]]:
    """`NAME=DIR` or `DIR` arguments as (name or None, folder)."""
    specs = []
    for item in items:
        name, sep, folder = item.partition("=")
        if sep and name and not Path(item).exists():
            specs.append((name, Path(folder)))
        else:
            specs.append((None, Path(item)))
    return specs


def expand(name: str | None, folder: Path) -> list[tuple[str, Path, str | None, str]]:
    """(name, adapter folder, training system prompt, base it was trained on) for a run, an
    adapter folder or every finished trial of a sweep. UserError when it holds none."""
    from loralab.evaluate.runner import adapter_run, expand_adapter_dirs

    found = expand_adapter_dirs([folder])
    if name is not None and len(found) > 1:
        raise UserError(f"{folder} holds {len(found)} adapters (a sweep): give it without "
                        "NAME= to serve each trial under its own name")
    out = []
    for path, default in found:
        run = adapter_run(path, default)
        out.append((name or default, path, run.system_prompt, run.base))
    return out


class Registry:
    """The adapters being served, and the engine-side work of adding and removing one."""

    def __init__(self, base_name: str, base_path: str, backend: Any, scheduler: Any,
                 max_adapters: int, max_bytes: int) -> None:
        self.base_name, self.base_path = base_name, base_path
        self.backend, self.scheduler = backend, scheduler
        self.max_adapters, self.max_bytes = max_adapters, max_bytes
        # written by the scheduler thread (add_now, unload's drop), read by the event loop:
        # `guard` makes each write and each listing whole
        self.adapters: dict[str, Adapter] = {}
        self.guard = threading.Lock()
        self.next_id = 1
        self.lock = asyncio.Lock()  # one load or unload at a time

    def resolve(self, model: str) -> Adapter | None:
        """The adapter a request's `model` names (None: the base). 404 when unknown."""
        if model == self.base_name:
            return None
        adapter = self.adapters.get(model)
        if adapter is None:
            raise ServeError(404, f"the model {model!r} does not exist; GET /v1/models lists "
                             "the base and the adapters", "model_not_found", "model")
        return adapter

    def listed(self) -> list[Adapter]:
        """The adapters now (a copy: safe to iterate while the scheduler changes them)."""
        with self.guard:
            return list(self.adapters.values())

    def names(self) -> list[str]:
        return [self.base_name, *(a.name for a in self.listed())]

    def prepare(self, name: str, folder: Path) -> list[tuple[Adapter, Any]]:
        """Check and read the adapters of `folder` (no engine change yet): UserError."""
        found = expand(name, folder)
        if len(self.adapters) + len(found) > self.max_adapters:
            raise UserError(f"at most {self.max_adapters} adapters are served at once "
                            f"(--max-adapters); {len(self.adapters)} are loaded")
        out: list[tuple[Adapter, Any]] = []
        total = self.backend.total_bytes([])
        for adapter_name, path, system, base in found:
            if adapter_name in self.adapters or adapter_name == self.base_name:
                raise UserError(f"the name {adapter_name!r} is taken")
            self._check_base(path, base)
            payload, _ = self.backend.read(path)
            before, total = total, self.backend.total_bytes([*(p for _, p in out), payload])
            if total > self.max_bytes:
                raise UserError(f"adapter {adapter_name} would bring the adapters to "
                                f"{total / 2**20:,.0f} MiB, over the "
                                f"{self.max_bytes / 2**20:,.0f} MiB bound (--adapter-memory-gb)")
            out.append((Adapter(adapter_name, path, self.next_id, system, total - before),
                        payload))
            self.next_id += 1
        return out

    def _check_base(self, path: Path, base: str) -> None:
        from loralab.evaluate.run_dirs import same_base

        if base and self.base_path and not same_base(base, self.base_path):
            raise UserError(f"adapter {path} was trained on {base!r}, not on the served base "
                            f"{self.base_path!r}")

    def add_now(self, prepared: list[tuple[Adapter, Any]]) -> None:
        """Attach prepared adapters; call from the scheduler thread (or before it starts)."""
        for adapter, payload in prepared:
            self.backend.add(adapter, payload)
            with self.guard:
                self.adapters[adapter.name] = adapter

    async def load(self, name: str, folder: Path) -> list[Adapter]:
        """POST /v1/adapters: read off the event loop, swap in between two steps."""
        async with self.lock:
            try:
                prepared = await asyncio.to_thread(self.prepare, name, folder)
            except UserError as exc:
                raise ServeError(400, str(exc), "adapter_not_loaded", "path") from None
            future = self.scheduler.call(lambda: self.add_now(prepared))
            await asyncio.wrap_future(future)
            return [a for a, _ in prepared]

    async def unload(self, name: str) -> Adapter:
        """DELETE /v1/adapters/NAME: its requests fail with 409, its memory is released."""
        async with self.lock:
            adapter = self.adapters.get(name)
            if adapter is None:
                raise ServeError(404, f"no adapter {name!r} is loaded", "model_not_found")

            def drop() -> None:
                self.scheduler.fail_adapter(adapter.id, f"the adapter {name!r} was unloaded")
                self.backend.remove(adapter)
                with self.guard:
                    del self.adapters[name]

            await asyncio.wrap_future(self.scheduler.call(drop))
            return adapter


class BatchAdapters:
    """The continuous engine's side: adapters as tensors, stacked into the batch's factors."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.loras: dict[int, dict[str, Any]] = {}

    def read(self, path: Path) -> tuple[Any, int]:
        """The adapter's {module: (A, B, scale)} on the model's device, and the bytes of
        that copy."""
        from loralab.engine.lora_weights import check_adapter_file, load_lora_file, lora_for_model

        check_adapter_file(path)
        loaded, reason = load_lora_file(path, self.batch.dtype)
        lora = None
        if loaded is not None:
            lora, reason = lora_for_model(loaded, self.batch.lm)
        if lora is None:
            raise UserError(f"adapter {path} cannot be served by the continuous engine "
                            f"({reason}); --engine naive attaches it with PEFT")
        return lora, _copy_bytes(lora)

    def total_bytes(self, extra: list[Any]) -> int:
        """What the loaded adapters plus `extra` take: the copies stacked from, and the
        stacked factors as they are allocated (each member of a group an adapter trains
        padded to its rank, and zero columns for every other adapter in that group)."""
        from loralab.engine.continuous_lora import stacked_bytes

        loras = [*self.loras.values(), *extra]
        itemsize = self.batch.lm.lm_head.weight.element_size()
        return (sum(_copy_bytes(lora) for lora in loras)
                + stacked_bytes(self.batch.lm, loras, itemsize))

    def add(self, adapter: Adapter, payload: Any) -> None:
        self.loras[adapter.id] = payload
        self.batch.set_adapters(self.loras)

    def remove(self, adapter: Adapter) -> None:
        self.loras.pop(adapter.id, None)
        self.batch.set_adapters(self.loras)


def _copy_bytes(lora: dict[str, Any]) -> int:
    return sum(a.nbytes + b.nbytes for a, b, _ in lora.values())

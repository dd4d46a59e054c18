"""How to generate (`GenSettings`) and what a generate call did (`GenStats`): the bottom of the
engine, imported by every other module of it and importing none of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class GenSettings:
    """How to generate; `min_new_tokens` = max_new_tokens forces a fixed length (benchmarks)."""

    max_new_tokens: int
    batch_size: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    engine: str = "auto"  # auto: static when greedy and the attention is sdpa/eager, else hf
    cuda_graph: bool = True  # static engine on CUDA: replay the decode step as a CUDA graph
    compile: bool = False  # static engine on CUDA: torch.compile the decode step before capture
    fast_forward: bool = True  # static engine: loralab's own forward where the model allows it
    shared_prefix: bool = True  # static engine: prefill the prompts' common prefix once
    prefill_chunks: int = 3  # static engine: prefill in this many length-sorted row groups
    min_new_tokens: int = 0  # stop tokens before this many new tokens do not end a generation
    seed: int = 0  # sampling only
    # Token ids for callers without a tokenizer (token-id prompts): () / None = the tokenizer's.
    stop_ids: tuple[int, ...] = ()
    pad_id: int | None = None


@dataclass
class GenStats:
    """What one generate call did. Filled while it runs (the decode loop writes `cuda_graph`,
    `shared_prefix`, ...) and returned with its generations: nothing global to read later."""

    engine: str  # "static" (loralab's decode loop) or "hf" (transformers' generate)
    new_tokens: int = 0  # kept tokens of every generation (up to and including its stop)
    seconds: float = 0.0  # the call's generation time between device syncs
    fast_forward: bool | str | None = None  # static: True, or why transformers' forward ran
    cuda_graph: bool = False  # static on CUDA: the decode step was replayed as a graph
    graph_error: str | None = None  # why a capture failed (the decode then ran eagerly)
    capture_seconds: float | None = None  # the last graph capture's time
    shared_prefix: int = 0  # the longest common prefix prefilled once, over the call's batches

    def as_dict(self) -> dict[str, Any]:
        """The throughput fields eval writes under metrics.json's `gen`."""
        rate = self.new_tokens / self.seconds if self.seconds > 0 else None
        return {"new_tokens": self.new_tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": rate, "engine": self.engine}

    def engine_dict(self) -> dict[str, Any]:
        """What the engine did (benchmarks record it per row)."""
        return {"cuda_graph": self.cuda_graph, "graph_error": self.graph_error,
                "shared_prefix": self.shared_prefix, "fast_forward": self.fast_forward,
                "capture_seconds": self.capture_seconds}

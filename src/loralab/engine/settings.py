"""How to generate: the settings both engines read (`generate` and `static_engine` import this,
never each other's settings)."""

from __future__ import annotations

from dataclasses import dataclass


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
    min_new_tokens: int = 0
    seed: int = 0  # sampling only

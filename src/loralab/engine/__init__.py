"""Generation as a library: `loralab eval`, `predict`, `chat` and `serve` call it; it imports
nothing from them.

Public API (everything else in the package is the engine's own):

    generate(model, tokenizer, prompts, settings, adapters=None) -> (results, GenStats)
        prompts: chat-rendered texts or token id lists; adapters: None, one LoraWeights
        (folded into loralab's forward) or a list of K (sharing every batch: results per
        adapter). Returns what the call did (engine, cuda_graph, fast_forward, seconds, ...).
    GenSettings       how to generate (max_new_tokens, batch_size, engine, cuda_graph, ...)
    GenStats          what one generate call did
    Generation        one prompt's output: text, new_tokens, finished, ids
    LoraWeights       one adapter's A/B/scale per module, as read_lora returns it
    read_lora(folder, model) -> (LoraWeights | None, why not)
    lora_scale(alpha, rank, rslora=False) -> float    PEFT's scaling rule
    check_adapter_file(folder) -> Path   the weights file, checked to read as tensors only
    AdapterSource(model, folders, settings)   adapters read ahead as tensors, else via PEFT
    attached_adapter(model, folder, merge)    context manager: PeftModel on the base, undone
    stop_token_ids(tokenizer, model=None) -> list[int]
    default_max_new_tokens(tokenizer, references) -> int

Names resolve on first use, so `import loralab.engine` loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "generate": "api", "Generation": "api", "stop_token_ids": "api",
    "default_max_new_tokens": "api",
    "GenSettings": "settings", "GenStats": "settings",
    "LoraWeights": "lora_weights", "read_lora": "lora_weights", "lora_scale": "lora_weights",
    "check_adapter_file": "lora_weights",
    "AdapterSource": "adapters", "attached_adapter": "adapters",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'loralab.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"loralab.engine.{_WHERE[name]}"), name)

"""Sweep trials reuse the compiled decoder layers across LoRA ranks (dynamo settings)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# dynamo settings that let a new trial reuse the compiled layers (see compiled_code_reused)
REUSE_SETTINGS = {
    "force_parameter_static_shapes": False,  # a LoRA weight's rank may become dynamic
    "force_nn_module_property_static_shapes": False,  # ... read as a module attribute too
    "specialize_float": False,  # PEFT's scaling (alpha / r) may become a symbolic float
}


@contextlib.contextmanager
def compiled_code_reused() -> Iterator[None]:
    """Trials of other ranks reuse the compiled decoder layers. Dynamo's defaults pin parameter
    shapes and python floats, so each new LoRA rank (a new weight shape and a new alpha/r) was a
    new graph: a full compilation per trial. With these settings a value becomes dynamic once
    it has changed (dynamo's automatic dynamic shapes): the base's weights never change and
    stay static; the second rank seen compiles once more, with the rank and the scaling
    symbolic, and every later trial finds a graph that fits (checked with dynamo's recompile
    log on the CPU: ranks 4, 8, 16, 32 compile at 4 and 8 only)."""
    import torch._dynamo as dynamo

    saved = {key: getattr(dynamo.config, key) for key in REUSE_SETTINGS if hasattr(dynamo.config, key)}
    for key in saved:
        setattr(dynamo.config, key, REUSE_SETTINGS[key])
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(dynamo.config, key, value)

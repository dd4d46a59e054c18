"""Putting an adapter on the loaded base for generation, two ways.

- As tensors (`AdapterSource`): when the static engine's own forward can run the base, the
  adapter's A/B are read straight from its safetensors file (the next file read in a thread while
  the GPU generates) and folded into the engine's weight copy. No PEFT modules, no merge into
  the base, nothing to undo: an adapter costs what a merged model costs.
- Through PEFT (`attached_adapter`): for everything else (another engine, DoRA, patterns,
  modules_to_save, a model the fast forward does not take, too little memory for its copy);
  merged for generation when asked, unmerged and unloaded on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loralab.engine.fast_forward import unavailable
from loralab.engine.forward import core_model, pick_engine
from loralab.engine.lora_weights import (
    LoraPrefetch,
    LoraWeights,
    check_adapter_file,
    lora_for_model,
)
from loralab.errors import UserError

FOLDED = "folded into loralab's forward"


class AdapterSource:
    """Yields, per adapter, what to generate with: (model, lora tensors or None, how)."""

    def __init__(self, model: Any, paths: list[Path], settings: Any) -> None:
        for path in paths:  # every adapter's file, before the first one is generated with
            check_adapter_file(path)
        self.model, self.lm = model, core_model(model)
        engine = pick_engine(model, settings)
        self.reason = "engine=hf" if engine != "static" else (
            unavailable(self.lm) if settings.fast_forward else "fast_forward off")
        weight = self.lm.lm_head.weight
        self.prefetch = LoraPrefetch(paths, weight.dtype, pin=weight.device.type == "cuda") \
            if self.reason is None and paths else None

    def tensors(self, index: int) -> tuple[LoraWeights | None, str | None]:
        """(adapter `index` as tensors on the model's device, None) or (None, why not)."""
        if self.prefetch is None:
            return None, self.reason
        loaded, reason = self.prefetch.get(index)
        return lora_for_model(loaded, self.lm, self.prefetch.paths[index]) if loaded \
            else (None, reason)

    @contextmanager
    def on_base(self, index: int, path: Path, merge: bool, fetched: tuple | None = None):
        """(model to generate with, lora or None, how the adapter was applied); `fetched`:
        what tensors(index) already returned."""
        lora, reason = fetched or self.tensors(index)
        if lora is not None:
            yield self.model, lora, FOLDED
            return
        with attached_adapter(self.model, path, merge=merge) as peft_model:
            yield peft_model, None, f"peft {'merged' if merge else 'unmerged'} ({reason})"

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()


class attached_adapter:  # noqa: N801 - used as a context manager, reads like one
    """PeftModel of `model` + the adapter in `path`, merged for generation when asked; on exit
    unmerged and unloaded, so the same base serves the next adapter."""

    def __init__(self, model: Any, path: Path, merge: bool) -> None:
        self.model, self.path, self.merge = model, Path(path), merge
        self.peft_model = None

    def __enter__(self) -> Any:
        from peft import PeftModel

        from loralab.model.quiet import quiet_hf

        check_adapter_file(self.path)
        try:
            with quiet_hf():  # no loading bar or deprecation warning per adapter
                self.peft_model = PeftModel.from_pretrained(self.model, str(self.path))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"cannot attach adapter {self.path} to the base: "
                            f"{str(exc).splitlines()[0]}") from None
        self.peft_model.eval()
        if self.merge:
            self.peft_model.merge_adapter()
        return self.peft_model

    def __exit__(self, *exc: Any) -> None:
        if self.peft_model is None:
            return
        if self.merge:
            self.peft_model.unmerge_adapter()
        self.peft_model.unload()

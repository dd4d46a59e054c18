"""loralab's LoRA forward for PEFT's Linear layers: bf16 compute, one fused add, no fp32 trips.

PEFT's forward casts the layer input to the adapter's dtype (fp32 here, for exact AdamW
updates), runs dropout even at p=0, and adds `B(A(x)) * s` to the base output in fp32, then
casts back: for a 7B model that is 196 modules x several full-size fp32 tensors per step.

This path keeps PEFT's modules and parameters (so `save_pretrained` writes the same plain PEFT
adapter, and `PeftModel.from_pretrained` reloads it), and only swaps their class for a subclass
whose forward computes, in the base's dtype:

    out = addmm(x W^T, (dropout(x) A^T) * s, B^T)        # base GEMM, small GEMM, fused add

The fp32 master weights are cast to the compute dtype on the fly (the casts are tiny: r x d),
scaling is applied to the [tokens, r] product rather than the [tokens, out] one, and dropout is
skipped outright when p = 0. On fp32 models (the CPU tests) the arithmetic is PEFT's.

The scale s = alpha/r (PEFT's `scaling`, rsLoRA included) is read from a 0-d fp32 buffer, not
the Python float: torch.compile guards on a float read from a dict, so every new alpha/r was a
recompile in a sweep. The product is taken in fp32 and rounded once, as PEFT's float does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_FAST_CLASSES: dict[type, type] = {}
SCALE = "loralab_scale"  # the buffer holding a fast layer's scale


def _fast_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not _plain_lora(self) or args or kwargs:
        return super(type(self), self).forward(x, *args, **kwargs)
    adapter = self.active_adapters[0]
    base = self.base_layer(x)
    lora_a = self.lora_A[adapter].weight
    lora_b = self.lora_B[adapter].weight
    dropout = self.lora_dropout[adapter]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0 and self.training:
        x = F.dropout(x, dropout.p, training=True)
    compute = base.dtype
    low = (F.linear(x.to(compute), lora_a.to(compute)).float() * self.loralab_scale).to(compute)
    flat = torch.addmm(base.reshape(-1, base.shape[-1]), low.reshape(-1, low.shape[-1]),
                       lora_b.to(compute).t())
    return flat.view(base.shape)


def _plain_lora(layer: nn.Module) -> bool:
    """One active vanilla LoRA adapter, unmerged, enabled: the case the fast forward covers."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    adapter = layer.active_adapters[0]
    return adapter in layer.lora_A and adapter not in getattr(layer, "lora_variant", {})


def fast_class(cls: type) -> type:
    """A subclass of PEFT's layer class with loralab's forward (one per class, cached)."""
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(f"Fast{cls.__name__}", (cls,), {"forward": _fast_forward})
    return _FAST_CLASSES[cls]


def is_fast(layer: nn.Module) -> bool:
    return type(layer) in _FAST_CLASSES.values()


def enable_fast_lora(peft_model: nn.Module) -> int:
    """Swap every plain PEFT LoRA Linear to the fast forward; returns how many were swapped."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    swapped = 0
    for module in peft_model.modules():
        if type(module) is LoraLinear and _plain_lora(module):
            module.__class__ = fast_class(LoraLinear)
            adapter = module.active_adapters[0]
            scale = torch.tensor(float(module.scaling[adapter]), dtype=torch.float32,
                                 device=module.lora_A[adapter].weight.device)
            module.register_buffer(SCALE, scale, persistent=False)  # not in the saved adapter
            swapped += 1
    return swapped


def mark_ranks_dynamic(model: nn.Module) -> None:
    """Compile the fast layers with the LoRA rank symbolic from the first trial on (a sweep's
    later ranks then find that graph instead of compiling a dynamic one at the second rank)."""
    import torch._dynamo as dynamo

    for module in model.modules():
        if is_fast(module):
            for adapter in module.active_adapters:
                dynamo.mark_dynamic(module.lora_A[adapter].weight, 0)
                dynamo.mark_dynamic(module.lora_B[adapter].weight, 1)


def disable_fast_lora(peft_model: nn.Module) -> None:
    """Give the layers PEFT's own class back (PEFT's merge/unload then see exactly their type)."""
    originals = {fast: orig for orig, fast in _FAST_CLASSES.items()}
    for module in peft_model.modules():
        if type(module) in originals:
            module.__class__ = originals[type(module)]
            if SCALE in module._buffers:
                del module._buffers[SCALE]

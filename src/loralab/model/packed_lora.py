"""Many LoRA adapters over one frozen base in one forward: the packed sweep's layer.

Each target nn.Linear of the base is wrapped by a `PackedLoraLinear` that holds every trial's
own A_t [r_t, in] and B_t [out, r_t] (separate fp32 parameters: each trial has its own
optimizer). The rows (tokens) of one forward belong to different trials; the layer computes

    low = where(K, (x A_cat^T) · s, 0)    A_cat = cat_t(A_t) [Σr, in]; K [tokens, Σr] bool
    out = x W^T + low B_cat^T              B_cat = cat_t(B_t) [out, Σr]

where K keeps, for each token, only its own trial's columns and s [Σr] is each column's trial's
alpha/r. Two GEMMs whatever the number of trials or their ranks, and exact: another trial's
slice adds 0 to a token's output and receives 0 gradient from it. The selection is a
`torch.where`, not a product with a 0/1 mask: a trial whose x A_t overflows to inf would
otherwise give every token 0·inf = NaN. (Non-finite *weights* B_t still reach every token
through the second GEMM: the packed loop computes such a trial alone, `sweep/packed.py`.)
K and s are built once per micro-batch (`PackedContext.set_owners`) and shared by every layer
(all trials target the same modules).

Compute is in the base's dtype with the fp32 masters cast on the fly, as in `fast_lora`; the
scale multiplies in fp32 and is rounded once, as `fast_lora`'s `low * scaling` does (a bf16
mask would carry alpha/r rounded: 32/12 is 0.2% off in bf16).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TrialSpec:
    """One trial's adapter shape: rank, scale (alpha/r or alpha/sqrt(r)) and dropout."""

    r: int
    scale: float
    dropout: float = 0.0


@dataclass
class PackedContext:
    """What every packed layer reads in a forward: the active trials and each token's owner."""

    trials: dict[int, TrialSpec] = field(default_factory=dict)  # slot → spec, every trial
    active: list[int] = field(default_factory=list)  # slots in this forward, in column order
    keep: torch.Tensor | None = None  # [tokens, Σr] bool: the token's owner's columns
    scale: torch.Tensor | None = None  # [Σr] fp32: each column's trial's alpha/r
    drop_p: torch.Tensor | None = None  # [tokens, 1] dropout probability (None: no dropout)

    def set_owners(self, owners: torch.Tensor) -> None:
        """owners [tokens]: the slot each token belongs to (-1: nobody, e.g. a pad fill)."""
        cols, scales = [], []
        for slot in self.active:
            spec = self.trials[slot]
            cols += [slot] * spec.r
            scales += [spec.scale] * spec.r
        device = owners.device
        col_owner = torch.tensor(cols, device=device)
        col_scale = torch.tensor(scales, device=device, dtype=torch.float32)
        self.keep = owners.reshape(-1, 1) == col_owner.reshape(1, -1)
        self.scale = col_scale
        probs = {s: self.trials[s].dropout for s in self.active}
        if any(probs.values()):
            table = torch.zeros(max(self.trials) + 2, device=device)
            for slot, p in probs.items():
                table[slot] = p
            self.drop_p = table[owners.reshape(-1)].unsqueeze(1)  # -1 indexes the last (0)
        else:
            self.drop_p = None

    def clear(self) -> None:
        self.keep = self.scale = self.drop_p = None


class PackedLoraLinear(nn.Module):
    """A frozen nn.Linear plus the LoRA pair of every trial (see the module docstring)."""

    def __init__(self, base_layer: nn.Linear, ctx: PackedContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ctx = ctx
        self.lora_A = nn.ParameterDict()  # str(slot) → [r, in]
        self.lora_B = nn.ParameterDict()  # str(slot) → [out, r]

    def add_trial(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
        pa = nn.Parameter(a.detach().to(torch.float32).clone())
        pb = nn.Parameter(b.detach().to(torch.float32).clone())
        self.lora_A[str(slot)], self.lora_B[str(slot)] = pa, pb
        return pa, pb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        ctx = self.ctx
        if ctx.keep is None or not ctx.active:
            return out
        compute = out.dtype
        a = torch.cat([self.lora_A[str(s)] for s in ctx.active]).to(compute)
        b = torch.cat([self.lora_B[str(s)] for s in ctx.active], dim=1).to(compute)
        flat_x = x.reshape(-1, x.shape[-1])
        if ctx.drop_p is not None and self.training:
            # Per-token dropout probability: each token's trial's own p (inverted dropout).
            keep = torch.rand_like(flat_x, dtype=torch.float32) >= ctx.drop_p
            flat_x = flat_x * (keep / (1.0 - ctx.drop_p)).to(flat_x.dtype)
        low = F.linear(flat_x.to(compute), a)
        # Scaled in fp32 (the exact alpha/r, one rounding: fast_lora's `low * scaling`), then
        # selected: where() passes 0, not 0·x, for another trial's columns (x may be inf).
        low = torch.where(ctx.keep, low * ctx.scale, 0.0).to(compute)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), low, b.t())
        return flat.view(out.shape)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." not in name:
        return model, name
    path, leaf = name.rsplit(".", 1)
    return model.get_submodule(path), leaf


def target_linears(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the Linear modules PEFT would wrap for these target names (suffix match)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]


class PackedAdapters:
    """The packed layers installed in a base model: add trials, read their weights, uninstall."""

    def __init__(self, model: nn.Module, targets: list[str]) -> None:
        self.model = model
        self.ctx = PackedContext()
        self.layers: dict[str, PackedLoraLinear] = {}
        self.originals: dict[str, nn.Linear] = {}
        for name in target_linears(model, targets):
            parent, leaf = _parent(model, name)
            linear = getattr(parent, leaf)
            self.originals[name] = linear
            self.layers[name] = PackedLoraLinear(linear, self.ctx)
        self.install()

    def install(self) -> None:
        for name, layer in self.layers.items():
            parent, leaf = _parent(self.model, name)
            setattr(parent, leaf, layer)

    def uninstall(self) -> None:
        """The base's own Linear modules back in place (the trials' weights are kept here)."""
        for name, linear in self.originals.items():
            parent, leaf = _parent(self.model, name)
            setattr(parent, leaf, linear)

    def add_trial(self, slot: int, spec: TrialSpec,
                  weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[nn.Parameter]:
        """Add a trial's initial weights (module name → (A, B)); returns its parameters in
        module order (A then B per module, as PEFT's parameters() lists them)."""
        missing = sorted(set(self.layers) - set(weights))
        if missing:
            raise ValueError(f"no initial weights for {missing[:3]}")
        self.ctx.trials[slot] = spec
        params: list[nn.Parameter] = []
        for name, layer in self.layers.items():
            params += layer.add_trial(slot, *weights[name])
        return params

    def trial_weights(self, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (layer.lora_A[str(slot)].data, layer.lora_B[str(slot)].data)
                for n, layer in self.layers.items()}

    def drop_trial(self, slot: int) -> None:
        """Forget a finished trial: its weights and optimizer memory can go."""
        if slot in self.ctx.active:
            self.ctx.active.remove(slot)
        for layer in self.layers.values():
            del layer.lora_A[str(slot)], layer.lora_B[str(slot)]

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield from layer.lora_A.values()
            yield from layer.lora_B.values()


def peft_weights(peft_model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT model's default adapter as base module name → (A, B), cloned."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[name] = (module.lora_A["default"].weight.detach().clone(),
                         module.lora_B["default"].weight.detach().clone())
    return out


def load_into_peft(peft_model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy trained (A, B) pairs into a freshly attached PEFT model's default adapter."""
    base = peft_model.get_base_model()
    for name, (a, b) in weights.items():
        module = base.get_submodule(name)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)

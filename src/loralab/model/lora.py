"""Attach a LoRA adapter with PEFT, and the loss computed only where labels are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from loralab.errors import UserError
from loralab.model.load import BASE_REVISION_ATTR
from loralab.model.quiet import quiet_hf

if TYPE_CHECKING:
    from loralab.config import LoraConfig


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target name must match at least one Linear in the model (PEFT only fails on none)."""
    names = {
        name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)
    }
    missing = [t for t in targets if t not in names]
    if missing:
        known = ", ".join(sorted(names - {"lm_head"}))
        raise UserError(
            f"lora.target_modules {missing} match nothing in the model; its linear layers: {known}"
        )


def attach_lora(model: nn.Module, lora_cfg: LoraConfig, seed: int) -> Any:
    """A PeftModel with fresh adapter weights (seeded), only the adapter trainable, weights in fp32."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_targets(model, lora_cfg.target_modules)
    peft_cfg = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        use_rslora=lora_cfg.rslora,
        use_dora=lora_cfg.dora,
        revision=getattr(model, BASE_REVISION_ATTR, None),  # set for bases loaded from the hub
    )
    with torch.random.fork_rng(devices=_devices_of(model)), quiet_hf():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_cfg)
    # Adapter weights in fp32 keep Adam's updates exact when the base is bf16.
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def _devices_of(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def lora_parameters(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def count_parameters(peft_model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return trainable, total


class LabelledLoss(nn.Module):
    """Sum of token cross-entropies at labelled positions, with logits only there.

    A causal LM's full logits are [tokens, vocab] in fp32: for Qwen's 152k vocabulary that is
    most of the step's memory and about half its time. Only positions whose next token carries a
    label need them, and those are projected through the LM head in chunks.
    Returns (loss_sum, n_labelled) so accumulation can normalise by the step's token count.
    """

    def __init__(self, peft_model: nn.Module, chunk: int = 2048, labelled_only: bool = True) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.chunk = chunk
        # False reproduces the usual HF loss path (fp32 logits at every position): the
        # benchmark's "lever off" baseline. The loss value is the same either way.
        self.labelled_only = labelled_only

    def causal_lm(self) -> nn.Module:
        return self.peft_model.get_base_model()

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, **model_inputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lm = self.causal_lm()
        hidden = lm.model(input_ids=input_ids, **model_inputs).last_hidden_state
        targets = labels[:, 1:]
        mask = targets != -100
        if not self.labelled_only:
            logits = lm.lm_head(hidden[:, :-1]).float()
            flat = logits.reshape(-1, logits.shape[-1])
            loss = nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="sum")
            return loss, mask.sum()
        picked = hidden[:, :-1][mask]
        wanted = targets[mask]
        return chunked_cross_entropy(picked, wanted, lm.lm_head, self.chunk), mask.sum()


def chunked_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int
) -> torch.Tensor:
    """Σ CE(head(hidden), targets), computed chunk by chunk so fp32 logits stay small."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            # Recompute the chunk's logits in backward instead of keeping them: memory stays
            # one chunk of fp32 logits whatever the number of labelled tokens.
            total = total + checkpoint(_chunk_ce, h, t, head, use_reentrant=False)
        else:
            total = total + _chunk_ce(h, t, head)
    return total


def _chunk_ce(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return nn.functional.cross_entropy(logits, targets, reduction="sum")

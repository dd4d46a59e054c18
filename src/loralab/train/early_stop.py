"""The held-out loss's best so far: early stopping, and the adapter a stopped run keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BestEval:
    """Updated at every held-out loss (`train.eval_every`); saved in checkpoints.

    With `patience` > 0 training stops after that many evals without a lower loss, and the
    run's adapter is the one of the best eval (its LoRA weights are kept on the CPU meanwhile),
    as HF Trainer's load_best_model_at_end does.
    """

    patience: int = 0
    loss: float | None = None
    step: int = 0
    since: int = 0  # evals since the best one
    last: float | None = None
    weights: dict[str, torch.Tensor] | None = None

    def update(self, loss: float, step: int, peft_model: Any) -> bool:
        """Record the eval loss of optimizer step `step`; True when training should stop."""
        self.last = loss
        if self.loss is None or loss < self.loss:
            self.loss, self.step, self.since = loss, step, 0
            if self.patience:
                self.weights = lora_weights(peft_model)
        else:
            self.since += 1
        return bool(self.patience) and self.since >= self.patience

    def restore_best(self, peft_model: Any) -> bool:
        """Put the best eval's LoRA weights back (early stopping on); True if it did."""
        if not self.patience or self.weights is None:
            return False
        from peft import set_peft_model_state_dict

        device = next(p for p in peft_model.parameters() if p.requires_grad).device
        set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in self.weights.items()})
        return True

    def state(self) -> dict[str, Any]:
        return {"loss": self.loss, "step": self.step, "since": self.since, "last": self.last,
                "weights": self.weights}

    @classmethod
    def from_state(cls, patience: int, state: dict[str, Any] | None) -> BestEval:
        return cls(patience, **(state or {}))

    def finish(self, peft_model: Any, steps_done: int, total_steps: int) -> dict[str, Any]:
        """result.json's held-out figures at the end of a run; with early stopping, the best
        eval's weights are put back into `peft_model` (they become the adapter saved)."""
        out = self.describe()
        if self.patience:
            out["stopped_early"] = steps_done < total_steps
            if self.restore_best(peft_model):
                out["adapter"] = f"best held-out loss, step {self.step}"
        return out

    def describe(self) -> dict[str, Any]:
        """What result.json says (nothing when no held-out loss was computed)."""
        if self.last is None:
            return {}
        return {"eval_loss": self.last, "best_eval_loss": self.loss, "best_step": self.step}


def lora_weights(peft_model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()}

"""One adapter's LoRA weights as plain tensors (`LoraWeights`), read from a PEFT adapter folder.

Evaluating an adapter through PEFT means building ~200 LoRA modules around the base, merging
them in and out again; `read_lora` instead loads A and B straight from `adapter_model.safetensors`
and the scale from `adapter_config.json` (`lora_scale`: PEFT's rule, tested against PEFT's own
layers), and `fast_forward` adds scale·B·A while it copies the weights anyway. Only plain LoRA on decoder-layer linears is read; anything PEFT does beyond that
(DoRA, rank/alpha patterns, modules_to_save, biases) returns a reason, and the caller attaches
the adapter with PEFT instead.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN

KEY = re.compile(r"^base_model\.model\.(model\.layers\.\d+\.(?:self_attn|mlp)\.[a-z_]+)"
                 r"\.lora_([AB])\.weight$")
PLAIN = {"peft_type": "LORA", "use_dora": False, "fan_in_fan_out": False, "bias": "none",
         "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
         "layer_replication": None, "use_qalora": False}
# Keys that say where the adapter goes or how it was initialised, not how it computes. Any
# other key set to something (aLoRA invocation tokens, trainable tokens, arrow, a future
# variant) sends the adapter to PEFT, which knows what it means.
INERT = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "r", "lora_alpha",
         "lora_dropout", "use_rslora", "target_modules", "exclude_modules", "init_lora_weights",
         "layers_to_transform", "layers_pattern", "auto_mapping", "peft_version",
         "megatron_config", "megatron_core", "eva_config", "corda_config", "runtime_config",
         "qalora_group_size", "ensure_weight_tying"}


@dataclass(eq=False)
class LoraWeights(Mapping):
    """One adapter on a model's linears, read as a mapping {module name
    (`model.layers.0.self_attn.q_proj`): (A [r, in], B [out, r], scale)} on the model's device.
    `source`: the folder it was read from."""

    factors: dict[str, tuple[Any, Any, float]]
    source: Path | None = None

    def __getitem__(self, module: str) -> tuple[Any, Any, float]:
        return self.factors[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _, _ in self.factors.values()), default=1)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_adapter_file(folder: Path) -> Path:
    """The adapter weights in `folder`, checked to read as plain tensors before PEFT sees them:
    a missing, empty, cut or bad-header safetensors file, or an adapter_model.bin that is not
    plain tensors (a pickle that would run code), is one line naming the file. Returns it."""
    from loralab.errors import UserError

    folder = Path(folder)
    safetensors_file, bin_file = folder / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS_BIN
    try:
        if safetensors_file.is_file():  # PEFT reads it in preference to the .bin
            from safetensors import safe_open

            with safe_open(str(safetensors_file), "pt") as fh:
                list(fh.keys())  # header read and the file's length checked against it
            return safetensors_file
        if bin_file.is_file():
            import torch

            loaded = torch.load(bin_file, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise ValueError(f"holds a {type(loaded).__name__}, not a state dict")
            return bin_file
    except Exception as exc:  # SafetensorError, UnpicklingError, RuntimeError, OSError
        file = safetensors_file if safetensors_file.is_file() else bin_file
        lines = str(exc).strip().splitlines()
        raise UserError(f"cannot read adapter weights {file} (loaded as tensors only): "
                        f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]) from None
    raise UserError(f"{folder} holds no adapter weights ({ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN})")


def _config_reason(cfg: dict[str, Any]) -> str | None:
    for key, value in cfg.items():
        if key in PLAIN:
            plain = PLAIN[key]
            if value != plain and not (plain in (None, {}, False) and not value):
                return f"adapter_config.json {key}={value!r}"
        elif key not in INERT and value not in (None, False, {}, [], ""):
            return f"adapter_config.json {key}={value!r} (only PEFT applies it)"
    return None


def load_lora_file(path: Path, dtype: Any = None,
                   pin: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """({"config": adapter_config, "pairs": {module: {"A": t, "B": t}}}, None) read to the CPU
    (cast to `dtype`, in pinned memory when `pin`: a quick copy to the GPU), or (None, why not).
    Touches no model, so it can run in a background thread."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file() or not (path / ADAPTER_CONFIG).is_file():
        return None, f"no {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}"
    cfg = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    reason = _config_reason(cfg)
    if reason:
        return None, reason
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(path / ADAPTER_WEIGHTS)).items():
        match = KEY.match(key)
        if match is None:
            return None, f"adapter weight {key} is not a decoder-layer LoRA A/B"
        tensor = tensor.to(dtype) if dtype is not None else tensor
        pairs.setdefault(match[1], {})[match[2]] = tensor.pin_memory() if pin else tensor
    return {"config": cfg, "pairs": pairs}, None


def lora_for_model(loaded: dict[str, Any], lm: Any,
                   source: Path | None = None) -> tuple[LoraWeights | None, str | None]:
    """(LoraWeights on lm's device, None) or (None, why): load_lora_file's tensors checked
    against the model's linears."""
    cfg, device = loaded["config"], lm.lm_head.weight.device
    modules = dict(lm.named_modules())
    lora = {}
    for name, pair in loaded["pairs"].items():
        module = modules.get(name)
        a, b = pair.get("A"), pair.get("B")
        if module is None or a is None or b is None:
            return None, f"{name}: no such linear in the base, or A/B missing"
        rank = a.shape[0]
        if tuple(a.shape) != (rank, module.in_features) or tuple(b.shape) != (
                module.out_features, rank):
            return None, f"{name}: adapter shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit"
        scale = lora_scale(cfg.get("lora_alpha", 8), rank, bool(cfg.get("use_rslora")))
        lora[name] = (a.to(device, non_blocking=True), b.to(device, non_blocking=True), scale)
    return LoraWeights(lora, source), None


def _load_or_reason(path: Path, dtype: Any, pin: bool) -> tuple[dict[str, Any] | None, str | None]:
    """load_lora_file, with a failure (unreadable file, no pinned memory) as a reason."""
    try:
        return load_lora_file(path, dtype, pin)
    except Exception as exc:  # the caller then attaches the adapter with PEFT, which reports
        return None, f"reading it as tensors failed: {type(exc).__name__}: {exc}"[:300]


def read_lora(path: Path, lm: Any) -> tuple[LoraWeights | None, str | None]:
    """load_lora_file + lora_for_model."""
    loaded, reason = load_lora_file(path)
    return lora_for_model(loaded, lm, Path(path)) if loaded is not None else (None, reason)


class LoraPrefetch:
    """Reads adapter files one ahead in a thread (cast, pinned) while the GPU generates for the
    current one. Measured on an H200 with a 7B (4 adapters one after another): each adapter's
    read still took ~26 ms of its run, as much as a file read on the spot as stored; where
    that goes (the wait, the copy to the GPU, the thread's share of the GIL) is not measured."""

    def __init__(self, paths: list[Path], dtype: Any = None, pin: bool = False) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.paths, self.dtype, self.pin = list(paths), dtype, pin
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: dict[int, Any] = {}

    def get(self, index: int) -> tuple[dict[str, Any] | None, str | None]:
        """load_lora_file(paths[index]); starts reading paths[index + 1]. A file not read ahead
        (the first, or a lone adapter) is read here as stored: casting and pinning on the CPU
        only pay off while the GPU is busy with another adapter (the factors are cast on the GPU
        when folded), and a round trip through the thread cost more than the read itself."""
        current = self.pending.pop(index, None)
        if index + 1 < len(self.paths) and index + 1 not in self.pending:
            self.pending[index + 1] = self._submit(index + 1)
        if current is None:
            return _load_or_reason(self.paths[index], None, False)
        return current.result()

    def _submit(self, index: int) -> Any:
        return self.pool.submit(_load_or_reason, self.paths[index], self.dtype, self.pin)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

"""Shared pieces of the GPU benchmarks: 7B-shaped random model, seed-like data, environment.

Results are written by bench/record.py (one folder per experiment, one schema)."""

from __future__ import annotations

import datetime
import platform
import random
import statistics
import subprocess
from pathlib import Path
from typing import Any

SEVEN_B = dict(  # Qwen2.5-7B's shapes (../shared/models.md), random bf16 weights
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
    rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False, bos_token_id=151643,
    eos_token_id=151645, pad_token_id=151643,
)
PAD_ID = 151643
BF16_PEAK = 790e12  # bf16 matmul rate measured on the H200 (anchors README)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class NoTokenizer:
    """What training needs of a tokenizer when the data is token ids already (the benchmarks)."""

    pad_token_id = PAD_ID

    def save_pretrained(self, folder) -> None:
        del folder


def loralab_cfg(out: Path, steps: int, overrides: dict):
    """The benchmarks' loralab config on 7B shapes (bs 4 x GA 4, no saves), with `overrides`."""
    from loralab.config import config_from_dict, set_dotted

    raw: dict = {"output_dir": str(out), "model": {"path": "7b-shapes"},
                 "data": {"path": "random", "max_length": 384},
                 "lora": {"target_modules": TARGETS},
                 "train": {"max_steps": steps, "batch_size": 4, "grad_accum": 4, "save_every": 0},
                 "tracking": {"backend": "none"}}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw).validate()


def build_model(shape: dict, attn: str = "sdpa"):
    """Random bf16 weights built on the GPU (< 1 s), frozen, eval mode, like load_base_model."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**shape)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.eval()
    model.config.use_cache = False
    return model


def seed_like_examples(n: int, seed: int = 0, low: int = 150, high: int = 384):
    """Random token ids, lengths uniform in [low, high], the last 25% labelled (prompt + answer)."""
    from loralab.data.render import IGNORE_INDEX, Example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(low, high)
        ids = [rng.randint(0, 151000) for _ in range(length)]
        cut = int(length * 0.75)
        out.append(Example(ids, [IGNORE_INDEX] * cut + ids[cut:], i, 0))
    return out


def environment(commit: str | None) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    from loralab.io import git_commit

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or git_commit(),
        "gpu": gpu,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "liger_kernel": _version("liger_kernel"),
        "driver": _driver(),
    }


def _version(name: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(name.replace("_", "-"))
    except Exception:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mfu(tokens_per_s: float, params: int) -> float:
    """4·N FLOPs per token (forward 2N + input gradients 2N) over the measured bf16 rate."""
    return tokens_per_s * 4 * params / BF16_PEAK


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(_cell(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)

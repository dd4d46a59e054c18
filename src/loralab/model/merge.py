"""Fold an adapter into its base and save a plain transformers model folder (the library part
of `loralab merge`; the command, which checks --out, finds the run and loads the model, is
commands/merge.py's).

The merged folder is checked the way a user will use it: reloaded from disk with
`AutoModelForCausalLM.from_pretrained` and compared, logit by logit, with base + adapter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loralab import rundir
from loralab.io import make_temp_dir, write_json
from loralab.layout import MERGE_CHECK

CHECK_PROMPTS = (
    "Hello! Who are you?",
    "将以下文本按照标签纬度进行关联度评分：新能源汽车销量创新高。",
    "Write one sentence about the sea.",
)


def prompt_logits(model: Any, tokenizer: Any, prompts: list[str]) -> list[Any]:
    """Full logits of every prompt (fp32, CPU), one prompt at a time: no padding involved."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
            out.append(model(**ids).logits.float().cpu())
    return out


def max_difference(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def merge_to_folder(peft_model: Any, tokenizer: Any, out: Path, prompts: list[str],
                    about: dict[str, Any]) -> dict[str, Any]:
    """Merge `peft_model` (an unmerged PEFT model) and write it with its tokenizer and
    merge_check.json to `out`, atomically. `prompts`: CHECK_PROMPTS rendered as the model is
    prompted, compared logit by logit after a reload; `about` ({"adapter", "base"}) heads the
    check. The command checks `out` (commands/merge.check_out_dir) before loading anything."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    expected = prompt_logits(peft_model, tokenizer, prompts)
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{out.name}.", out.parent)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=merged.dtype)
        reloaded.to(next(merged.parameters()).device).eval()
        check = {
            **about,
            "dtype": str(merged.dtype).replace("torch.", ""),
            "prompts": len(prompts),
            "max_abs_logit_diff": max_difference(expected, prompt_logits(reloaded, tokenizer, prompts)),
            "max_abs_logit": max(float(x.abs().max()) for x in expected),
        }
        write_json(tmp / MERGE_CHECK, check)
        rundir.mark(tmp, "merged")
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an old `out` (--overwrite) goes only afterwards."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "dir")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

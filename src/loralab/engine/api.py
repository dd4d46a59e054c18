"""Batched generation for evaluation: left padding, greedy by default, stop at end-of-turn.

Two engines behind one function, `generate_texts`:
- `static` (greedy): loralab's own loop over a preallocated KV cache with explicit masks, its
  decode step replayed as a CUDA graph on CUDA (`loralab.engine.decode`).
- `hf`: transformers' `generate` (sampling, attention kernels the static loop cannot drive);
  static cache on CUDA, dynamic cache on CPU.
Prompts are sorted by length before batching so a batch pads little. A generation that never
stops is cut at max_new_tokens and reported as not finished.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from loralab.engine.decode import (  # re-exported: tests and benchmarks import them here
    CHECK_EVERY,
    LAST_RUN,
    MIN_SHARED_PREFIX,
    StaticKV,
    common_prefix_length,
    core_model,
    grouped_decode_attention,
    left_pad,
    make_forward,
    row_groups,
    static_generate,
)
from loralab.engine.settings import GenSettings
from loralab.errors import UserError

__all__ = [
    "CHECK_EVERY", "ENGINES", "LAST_RUN", "MIN_SHARED_PREFIX", "GenSettings", "GenStats",
    "Generation", "StaticKV", "common_prefix_length", "cut_at_stop", "default_max_new_tokens",
    "generate_ids", "generate_ids_for_adapters", "generate_texts",
    "generate_texts_for_adapters", "grouped_decode_attention", "hf_generate", "left_pad",
    "length_batches", "make_forward", "pick_engine", "row_groups", "static_generate", "stop_token_ids",
]

ENGINES = ("auto", "static", "hf")


@dataclass
class Generation:
    """One record's output."""

    text: str
    new_tokens: int  # tokens generated up to and including the stop token
    finished: bool  # stopped by itself before max_new_tokens


@dataclass
class GenStats:
    new_tokens: int
    seconds: float
    engine: str
    # What the static engine did in this call (cuda_graph, graph_error, fast_forward,
    # shared_prefix, ...): returned with the generations, read by eval's metrics.json.
    engine_run: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else None
        return {"new_tokens": self.new_tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": rate, "engine": self.engine}


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """`<|im_end|>` when the vocabulary has it, the tokenizer's eos, the model's eos ids."""
    ids: list[int] = []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end is not None:
        ids.append(im_end)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    return sorted(set(ids))


def default_max_new_tokens(tokenizer: Any, references: list[str]) -> int:
    """1.5 × the longest reference answer in tokens + 16: room for the answer and its stop."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references),
                  default=0)
    return int(1.5 * longest) + 16


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first, stable), cut into batches of `batch_size`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def cut_at_stop(ids: list[int], stop_ids: list[int], limit: int) -> tuple[list[int], bool]:
    """(tokens up to the first stop token, inclusive; whether a stop token came within limit)."""
    stops = set(stop_ids)
    for i, token in enumerate(ids[:limit]):
        if token in stops:
            return ids[: i + 1], True
    return ids[:limit], False


def pick_engine(model: Any, settings: GenSettings) -> str:
    if settings.engine not in ENGINES:
        raise UserError(f"generation engine must be one of {', '.join(ENGINES)}")
    if settings.engine != "auto":
        if settings.engine == "static" and settings.do_sample:
            raise UserError("the static engine is greedy only: use engine=hf to sample")
        return settings.engine
    attn = getattr(core_model(model).config, "_attn_implementation", "sdpa")
    return "static" if not settings.do_sample and attn in ("sdpa", "eager") else "hf"


def generate_texts(
    model: Any, tokenizer: Any, prompts: list[str], settings: GenSettings,
    lora: dict[str, Any] | None = None,
) -> tuple[list[Generation], GenStats]:
    """Generate for every prompt (chat-rendered text); results in prompt order."""
    engine = pick_engine(model, settings)
    outs, seconds, stop_ids = _timed(model, tokenizer, prompts, lambda ids, stop, pad: (
        generate_ids(model, ids, settings, stop, pad, engine, lora)))
    return _decoded(tokenizer, outs, stop_ids, settings, seconds, engine, dict(LAST_RUN))


def generate_texts_for_adapters(
    model: Any, tokenizer: Any, prompts: list[str], settings: GenSettings,
    loras: list[dict[str, Any]],
) -> list[tuple[list[Generation], GenStats]]:
    """generate_texts for K adapters (read by lora_file) at once, their rows sharing every batch
    so each decode step reads the base weights once for all of them. Each adapter's seconds
    are the batch's seconds / K."""
    if not loras:
        return []
    outs, seconds, stop_ids = _timed(model, tokenizer, prompts, lambda ids, stop, pad: (
        generate_ids_for_adapters(model, ids, settings, stop, pad, loras)))
    share = seconds / len(loras)
    run = dict(LAST_RUN)
    return [_decoded(tokenizer, o, stop_ids, settings, share, "static", run) for o in outs]


def _timed(model: Any, tokenizer: Any, prompts: list[str], generate: Any):
    """(generate(prompt ids, stop ids, pad id), its seconds between device syncs, stop ids)."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stop_ids = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    LAST_RUN.update(cuda_graph=False, graph_error=None)
    _sync(device)
    started = time.perf_counter()
    outs = generate(prompt_ids, stop_ids, pad_id)
    _sync(device)
    return outs, time.perf_counter() - started, stop_ids


def _decoded(tokenizer: Any, outs: list[list[int]], stop_ids: list[int], settings: GenSettings,
             seconds: float, engine: str, engine_run: dict[str, Any]
             ) -> tuple[list[Generation], GenStats]:
    results = []
    for out in outs:
        kept, finished = cut_at_stop(out, stop_ids, settings.max_new_tokens)
        results.append(Generation(tokenizer.decode(kept, skip_special_tokens=True), len(kept),
                                  finished))
    return results, GenStats(sum(r.new_tokens for r in results), seconds, engine, engine_run)


def generate_ids(model: Any, prompt_ids: list[list[int]], settings: GenSettings,
                 stop_ids: list[int], pad_id: int, engine: str = "static",
                 lora: dict[str, Any] | None = None) -> list[list[int]]:
    """New token ids (uncut) per prompt, in prompt order, batched by length. `lora`: an
    adapter read by lora_file.read_lora, folded into the static engine's fast forward."""
    import torch

    if engine == "static":
        return _static_by_length(model, prompt_ids, settings, stop_ids, pad_id, lora)[0]
    with torch.inference_mode():
        return _by_length(prompt_ids, settings, 1, lambda ids: hf_generate(
            model, ids, settings, stop_ids, pad_id))[0]


def generate_ids_for_adapters(model: Any, prompt_ids: list[list[int]], settings: GenSettings,
                              stop_ids: list[int], pad_id: int,
                              loras: list[dict[str, Any]]) -> list[list[list[int]]]:
    """New token ids per adapter, per prompt (prompt order): generate_ids with K adapters'
    rows in every batch (the static engine on loralab's forward only)."""
    return _static_by_length(model, prompt_ids, settings, stop_ids, pad_id, list(loras))


def _static_by_length(model, prompt_ids, settings, stop_ids, pad_id, lora):
    """The static engine over length batches, one forward (weight copy) for all of them."""
    import torch

    with torch.inference_mode():
        forward = make_forward(model, settings, lora)
        return _by_length(prompt_ids, settings, forward.copies, lambda ids: static_generate(
            model, ids, settings, stop_ids, pad_id, forward))


def _by_length(prompt_ids: list[list[int]], settings: GenSettings, copies: int,
               generate: Any) -> list[list[list[int]]]:
    """generate(ids of a length batch) per batch, its rows (`copies` adapter-major blocks of
    the batch) put back in prompt order: [copy][prompt] -> new token ids."""
    results: list[list[list[int]]] = [[[] for _ in prompt_ids] for _ in range(copies)]
    for batch in length_batches([len(p) for p in prompt_ids], settings.batch_size):
        outs = generate([prompt_ids[i] for i in batch])
        for k, per_copy in enumerate(results):
            for j, i in enumerate(batch):
                per_copy[i] = outs[k * len(batch) + j]
    return results


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- transformers' generate


def hf_generate(
    model: Any, ids: list[list[int]], settings: GenSettings, stop_ids: list[int], pad_id: int
) -> list[list[int]]:
    """New token ids per prompt through `model.generate` (explicit settings: no model defaults
    such as Qwen's repetition_penalty or sampling leak into a greedy evaluation)."""
    import torch

    device = next(model.parameters()).device
    input_ids, mask = left_pad(ids, pad_id, device)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
        do_sample=settings.do_sample, eos_token_id=stop_ids, pad_token_id=pad_id,
        repetition_penalty=1.0, use_cache=True,
    )
    if settings.do_sample:
        torch.manual_seed(settings.seed)
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if device.type == "cuda":
        kwargs["cache_implementation"] = "static"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    return [row.tolist() for row in out[:, input_ids.shape[1] :]]

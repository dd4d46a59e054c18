"""`generate`: the engine's one entry point, for 0, 1 or K adapters.

Two engines behind it (settings.engine, `forward.pick_engine`):
- `static` (greedy): loralab's own loop over a preallocated KV cache with explicit masks, its
  decode step replayed as a CUDA graph on CUDA (`decode.static_generate`), on loralab's forward
  where the model allows it (`fast_forward`), else transformers'.
- `hf`: transformers' `generate` (sampling, attention kernels the static loop cannot drive);
  static cache on CUDA, dynamic cache on CPU.
Prompts are sorted by length before batching so a batch pads little. A generation that never
stops is cut at max_new_tokens and reported as not finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from loralab.engine.decode import hf_generate, static_generate
from loralab.engine.forward import make_forward, pick_engine
from loralab.engine.lora_weights import LoraWeights
from loralab.engine.settings import GenSettings, GenStats

Prompts = Union[Sequence[str], Sequence[Sequence[int]]]  # noqa: UP007 - a runtime alias


@dataclass
class Generation:
    """One prompt's output."""

    text: str  # decoded without special tokens ("" when generate was given no tokenizer)
    new_tokens: int  # tokens generated up to and including the stop token
    finished: bool  # stopped by itself before max_new_tokens
    ids: list[int] = field(default_factory=list)  # those tokens' ids


def generate(model: Any, tokenizer: Any, prompts: Prompts, settings: GenSettings,
             adapters: LoraWeights | list[LoraWeights] | None = None,
             stream: Callable[[str], None] | None = None) -> tuple[Any, GenStats]:
    """Generate for every prompt; (results in prompt order, what the call did).

    `prompts`: chat-rendered texts (tokenized without special tokens) or token id lists.
    `tokenizer`: decodes the results and gives the stop and pad ids; may be None for token id
    prompts when settings.stop_ids is set (results then have no text).
    `adapters`: None (the model as it is, PEFT adapters attached included); one LoraWeights,
    folded into loralab's forward; or a list of K, whose rows share every batch (unmerged) so a
    decode step reads the base weights once for all of them. Adapters need the static engine
    and loralab's forward (`AdapterSource` reads them only then).
    `stream`: called with each piece of text as it is decoded, for one prompt (chat); runs
    transformers' generate.
    Results: [Generation] per prompt; for a list of adapters, one such list per adapter.
    """
    if adapters == []:
        return [], GenStats("static")
    engine = "static" if isinstance(adapters, list) else pick_engine(model, settings)
    if adapters is not None and (engine != "static" or stream is not None):
        raise ValueError("adapters read as tensors need the static engine (engine=hf given)")
    if stream is not None and (len(prompts) != 1 or tokenizer is None):
        raise ValueError("stream needs one prompt and a tokenizer")
    stop_ids, pad_id = _stop_and_pad(tokenizer, model, settings)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str)
                  else list(p) for p in prompts]
    stats = GenStats(engine)
    device = next(model.parameters()).device
    _sync(device)
    started = time.perf_counter()
    if stream is not None:
        stats.engine = "hf"
        outs = [_streamed(model, tokenizer, prompt_ids, settings, stop_ids, pad_id, stream)]
    else:
        outs = _generate_ids(model, prompt_ids, settings, stop_ids, pad_id, engine, adapters,
                             stats)
    _sync(device)
    stats.seconds = time.perf_counter() - started
    results = [[_generation(tokenizer, o, stop_ids, settings) for o in per_adapter]
               for per_adapter in outs]
    stats.new_tokens = sum(g.new_tokens for per_adapter in results for g in per_adapter)
    return (results if isinstance(adapters, list) else results[0]), stats


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


def cut_at_stop(ids: list[int], stop_ids: list[int], limit: int,
                min_tokens: int = 0) -> tuple[list[int], bool]:
    """(tokens up to the first stop token at or after `min_tokens`, inclusive; whether a stop
    token came within limit)."""
    stops = set(stop_ids)
    for i in range(min_tokens, min(limit, len(ids))):
        if ids[i] in stops:
            return ids[: i + 1], True
    return ids[:limit], False


def _stop_and_pad(tokenizer: Any, model: Any, settings: GenSettings) -> tuple[list[int], int]:
    if not settings.stop_ids and tokenizer is None:
        raise ValueError("generate without a tokenizer needs settings.stop_ids")
    stop_ids = list(settings.stop_ids) or stop_token_ids(tokenizer, model)
    if settings.pad_id is not None:
        return stop_ids, settings.pad_id
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return stop_ids, pad_id if pad_id is not None else stop_ids[0]


def _generation(tokenizer: Any, out: list[int], stop_ids: list[int],
                settings: GenSettings) -> Generation:
    kept, finished = cut_at_stop(out, stop_ids, settings.max_new_tokens, settings.min_new_tokens)
    text = tokenizer.decode(kept, skip_special_tokens=True) if tokenizer is not None else ""
    return Generation(text, len(kept), finished, kept)


def _generate_ids(model: Any, prompt_ids: list[list[int]], settings: GenSettings,
                  stop_ids: list[int], pad_id: int, engine: str,
                  adapters: LoraWeights | list[LoraWeights] | None,
                  stats: GenStats) -> list[list[list[int]]]:
    """New token ids (uncut): [adapter][prompt], prompt order, batched by length; one forward
    (one weight copy) for every batch of the call."""
    import torch

    with torch.inference_mode():
        if engine != "static":
            return _by_length(prompt_ids, settings, 1, lambda ids: hf_generate(
                model, ids, settings, stop_ids, pad_id))
        forward = make_forward(model, settings, adapters, stats)
        return _by_length(prompt_ids, settings, forward.copies, lambda ids: static_generate(
            model, ids, settings, stop_ids, pad_id, forward, stats))


def _streamed(model: Any, tokenizer: Any, prompt_ids: list[list[int]], settings: GenSettings,
              stop_ids: list[int], pad_id: int, stream: Callable[[str], None]) -> list[list[int]]:
    """transformers' generate for one prompt, its text handed to `stream` as it comes."""
    import torch
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                stream(text)

    streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        return hf_generate(model, prompt_ids, settings, stop_ids, pad_id, streamer)


def _by_length(prompt_ids: list[list[int]], settings: GenSettings, copies: int,
               generate_batch: Any) -> list[list[list[int]]]:
    """generate_batch(ids of a length batch) per batch, its rows (`copies` adapter-major blocks
    of the batch) put back in prompt order: [copy][prompt] -> new token ids."""
    results: list[list[list[int]]] = [[[] for _ in prompt_ids] for _ in range(copies)]
    for batch in length_batches([len(p) for p in prompt_ids], settings.batch_size):
        outs = generate_batch([prompt_ids[i] for i in batch])
        for k, per_copy in enumerate(results):
            for j, i in enumerate(batch):
                per_copy[i] = outs[k * len(batch) + j]
    return results


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


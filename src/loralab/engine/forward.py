"""The static engine's two forwards and the choice between them.

`FastForward` (fast_forward.py): loralab's own forward over a stacked copy of a Llama-shaped
decoder, with 0, 1 (folded into the copy) or K adapters (their rows sharing every batch).
`HFForward`: transformers' own forward, for any model the engine accepts (PEFT-attached
adapters, other architectures, too little memory for the copy). `make_forward` picks one.
"""

from __future__ import annotations

from typing import Any

from loralab.engine.fast_forward import FastForward, unavailable, why_not
from loralab.engine.kv_cache import PrefillWriter, StaticKV
from loralab.engine.lora_weights import LoraWeights
from loralab.engine.settings import GenSettings, GenStats
from loralab.errors import UserError

ENGINES = ("auto", "static", "hf")


def core_model(model: Any) -> Any:
    """The transformers model inside a PeftModel (LoRA layers live in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pick_engine(model: Any, settings: GenSettings) -> str:
    """"static" (loralab's greedy decode loop) or "hf" (transformers' generate)."""
    if settings.engine not in ENGINES:
        raise UserError(f"generation engine must be one of {', '.join(ENGINES)}")
    if settings.engine != "auto":
        if settings.engine == "static" and settings.do_sample:
            raise UserError("the static engine is greedy only: use engine=hf to sample")
        return settings.engine
    attn = getattr(core_model(model).config, "_attn_implementation", "sdpa")
    return "static" if not settings.do_sample and attn in ("sdpa", "eager") else "hf"


def _cache_kwarg(lm: Any) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use what this version takes."""
    import inspect

    params = inspect.signature(lm.model.forward).parameters if hasattr(lm, "model") else {}
    return "cache" if "cache" in params else "past_key_values"


def _forward(lm: Any, input_ids, position_ids, mask, cache, cache_kwarg: str):
    # Models with per-layer-type masks (Qwen2's has_sliding_layers) take them as a mapping;
    # the others (Llama, Mistral) take a 4-D mask, which transformers uses as given.
    masks = {"full_attention": mask, "sliding_attention": mask} \
        if hasattr(getattr(lm, "model", None), "has_sliding_layers") else mask
    out = lm(input_ids=input_ids, position_ids=position_ids, attention_mask=masks,
             use_cache=True, logits_to_keep=1, **{cache_kwarg: cache})
    return out.logits[:, -1]


class HFForward:
    """prefill/decode through transformers' own forward (any model the engine accepts)."""

    copies = 1  # one adapter (or none) per row: several adapters per batch need FastForward

    def __init__(self, lm: Any, compile_decode: bool = False) -> None:
        import torch

        self.lm, self.kwarg = lm, _cache_kwarg(lm)
        self.step = torch.compile(_forward, dynamic=False) if compile_decode else _forward

    def prefill(self, cache: StaticKV, input_ids, positions, mask, write, read, adapter=0):
        writer = PrefillWriter(cache, write, read)
        return _forward(self.lm, input_ids, positions, mask, writer, self.kwarg)

    def decode(self, cache: StaticKV, token, position, mask):
        return self.step(self.lm, token, position, mask, cache, self.kwarg)


def make_forward(model: Any, settings: GenSettings,
                 lora: LoraWeights | list[LoraWeights] | None, stats: GenStats):
    """loralab's FastForward (with `lora` folded in, or a list of adapters sharing the batch)
    where the model and memory allow it, else HFForward; stats.fast_forward is True or the
    reason it was not used."""
    lm = core_model(model)
    # With adapters read as tensors the memory was judged when they were read (AdapterSource);
    # judging it again here, with their factors now on the GPU, could only refuse them late.
    check = why_not if lora is not None else unavailable
    reason = check(lm) if settings.fast_forward else "off (fast_forward=False)"
    stats.fast_forward = reason or True
    if lora is not None and reason:
        raise RuntimeError(f"an adapter read as tensors needs the fast forward: {reason}")
    compile_decode = settings.compile and lm.lm_head.weight.device.type == "cuda"
    if reason is None:
        return FastForward(lm, lora, compile_=compile_decode)
    return HFForward(lm, compile_decode=compile_decode)


def grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, **kwargs):
    """One-token attention for grouped-query models without copying K/V per query head.

    transformers' SDPA path repeats every K/V head for its query heads whenever a mask is given
    (7× the cache of Qwen2.5-7B read and written per layer and token): the largest cost of a
    decode step once launches are gone. Longer queries (prefill) use the SDPA path.
    """
    import torch

    if query.shape[2] != 1:
        return _SDPA["forward"](module, query, key, value, attention_mask, dropout=dropout,
                                scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :length].float()  # [batch, 1, 1, length]
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [batch, kv_heads, group, dim]
    return out.reshape(batch, 1, heads, dim), None


_SDPA: dict[str, Any] = {}


class decode_attention:  # noqa: N801 - a context manager
    """Route transformers' 'sdpa' attention through grouped_decode_attention while inside."""

    def __enter__(self) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.table = ALL_ATTENTION_FUNCTIONS
        self.had_local = "sdpa" in getattr(self.table, "_local_mapping", {})
        self.previous = self.table["sdpa"]
        _SDPA["forward"] = self.previous
        self.table["sdpa"] = grouped_decode_attention

    def __exit__(self, *exc: Any) -> None:
        if self.had_local:
            self.table["sdpa"] = self.previous
        else:
            del self.table["sdpa"]

"""The static engine's KV cache: preallocated keys/values written at a device-side offset
(`StaticKV`), prefill's view of it (`PrefillWriter`), and the masks and padding around it."""

from __future__ import annotations

from typing import Any


def left_pad(ids: list[list[int]], pad_id: int, device: Any):
    """(input ids, attention mask) of `ids` left-padded with `pad_id` to the longest."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


def additive_mask(valid: Any, dtype: Any) -> Any:
    """Boolean 'may attend' → additive mask (finite minimum: a fully masked row stays finite)."""
    import torch

    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(valid, zero, torch.finfo(dtype).min)


def _cache_base():
    from transformers.cache_utils import Cache

    return Cache


class StaticKV(_cache_base()):
    """Preallocated keys/values of every layer, written at a device-side offset.

    The offset lives in a tensor so the decode step is the same code every token (graph-safe);
    it advances once per forward, after all layers wrote (`advance`).
    """

    is_compileable = True

    def __init__(self, config: Any, batch: int, max_len: int, dtype: Any, device: Any) -> None:
        import torch

        # Cache.__init__ differs across transformers versions; this class needs none of it.
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, heads, max_len, head_dim)
        n = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.offset = torch.zeros((), dtype=torch.long, device=device)
        self.steps = torch.arange(max_len, device=device)
        self.layers = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        where = self.offset + self.steps[: key_states.shape[2]]
        self.keys[layer_idx].index_copy_(2, where, key_states.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, where, value_states.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions and masks are always given explicitly

    def advance(self, n: int) -> None:
        self.offset.add_(n)


class PrefillWriter(_cache_base()):
    """Prefill's view of a StaticKV: writes a block of rows/slots, attends over a cache slice.

    `write` = (rows, first slot) where the new keys go (a batch-1 prefix broadcasts to every
    row); `read` = (rows, end slot) of what the block's queries attend to.
    """

    is_compileable = False

    def __init__(self, cache: StaticKV, write: tuple[slice, int], read: tuple[slice, int]):
        self.cache, self.write, self.read = cache, write, read
        self.layers = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        (rows, start), (read_rows, end) = self.write, self.read
        stop = start + key_states.shape[2]
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys[rows, :, start:stop] = key_states.to(keys.dtype)
        values[rows, :, start:stop] = value_states.to(values.dtype)
        return keys[read_rows, :, :end], values[read_rows, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

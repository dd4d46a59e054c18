"""Peak GPU memory of a LoRA training step, predicted from layer shapes; `train.memory: auto`.

Two numbers:
- the seed's rule of thumb: 2·P (bf16 weights) + 16·P_LoRA (fp32 weight, grad, two Adam moments)
- loralab's model: weights + LoRA states + saved activations + the loss's logits + backward
  workspace, each counted from the decoder's shapes for a micro-batch of T tokens.

Saved activations per token and layer (bytes, bf16 compute, h hidden, kv = kv heads x head dim,
i intermediate), as autograd keeps them with loralab's fast LoRA path:
  2 RMSNorms keep their fp32 input            2·4h
  LoRA A GEMMs keep the norm outputs          2·2h   (q/k/v share one input, gate/up another)
  attention keeps q, k, v, out                2·(2h + 2kv)   (4h when SDPA repeats k/v heads)
  MLP keeps gate, silu(gate), up, their prod  4·2i
PEFT's own forward also keeps fp32 copies of the inputs of the 7 adapters (6·4h + 4i); dropout
keeps a mask per adapter input (and, on the fast path, the dropped copy). With gradient
checkpointing a layer keeps only its bf16 input, plus one layer's activations while it is
recomputed. Checked against the H200 anchors (../shared/anchors) within a few percent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

GIB = 2**30
# Never plan past this share of the card: the allocator fragments and CUDA keeps some for itself.
CARD_SHARE = 0.9


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that size a decoder's memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim


def shape_of(hf_config: Any, params: int | None = None) -> ModelShape:
    """ModelShape from a transformers config (Qwen2/Llama-style names)."""
    h = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or h // heads
    shape = ModelShape(
        hidden=h,
        intermediate=hf_config.intermediate_size,
        layers=hf_config.num_hidden_layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=hf_config.vocab_size,
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
        params=0,
    )
    return ModelShape(**{**asdict(shape), "params": params or count_params(shape)})


def count_params(s: ModelShape) -> int:
    """Parameters of a Qwen2-style decoder (biases on q/k/v), embeddings and head included."""
    attn = 2 * s.hidden * s.heads * s.head_dim + 2 * s.hidden * s.kv
    attn += s.heads * s.head_dim + 2 * s.kv  # q/k/v biases
    layer = attn + 3 * s.hidden * s.intermediate + 2 * s.hidden
    head = 0 if s.tied else s.vocab * s.hidden
    return s.layers * layer + s.vocab * s.hidden + head + s.hidden


def module_dims(s: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection LoRA can target."""
    q, kv = s.heads * s.head_dim, s.kv
    return {
        "q_proj": (s.hidden, q),
        "k_proj": (s.hidden, kv),
        "v_proj": (s.hidden, kv),
        "o_proj": (q, s.hidden),
        "gate_proj": (s.hidden, s.intermediate),
        "up_proj": (s.hidden, s.intermediate),
        "down_proj": (s.intermediate, s.hidden),
    }


def lora_params(s: ModelShape, r: int, targets: list[str]) -> int:
    dims = module_dims(s)
    return s.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)


@dataclass
class Estimate:
    """Predicted peak memory of one training step, in bytes, by part."""

    tokens: int  # tokens in the largest micro-batch (padding included)
    micro_batch: int
    checkpointing: bool
    weights: int
    lora_states: int
    activations: int
    logits: int
    workspace: int
    seed_formula: int  # 2P + 16 P_LoRA

    @property
    def total(self) -> int:
        return self.weights + self.lora_states + self.activations + self.logits + self.workspace

    def gib(self) -> dict[str, float]:
        parts = ("weights", "lora_states", "activations", "logits", "workspace", "total")
        return {k: round(getattr(self, k) / GIB, 2) for k in parts} | {
            "seed_formula": round(self.seed_formula / GIB, 2)
        }


@dataclass(frozen=True)
class StepShape:
    """How a step runs, as far as memory is concerned."""

    fused_lora: bool = True
    dropout: float = 0.0
    varlen_attention: bool = True  # flash/flex keep k/v at kv-head size; SDPA may repeat them
    labelled_only: bool = True
    loss_chunk: int = 2048
    r: int = 8
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")
    weight_bytes: int = 2  # bf16 base
    compiled: bool = False  # torch.compile'd layers (inductor recomputes cheap pointwise results)


def layer_bytes_per_token(s: ModelShape, step: StepShape) -> int:
    """Saved activations of one decoder layer, per token."""
    h, kv, i, e = s.hidden, s.kv, s.intermediate, step.weight_bytes
    norms = 2 * 4 * h
    attention = e * (2 * h + 2 * kv) if step.varlen_attention else e * 4 * h
    drop = step.dropout > 0
    if step.compiled:
        # Measured on the H200 (docs/fast_path.md): silu(gate) is recomputed, PEFT's fp32 casts
        # fuse away (fused or not), and dropout keeps only the dropped bf16 copies.
        total = norms + attention + 3 * e * i + 2 * e * h
        return total + (e * (6 * h + i) if drop else 0)
    mlp = 4 * e * i
    total = norms + attention + mlp
    if step.fused_lora:
        total += 2 * e * h  # the two norm outputs, kept by the LoRA A GEMMs
        if drop:  # a dropped copy (e) and a mask (1 byte) per adapter input
            total += (e + 1) * (3 * h + h + 2 * h + i)
    else:
        total += 4 * (6 * h + i)  # PEFT's fp32 casts of the adapter inputs
        if drop:
            total += 6 * h + i
    return total


def estimate(
    s: ModelShape, tokens: int, labelled: int, micro_batch: int, checkpointing: bool,
    step: StepShape,
) -> Estimate:
    """Predicted peak for a micro-batch of `tokens` tokens with `labelled` loss positions."""
    p_lora = lora_params(s, step.r, list(step.targets))
    per_layer = layer_bytes_per_token(s, step)
    if checkpointing:
        saved = s.layers * step.weight_bytes * s.hidden + per_layer
    else:
        saved = s.layers * per_layer
    embed_and_norm = (step.weight_bytes + 4) * s.hidden
    activations = tokens * (saved + embed_and_norm)
    if step.labelled_only:
        rows = min(labelled, step.loss_chunk)
        # bf16 head output, fp32 logits, fp32 gradient of one chunk; the picked hidden states.
        logits = rows * s.vocab * (step.weight_bytes + 8) + labelled * s.hidden * 4
    else:
        logits = tokens * s.vocab * (step.weight_bytes + 10)
    # Backward of the top layer holds a few [T, i] gradients and the fp32 residual gradient.
    workspace = tokens * (3 * step.weight_bytes * s.intermediate + 8 * s.hidden)
    return Estimate(
        tokens=tokens,
        micro_batch=micro_batch,
        checkpointing=checkpointing,
        weights=s.params * step.weight_bytes,
        lora_states=16 * p_lora,
        activations=activations,
        logits=logits,
        workspace=workspace,
        seed_formula=2 * s.params + 16 * p_lora,
    )


def worst_micro_batch(
    lengths: list[int], labelled: list[int], micro_batch: int, packed: bool, pad_multiple: int = 1
) -> tuple[int, int]:
    """(tokens, labelled) of the largest micro-batch the data can produce (padding included):
    its `micro_batch` longest sequences together, whatever the batch plan puts together."""
    k = min(micro_batch, len(lengths))
    if packed:
        tokens = sum(sorted(lengths, reverse=True)[:k])
        tokens += -tokens % max(1, pad_multiple)
    else:
        tokens = k * max(lengths)
    return tokens, sum(sorted(labelled, reverse=True)[:k])


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan_memory(
    s: ModelShape,
    largest: Callable[[int], tuple[int, int]],
    micro_batches: Sequence[int],
    budget: int,
    step: StepShape,
    checkpointing: str = "auto",
) -> Estimate:
    """The fastest (micro-batch, checkpointing) whose predicted peak fits in `budget` bytes.

    `largest(m)` is (tokens incl. padding, labelled) of the largest micro-batch of m sequences
    the run will have; `micro_batches` are the sizes allowed (they divide the effective batch,
    so the step's sequences are the same). Largest micro-batch first (fewer, bigger GEMMs),
    without checkpointing first (no recomputation). If nothing fits, the smallest plan is
    returned (the caller reports it).
    """
    options = (True,) if checkpointing == "on" else (False,) if checkpointing == "off" else (
        False, True)
    last = None
    for ckpt in options:
        for micro in sorted(micro_batches, reverse=True):
            last = estimate(s, *largest(micro), micro, ckpt, step)
            if last.total <= budget:
                return last
    assert last is not None
    return last


def card_budget(device: Any) -> int:
    """Bytes a plan may use on this CUDA device."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    # A per-process cap (torch.cuda.set_per_process_memory_fraction) is the card this process has.
    read_cap = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.8
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    # It takes an index only: a bare "cuda" (what loralab passes by default) is the current one.
    index = torch.cuda.current_device() if dev.index is None else dev.index
    fraction = read_cap(index) if read_cap else 1.0
    return int(total * min(fraction, 1.0) * CARD_SHARE)

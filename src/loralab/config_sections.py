"""The sections of a run's config (model, data, lora, train, tracking, eval): their keys, the
seed's defaults and each section's validation. `loralab.config` puts them together in `Config`
(and is where callers import them from); no torch import, as for `loralab.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loralab.errors import UserError

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED_TAGS = ["其他", "云计算", "架构师", "计算机", "个人娱乐", "人工智能", "商业案例", "汽车行业", "经济观察"]
SEED_SYSTEM_PROMPT = (
    "将以下文本按照【其他、云计算、架构师、计算机、个人娱乐、人工智能、商业案例、汽车行业、经济观察】"
    "标签纬度进行关联度评分"
)


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    path: str = "builtin:tiny-qwen2"  # local folder, HF hub id, ModelScope id, or builtin:tiny-qwen2
    source: str = "auto"  # auto | local | hf | modelscope
    dtype: str = "auto"  # auto (bf16 where supported, else fp32) | bf16 | fp16 | fp32
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention | flash_attention_2
    trust_remote_code: bool = False  # run code shipped with the model folder

    def validate(self) -> None:
        _choice("model.source", self.source, ("auto", "local", "hf", "modelscope"))
        _choice("model.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        _choice(
            "model.attn_implementation",
            self.attn_implementation,
            ("sdpa", "eager", "flex_attention", "flash_attention_2"),
        )
        if not self.path:
            raise UserError("model.path is empty: give a local folder, a hub id or builtin:tiny-qwen2")


@dataclass
class DataConfig:
    """Where the records are and how they become tokens."""

    # Training file (JSON array, JSONL, alpaca fields or chat `messages`), or a list of files
    # mixed in order, each a path or {path: ..., limit: N} / {path: ..., sample: N}.
    path: str | list[Any] = ""
    eval_path: str | None = None  # held-out file used by `loralab eval` (same formats)
    system_prompt: str | None = None  # replaces every record's instruction (train = inference prompt)
    limit: int | None = None  # keep the first N records (the seed's "amount of data")
    sample: int | None = None  # or keep N records drawn at random with train.seed
    max_length: int = 384  # tokens per sequence; the input is cut, never the answer
    shuffle: bool = True  # reshuffle every epoch with train.seed

    def validate(self) -> None:
        if not self.path:
            raise UserError("data.path is empty: give the training file")
        if isinstance(self.path, list):
            for i, part in enumerate(self.path):
                check_mix_part(f"data.path[{i}]", part)
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"data.limit must be > 0 or null, got {self.limit}")
        if self.sample is not None and self.sample <= 0:
            raise UserError(f"data.sample must be > 0 or null, got {self.sample}")
        if self.limit is not None and self.sample is not None:
            raise UserError("data.limit and data.sample are exclusive: set one of them")
        if self.max_length < 16:
            raise UserError(f"data.max_length must be >= 16, got {self.max_length}")


def check_mix_part(key: str, part: Any) -> None:
    """One file of a data.path list: a path, or {path, limit | sample} with positive counts."""
    if isinstance(part, str) and part:
        return
    if not isinstance(part, dict) or not isinstance(part.get("path"), str) or not part["path"]:
        raise UserError(f"{key} must be a file path or {{path: ..., limit: N}}, got {part!r}")
    unknown = set(part) - {"path", "limit", "sample"}
    if unknown:
        raise UserError(f"{key} has unknown keys {sorted(unknown)}: path, limit, sample")
    if "limit" in part and "sample" in part:
        raise UserError(f"{key}: limit and sample are exclusive")
    for count in ("limit", "sample"):
        value = part.get(count)
        if count in part and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise UserError(f"{key}.{count} must be a positive integer, got {value!r}")


@dataclass
class LoraConfig:
    """The adapter: PEFT LoRA and the variants PEFT offers by flag."""

    r: int = 8  # rank
    alpha: float = 32  # scaling numerator: scale = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.1  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: list(SEED_TARGETS))
    rslora: bool = False  # rank-stabilised scaling
    dora: bool = False  # weight-decomposed LoRA (slower; uses PEFT's own layers)

    def validate(self) -> None:
        if self.r <= 0:
            raise UserError(f"lora.r must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise UserError("lora.target_modules is empty")


@dataclass
class TrainConfig:
    """Optimisation, precision, checkpoints and the fast-path switches."""

    lr: float = 1e-4  # peak learning rate (AdamW)
    epochs: float = 4  # passes over the data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 4  # sequences per micro-batch per device
    grad_accum: int = 4  # micro-batches per optimizer step
    seed: int = 42  # data order, sampling, LoRA init
    scheduler: str = "linear"  # linear | cosine | constant (after warmup)
    warmup_ratio: float = 0.0  # share of steps spent warming up (HF default: 0)
    warmup_steps: int = 0  # or a fixed number of warmup steps (wins when > 0)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    precision: str = "auto"  # auto | bf16 | fp32 (weights and compute of the frozen base)
    gradient_checkpointing: str = "auto"  # auto | on | off (auto: off unless memory needs it)
    memory: str = "auto"  # auto (CUDA: largest micro-batch that fits, same effective batch) | fixed
    log_every: int = 1  # optimizer steps between metric logs
    save_every: int = 0  # optimizer steps between checkpoints; 0: only the final adapter
    eval_every: int = 0  # optimizer steps between eval-loss passes on data.eval_path; 0: never
    early_stopping_patience: int = 0  # stop after this many evals without a better eval loss; 0: off
    keep_checkpoints: int = 2  # newest checkpoints kept under checkpoints/; 0: all
    strategy: str = "ddp"  # ddp | fsdp: several processes each hold the base, or shard its layers
    # Fast-path levers (docs/fast_path.md). auto: on with CUDA, the plain HF + PEFT path on CPU.
    packing: str = "auto"  # auto | on | off: sequences back to back in one row, no padding
    attention: str = "auto"  # auto | varlen | flex | sdpa: attention kept inside packed sequences
    pack_multiple: int = 0  # fill packed rows to a multiple of this; 0: 64 on CUDA, 1 on CPU
    group_by_length: bool = True  # micro-batches of similar lengths (less padding)
    fused_lora: str = "auto"  # auto | on | off: loralab's bf16 LoRA path instead of PEFT's forward
    compile: str = "auto"  # auto | on | off: torch.compile the decoder layers
    labelled_logits: bool = True  # LM head and loss only at labelled positions
    loss_chunk: int = 2048  # labelled positions per chunk of the chunked cross-entropy

    SWITCHES = ("packing", "compile", "fused_lora", "gradient_checkpointing")  # auto/on/off

    def __post_init__(self) -> None:
        # YAML reads on/off as booleans, and packing/compile used to be booleans: map them back.
        for key in ("packing", "compile", "fused_lora", "gradient_checkpointing"):
            value = getattr(self, key)
            if isinstance(value, bool) or str(value).lower() in ("true", "false"):
                setattr(self, key, "on" if str(value).lower() == "true" else "off")

    def validate(self) -> None:
        if self.lr <= 0:
            raise UserError(f"train.lr must be > 0, got {self.lr}")
        if self.epochs <= 0:
            raise UserError(f"train.epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"train.max_steps must be > 0 or null, got {self.max_steps}")
        for key in ("batch_size", "grad_accum", "log_every", "loss_chunk"):
            if getattr(self, key) <= 0:
                raise UserError(f"train.{key} must be > 0, got {getattr(self, key)}")
        for key in ("save_every", "eval_every", "warmup_steps", "pack_multiple",
                    "early_stopping_patience", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise UserError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _choice("train.scheduler", self.scheduler, ("linear", "cosine", "constant"))
        _choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        _choice("train.gradient_checkpointing", self.gradient_checkpointing, ("auto", "on", "off"))
        _choice("train.memory", self.memory, ("fixed", "auto"))
        for key in ("fused_lora", "packing", "compile"):
            _choice(f"train.{key}", getattr(self, key), ("auto", "on", "off"))
        _choice("train.attention", self.attention, ("auto", "varlen", "flex", "sdpa"))
        _choice("train.strategy", self.strategy, ("ddp", "fsdp"))


@dataclass
class TrackingConfig:
    """Where metrics go besides metrics.jsonl."""

    backend: str = "swanlab"  # swanlab | tensorboard | none
    mode: str = "local"  # swanlab mode: local | offline | online | disabled
    project: str = "loralab"  # swanlab project
    experiment: str | None = None  # experiment name; default: the run directory's name
    group: str | None = None  # swanlab group (a sweep sets it)
    log_dir: str | None = None  # default: swanlog/ (tensorboard/<run>) beside the run directory

    def validate(self) -> None:
        _choice("tracking.backend", self.backend, ("swanlab", "tensorboard", "none"))
        _choice("tracking.mode", self.mode, ("local", "offline", "online", "cloud", "disabled"))


@dataclass
class EvalConfig:
    """How `loralab eval` generates and scores."""

    task: str = "tag_scores"  # tag_scores | generic
    tags: list[str] = field(default_factory=lambda: list(SEED_TAGS))  # tag_scores: expected keys
    score_min: int = 0  # tag_scores: lowest score
    score_max: int = 10  # tag_scores: highest score
    tolerance: int = 2  # tag_scores: |pred - truth| counted as right
    max_new_tokens: int | None = None  # default: 1.5x the longest reference answer + 16
    batch_size: int = 128  # prompts per generation batch (one batch of 77 beat two of 64 on an H200)
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0  # only with do_sample
    top_p: float = 1.0  # only with do_sample
    bootstrap: int = 1000  # bootstrap resamples for intervals; 0 disables
    merge: bool = True  # PEFT fallback: merge the adapter into the weights for generation
    adapter_batch: int = 4  # adapters whose rows share each generation batch (1: one at a time)

    def validate(self) -> None:
        _choice("eval.task", self.task, ("tag_scores", "generic"))
        if self.task == "tag_scores" and not self.tags:
            raise UserError("eval.tags is empty")
        if self.score_max <= self.score_min:
            raise UserError("eval.score_max must be greater than eval.score_min")
        if self.tolerance < 0:
            raise UserError(f"eval.tolerance must be >= 0, got {self.tolerance}")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise UserError(f"eval.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.batch_size <= 0:
            raise UserError(f"eval.batch_size must be > 0, got {self.batch_size}")
        if self.adapter_batch <= 0:
            raise UserError(f"eval.adapter_batch must be > 0, got {self.adapter_batch}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")

"""Predicted peak GPU memory of the training step: what `loralab estimate CONFIG [k=v ...]`
prints (the command is commands/estimate.py's; sweep and bench/train_speed.py read the plans
here too).

Reads only the model's config.json (no weights) and, when the data file exists, its token
lengths; prints the seed's rule of thumb and loralab's memory model for the plan training will
make (the config's train.memory) and for the other setting. The peak is planned for the largest
micro-batch of the run's own batch plan (the examples each step trains on are fixed by the seed
before training); the data's worst case (its longest sequences in one micro-batch) is printed
beside it.
"""

from __future__ import annotations

from typing import Any

from loralab.errors import UserError


def estimate_lines(cfg: Any, gpu_gib: float | None = None) -> list[str]:
    """The report `loralab estimate` prints, as lines: the plan training makes on a GPU
    (`levers.plan`, the function the training loop calls) for the config's train.memory and
    for the other setting, on a card of `gpu_gib`."""
    from loralab.model.memory import GIB

    card = gpu_gib if gpu_gib is not None else _this_gpu_gib()
    shape = model_shape(cfg)
    lengths, labelled, source = data_lengths(cfg)
    given, auto, budget = gpu_plans(cfg, shape, lengths, labelled, card)
    effective = cfg.train.batch_size * cfg.train.grad_accum
    titles = {"auto": f"train.memory=auto on a {card:.0f} GiB card (effective batch {effective})",
              "fixed": f"train.memory=fixed (batch_size {cfg.train.batch_size} x grad_accum "
                       f"{cfg.train.grad_accum})"}
    mine = cfg.train.memory if cfg.train.memory in titles else "fixed"
    other = "fixed" if mine == "auto" else "auto"
    plans = {"auto": auto, "fixed": given}
    lines = [
        f"model {cfg.model.path}: {shape.params:,} parameters, {shape.layers} layers, "
        f"hidden {shape.hidden}, LoRA r={cfg.lora.r} on {len(cfg.lora.target_modules)} "
        "projections",
        f"data: {source}; packing {'on' if given.packing else 'off'} (attention "
        f"{given.attention}), compile {'on' if given.compile else 'off'}, dropout {cfg.lora.dropout}",
        f"seed's formula 2P + 16 P_LoRA: {given.predicted.seed_formula / GIB:.2f} GiB (no activations)",
        _describe(f"training runs with {titles[mine]}", plans[mine]),
        _describe(f"with {titles[other]}", plans[other]),
        f"(peak: this run's largest micro-batch, from its batch plan over "
        f"{_total_steps(cfg, len(lengths))} steps; worst case: the data's longest sequences "
        "in one micro-batch)",
    ]
    if auto.predicted.total > budget:
        lines.append("  does not fit even with micro-batch 1 and checkpointing")
    return lines


def training_plan(cfg: Any, shape: Any, lengths: list[int], labelled: list[int],
                  card_gib: float) -> Any:
    """The plan training makes for `cfg` on a GPU of `card_gib` (its train.memory setting):
    what `loralab estimate` prints first. `.predicted_gib['total']` is the peak it predicts,
    `.worst_case_gib` the data's worst case. bench/train_speed.py records it beside the
    measured peak."""
    given, auto, _ = gpu_plans(cfg, shape, lengths, labelled, card_gib)
    return auto if cfg.train.memory == "auto" else given


def gpu_plans(cfg: Any, shape: Any, lengths: list[int], labelled: list[int],
              card_gib: float) -> tuple[Any, Any, int]:
    """(the plan with train.memory=fixed, the plan with train.memory=auto, the byte budget) on a
    GPU of `card_gib`: `levers.plan`, which the training loop calls through `levers.resolve`."""
    import dataclasses

    from loralab.model.memory import CARD_SHARE, GIB
    from loralab.train.levers import plan

    # Packed rows attend through varlen or flex on a GPU: both keep the KV heads, as planned.
    backend = cfg.train.attention if cfg.train.attention != "auto" else "varlen"
    budget = int(card_gib * GIB * CARD_SHARE)

    def for_memory(memory: str) -> Any:
        planned = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, memory=memory))
        return plan(planned, True, backend, shape, lengths, labelled, budget)

    return for_memory("fixed"), for_memory("auto"), budget


def _total_steps(cfg: Any, examples: int) -> int:
    from loralab.train.schedule import make_schedule

    return make_schedule(cfg, examples).total_steps


def _describe(title: str, fast: Any) -> str:
    est, g = fast.predicted, fast.predicted.gib()
    return (
        f"{title}: micro-batch {est.micro_batch} (largest {est.tokens} tokens), checkpointing "
        f"{'on' if est.checkpointing else 'off'} -> peak {g['total']:.2f} GiB = weights "
        f"{g['weights']:.2f} + LoRA states {g['lora_states']:.2f} + activations "
        f"{g['activations']:.2f} + logits {g['logits']:.2f} + workspace {g['workspace']:.2f}; "
        f"worst case {fast.worst_case_gib:.2f} GiB"
    )


def model_shape(cfg: Any) -> Any:
    """ModelShape from the model's config.json only (a hub id fetches just that file)."""
    from loralab.model.memory import shape_of

    if cfg.model.path.startswith("builtin:"):
        from transformers import Qwen2Config

        from loralab.model.load import TINY_QWEN2, builtin_model_name

        builtin_model_name(cfg.model.path)
        return shape_of(Qwen2Config(**TINY_QWEN2))
    from pathlib import Path

    from loralab.model.hub import require_reachable_or_cached
    from loralab.model.load import model_folder

    path = cfg.model.path
    if Path(path).expanduser().is_dir():
        path = str(model_folder(Path(path).expanduser()))
    elif cfg.model.source != "modelscope":  # a hub id: offline and not cached is one line now
        require_reachable_or_cached(path, "config.json")
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read the model config of {cfg.model.path}: {first}") from None
    return shape_of(hf_config)


def data_lengths(cfg: Any) -> tuple[list[int], list[int], str]:
    """(lengths, labelled counts, where they came from): the data when readable, else max_length."""
    from pathlib import Path

    from loralab.data.records import mix_paths

    if cfg.data.path and all(Path(p).is_file() for p in mix_paths(cfg.data.path)):
        from loralab.data.summary import build_dataset
        from loralab.model.load import resolve_tokenizer_path
        from loralab.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg.model))
        examples, _ = build_dataset(cfg.data, tokenizer, cfg.train.seed)
        lengths = [len(e.input_ids) for e in examples]
        labelled = [sum(1 for x in e.labels[1:] if x != -100) for e in examples]
        return lengths, labelled, f"{len(examples)} examples of {', '.join(mix_paths(cfg.data.path))}"
    n = max(1, cfg.train.batch_size * cfg.train.grad_accum)
    longest = cfg.data.max_length
    return [longest] * n, [longest // 4] * n, f"no data file: every sequence {longest} tokens"


def _this_gpu_gib() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 2**30
    except ImportError:
        pass
    return 24.0

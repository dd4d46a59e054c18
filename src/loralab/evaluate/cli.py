"""`loralab eval`, `loralab predict`, `loralab chat` and `loralab merge` (no torch at import)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from loralab.errors import UserError

ENGINE_HELP = "generation engine: auto (static greedy loop, CUDA graphs on GPU), static, hf"


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="generate and score with the base model and adapters; compare",
                       description="Evaluate adapters (runs or sweeps) and optionally the base "
                       "model on an eval file; writes RUN/eval/, COMP/base/, COMP/references/ "
                       "and the comparison report.")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.batch_size=32")
    e.add_argument("--data", type=Path, help="eval file (default: the run's data.eval_path)")
    e.add_argument("--adapters", type=Path, nargs="+", action="extend", default=[],
                   metavar="RUN_OR_SWEEP", help="run folders or sweep folders (finished trials)")
    e.add_argument("--checkpoints", type=Path, metavar="RUN",
                   help="every checkpoint of RUN and its final adapter, as a curve of the "
                   "metrics against the step (default --out: RUN/checkpoint_curve)")
    e.add_argument("--base", action="store_true", help="also evaluate the base model")
    e.add_argument("--limit", type=int, help="evaluate the first N records only")
    e.add_argument("--out", type=Path, help="comparison folder (default: FIRST/comparison)")
    e.add_argument("--config", type=Path, help="config file (default: the first run's config.yaml)")
    e.add_argument("--engine", default="auto", choices=["auto", "static", "hf"], help=ENGINE_HELP)
    e.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    e.add_argument("--compile", dest="compile", action="store_const", const="on", default="auto",
                   help="CUDA: torch.compile loralab's forward (~15%% faster generation after a "
                   "one-off compile of 26-35 s on a 7B); default: on when the eval plans >= "
                   "600,000 new tokens")
    e.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                   help="never compile (the default compiles large evals on CUDA)")
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="batch generations of an adapter to JSONL")
    p.add_argument("--adapter", type=Path, required=True, help="trained run or adapter folder")
    p.add_argument("--input", type=Path, required=True,
                   help="JSON array / JSONL of records, {input}/{prompt} objects or strings")
    p.add_argument("--out", type=Path, help="output JSONL (default: standard output)")
    p.add_argument("--limit", type=int, help="the first N inputs only")
    p.add_argument("--max-new-tokens", type=int, help="default: eval.max_new_tokens, else 512")
    p.add_argument("--engine", default="auto", choices=["auto", "static", "hf"], help=ENGINE_HELP)
    p.add_argument("--device", help="cuda, cpu ... (default: cuda when available)")
    p.set_defaults(func=cmd_predict)

    c = sub.add_parser("chat", help="talk to an adapter (streaming; exit or Ctrl-D ends)")
    c.add_argument("--adapter", type=Path, required=True, help="trained run or adapter folder")
    c.add_argument("--system", help="system prompt (default: the run's data.system_prompt)")
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--device", help="cuda, cpu ... (default: cuda when available)")
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("merge", help="merge an adapter into its base: a plain safetensors model")
    m.add_argument("--adapter", type=Path, required=True, help="trained run or adapter folder")
    m.add_argument("--out", type=Path, required=True, help="folder for the merged model")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    m.add_argument("--device", help="cpu (default) or cuda")
    m.set_defaults(func=cmd_merge)


def cmd_eval(args: argparse.Namespace) -> int:
    from loralab.evaluate.runner import run_eval
    from loralab.report.cli import run_report

    result = run_eval(args.data, args.adapters, args.base, args.limit, args.out, args.config,
                      args.overrides, engine=args.engine, device=args.device,
                      compile_decode=args.compile, curve_of=args.checkpoints)
    return run_report(argparse.Namespace(dir=result["comparison_dir"], out=None))


# ---------------------------------------------------------------- predict


def read_inputs(path: Path) -> list[dict[str, Any]]:
    """Inputs as chat turns: training records (answer ignored), {input}/{prompt} or strings."""
    from loralab.data.records import parse_record

    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    try:
        items = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not a JSON array or JSONL (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path} holds no inputs")
    out = []
    for i, item in enumerate(items, 1):
        if isinstance(item, str):
            out.append({"system": None, "messages": [{"role": "user", "content": item}]})
            continue
        if isinstance(item, dict) and "messages" in item and item["messages"] and \
                item["messages"][-1].get("role") == "user":
            item = {**item, "messages": [*item["messages"], {"role": "assistant", "content": "-"}]}
        elif isinstance(item, dict) and "prompt" in item:
            item = {"completion": "-", **item}  # the answer is not needed to ask
        elif isinstance(item, dict) and "messages" not in item:
            item = {"output": "-", **item}
        try:
            record = parse_record(item, i)
        except Exception as exc:
            raise UserError(f"{path}: input {i}: {exc}") from None
        out.append({"system": record.system, "messages": record.messages})
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from loralab.data.render import render_prompt
    from loralab.engine import GenSettings, generate
    from loralab.io import atomic_write_text
    from loralab.scoring.tasks import get_task

    inputs = read_inputs(args.input)[: args.limit] if args.limit else read_inputs(args.input)
    model, tokenizer, cfg = load_adapter_model(args.adapter, args.device)
    system = cfg.data.system_prompt
    prompts = [render_prompt(tokenizer, system or x["system"], x["messages"]) for x in inputs]
    settings = GenSettings(max_new_tokens=args.max_new_tokens or cfg.eval.max_new_tokens or 512,
                           batch_size=cfg.eval.batch_size, engine=args.engine)
    generations, stats = generate(model, tokenizer, prompts, settings)
    task = get_task(cfg.eval)
    lines = []
    for x, g in zip(inputs, generations, strict=True):
        row = {"input": x["messages"][-1]["content"], "generation": g.text,
               "finished": g.finished, "new_tokens": g.new_tokens}
        if task.predict_shows_parsed:
            row["parsed"] = task.parse(g.text)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    if args.out:
        atomic_write_text(args.out, "".join(lines))
        rate = stats.as_dict()["tokens_per_s"] or 0
        print(f"{len(lines)} generations → {args.out} ({rate:,.0f} new tokens/s)", file=sys.stderr)
    else:
        sys.stdout.write("".join(lines))
    return 0


def load_adapter_model(adapter: Path, device: str | None, merge: bool = True):
    """(model with the adapter, tokenizer, the run's Config) for predict and chat."""
    from loralab.engine import attached_adapter
    from loralab.evaluate.runner import single_run
    from loralab.model.load import load_base_model

    run, cfg = single_run(adapter)
    model, tokenizer = load_base_model(cfg.model, device)
    peft_model = attached_adapter(model, run.path, merge=merge).__enter__()
    return peft_model, tokenizer, cfg


# ---------------------------------------------------------------- chat


def cmd_chat(args: argparse.Namespace) -> int:
    from loralab.data.render import render_prompt
    from loralab.engine import GenSettings, generate

    model, tokenizer, cfg = load_adapter_model(args.adapter, args.device)
    system = args.system if args.system is not None else cfg.data.system_prompt
    settings = GenSettings(max_new_tokens=args.max_new_tokens, engine="hf")
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print("loralab chat: type a message; 'exit' or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() == "exit":
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        prompt = render_prompt(tokenizer, system, history)
        print("assistant> ", end="", flush=True)
        answer, _ = generate(model, tokenizer, [prompt], settings, stream=_show)
        print(flush=True)
        history.append({"role": "assistant", "content": answer[0].text})


def _show(piece: str) -> None:
    print(piece, end="", flush=True)


# ---------------------------------------------------------------- merge


def cmd_merge(args: argparse.Namespace) -> int:
    from loralab.rundir import sibling_lock

    with sibling_lock(Path(args.out)):  # one merge into a folder at a time
        return _merge(args)


def _merge(args: argparse.Namespace) -> int:
    from loralab.data.render import render_prompt
    from loralab.engine import attached_adapter, check_adapter_file
    from loralab.evaluate.runner import single_run
    from loralab.model.load import load_base_model
    from loralab.model.merge import CHECK_PROMPTS, check_out_dir, merge_to_folder

    check_out_dir(Path(args.out), args.overwrite)
    run, cfg = single_run(Path(args.adapter))
    check_adapter_file(run.path)  # before the base model loads
    model, tokenizer = load_base_model(cfg.model, args.device or "cpu")
    peft_model = attached_adapter(model, run.path, merge=False).__enter__()
    about = {"adapter": str(run.path.resolve()), "base": cfg.model.path}
    prompts = [render_prompt(tokenizer, run.system_prompt, [{"role": "user", "content": p}])
               for p in CHECK_PROMPTS]
    check = merge_to_folder(peft_model, tokenizer, Path(args.out), prompts, about)
    print(f"merged model → {args.out}")
    print(f"largest logit difference vs base+adapter: {check['max_abs_logit_diff']:.3g} "
          f"(reloaded from disk, {check['prompts']} prompts, {check['dtype']})")
    return 0

"""`loralab eval`, `loralab predict` and `loralab chat` (no torch at import)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def cmd_eval(args: argparse.Namespace) -> int:
    from loralab.commands.report import run_report
    from loralab.evaluate.runner import run_eval

    result = run_eval(args.data, args.adapters, args.base, args.limit, args.out, args.config,
                      args.overrides, engine=args.engine, device=args.device,
                      compile_decode=args.compile, curve_of=args.checkpoints)
    return run_report(argparse.Namespace(dir=result["comparison_dir"], out=None))


# ---------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    from loralab.data.render import render_prompt
    from loralab.engine import GenSettings, generate
    from loralab.evaluate.inputs import read_inputs
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

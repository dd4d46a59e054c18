"""`loralab merge`: find the run, load base + adapter, merge into a plain safetensors model
(the library part, merging and the reload check, is model/merge.py's)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loralab import rundir
from loralab.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="merge an adapter into its base: a plain safetensors model")
    m.add_argument("--adapter", type=Path, required=True, help="trained run or adapter folder")
    m.add_argument("--out", type=Path, required=True, help="folder for the merged model")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    m.add_argument("--device", help="cpu (default) or cuda")
    m.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    with rundir.sibling_lock(Path(args.out)):  # one merge into a folder at a time
        return _merge(args)


def _merge(args: argparse.Namespace) -> int:
    from loralab.data.render import render_prompt
    from loralab.engine import attached_adapter, check_adapter_file
    from loralab.evaluate.runner import single_run
    from loralab.model.load import load_base_model
    from loralab.model.merge import CHECK_PROMPTS, merge_to_folder

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


def check_out_dir(out: Path, overwrite: bool) -> None:
    """--out must be new, empty, or (with --overwrite) a merged model loralab wrote and nothing
    else: --overwrite replaces the whole folder, so a file loralab did not write is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file")
    if overwrite:
        rundir.refuse_precious(out, "merge --overwrite")
    if rundir.is_empty(out):
        return
    if rundir.folder_kind(out) != "merged":
        raise UserError(f"--out {out} is not empty and is not a merged model of loralab's "
                        f"(no {rundir.MARKER}): choose an empty or new folder")
    if not overwrite:
        raise UserError(f"--out {out} is not empty: use --overwrite to replace it")
    _, other = rundir.known_contents(out, "merged")
    if other:
        names = ", ".join(p.name for p in other[:3]) + (" ..." if len(other) > 3 else "")
        raise UserError(f"--overwrite refuses {out}: it holds files loralab did not write "
                        f"({names}); move them or choose another --out")

"""GPU checks used by train_speed.py: attention kernels available, and the same-math runs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def probe_kernels() -> dict:
    """Which packed-attention kernels run here, and do they agree with the exact SDPA path."""
    import torch

    from loralab.model import attention as att

    found: dict = {"varlen_import": att.varlen_available(), "flex_import": att.flex_available()}
    torch.manual_seed(0)
    lengths = [150, 384, 200, 310]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device="cuda")
    q = torch.randn(1, 28, total, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 4, total, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 4, total, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = att._sdpa_block_diagonal(q.float(), k.float(), v.float(), cu, None)
    for name, fn in (("varlen", lambda: att._varlen(q, k, v, cu, max(lengths), None)),
                     ("flex", lambda: att._flex(q, k, v, cu, None))):
        att._state["cache_key"] = None
        try:
            out = fn()
            out.float().sum().backward()
            err = _rel(out.detach().float(), ref.detach())
            found[name] = {"ok": err < 2e-2, "rel_err": round(err, 5)}
        except Exception as exc:
            found[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return found


def same_math(model, examples, steps: int, say) -> dict:
    """Per-step losses of plain HF+PEFT vs loralab (dropout 0, same order); adapter reload."""
    import torch
    from common import NoTokenizer, loralab_cfg
    from peft import PeftModel

    from loralab.model.fast_lora import disable_fast_lora, enable_fast_lora
    from loralab.train.loop import Base, train_adapter

    out = Path(tempfile.mkdtemp(prefix="same_"))
    cfg = loralab_cfg(out, steps, {"lora.dropout": 0.0, "train.lr": 1e-3})
    reference = hf_peft_losses(model, examples, cfg, steps)
    base = Base(model, NoTokenizer(), torch.device("cuda"))
    trained, result = train_adapter(cfg, base, data=(examples, {"kept": len(examples)}),
                                    overwrite=True, show_progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ours = [r["loss"] for r in rows]
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, reference, strict=True)]
    probe = torch.tensor([examples[0].input_ids[:256]], device="cuda")
    trained.eval()
    with torch.no_grad():
        peft_logits = trained(input_ids=probe).logits.float()  # PEFT's forward, as trained
        enable_fast_lora(trained)
        fast_logits = trained(input_ids=probe).logits.float()  # loralab's forward
        disable_fast_lora(trained)
    trained.unload()
    reloaded = PeftModel.from_pretrained(model, str(out)).eval()
    with torch.no_grad():
        reload_logits = reloaded(input_ids=probe).logits.float()
    reloaded.unload()
    reload_err = _rel(reload_logits, peft_logits)
    found = {"steps": steps, "max_rel_loss_diff": max(rel),
             "mean_rel_loss_diff": sum(rel) / len(rel), "within_1pct": max(rel) < 0.01,
             "reload_logits_rel_err": reload_err, "reload_ok": reload_err < 1e-2,
             "fast_vs_peft_forward_rel_err": _rel(fast_logits, peft_logits),
             "fast_vs_peft_argmax_agree": float((fast_logits.argmax(-1) == peft_logits.argmax(-1))
                                                .float().mean()),
             "fast_path": result["fast_path"], "losses": {"hf_peft": reference, "loralab": ours}}
    say("same-math", json.dumps({k: v for k, v in found.items() if k != "losses"}))
    say("losses hf+peft", [round(x, 4) for x in reference])
    say("losses loralab", [round(x, 4) for x in ours])
    return found


def hf_peft_losses(model, examples, cfg, steps: int) -> list[float]:
    """The reference: per-step losses of a plain HF + PEFT loop (AdamW, linear schedule,
    clipping) over the same batch plan loralab makes, one micro-batch per step; the model is
    left without the adapter."""
    import torch
    from common import NoTokenizer

    from loralab.data.batching import collate_padded, plan_steps
    from loralab.model.lora import attach_lora
    from loralab.train.schedule import Schedule, lr_factor

    lengths = [len(e.input_ids) for e in examples]
    plan = plan_steps(lengths, 16, 1, cfg.train.seed, 0, True, True)
    schedule = Schedule(len(plan), steps, 0)
    peft_model = attach_lora(model, cfg.lora, cfg.train.seed)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, schedule, "linear"))
    losses = []
    for step in range(steps):
        batch = collate_padded([examples[i] for i in plan[step][0]], NoTokenizer.pad_token_id)
        batch = {k: v.cuda() for k, v in batch.items() if k != "position_ids"}
        loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    peft_model.unload()
    return losses


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())

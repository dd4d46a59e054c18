"""K adapter folders evaluated on one base, several ways, each against K merged runs
(bench/eval_speed.py's adapter rows)."""

from __future__ import annotations

import functools
import statistics
from typing import Any

import torch
from eval_runs import ENGINE, add_random_adapter, engine_run, forced, timed

from loralab.engine import GenSettings, generate


def adapter_folders(model, count: int):
    """(the plain base, K adapter folders on disk): adapters a1.. added beside a0, each saved
    to its own folder, then PEFT unloaded."""
    import tempfile
    from pathlib import Path

    names = [f"a{i}" for i in range(count)]
    for i, n in enumerate(names[1:], 2):
        add_random_adapter(model, n, seed=i)
    root = Path(tempfile.mkdtemp(prefix="k_adapters_"))
    for n in names:
        model.save_pretrained(str(root), selected_adapters=[n])  # → root/n (non-default names)
    return model.unload(), [root / n if (root / n).is_dir() else root for n in names]


class AdapterWays:
    """The ways K adapter folders are evaluated on one base, and what they are compared with."""

    def __init__(self, base, folders, prompts, args) -> None:
        self.base, self.folders, self.prompts, self.args = base, folders, prompts, args

    def loralab(self, paths, compile_=False) -> int:
        """The eval runner's way: AdapterSource reads the next file in a thread, folds it."""
        from loralab.engine import AdapterSource

        source = AdapterSource(self.base, paths, GenSettings(max_new_tokens=self.args.new))
        total = 0
        for i, folder in enumerate(paths):
            with source.on_base(i, folder, merge=True) as (target, lora, how):
                assert lora is not None, how
                total += engine_run(target, self.prompts, self.args.new, len(self.prompts),
                                    lora=lora, compile_=compile_)
        source.close()
        return total

    def unmerged(self, paths, per_batch: int, compile_=False) -> int:
        """Adapters applied unmerged, `per_batch` of them sharing each batch: all K (the decode
        reads the base weights once per step for all, eval.adapter_batch) or 1 (no fold while
        copying, a low-rank update per projection group instead)."""
        from loralab.engine import AdapterSource

        source = AdapterSource(self.base, paths, GenSettings(max_new_tokens=self.args.new))
        loras = [source.tensors(i)[0] for i in range(len(paths))]
        source.close()
        total = 0
        for start in range(0, len(loras), per_batch):
            _, stats = generate(self.base, None, self.prompts, forced(
                self.args.new, len(self.prompts), compile_), loras[start : start + per_batch])
            ENGINE.update(stats.engine_dict())
            total += stats.new_tokens
        return total

    def peft(self) -> int:
        from loralab.engine import attached_adapter

        total = 0
        for folder in self.folders:
            with attached_adapter(self.base, folder, merge=True) as peft_model:
                total += engine_run(peft_model, self.prompts, self.args.new, len(self.prompts))
        return total

    def merged_runs(self, n: int, compile_=False) -> int:
        """n runs on a model whose weights already hold an adapter (the plain base: the same
        work, other values): what n adapters are compared with."""
        return sum(engine_run(self.base, self.prompts, self.args.new, len(self.prompts),
                              compile_=compile_) for _ in range(n))

    def listed(self) -> list:
        """(name, way(compile_), adapters it evaluates)."""
        folders, lone, k = self.folders, self.folders[:1], f"k{len(self.folders)}_adapters_"
        return [(k + "lora_files", lambda c: self.loralab(folders, c), len(folders)),
                (k + "peft_attach_merge", lambda c: self.peft(), len(folders)),
                (k + "lora_files_one_batch", lambda c: self.unmerged(folders, len(folders), c),
                 len(folders)),
                ("lone_adapter_from_folder", lambda c: self.loralab(lone, c), 1),
                ("lone_adapter_from_folder_unmerged", lambda c: self.unmerged(lone, 1, c), 1)]


def k_adapters(model, prompts, rec: Any):
    """K adapter folders on disk evaluated one after another on one base, the ways above, each
    against K merged runs = K x one run on an already merged model. Returns the plain base."""
    from loralab.engine import read_lora

    args = rec.args
    base, folders = adapter_folders(model, args.adapters)
    ways = AdapterWays(base, folders, prompts, args)
    read_lora(folders[0], base)  # warm: the first read of a file
    listed = ways.listed()
    if args.compile:
        secs, _ = timed(rec.device, lambda: engine_run(base, prompts, args.new, len(prompts),
                                                       compile_=True))
        rec("loralab_engine_compile_first_call", secs, len(prompts) * args.new)
        listed += [(name + "_compiled", way, n) for name, way, n in listed if "peft" not in name]
    for label, way, n in [w for w in listed if args.ways in w[0]]:
        time_way(rec, ways, label, way, n)
    if args.step_breakdown and rec.device.type == "cuda":
        phase_rows(rec, ways)
    return base


def time_way(rec: Any, ways: AdapterWays, label: str, way, n: int) -> None:
    """One way against n merged runs, alternating, repeated; the base must come out unchanged."""
    compile_ = label.endswith("_compiled")
    probe = ways.base.model.layers[0].self_attn.q_proj.weight
    original = probe.detach().clone()
    try:
        this = functools.partial(way, compile_)
        reference = functools.partial(ways.merged_runs, n, compile_)
        this()  # warm: a new batch shape (and its compile) is not what is compared
        pairs = [(timed(rec.device, this), timed(rec.device, reference))
                 for _ in range(rec.args.repeats)]
    except Exception as exc:  # measuring: a failure is a result
        rec.save({"name": label, "error": f"{type(exc).__name__}: {exc}"[:400]})
        return
    secs = statistics.median(p[0][0] for p in pairs)
    merged = statistics.median(p[1][0] for p in pairs)
    rec(label, secs, pairs[0][0][1], merged_runs_seconds=round(merged, 3),
        ratio_to_merged_runs=round(secs / merged, 3),
        ratios_each_repeat=[round(p[0][0] / p[1][0], 3) for p in pairs],
        base_weights_unchanged=bool(torch.equal(probe, original)))


def phase_rows(rec: Any, ways: AdapterWays) -> None:
    """Where an adapter's extra time goes (--step-breakdown, CUDA): overhead and phases."""
    from step_breakdown import adapter_overhead_rows, run_phases

    folders, lone = ways.folders, ways.folders[:1]
    for row in adapter_overhead_rows(ways.base, folders[0]):
        rec.save(row)
    for compile_ in (False, True):
        for label, run in (("merged", lambda c=compile_: ways.merged_runs(1, c)),
                           ("lone_adapter", lambda c=compile_: ways.loralab(lone, c)),
                           (f"k{len(folders)}_adapters_one_after_another",
                            lambda c=compile_: ways.loralab(folders, c))):
            phases = [run_phases(run) for _ in range(3)]
            rec.save({"name": f"phases_ms_{label}{'_compiled' if compile_ else ''}",
                      **{k: round(statistics.median(p[k] for p in phases), 1)
                         for k in phases[0]}})

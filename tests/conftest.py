"""Shared fixtures: the builtin Qwen2.5 tokenizer, built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """A freshly built builtin tokenizer folder (not the user's cache)."""
    from loralab.model.tokenizer import builtin_tokenizer_dir

    return builtin_tokenizer_dir(tmp_path_factory.mktemp("tokenizers") / "qwen2.5")


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    """The builtin Qwen2.5 tokenizer (real vocabulary, Qwen2.5 chat template)."""
    from loralab.model.tokenizer import load_tokenizer

    return load_tokenizer(qwen_tokenizer_dir)

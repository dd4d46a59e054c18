"""Records to token ids through the tokenizer's own chat template: loss mask and truncation.

The prompt of a training example is exactly what `render_prompt` gives at inference, and the
labels are the answer plus the end-of-turn token, so the model learns to close its turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loralab.data.records import Record
from loralab.errors import UserError

IGNORE_INDEX = -100
SKIP_ANSWER_TOO_LONG = "answer does not fit data.max_length"
_PROBE_ANSWER = "LORALAB_ANSWER_PROBE"


@dataclass
class Example:
    """One tokenised training sequence."""

    input_ids: list[int]
    labels: list[int]  # -100 where no loss
    record_index: int
    truncated: int  # prompt tokens cut to fit


def conversation(system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The message list a chat template takes: optional system turn first."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [dict(m) for m in messages]


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: "
            "use an instruct model's tokenizer or the builtin one"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation
    )


def render_prompt(tokenizer: Any, system: str | None, messages: list[dict[str, str]]) -> str:
    """The inference prompt: the chat template with the generation prompt."""
    return _apply_template(tokenizer, conversation(system, messages), generation=True)


def render_full(tokenizer: Any, record: Record, messages: list[dict[str, str]]) -> str:
    """The whole conversation including the answer turn."""
    turns = conversation(record.system, messages) + [{"role": "assistant", "content": record.answer}]
    return _apply_template(tokenizer, turns, generation=False)


def end_of_turn_token(tokenizer: Any) -> str:
    """The special token the template puts right after an assistant answer (else eos)."""
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    text = _apply_template(tokenizer, turns, generation=False)
    after = text[text.rfind(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
    specials = sorted(_special_token_texts(tokenizer), key=len, reverse=True)
    for token in specials:
        if after.startswith(token):
            return token
    if tokenizer.eos_token and after.lstrip().startswith(tokenizer.eos_token):
        return tokenizer.eos_token
    raise UserError(
        "the chat template puts no end-of-turn token after the assistant's answer: "
        "cannot train the model to stop"
    )


def _special_token_texts(tokenizer: Any) -> set[str]:
    texts = set(tokenizer.all_special_tokens)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return {t for t in texts if t}


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_segment(tokenizer: Any, prompt: str, full: str, eot: str) -> str:
    """The text after the prompt up to and including the end-of-turn token."""
    if not full.startswith(prompt):
        raise UserError(
            "the chat template renders the prompt differently with and without the answer; "
            "loralab cannot split prompt and answer for this template"
        )
    rest = full[len(prompt):]
    end = rest.rfind(eot)
    if end < 0:
        raise UserError(f"the chat template does not close the answer with {eot!r}")
    return rest[: end + len(eot)]


def encode_record(tokenizer: Any, record: Record, max_length: int) -> Example | str:
    """Token ids and labels for one record, or a skip reason when the answer cannot fit."""
    eot = end_of_turn_token(tokenizer)
    prompt = render_prompt(tokenizer, record.system, record.messages)
    segment = answer_segment(tokenizer, prompt, render_full(tokenizer, record, record.messages), eot)
    answer_ids = _tokens(tokenizer, segment)
    prompt_ids = _tokens(tokenizer, prompt)
    truncated = 0
    if len(prompt_ids) + len(answer_ids) > max_length:
        cut = _truncate_prompt(tokenizer, record, max_length - len(answer_ids))
        if cut is None:
            return SKIP_ANSWER_TOO_LONG
        truncated = len(prompt_ids) - len(cut)
        prompt_ids = cut
    # The first position never carries a label: packing relies on it (no cross-sequence loss).
    assert prompt_ids, "a chat prompt is never empty"
    return Example(
        input_ids=prompt_ids + answer_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        record_index=record.index,
        truncated=truncated,
    )


def required_length(tokenizer: Any, record: Record) -> int:
    """Tokens the record needs with its last user message emptied (the least it can take)."""
    eot = end_of_turn_token(tokenizer)
    messages = _with_last_user(record.messages, "")
    prompt = render_prompt(tokenizer, record.system, messages)
    segment = answer_segment(tokenizer, prompt, render_full(tokenizer, record, messages), eot)
    return len(_tokens(tokenizer, prompt)) + len(_tokens(tokenizer, segment))


def _with_last_user(messages: list[dict[str, str]], content: str) -> list[dict[str, str]]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = [dict(m) for m in messages]
    out[last]["content"] = content
    return out


def _last_user_content(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def _truncate_prompt(tokenizer: Any, record: Record, budget: int) -> list[int] | None:
    """Prompt ids within `budget`, cutting the end of the last user message; None if impossible.

    Cut, re-render and re-tokenise until it fits: the template and the merges at the cut
    decide the exact count, so the loop checks the real ids rather than trusting arithmetic.
    """
    empty = _with_last_user(record.messages, "")
    empty_prompt = _tokens(tokenizer, render_prompt(tokenizer, record.system, empty))
    if len(empty_prompt) > budget:
        return None
    prefix = _PrefixCutter(tokenizer, _last_user_content(record.messages))
    keep = min(prefix.n_tokens, budget - len(empty_prompt))
    while keep > 0:
        messages = _with_last_user(record.messages, prefix.text(keep))
        ids = _tokens(tokenizer, render_prompt(tokenizer, record.system, messages))
        if len(ids) <= budget:
            return ids
        keep -= max(1, len(ids) - budget)
    return empty_prompt


class _PrefixCutter:
    """Text of the first k tokens of a message, cut from the original (no decode artefacts)."""

    def __init__(self, tokenizer: Any, content: str) -> None:
        self.tokenizer, self.content = tokenizer, content
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        enc = tokenizer(content, add_special_tokens=False, return_offsets_mapping=self.fast)
        self.ids = enc["input_ids"]
        self.offsets = enc["offset_mapping"] if self.fast else None
        self.n_tokens = len(self.ids)

    def text(self, keep: int) -> str:
        if keep >= self.n_tokens:
            return self.content
        if self.offsets is not None:
            return self.content[: self.offsets[keep - 1][1]]
        # Slow tokenizers: decode, dropping a character split across tokens.
        return self.tokenizer.decode(self.ids[:keep]).rstrip("\ufffd")

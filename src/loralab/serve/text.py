"""Token ids to text for the HTTP side: incremental detokenisation, held back while it could
still become a `stop` string or ends inside a UTF-8 character."""

from __future__ import annotations

from typing import Any


class TextSink:
    """Token ids in, text out, cut at the first `stop` string. Decodes a short window of ids
    per token (the ids since the last character boundary, after a few settled ones for
    context), not every id again: a whole decode per token costs O(n²) on a busy event loop."""

    def __init__(self, tokenizer: Any, stops: list[str], stop_ids: list[int]) -> None:
        self.tokenizer, self.stops, self.stop_ids = tokenizer, stops, set(stop_ids)
        self.decode = _decoder(tokenizer)
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: settled context; ids[read:]: new
        self.text, self.sent = "", 0
        self.stopped = False

    def _decode(self, final: bool = False) -> None:
        """Append what ids[read:] add; wait while they end inside a UTF-8 character."""
        window = self.decode(self.ids[self.prefix :])
        if window.endswith("\ufffd") and not final:
            return
        settled = self.decode(self.ids[self.prefix : self.read])
        self.text += window[len(settled) :]
        self.prefix, self.read = self.read, len(self.ids)

    def feed(self, tokens: list[int]) -> str:
        """The text that became final with `tokens`."""
        self.ids += [t for t in tokens if t not in self.stop_ids]
        self._decode()
        if self.stops:
            hits = [i for i in (self.text.find(s, max(0, self.sent - self.hold))
                                for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
                new, self.sent = self.text[self.sent :], len(self.text)
                return new
        safe = len(self.text) - self.hold
        if safe <= self.sent:
            return ""
        new, self.sent = self.text[self.sent : safe], safe
        return new

    def flush(self) -> str:
        """The rest of the text once generation ended (stop strings were checked by feed)."""
        if self.read < len(self.ids):
            self._decode(final=True)
        new, self.sent = self.text[self.sent :], len(self.text)
        return new


def _decoder(tokenizer: Any) -> Any:
    """ids -> tokenizer.decode(ids, skip_special_tokens=True), straight to the Rust tokenizer
    where transformers' wrapper (a few times the decode's cost) adds nothing."""
    raw = getattr(tokenizer, "_tokenizer", None)
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        raw = None
    kind = type(tokenizer)  # transformers' own decode of a fast tokenizer, no clean-up
    if (raw is not None and getattr(kind, "decode", None) is PreTrainedTokenizerBase.decode
            and getattr(kind, "_decode", None) is TokenizersBackend._decode
            and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False):
        return lambda ids: raw.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

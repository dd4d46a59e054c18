"""The static engine's prefill shortcuts (shared prefix, row groups) change no output."""

from __future__ import annotations

import pytest
import torch

from loralab.data.render import render_prompt
from loralab.engine import GenSettings, GenStats, generate
from loralab.engine.decode import common_prefix_length, row_groups, static_generate
from loralab.engine.forward import make_forward


@pytest.fixture(scope="module")
def prompts(qwen_tokenizer):
    texts = ["hi", "hello world " * 9, "一二三四五", "tags please " * 4, "x", "abc " * 7]
    system = "Score the text against every tag, JSON only."
    return [render_prompt(qwen_tokenizer, system, [{"role": "user", "content": t}])
            for t in texts]


def _texts(model, tokenizer, prompts, **kw):
    outs, stats = generate(model, tokenizer, prompts, GenSettings(max_new_tokens=8, **kw))
    return [g.text for g in outs], stats


def test_common_prefix_length_leaves_every_sequence_a_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[7], [7, 8]]) == 0
    assert common_prefix_length([[1, 2], [3, 2]]) == 0


def test_row_groups_cover_rows_in_order():
    assert row_groups(7, 3) == [(0, 2), (2, 5), (5, 7)]
    assert row_groups(2, 3) == [(0, 1), (1, 2)]
    assert row_groups(5, 1) == [(0, 5)]


def test_shared_prefix_and_row_groups_match_hf_generate(lively_model, qwen_tokenizer, prompts):
    hf, _ = _texts(lively_model, qwen_tokenizer, prompts, engine="hf", batch_size=8)
    plain, stats = _texts(lively_model, qwen_tokenizer, prompts, engine="static", batch_size=8,
                          shared_prefix=False, prefill_chunks=1)
    assert stats.shared_prefix == 0
    shared, stats = _texts(lively_model, qwen_tokenizer, prompts, engine="static", batch_size=8,
                           shared_prefix=True, prefill_chunks=1)
    assert stats.shared_prefix >= 10  # the system turn was prefilled once
    grouped, _ = _texts(lively_model, qwen_tokenizer, prompts, engine="static", batch_size=8,
                        shared_prefix=False, prefill_chunks=3)
    both, _ = _texts(lively_model, qwen_tokenizer, prompts, engine="static", batch_size=8,
                     shared_prefix=True, prefill_chunks=4)
    assert len(set(hf)) == len(prompts)  # outputs depend on the prompt
    assert plain == hf and shared == hf and grouped == hf and both == hf


@pytest.mark.parametrize("fast", [True, False])
def test_prefill_groups_give_the_same_first_logits(lively_model, qwen_tokenizer, prompts,
                                                   monkeypatch, fast):
    """Closer than text equality: the prefill's next-token logits agree to float rounding."""
    from loralab.engine.fast_forward import FastForward

    ids = [qwen_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids.sort(key=len, reverse=True)
    captured = []

    def keep(logits):
        captured.append(logits.reshape(-1, logits.shape[-1]).detach().clone())
        return logits

    fast_logits = FastForward._logits
    monkeypatch.setattr(FastForward, "_logits", lambda self, x: keep(fast_logits(self, x)))
    def copy_of_last(module, inputs, output) -> None:  # returns None: the output stays as is
        keep(output[:, -1])

    hook = lively_model.lm_head.register_forward_hook(copy_of_last)
    try:
        runs = []
        for shared, chunks in [(False, 1), (True, 3)]:
            captured.clear()
            settings = GenSettings(max_new_tokens=1, shared_prefix=shared, prefill_chunks=chunks,
                                   fast_forward=fast)
            stats = GenStats("static")
            with torch.inference_mode():
                forward = make_forward(lively_model, settings, None, stats)
                static_generate(lively_model, ids, settings, [151645], 151643, forward, stats)
            assert (stats.fast_forward is True) == fast
            runs.append(torch.cat(captured[-chunks:]))
    finally:
        hook.remove()
    assert runs[0].shape == (len(ids), lively_model.config.vocab_size)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)


def test_prompts_without_a_common_prefix(lively_model, qwen_tokenizer):
    raw = ["alpha beta", "gamma " * 6, "delta"]
    hf, _ = _texts(lively_model, qwen_tokenizer, raw, engine="hf", batch_size=4)
    static, stats = _texts(lively_model, qwen_tokenizer, raw, engine="static", batch_size=4)
    assert stats.shared_prefix == 0
    assert static == hf


def test_each_call_returns_what_its_engine_did(lively_model, qwen_tokenizer, prompts):
    # eval's metrics.json reads the stats of its own call, not a global a later call overwrote
    settings = GenSettings(max_new_tokens=4, engine="static", batch_size=8)
    _, stats = generate(lively_model, qwen_tokenizer, prompts, settings)
    settings.shared_prefix = False
    _, later = generate(lively_model, qwen_tokenizer, prompts, settings)
    assert stats.shared_prefix >= 10 and later.shared_prefix == 0
    assert stats.fast_forward is True and stats.cuda_graph is False
    assert stats.graph_error is None and stats.seconds > 0

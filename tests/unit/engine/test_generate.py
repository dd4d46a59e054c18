"""The generation engine: batching, stopping, and the static greedy loop against HF generate."""

from __future__ import annotations

import pytest
import torch

from loralab.data.render import render_prompt
from loralab.engine import GenSettings, default_max_new_tokens, generate, stop_token_ids
from loralab.engine.api import cut_at_stop, length_batches
from loralab.engine.decode import CHECK_EVERY
from loralab.engine.forward import grouped_decode_attention, pick_engine

IM_END = 151645


@pytest.fixture(scope="module")
def prompts(qwen_tokenizer):
    texts = ["hi", "hello world " * 9, "一二三四五", "tags please " * 4, "x"]
    return [render_prompt(qwen_tokenizer, "system", [{"role": "user", "content": t}])
            for t in texts]


def test_length_batches_sorts_longest_first_and_covers_every_index():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = length_batches(lengths, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(i for b in batches for i in b) == list(range(7))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert batches[0][:2] == [1, 3]  # ties keep file order


def test_cut_at_stop():
    assert cut_at_stop([5, 6, IM_END, 7], [IM_END], 10) == ([5, 6, IM_END], True)
    assert cut_at_stop([5, 6, 7, 8], [IM_END], 3) == ([5, 6, 7], False)
    assert cut_at_stop([IM_END], [IM_END], 1) == ([IM_END], True)
    assert cut_at_stop([5, 6, 7, IM_END], [IM_END], 3) == ([5, 6, 7], False)
    # stop tokens before min_new_tokens do not end a generation (forced lengths)
    assert cut_at_stop([IM_END, 6, IM_END, 7], [IM_END], 4, min_tokens=1) == (
        [IM_END, 6, IM_END], True)
    assert cut_at_stop([IM_END, 6, IM_END], [IM_END], 3, min_tokens=3) == (
        [IM_END, 6, IM_END], False)


def test_stop_ids_and_default_max_new_tokens(qwen_tokenizer):
    assert IM_END in stop_token_ids(qwen_tokenizer)
    answer = '{"其他": 0, "云计算": 7}'
    n = len(qwen_tokenizer(answer, add_special_tokens=False)["input_ids"])
    assert default_max_new_tokens(qwen_tokenizer, ["{}", answer]) == int(1.5 * n) + 16


def test_grouped_decode_attention_matches_repeated_heads():
    torch.manual_seed(1)
    q = torch.randn(3, 8, 1, 16)
    k, v = torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    valid = torch.rand(3, 10) > 0.3
    valid[:, 0] = True
    mask = torch.where(valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    out, _ = grouped_decode_attention(None, q, k, v, mask, scaling=0.25)
    rk, rv = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, rk, rv, attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", [2, 5])
def test_static_engine_equals_hf_generate_greedy(lively_model, qwen_tokenizer, prompts, batch_size):
    settings = dict(max_new_tokens=10, batch_size=batch_size)
    hf, hf_stats = generate(lively_model, qwen_tokenizer, prompts,
                                  GenSettings(**settings, engine="hf"))
    static, stats = generate(lively_model, qwen_tokenizer, prompts,
                                   GenSettings(**settings, engine="static"))
    assert [g.text for g in static] == [g.text for g in hf]
    assert len({g.text for g in static}) == len(prompts)  # outputs depend on the prompt
    assert stats.engine == "static" and hf_stats.engine == "hf"
    assert all(g.new_tokens == 10 and not g.finished for g in static)  # bounded, not finished
    assert stats.new_tokens == 10 * len(prompts)


def test_static_engine_batching_does_not_change_outputs(lively_model, qwen_tokenizer, prompts):
    one = [g.text for g in generate(lively_model, qwen_tokenizer, prompts,
                                          GenSettings(max_new_tokens=6, batch_size=1))[0]]
    all_ = [g.text for g in generate(lively_model, qwen_tokenizer, prompts,
                                           GenSettings(max_new_tokens=6, batch_size=8))[0]]
    assert one == all_


@pytest.mark.parametrize("engine,fast", [("static", True), ("static", False), ("hf", False)])
def test_generation_that_stops_is_finished_and_exits_early(lively_model, qwen_tokenizer, prompts,
                                                           monkeypatch, engine, fast):
    from loralab.engine.fast_forward import FastForward

    calls = {"n": 0}

    def force_stop(logits):
        calls["n"] += 1
        logits[..., IM_END] = 1e4
        return logits

    # loralab's forward computes logits from the weights, transformers' through lm_head
    fast_logits = FastForward._logits
    monkeypatch.setattr(FastForward, "_logits", lambda self, x: force_stop(fast_logits(self, x)))
    handle = lively_model.lm_head.register_forward_hook(lambda m, i, out: force_stop(out))
    try:
        outs, _ = generate(lively_model, qwen_tokenizer, prompts, GenSettings(
            max_new_tokens=40, batch_size=8, engine=engine, fast_forward=fast))
    finally:
        handle.remove()
    assert all(g.finished and g.new_tokens == 1 and g.text == "" for g in outs)
    # prefill (a shared prefix + up to 3 row groups) + decode: did not run to 40 tokens
    assert 1 <= calls["n"] <= CHECK_EVERY + 1 + 4


def test_sampling_needs_the_hf_engine(lively_model):
    with pytest.raises(Exception, match="greedy only"):
        pick_engine(lively_model, GenSettings(max_new_tokens=4, do_sample=True, engine="static"))
    assert pick_engine(lively_model, GenSettings(max_new_tokens=4, do_sample=True)) == "hf"
    assert pick_engine(lively_model, GenSettings(max_new_tokens=4)) == "static"


def test_token_id_prompts_without_a_tokenizer_equal_text_prompts(lively_model, qwen_tokenizer,
                                                                  prompts):
    """Token ids in, token ids out (benchmarks, serve): the same tokens as rendered text."""
    settings = GenSettings(max_new_tokens=6, batch_size=3)
    texts, _ = generate(lively_model, qwen_tokenizer, prompts, settings)
    ids = [qwen_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stops = tuple(stop_token_ids(qwen_tokenizer, lively_model))
    by_ids, stats = generate(lively_model, None, ids, GenSettings(
        max_new_tokens=6, batch_size=3, stop_ids=stops, pad_id=qwen_tokenizer.pad_token_id))
    assert [g.ids for g in by_ids] == [g.ids for g in texts]
    assert [qwen_tokenizer.decode(g.ids, skip_special_tokens=True) for g in by_ids] == [
        g.text for g in texts]
    assert all(g.text == "" for g in by_ids) and stats.new_tokens == sum(
        g.new_tokens for g in texts)
    with pytest.raises(ValueError, match="stop_ids"):
        generate(lively_model, None, ids, GenSettings(max_new_tokens=2))


def test_stream_hands_out_the_text_it_returns(lively_model, qwen_tokenizer, prompts):
    pieces: list[str] = []
    outs, stats = generate(lively_model, qwen_tokenizer, prompts[1:2],
                           GenSettings(max_new_tokens=8), stream=pieces.append)
    assert stats.engine == "hf" and len(pieces) >= 1
    assert "".join(pieces) == outs[0].text
    plain, _ = generate(lively_model, qwen_tokenizer, prompts[1:2],
                        GenSettings(max_new_tokens=8, engine="hf"))
    assert plain[0].text == outs[0].text

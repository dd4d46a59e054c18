"""Rendering, loss masks and truncation with the real Qwen2.5 tokenizer."""

from __future__ import annotations

import copy
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loralab.data.records import Record, read_records
from loralab.data.render import (
    IGNORE_INDEX,
    SKIP_ANSWER_TOO_LONG,
    encode_record,
    end_of_turn_token,
    render_prompt,
    required_length,
)
from loralab.errors import UserError

SYSTEM = "将以下文本按照【其他、云计算、架构师、计算机、个人娱乐、人工智能、商业案例、汽车行业、经济观察】标签纬度进行关联度评分"


def user_record(user: str, answer: str, system: str | None = SYSTEM, index: int = 1) -> Record:
    return Record(index, system, [{"role": "user", "content": user}], answer)


def labelled(example) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


def prompt_ids(example) -> list[int]:
    n = sum(1 for t in example.labels if t == IGNORE_INDEX)
    assert example.labels[:n] == [IGNORE_INDEX] * n  # the mask is one prefix
    return example.input_ids[:n]


def test_end_of_turn_is_im_end(qwen_tokenizer):
    assert end_of_turn_token(qwen_tokenizer) == "<|im_end|>"


def test_render_prompt_uses_the_template(qwen_tokenizer):
    text = render_prompt(qwen_tokenizer, "S", [{"role": "user", "content": "U"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    default = render_prompt(qwen_tokenizer, None, [{"role": "user", "content": "U"}])
    assert "You are Qwen" in default


def test_labels_are_answer_plus_end_of_turn(qwen_tokenizer):
    answer = json.dumps({"其他": 3, "云计算": 0, "商业案例": 7}, ensure_ascii=False)
    example = encode_record(qwen_tokenizer, user_record("一篇文章", answer), max_length=384)
    assert qwen_tokenizer.decode(labelled(example)) == answer + "<|im_end|>"
    assert example.labels[-1] == 151645
    assert example.labels[0] == IGNORE_INDEX
    assert example.truncated == 0
    # Unlike the seed, the sequence does not end with <|endoftext|>.
    assert 151643 not in example.input_ids


def test_ids_match_tokenising_the_full_conversation(qwen_tokenizer):
    record = user_record("标题 关键词: 云 芯片\n核心句子:\n第一句。", '{"其他": 1}')
    example = encode_record(qwen_tokenizer, record, max_length=384)
    messages = [{"role": "system", "content": SYSTEM}, *record.messages,
                {"role": "assistant", "content": record.answer}]
    full = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.endswith("<|im_end|>\n")
    expected = qwen_tokenizer(full[:-1], add_special_tokens=False).input_ids
    assert example.input_ids == expected


def test_training_prompt_equals_inference_prompt(qwen_tokenizer):
    record = user_record("文章内容", "答案", system=None)
    example = encode_record(qwen_tokenizer, record, max_length=384)
    assert qwen_tokenizer.decode(prompt_ids(example)) == render_prompt(
        qwen_tokenizer, record.system, record.messages
    )


def test_multi_turn_labels_only_the_last_answer(qwen_tokenizer):
    record = Record(1, None, [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
                              {"role": "user", "content": "U2"}], "A2")
    example = encode_record(qwen_tokenizer, record, max_length=384)
    assert qwen_tokenizer.decode(labelled(example)) == "A2<|im_end|>"
    assert "A1" in qwen_tokenizer.decode(prompt_ids(example))


def test_seed_case_keeps_the_whole_answer(qwen_tokenizer, make_seed_record):
    """The seed's MAX_LENGTH=384 cut the answer of long records; here the article is cut."""
    raw = make_seed_record(random.Random(3), input_chars=900)
    record = user_record(raw["input"], raw["output"])
    example = encode_record(qwen_tokenizer, record, max_length=384)
    assert len(example.input_ids) <= 384
    assert example.truncated > 0
    assert qwen_tokenizer.decode(labelled(example)) == raw["output"] + "<|im_end|>"
    prompt = qwen_tokenizer.decode(prompt_ids(example))
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    kept = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert raw["input"].startswith(kept) and len(kept) < len(raw["input"])
    # The cut is tight: one more token of the article would not fit.
    assert len(example.input_ids) >= 384 - 2


def test_truncated_count_is_the_prompt_tokens_removed(qwen_tokenizer, make_seed_record):
    raw = make_seed_record(random.Random(5), input_chars=600)
    record = user_record(raw["input"], raw["output"])
    whole = encode_record(qwen_tokenizer, record, max_length=10_000)
    cut = encode_record(qwen_tokenizer, record, max_length=200)
    assert whole.truncated == 0
    assert cut.truncated == len(prompt_ids(whole)) - len(prompt_ids(cut))
    assert labelled(cut) == labelled(whole)


def test_answer_that_cannot_fit_is_skipped(qwen_tokenizer):
    record = user_record("short", "很长的答案" * 50)
    need = required_length(qwen_tokenizer, record)
    assert encode_record(qwen_tokenizer, record, max_length=need - 1) == SKIP_ANSWER_TOO_LONG
    example = encode_record(qwen_tokenizer, record, max_length=need)
    assert isinstance(example, type(encode_record(qwen_tokenizer, record, 10_000)))
    assert len(example.input_ids) == need


def test_tokenizer_without_template_is_a_user_error(qwen_tokenizer):
    bare = copy.deepcopy(qwen_tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        render_prompt(bare, None, [{"role": "user", "content": "U"}])


TEXT = st.text(
    alphabet=st.sampled_from(list("abc xyz，。的是在了一人有云计算芯片😀\n\t{}\":0123456789")),
    min_size=0,
    max_size=300,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=TEXT, answer=TEXT.filter(lambda s: s.strip()), max_length=st.integers(16, 200))
def test_truncation_properties(qwen_tokenizer, user, answer, max_length):
    record = user_record(user, answer, system="S")
    whole = encode_record(qwen_tokenizer, record, max_length=100_000)
    result = encode_record(qwen_tokenizer, record, max_length=max_length)
    if isinstance(result, str):
        assert required_length(qwen_tokenizer, record) > max_length
        return
    assert len(result.input_ids) <= max_length
    assert labelled(result) == labelled(whole)  # the answer is never touched
    assert result.labels[0] == IGNORE_INDEX
    if result.truncated == 0:
        assert result.input_ids == whole.input_ids
    prompt = qwen_tokenizer.decode(prompt_ids(result))
    kept = prompt.split("<|im_start|>user\n", 1)[1].rsplit("<|im_end|>", 1)[0]
    assert user.startswith(kept)
    assert prompt == render_prompt(qwen_tokenizer, "S", [{"role": "user", "content": kept}])


def test_records_from_a_file_encode(qwen_tokenizer, seed_like_file):
    records = read_records(seed_like_file(n=5, input_chars=300))
    examples = [encode_record(qwen_tokenizer, r, max_length=384) for r in records]
    assert [e.record_index for e in examples] == [1, 2, 3, 4, 5]

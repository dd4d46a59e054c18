"""Seed-like records: the article-tagging task's layout, made up but realistically long."""

from __future__ import annotations

import json
import random

import pytest

TAGS = ["其他", "云计算", "架构师", "计算机", "个人娱乐", "人工智能", "商业案例", "汽车行业", "经济观察"]
WORDS = ["云原生", "大模型", "数据库", "芯片", "自动驾驶", "财报", "架构", "推理", "算力", "新能源"]


def seed_like_record(rng: random.Random, input_chars: int = 480) -> dict[str, str]:
    """{instruction, input, output} as in the seed's training file."""
    keywords = " ".join(rng.choice(WORDS) for _ in range(20))
    body = "".join(rng.choice(WORDS) + "，" for _ in range(input_chars // 3))
    article = f"某公司发布新产品 关键词: {keywords}\n核心句子:\n{body}"[:input_chars]
    scores = {tag: rng.randint(0, 10) for tag in TAGS}
    return {
        "instruction": "将以下文本分类",
        "input": article,
        "output": json.dumps(scores, ensure_ascii=False),
    }


@pytest.fixture
def make_seed_record():
    """The record generator, for tests that need one record."""
    return seed_like_record


@pytest.fixture
def seed_like_file(tmp_path):
    """Write n seed-like records as a JSON array; returns the path."""

    def write(n: int = 20, seed: int = 0, input_chars: int = 480):
        rng = random.Random(seed)
        rows = [seed_like_record(rng, input_chars) for _ in range(n)]
        path = tmp_path / f"train_{n}_{seed}.json"
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    return write

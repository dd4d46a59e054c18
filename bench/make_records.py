"""Synthetic tag-scoring records whose lengths follow the course's training data.

With the long (inference) system prompt and the Qwen2.5 chat template, the course's records are
median 436 tokens, p10 349, p90 484, range 123-550. This draws each record's total length from
that distribution (piecewise-linear quantiles) and fills the article text to hit it exactly.
Records are a JSON array in the seed's format: {"instruction", "input", "output"}.

    python bench/make_records.py --n 1447 --out /tmp/records.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from loralab.config import SEED_SYSTEM_PROMPT, SEED_TAGS

# (quantile, tokens) knots of the course's length distribution.
KNOTS = [(0.0, 123), (0.1, 349), (0.5, 436), (0.9, 484), (1.0, 550)]
SHORT_INSTRUCTION = "将以下文本分类"  # what the seed's training file carries
CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"
    "产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使"
    "点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明"
    "看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料"
    "象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指"
)


def quantile_length(u: float) -> int:
    """Tokens at quantile u in [0, 1] (linear between the knots)."""
    for (u0, t0), (u1, t1) in zip(KNOTS, KNOTS[1:], strict=False):
        if u <= u1:
            return round(t0 + (t1 - t0) * (u - u0) / (u1 - u0))
    return KNOTS[-1][1]


def target_lengths(n: int, rng: random.Random) -> list[int]:
    """n lengths spread evenly over the quantiles (so the sample's quantiles match), shuffled."""
    lengths = [quantile_length(i / max(1, n - 1)) for i in range(n)]
    rng.shuffle(lengths)
    return lengths


def article_text(rng: random.Random) -> str:
    """Title, ' 关键词: ' and keywords, then '\\n核心句子:\\n' and sentences (longer than needed)."""
    def word() -> str:
        return "".join(rng.choice(CHARS) for _ in range(rng.randint(2, 4)))

    title = "".join(word() for _ in range(rng.randint(3, 6)))
    keywords = " ".join(word() for _ in range(20))
    sentences = "\n".join("".join(word() for _ in range(rng.randint(8, 16))) + "。" for _ in range(40))
    return f"{title} 关键词: {keywords}\n核心句子:\n{sentences}"


def scores_json(rng: random.Random) -> str:
    scores = {tag: 0 for tag in SEED_TAGS}
    for tag in rng.sample(SEED_TAGS, rng.randint(1, 3)):
        scores[tag] = rng.randint(3, 10)
    return json.dumps(scores, ensure_ascii=False)


def record_tokens(tokenizer: Any, text: str, output: str) -> int:
    """Prompt + answer tokens as loralab trains them, with the long system prompt."""
    from loralab.data.records import Record
    from loralab.data.render import encode_record

    record = Record(1, SEED_SYSTEM_PROMPT, [{"role": "user", "content": text}], output)
    example = encode_record(tokenizer, record, max_length=100_000)
    return len(example.input_ids)


def fit_text(tokenizer: Any, text: str, output: str, target: int) -> str:
    """The longest prefix of `text` whose record has at most `target` tokens (binary search)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if record_tokens(tokenizer, text[:mid], output) <= target:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def make_records(n: int, tokenizer: Any, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for target in target_lengths(n, rng):
        output = scores_json(rng)
        text = fit_text(tokenizer, article_text(rng), output, target)
        records.append({"instruction": SHORT_INSTRUCTION, "input": text, "output": output})
    return records


def length_stats(records: list[dict[str, str]], tokenizer: Any) -> dict[str, int]:
    from loralab.data.summary import percentile

    lengths = sorted(record_tokens(tokenizer, r["input"], r["output"]) for r in records)
    return {"n": len(lengths), "min": lengths[0], "p10": percentile(lengths, 10),
            "p50": percentile(lengths, 50), "p90": percentile(lengths, 90), "max": lengths[-1]}


def builtin_tokenizer() -> Any:
    from loralab.model.tokenizer import builtin_tokenizer_dir, load_tokenizer

    return load_tokenizer(builtin_tokenizer_dir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1447, help="records (default 1447, the seed's file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON array file to write")
    args = parser.parse_args(argv)
    tokenizer = builtin_tokenizer()
    records = make_records(args.n, tokenizer, args.seed)
    from loralab.io import atomic_write_text

    atomic_write_text(Path(args.out), json.dumps(records, ensure_ascii=False, indent=1))
    print(json.dumps({"out": args.out, "tokens": length_stats(records, tokenizer)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

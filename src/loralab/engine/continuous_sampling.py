"""How the continuous batch's rows pick their tokens from the logits: greedy, or temperature /
top_p with a per-request seed. Runs after the step, outside the decode graph."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Sampling:
    """How a row picks its tokens: greedy when temperature is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def generator(sampling: Sampling, device: Any) -> Any:
    """A torch.Generator for a sampling row (seeded with its seed, else the clock); None for a
    greedy one."""
    import torch

    if sampling.temperature <= 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(sampling.seed if sampling.seed is not None else int(time.time_ns() % 2**63))
    return gen


def choose(logits: Any, samplings: list[Sampling], generators: list[Any]) -> Any:
    """One token per row of logits [rows, vocab]: argmax, or a draw with the row's temperature,
    top_p and generator."""
    tokens = logits.argmax(-1)
    for j, (sampling, gen) in enumerate(zip(samplings, generators, strict=True)):
        if sampling.temperature > 0:
            tokens[j] = sample(logits[j], sampling, gen)
    return tokens


def sample(logits: Any, sampling: Sampling, generator: Any) -> Any:
    """One token from logits [vocab] with temperature and nucleus (top_p) filtering."""
    import torch

    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above
        sorted_probs[before >= sampling.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]

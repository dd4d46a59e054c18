"""The continuous engine's fused layer pieces against their plain formulas."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loralab.engine.continuous_lora import (
    FUSED_ROWS,
    fuse_shrinks,
    masked_linear,
    rope_tables,
    rotate_qk,
)
from loralab.engine.fast_forward import rotate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_and_k_rotated_together_equal_rotate_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, dim = 5, 4, 2, 8
    q = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
    k = torch.randn(tokens, kv_heads, dim, generator=gen).to(dtype)
    angles = torch.randn(tokens, dim // 2, generator=gen)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)  # [tokens, dim], as rotary_emb
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    qk = torch.cat([q, k], 1).unflatten(-1, (2, dim // 2))
    together = rotate_qk(qk, *rope_tables(cos, sin)).flatten(-2)
    # fast_forward.rotate, one tensor at a time, tables broadcast over the heads
    assert torch.equal(together[:, :heads], rotate(q, cos[:, None], sin[:, None]))
    assert torch.equal(together[:, heads:], rotate(k, cos[:, None], sin[:, None]))


@pytest.mark.parametrize("shape, mask_shape", [((6, 16), (6, 12)), ((2, 3, 16), (2, 1, 12))])
def test_masked_linear_adds_bias_residual_and_each_rows_adapter(shape, mask_shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen)
    weight, bias = torch.randn(10, 16, generator=gen), torch.randn(10, generator=gen)
    a, b = torch.randn(12, 16, generator=gen), torch.randn(10, 12, generator=gen)
    mask = (torch.rand(*mask_shape, generator=gen) > 0.5).float()
    residual = torch.randn(*shape[:-1], 10, generator=gen)
    want = x @ weight.T + bias + residual + ((x @ a.T) * mask) @ b.T
    got = masked_linear(x, weight, bias, (a, b), mask, residual)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked_linear(x, weight, None, None, None),
                               x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fuse_shrinks_puts_a_under_the_weight_and_gives_the_same_sums(with_bias):
    """fuse_shrinks: the layer's weight (and bias) keep their values as views of a fused
    tensor padded to FUSED_ROWS, A is its rows after them, and masked_linear over the fused
    entry is the plain formula; o and down (residual groups) are left as they were."""
    gen = torch.Generator().manual_seed(2)
    weights = {g: torch.randn(n, 16, generator=gen) for g, n in (("qkv", 10), ("o", 16),
                                                                  ("gate_up", 8), ("down", 16))}
    biases = {g: torch.randn(10, generator=gen) if with_bias and g == "qkv" else None
              for g in weights}
    layer = SimpleNamespace(**weights, **{f"{g}_bias": b for g, b in biases.items()})
    entry = {g: (torch.randn(6, 16, generator=gen), torch.randn(len(w), 6, generator=gen))
             for g, w in weights.items()}
    plain = dict(entry)
    fuse_shrinks([layer], [entry])
    for group in ("qkv", "gate_up"):
        a, b, fused, fused_bias = entry[group]
        n = len(weights[group])
        assert fused.shape == (FUSED_ROWS, 16)
        assert torch.equal(layer.__dict__[group], weights[group])
        assert layer.__dict__[group].data_ptr() == fused.data_ptr()
        assert torch.equal(a, plain[group][0]) and torch.equal(fused[n:n + 6], a)
        assert not fused[n + 6:].any()
        if biases[group] is not None:
            assert torch.equal(layer.__dict__[f"{group}_bias"], biases[group])
            assert fused_bias.shape == (FUSED_ROWS,)
        x = torch.randn(2, 3, 16, generator=gen)
        mask = (torch.rand(2, 1, 6, generator=gen) > 0.5).float()
        want = x @ weights[group].T + ((x @ a.T) * mask) @ b.T
        if biases[group] is not None:
            want = want + biases[group]
        got = masked_linear(x, layer.__dict__[group], layer.__dict__[f"{group}_bias"],
                            entry[group], mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for group in ("o", "down"):
        assert entry[group] is plain[group] and layer.__dict__[group] is weights[group]

"""The continuous engine's fused layer pieces against their plain formulas."""

from __future__ import annotations

import pytest
import torch

from loralab.engine.continuous_lora import masked_linear, rope_tables, rotate_qk
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

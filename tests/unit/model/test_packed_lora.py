"""The packed LoRA layer: every token gets its own trial's adapter, and only its own trial's
weights get its gradient; the expected values are computed here one trial at a time."""

from __future__ import annotations

import torch
from torch import nn

from loralab.model.packed_lora import PackedAdapters, TrialSpec

RANKS = {0: 2, 1: 4, 2: 8}
SCALES = {0: 16 / 2, 1: 32 / 4, 2: 8 / 8}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(12, 10, bias=True)
        self.o_proj = nn.Linear(10, 12, bias=False)  # not a target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.q_proj(x))


def _weights(seed: int, r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {"q_proj": (torch.randn(r, 12, generator=gen), torch.randn(10, r, generator=gen))}


def _packed(dropout: dict[int, float] | None = None):
    torch.manual_seed(0)
    model = Block().requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = PackedAdapters(model, ["q_proj"])
    params = {}
    for slot, r in RANKS.items():
        spec = TrialSpec(r, SCALES[slot], (dropout or {}).get(slot, 0.0))
        params[slot] = adapters.add_trial(slot, spec, _weights(slot, r))
    adapters.ctx.active = list(RANKS)
    return model, adapters, params, before


def _alone(model: Block, slot: int, x: torch.Tensor):
    """Trial `slot` by itself: base + s * x A^T B^T, its own leaf tensors."""
    a, b = (t.clone().requires_grad_(True) for t in _weights(slot, RANKS[slot])["q_proj"])
    q = model.q_proj.base_layer if hasattr(model.q_proj, "base_layer") else model.q_proj
    hidden = q(x) + (x @ a.t() @ b.t()) * SCALES[slot]
    return model.o_proj(hidden), a, b


def test_each_token_gets_its_trials_adapter_and_gradient():
    model, adapters, params, _ = _packed()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 12, generator=gen)
    owners = torch.tensor([[0, 0, 1, 1, 1, 0, -1], [1, 0, 0, 1, 1, 1, 1]])  # trial 2: no tokens
    adapters.ctx.set_owners(owners)
    out = model(x)
    weight = torch.randn(out.shape, generator=gen)
    (out * weight).sum().backward()
    for slot in (0, 1):
        rows = owners == slot
        expected, a, b = _alone(model, slot, x)
        assert torch.allclose(out[rows], expected[rows], rtol=1e-5, atol=1e-5)
        (expected * weight * rows.unsqueeze(-1)).sum().backward()
        assert torch.allclose(params[slot][0].grad, a.grad, rtol=1e-5, atol=1e-5)
        assert torch.allclose(params[slot][1].grad, b.grad, rtol=1e-5, atol=1e-5)
    nobody = owners == -1
    plain = model.o_proj(model.q_proj.base_layer(x))
    assert torch.equal(out[nobody], plain[nobody])
    assert not params[2][0].grad.any() and not params[2][1].grad.any()


def test_dropout_is_per_trial_and_uninstall_restores_the_base():
    model, adapters, _, before = _packed(dropout={1: 0.5})
    model.train()
    x = torch.randn(1, 6, 12)
    owners = torch.tensor([[0, 0, 0, 1, 1, 1]])
    adapters.ctx.set_owners(owners)
    out = model(x)
    expected, _, _ = _alone(model, 0, x)
    assert torch.allclose(out[0, :3], expected[0, :3], rtol=1e-5, atol=1e-5)  # p=0: untouched
    dropped, _, _ = _alone(model, 1, x)
    assert not torch.allclose(out[0, 3:], dropped[0, 3:], atol=1e-4)  # p=0.5: some inputs dropped
    original = adapters.originals["q_proj"]
    adapters.uninstall()
    assert model.q_proj is original and type(model.q_proj) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_trial_that_leaves_is_no_longer_computed():
    model, adapters, params, _ = _packed()
    adapters.drop_trial(1)
    assert adapters.ctx.active == [0, 2]
    x = torch.randn(1, 4, 12)
    adapters.ctx.set_owners(torch.tensor([[2, 2, 0, 0]]))
    out = model(x)
    for slot, rows in ((2, slice(0, 2)), (0, slice(2, 4))):
        expected, _, _ = _alone(model, slot, x)
        assert torch.allclose(out[0, rows], expected[0, rows], rtol=1e-5, atol=1e-5)
    assert len(list(adapters.parameters())) == 4  # trials 0 and 2: A and B each


def test_bf16_scale_is_the_exact_alpha_over_r_of_the_fused_single_trial_forward():
    """At 32/12 (2.6667, 2.671875 in bf16) the packed layer must give what loralab's fused
    forward gives a trial alone (model/fast_lora.py: bf16 GEMMs, `low * scaling`)."""
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16).requires_grad_(False)
    adapters = PackedAdapters(model, ["q_proj"])
    a, b = torch.randn(12, 12), torch.randn(10, 12)
    adapters.add_trial(0, TrialSpec(12, 32 / 12), {"q_proj": (a, b)})
    adapters.ctx.active = [0]
    x = torch.randn(1, 64, 12).to(torch.bfloat16)
    adapters.ctx.set_owners(torch.zeros(1, 64, dtype=torch.long))
    out = model.q_proj(x)
    base = model.q_proj.base_layer(x)
    low = torch.nn.functional.linear(x, a.to(torch.bfloat16)) * (32 / 12)
    alone = torch.addmm(base.reshape(-1, 10), low.reshape(-1, 12), b.to(torch.bfloat16).t())
    assert torch.equal(out.reshape(-1, 10), alone)


def test_another_trials_overflowing_product_does_not_reach_a_token():
    """Trial 1's A at 1e38: x A_1 is inf on every token; trial 0's tokens must not see it."""
    model, adapters, params, _ = _packed()
    with torch.no_grad():
        params[1][0].fill_(1e38)
    x = torch.randn(1, 6, 12)
    owners = torch.tensor([[0, 0, 0, 1, 1, 1]])
    adapters.ctx.set_owners(owners)
    out = model(x)
    expected, _, _ = _alone(model, 0, x)
    assert torch.isfinite(out[0, :3]).all()
    assert torch.allclose(out[0, :3], expected[0, :3], rtol=1e-5, atol=1e-5)

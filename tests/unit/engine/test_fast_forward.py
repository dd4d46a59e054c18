"""loralab's own forward: same tokens and logits as transformers', adapters folded in exactly."""

from __future__ import annotations

import random

import pytest
import torch

from loralab.engine import GenSettings, LoraWeights, generate, read_lora
from loralab.engine import fast_forward as ff
from loralab.engine.kv_cache import StaticKV, additive_mask

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STOP, PAD = (151645,), 151643


@pytest.fixture(scope="module")
def prompt_ids():
    """Seven prompts sharing a 9-token head (the shared-prefix path) of different lengths."""
    rng = random.Random(0)
    head = [rng.randint(0, 150000) for _ in range(9)]
    return [head + [rng.randint(0, 150000) for _ in range(rng.randint(3, 30))] for _ in range(7)]


def _ids(model, ids, settings, adapters=None):
    """New token ids per prompt (per adapter for a list), and the call's stats."""
    outs, stats = generate(model, None, ids, settings, adapters)
    if isinstance(adapters, list):
        return [[g.ids for g in per_adapter] for per_adapter in outs], stats
    return [g.ids for g in outs], stats


def _generate(model, ids, fast: bool, lora=None, **kw):
    settings = GenSettings(max_new_tokens=12, min_new_tokens=12, batch_size=8, fast_forward=fast,
                           stop_ids=STOP, pad_id=PAD, **kw)
    out, stats = _ids(model, ids, settings, lora)
    return out, stats.fast_forward


@pytest.mark.parametrize("shared,chunks", [(True, 3), (False, 1)])
def test_same_greedy_tokens_as_transformers_forward(lively_model, prompt_ids, shared, chunks):
    fast, used = _generate(lively_model, prompt_ids, True, shared_prefix=shared,
                           prefill_chunks=chunks)
    slow, not_used = _generate(lively_model, prompt_ids, False, shared_prefix=shared,
                               prefill_chunks=chunks)
    assert used is True and not_used != True  # noqa: E712 - a reason string when not used
    assert fast == slow
    assert len({tuple(x) for x in fast}) == len(prompt_ids)  # outputs depend on the prompt


def test_prefill_logits_match_transformers(lively_model, prompt_ids):
    n = min(len(p) for p in prompt_ids)
    ids = torch.tensor([p[:n] for p in prompt_ids])
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(len(ids), 1, n, n)
    cache = StaticKV(lively_model.config, len(ids), n, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        ours = ff.FastForward(lively_model).prefill(
            cache, ids, torch.arange(n)[None].expand(len(ids), n), additive_mask(causal, torch.float32),
            (slice(None), 0), (slice(None), n))
        theirs = lively_model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.fixture()
def saved_adapter(lively_model, tmp_path, save_adapter):
    """A PEFT adapter with non-zero B (rsLoRA scaling, r=4) saved to disk; the base unloaded."""
    return save_adapter(lively_model, tmp_path, 3, r=4, lora_alpha=16, target_modules=TARGETS,
                        use_rslora=True)


def test_folded_adapter_equals_peft_merged(lively_model, saved_adapter, prompt_ids):
    from peft import PeftModel

    base = lively_model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora, why = read_lora(saved_adapter, base)
    assert why is None and len(lora) == 2 * 7
    folded, used = _generate(base, prompt_ids, True, lora=lora)
    assert used is True
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # untouched
    plain, _ = _generate(base, prompt_ids, True)
    peft_model = PeftModel.from_pretrained(base, str(saved_adapter))
    try:
        peft_model.merge_adapter()
        merged, reason = _generate(peft_model, prompt_ids, False)
        assert "off" in reason
        merged_fast, used = _generate(peft_model, prompt_ids, True)  # merged PEFT layers: taken
        assert used is True
        peft_model.unmerge_adapter()
        unmerged, reason = _generate(peft_model, prompt_ids, True)
        assert "unmerged" in reason  # an unmerged adapter falls back to transformers' forward
    finally:
        peft_model.unload()
    assert folded == merged == merged_fast == unmerged
    assert folded != plain  # the adapter changes the outputs


def test_copy_writes_each_part_once_and_shares_what_no_adapter_changes(lively_model,
                                                                        saved_adapter):
    lora, _ = read_lora(saved_adapter, lively_model)
    prefix = "model.layers.0."
    some = LoraWeights({k: v for k, v in lora.items() if k in (prefix + "self_attn.q_proj",
                                                               prefix + "self_attn.o_proj")})
    with torch.inference_mode():
        plain, folded = ff.build_layers(lively_model)[0], ff.build_layers(lively_model, some)[0]
    attn, mlp = lively_model.model.layers[0].self_attn, lively_model.model.layers[0].mlp

    def with_delta(linear, name):
        a, b, scale = lora[prefix + name]
        return linear.weight + scale * b @ a

    # without an adapter: q/k/v and gate/up stacked, o and down the base's own tensors
    assert torch.equal(plain.qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                             attn.v_proj.weight]))
    assert torch.equal(plain.gate_up, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert plain.o is attn.o_proj.weight and plain.down is mlp.down_proj.weight
    # with one: its rows folded, the other rows copied, a changed o copied, down still shared
    q = attn.q_proj.out_features
    torch.testing.assert_close(folded.qkv[:q], with_delta(attn.q_proj, "self_attn.q_proj"))
    assert torch.equal(folded.qkv[q:], plain.qkv[q:])
    torch.testing.assert_close(folded.o, with_delta(attn.o_proj, "self_attn.o_proj"))
    assert folded.o.data_ptr() != attn.o_proj.weight.data_ptr()
    assert folded.down is mlp.down_proj.weight


def test_why_not(lively_model, monkeypatch):
    assert ff.why_not(lively_model) is None
    monkeypatch.setattr(lively_model.config, "sliding_window", 16, raising=False)
    assert "sliding" in ff.why_not(lively_model)
    monkeypatch.setattr(lively_model.config, "sliding_window", None)
    monkeypatch.setattr(lively_model.config, "model_type", "gpt2")
    assert "gpt2" in ff.why_not(lively_model)
    monkeypatch.setattr(lively_model.config, "model_type", "qwen2")
    norm = lively_model.model.layers[1].post_attention_layernorm
    weight = norm.weight  # (monkeypatch would delete a module's parameter on undo)
    norm.weight = torch.nn.Parameter(weight.double())
    try:
        assert "norms in another dtype" in ff.why_not(lively_model)  # fused RMSNorm: one dtype
    finally:
        norm.weight = weight


def test_too_little_memory_for_the_copy_falls_back(lively_model, prompt_ids, monkeypatch):
    monkeypatch.setattr(ff, "free_bytes", lambda device: 1024)
    out, reason = _generate(lively_model, prompt_ids, True)
    assert "stacked copy needs" in reason
    assert out == _generate(lively_model, prompt_ids, False)[0]
    # the eval then reads no adapter as tensors: each one goes through PEFT
    from loralab.engine.adapters import AdapterSource

    source = AdapterSource(lively_model, [], GenSettings(8))
    assert "stacked copy needs" in source.reason and source.prefetch is None


def test_adapters_sharing_a_batch_equal_each_folded_alone(lively_model, prompt_ids, tmp_path,
                                                         save_adapter):
    """Three adapters of different ranks and targets in one batch (unmerged, adapter-major
    rows) give each one's own tokens; batch_size 4 makes two batches of prompts."""
    loras = []
    for i, (rank, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, TARGETS),
                                         (2, ["up_proj", "down_proj"])]):
        folder = save_adapter(lively_model, tmp_path / str(i), 10 + i, r=rank, lora_alpha=16,
                              target_modules=targets)
        loras.append(read_lora(folder, lively_model)[0])
    settings = GenSettings(max_new_tokens=12, min_new_tokens=12, batch_size=4, stop_ids=STOP,
                           pad_id=PAD)
    alone = [_ids(lively_model, prompt_ids, settings, lora)[0] for lora in loras]
    together, stats = _ids(lively_model, prompt_ids, settings, loras)
    assert together == alone
    assert stats.engine == "static" and stats.new_tokens == 3 * 12 * len(prompt_ids)
    assert alone[0] != alone[1] != alone[2]


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_llama_and_mistral_match_transformers_generate(kind):
    """Llama (with attention biases) takes loralab's forward; Mistral (sliding window by
    default) is refused and runs the engine on transformers' forward: both equal HF generate."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    cfg = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                     initializer_range=0.5, **({"attention_bias": True} if kind == "llama" else {}))
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg).eval()
    rng = random.Random(1)
    head = [rng.randint(3, 999) for _ in range(6)]
    ids = [head + [rng.randint(3, 999) for _ in range(rng.randint(3, 20))] for _ in range(5)]
    settings = dict(max_new_tokens=10, min_new_tokens=10, batch_size=8, stop_ids=(2,), pad_id=0)
    reference, _ = _ids(model, ids, GenSettings(**settings, engine="hf"))
    for fast in (True, False):
        out, stats = _ids(model, ids, GenSettings(**settings, fast_forward=fast))
        used = stats.fast_forward
        assert out == reference
        assert (used is True) == (fast and kind == "llama"), used


def test_compiled_decode_does_not_recompile_per_cache_length(lively_model, monkeypatch):
    """A new length batch changes the cache length: the compiled decode layer recompiles once
    with dynamic sizes, not once per batch up to dynamo's recompile limit."""
    import functools

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    ff.compiled_pieces.cache_clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    forward = ff.FastForward(lively_model, compile_=True)
    ff.compiled_pieces.cache_clear()
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for length in range(20, 60, 4):  # 10 cache lengths, more than the limit of 8
            cache = StaticKV(lively_model.config, 3, length, torch.float32, torch.device("cpu"))
            mask = torch.zeros(3, 1, 1, length)
            forward.decode(cache, torch.tensor([[5], [6], [7]]), torch.tensor([[1], [2], [3]]), mask)
    assert counters["stats"]["unique_graphs"] - before <= 3
    torch._dynamo.reset()


def test_bf16_prefill_and_decode_round_like_transformers(prompt_ids):
    """In bf16 (the GPU dtype) loralab's forward stays as close to a float32 reference as
    transformers' own bf16 forward: casts, masks and attention keep the model's dtype."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                      initializer_range=0.2)
    cfg._attn_implementation = "sdpa"
    reference = Qwen2ForCausalLM(cfg).eval()
    model = Qwen2ForCausalLM(cfg).eval()
    model.load_state_dict(reference.state_dict())
    model.to(torch.bfloat16)
    n = min(len(p) for p in prompt_ids)
    ids = torch.tensor([[t % 1000 for t in p[:n]] for p in prompt_ids])
    rows = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(rows, 1, n, n)
    with torch.inference_mode():
        want = reference(input_ids=ids).logits[:, -1]
        theirs = model(input_ids=ids).logits[:, -1].float()
        cache = StaticKV(cfg, rows, n + 1, torch.bfloat16, torch.device("cpu"))
        forward = ff.FastForward(model)
        ours = forward.prefill(cache, ids, torch.arange(n)[None].expand(rows, n),
                               additive_mask(causal, torch.bfloat16), (slice(None), 0),
                               (slice(None), n)).float()
        cache.advance(n)
        step = forward.decode(cache, ids[:, -1:], torch.full((rows, 1), n),
                              torch.zeros(rows, 1, 1, n + 1, dtype=torch.bfloat16))
    assert ours.dtype == torch.float32 and step.dtype == torch.bfloat16
    assert torch.isfinite(step).all()
    ours_err = (ours - want).norm() / want.norm()
    theirs_err = (theirs - want).norm() / want.norm()
    assert ours_err < 1.1 * theirs_err + 1e-4, (ours_err, theirs_err)


def test_adapters_read_as_tensors_need_the_static_engine(lively_model, saved_adapter,
                                                          prompt_ids):
    lora, _ = read_lora(saved_adapter, lively_model)
    settings = GenSettings(max_new_tokens=2, engine="hf", stop_ids=STOP, pad_id=PAD)
    with pytest.raises(ValueError, match="static engine"):
        generate(lively_model, None, prompt_ids, settings, lora)
    outs, stats = generate(lively_model, None, prompt_ids, settings, [])
    assert outs == [] and stats.new_tokens == 0

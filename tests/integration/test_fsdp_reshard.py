"""FSDP frees each decoder layer's gathered weights after its forward (2 gloo processes).

Without a root above them every sharded layer is its own FSDP root, and FSDP keeps a root's
weights gathered after its forward: on 2 H200s a 72B-shaped model then held all 80 layers whole
on each GPU and ran out of memory. After a forward, every layer must hold only its shard again.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results: dict) -> None:
    from peft import LoraConfig, get_peft_model
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, Qwen2Config

    from loralab.train.dist import from_env, shutdown
    from loralab.train.fsdp import shard_decoder_layers

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = from_env()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg)
    model.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    shard_decoder_layers(model, dist)
    ids = torch.randint(0, 128, (2, 8))
    hidden = model.model(input_ids=ids).last_hidden_state
    after_forward = [isinstance(layer.mlp.gate_proj.weight, DTensor) for layer in model.model.layers]
    hidden.float().pow(2).mean().backward()
    grads = [p.grad is not None for p in peft_model.parameters() if p.requires_grad]
    results[rank] = (after_forward, all(grads) and bool(grads))
    shutdown()


def test_layers_are_sharded_again_after_their_forward():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        got = dict(results)
    for rank in (0, 1):
        after_forward, lora_grads = got[rank]
        assert after_forward == [True, True, True], f"rank {rank}: layers left gathered"
        assert lora_grads

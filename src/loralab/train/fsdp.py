"""train.strategy=fsdp: the frozen base's decoder layers sharded over the processes (FSDP2).

What may not fit one GPU is the base; the LoRA weights are small. So only the decoder layers'
frozen weights are sharded: each process keeps 1/N of them and all-gathers a layer just before
it runs, in the forward and again in the backward. Embeddings, the final norm and the LM head
stay whole on every process (loralab calls the decoder and the head separately, and a tied
head would otherwise sit in two shards). The LoRA weights are left out of FSDP
(`ignored_params`) and stay replicated, so their gradients are summed as in the data-parallel
path and the optimizer, clipping, checkpoints and the saved adapter are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from loralab.train.dist import Dist


def shard_decoder_layers(model: torch.nn.Module, dist: Dist) -> int:
    """fully_shard every decoder layer of `model` over the job's processes; the layer count.

    Call it after the LoRA layers are attached (their weights must be known to be left out)
    and before anything is compiled.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from loralab.train.levers import decoder_layers

    mesh = init_device_mesh(dist.device.type, (dist.world,))
    layers = decoder_layers(model)
    for layer in layers:
        trainable = {p for p in layer.parameters() if p.requires_grad}
        fully_shard(layer, mesh=mesh, ignored_params=trainable)
    # The decoder stack is the root and holds no shards of its own (embeddings and norm stay
    # whole). Without a root every layer is one, and FSDP keeps a root's weights gathered
    # after its forward: all layers would end up whole on every process (seen: 72B shapes
    # reached 137 GiB per H200 in the first layers' backward).
    decoder = getattr(model, "model", model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    whole = {p for p in decoder.parameters() if id(p) not in in_layers}
    fully_shard(decoder, mesh=mesh, ignored_params=whole)
    return len(layers)


def move_to(model: torch.nn.Module, device: torch.device) -> None:
    """Move the sharded model to `device`. A base whose weights were built on the meta device
    (accelerate's `init_empty_weights`: shapes without weights, for benchmarks of models too big
    for one host's memory) is materialised there with random values (N(0, 0.02), norms 1), each
    process allocating only its shards; its real buffers (rotary frequencies) are kept."""
    if not any(p.is_meta for p in model.parameters()):
        model.to(device)
        return
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if name.endswith("norm.weight"):
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=generator)


def sharded_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes this process holds of the base's sharded weights, their full size)."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for p in model.parameters():
        if isinstance(p, DTensor):
            local += p.to_local().numel() * p.element_size()
            full += p.numel() * p.element_size()
    return local, full


def describe(model: Any, layers: int, dist: Dist) -> dict[str, Any]:
    local, full = sharded_bytes(model)
    return {"strategy": "fsdp", "sharded_layers": layers, "processes": dist.world,
            "sharded_bytes_per_process": local, "sharded_bytes": full}

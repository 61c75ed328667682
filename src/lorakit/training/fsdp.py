"""Sharded data parallelism on PyTorch's own engine: FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each decoder block is one FSDP unit and the root (embeddings, final norm, head) another, as
torchtune's recipes wrap them; `lorakit plan --shard full` counts the same units. Frozen base
weights and trainable adapter weights share a unit: FSDP2 shards both, and only the trainable ones
get gradients and optimizer state (sharded too). FSDP averages gradients over the ranks; lorakit's
loss is already normalised by the global number of loss tokens, so `loss_scale()` (the world size)
turns the average back into the sum the single-process run computes. (A divide factor of 1 would
say it directly, but it reduces with PREMUL_SUM, which gloo lacks.)
What this does not do yet: the trainer's --fsdp loop, distributed checkpoints (issue 19).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..plan.report import fsdp_blocks


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` in place across the default process group's ranks (CPU: gloo, CUDA: nccl)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("FSDP needs a process group: launch with torchrun (WORLD_SIZE > 1)")
    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for block in fsdp_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def loss_scale() -> int:
    """What to multiply a rank's loss by so FSDP's averaged gradient is the global sum."""
    return dist.get_world_size() if dist.is_initialized() else 1


def full_state(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0, in CPU memory (other ranks get {}): what files are written
    from. Every rank must call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                               ignore_frozen_params=trainable_only))

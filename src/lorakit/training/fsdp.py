"""Sharded data parallelism on PyTorch's own engine: FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each decoder block is one FSDP unit and the root (embeddings, final norm, head) another, as
torchtune's recipes wrap them; `lorakit plan --shard full` counts the same units. Frozen base
weights and trainable adapter weights share a unit: FSDP2 shards both, and only the trainable ones
get gradients and optimizer state (sharded too). FSDP averages gradients over the ranks; lorakit's
loss is already normalised by the global number of loss tokens, so `loss_scale()` (the world size)
turns the average back into the sum the single-process run computes. (A divide factor of 1 would
say it directly, but it reduces with PREMUL_SUM, which gloo lacks.)

Files: checkpoints go through `torch.distributed.checkpoint` (each rank its shard, see
`checkpoint.save_sharded`); the final adapter or model is written once by rank 0 inside
`gathered(model)`, which swaps the trainable shards for their full tensors while it lasts.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.distributed as dist

from ..plan.report import fsdp_blocks


def shard(model: torch.nn.Module, bf16: bool = False) -> torch.nn.Module:
    """Shard `model` in place across the default process group's ranks (CPU: gloo, CUDA: nccl).
    `bf16`: FSDP's mixed precision, parameters all-gathered and computed in bf16, gradients
    reduced in fp32 (the sharded masters stay fp32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("FSDP needs a process group: launch with torchrun (WORLD_SIZE > 1)")
    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in fsdp_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def forward_method(model: torch.nn.Module, name: str, fn) -> None:
    """Give the sharded `model` a method `name` (`fn(model, *args)`) that runs between the root
    unit's all-gather and reshard, as `forward` does: for a path that calls inner modules directly
    (the trainer's loss runs the head on labelled positions only)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, name, types.MethodType(fn, model))
    register_fsdp_forward_method(model, name)


def model_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2 swaps it for a subclass named FSDP<class>."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    return next(c for c in cls.__bases__ if c is not FSDPModule) if issubclass(cls, FSDPModule) else cls


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")          # a DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a sharded tensor (the tensor itself when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, all-gathered when sharded (a collective: every rank calls it)."""
    return t.full_tensor() if is_sharded(t) else t


def loss_scale() -> int:
    """What to multiply a rank's loss by so FSDP's averaged gradient is the global sum."""
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """While inside, the trainable parameters are whole plain tensors on every rank (so the usual
    writers work on them); the shards come back on exit. Frozen weights stay sharded: an adapter's
    file never needs them. Every rank must enter (it all-gathers)."""
    swapped, full_of = [], {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.requires_grad or not is_sharded(p):
                continue
            if id(p) not in full_of:           # tied weights: one gather, one shared full tensor
                full_of[id(p)] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=True)
            swapped.append((module, name, p))
            module._parameters[name] = full_of[id(p)]
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_state(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0, in CPU memory (other ranks get {}). Every rank must
    call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                               ignore_frozen_params=trainable_only))

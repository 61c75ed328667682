"""Data parallelism through torchrun: one process per rank, gradients summed across ranks.

Each optimizer step sees one global batch; rank r takes rows r, r + world, ... of it. The loss is
normalised by the global number of loss tokens, so summing gradients over ranks gives exactly the
single-process gradient. Adapter gradients are small, so one all-reduce of a flat buffer per step
is all the communication there is. Every rank holds the whole adapter; rank 0 writes files.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """(rank, world_size); starts a gloo (CPU) or nccl (CUDA) group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


BUCKET_BYTES = 25 * 2**20        # torch DDP's default bucket_cap_mb


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum each gradient over the ranks, in place, in buckets of ~25 MB (one all-reduce each): the
    extra memory is one bucket, not a flat copy of every gradient (full fine-tuning's are the model's size)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    bucket, size = [], 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if bucket and (size >= BUCKET_BYTES or bucket[0].grad.dtype != p.grad.dtype):
            _all_reduce(bucket)
            bucket, size = [], 0
        bucket.append(p)
        size += p.grad.numel() * p.grad.element_size()
    if bucket:
        _all_reduce(bucket)


def _all_reduce(bucket: list[torch.nn.Parameter]) -> None:
    if len(bucket) == 1:
        dist.all_reduce(bucket[0].grad, op=dist.ReduceOp.SUM)
        return
    flat = torch.cat([p.grad.reshape(-1) for p in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in bucket:
        n = p.grad.numel()
        p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
        offset += n


def sum_tensor(t: torch.Tensor) -> None:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def gather_objects(obj) -> list:
    """`obj` from every rank, in rank order (a list of one outside torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

"""Run under torchrun by test_fsdp.py: one backward and one AdamW step, sharded with FSDP2 over the
ranks (each rank its rows of the global batch), against the same step in one process; prints the
worst relative error of the gradients and of the updated trainable weights, as JSON, on rank 0."""
import copy
import json
import sys

import torch
import torch.distributed as dist

import lorakit as lk
from lorakit.training import fsdp


def build(method: str):
    torch.manual_seed(0)
    model = lk.tiny_model("llama")
    if method != "full":
        lk.inject(model, lk.LoraConfig(r=4, targets="all-linear", use_dora=method == "dora"))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def step(model, rows, scale):
    """Loss normalised by the global batch's loss tokens, as lorakit's trainer does."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = 4 * 15                                     # 4 rows of 16 tokens: 15 predicted each
    logits = model(input_ids=rows).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                             reduction="sum") / tokens
    (loss * scale).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    return grads


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(method: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(2))
    single = build(method)
    want = step(single, rows, 1)
    sharded = fsdp.shard(build(method))
    got = step(sharded, rows[rank::world], fsdp.loss_scale())
    grad_err = max(((full(got[n]) - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in want.items())
    state = fsdp.full_state(sharded, trainable_only=method != "full")
    if rank == 0:                                       # the gathered state lives on rank 0 only
        ref = {n: p for n, p in single.state_dict().items() if n in state}
        weight_err = max((state[n] - p).abs().max().item() for n, p in ref.items())
        print(json.dumps({"grad_err": grad_err, "weight_err": weight_err, "keys": len(state), "ref_keys": len(ref),
                          "sharded": all(hasattr(p, "full_tensor") for p in sharded.parameters())}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

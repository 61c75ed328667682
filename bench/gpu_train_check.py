"""Training on a GPU: the fused LoRA MLP (`methods/fused_mlp.py`) against the unfused graph and peft.

1. Numerics, a tiny Llama: in fp32 (TF32 off) the fused block's loss and adapter grads equal the
   unfused graph's (to 1e-4); under bf16 autocast each grad is as close to the fp32 truth as the
   unfused graph's (within 1.5x), as `tests/methods/test_fused_mlp.py` holds on the CPU.
2. A training step of a random Llama with SmolLM2-135M's shapes (no weights needed), r=16
   all-linear, the base stored in bf16, fp32 adapters and AdamW, bf16 autocast: median step time
   and peak allocated memory above the resident model (`torch.cuda.max_memory_allocated`: exact,
   no allocator slack), lorakit fused / lorakit unfused / peft (its forward with labels).

    PYTHONPATH=src python3 bench/gpu_train_check.py --device cuda --out results.json
It runs on the CPU too (`--device cpu --batch 2 --seq 64`: a dry run, memory not measured).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import lorakit as lk
from lorakit.methods import fused_mlp
from lorakit.models import tiny_model
from lorakit.training.trainer import loss_sum


def _tiny_grads(device: str, fused: bool, bf16: bool):
    model = tiny_model("llama").to(device)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(0, 0.5)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)).to(device)
    fused_mlp.enabled = fused
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    fused_mlp.enabled = True
    return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def numerics(device: str) -> dict:
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()   # noqa: E731
    (l0, g0), (l1, g1) = _tiny_grads(device, False, False), _tiny_grads(device, True, False)
    fp32_worst = max(rel(g1[n], g0[n]) for n in g0)
    (_, gu), (_, gf) = _tiny_grads(device, False, True), _tiny_grads(device, True, True)
    mlp = [n for n in g0 if ".mlp." in n]
    bf16 = {n: (rel(gf[n], g0[n]), rel(gu[n], g0[n])) for n in mlp}
    ok = abs(l1 - l0) <= 1e-5 * abs(l0) and fp32_worst <= 1e-4 and all(f <= 1.5 * u + 2e-3 for f, u in bf16.values())
    return {"ok": ok, "fp32_loss": (l0, l1), "fp32_worst_grad_rel": fp32_worst,
            "bf16_worst_grad_rel_fused_unfused": max(bf16.values())}


def smollm2_shaped(device: str):
    import transformers

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)


def step_run(lib: str, device: str, batch: int, seq: int, steps: int) -> dict:
    model = smollm2_shaped(device)
    if lib == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    else:
        lk.inject(model, lk.LoraConfig(r=16, alpha=32, targets="all-linear"))
        fused_mlp.enabled = lib == "lorakit"
    model.train()
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(3)).to(device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            if lib == "peft":
                loss = model(**data, use_cache=False).loss
            else:
                s, n = loss_sum(model, data)
                loss = s / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    fused_mlp.enabled = True
    out = {"lib": lib, "median_step_ms": 1e3 * statistics.median(times), "tokens_per_s": batch * seq / statistics.median(times)}
    if cuda:
        out["peak_mb_above_model"] = (torch.cuda.max_memory_allocated() - resident) / 2**20
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "numerics": numerics(args.device), "steps": []}
    print(json.dumps(result["numerics"]))
    for lib in ("lorakit", "unfused", "peft", "lorakit", "unfused", "peft"):      # alternate, twice
        result["steps"].append(step_run(lib, args.device, args.batch, args.seq, args.steps))
        print(json.dumps(result["steps"][-1]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if not result["numerics"]["ok"]:
        raise SystemExit("numerics check FAILED")


if __name__ == "__main__":
    main()

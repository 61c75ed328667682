"""The batched multi-adapter op in a whole model: 32 adapters x 1 row, against peft and a merged model.

Three runs, each in a fresh process on the same model and the same 32 adapters (r=16, alpha=32,
every linear layer of the blocks, deterministic random weights):
- merged:  adapter 0 merged into the base weights, every row on it (the lower bound: no adapter work);
- lorakit: `lorakit.serve.attach` with 32 slots, row i on adapter i through the fast op;
- peft:    32 adapters loaded in one PeftModel, `model(..., adapter_names=[...])` (its mixed batch).
Two shapes: a decode step (32 rows x 1 token) and a prefill (32 rows x 32 tokens, logits for the
last position only, as an engine asks). fp32, no KV cache, 2 threads (or `--device cuda`: the
timed forwards end with a synchronize, TF32 is off so the logits stay fp32); the figure is the
fastest timed forward after warm-up. The model is SmolLM2-135M (the embedded model; if it is not
installed, a Llama of its shapes with random weights, and the output says so). The runs check each
other: lorakit's logits against peft's (every row) and against the merged model's (row 0).

    .venv/bin/python bench/serve_ops.py            # writes bench/results/serve_ops.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = ("merged", "lorakit", "peft")
SHAPES = {"decode": 1, "prefill": 32}      # tokens per row


def base_model(name: str):
    import lorakit as lk

    try:
        model, _ = lk.load_base(name)
        return model.eval(), name
    except FileNotFoundError:   # not installed: same shapes, random weights
        import torch
        import transformers
        config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                          max_position_embeddings=2048, tie_word_embeddings=True)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval(), "random Llama with SmolLM2-135M's shapes"


def adapter_tensors(j: int, i: int, d_in: int, d_out: int, r: int):
    """Adapter j's A (r, d_in), B (d_out, r) on target layer i: the same in every process."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * j + i)
    return torch.randn(r, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, r, generator=g) * 0.02


def worker(run: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    from lorakit.linear import shape as linear_shape
    from lorakit.serve import AdapterWeights, LayerWeights, attach
    from lorakit.targets import resolve

    model, source = base_model(args.model)
    targets = resolve(model, "all-linear")
    shapes = [linear_shape(model.get_submodule(t)) for t in targets]
    scale, n = args.alpha / args.r, args.adapters
    t0 = time.perf_counter()
    kwargs = {}
    if run == "merged":
        with torch.no_grad():
            for i, (t, (d_in, d_out)) in enumerate(zip(targets, shapes)):
                A, B = adapter_tensors(0, i, d_in, d_out, args.r)
                model.get_submodule(t).weight += scale * (B @ A)
    elif run == "lorakit":
        handle = attach(model, "all-linear", slots=n, r_max=args.r)
        for j in range(n):
            layers = {t: LayerWeights(*adapter_tensors(j, i, d_in, d_out, args.r), scale)
                      for i, (t, (d_in, d_out)) in enumerate(zip(targets, shapes))}
            handle.write_slot(j, AdapterWeights(f"a{j}", layers))
        handle.set_rows(list(range(n)))
    else:
        import peft
        config = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config, adapter_name="a0")
        for j in range(1, n):
            model.add_adapter(f"a{j}", config)
        with torch.no_grad():
            for i, t in enumerate(targets):
                layer = model.base_model.model.get_submodule(t)
                d_in, d_out = shapes[i]
                for j in range(n):
                    A, B = adapter_tensors(j, i, d_in, d_out, args.r)
                    layer.lora_A[f"a{j}"].weight.copy_(A)
                    layer.lora_B[f"a{j}"].weight.copy_(B)
        model.eval()
        kwargs["adapter_names"] = [f"a{j}" for j in range(n)]
    model.to(device)                                   # slots are buffers: they move with the model
    setup_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(0)
    out = {"run": run, "model": source, "setup_s": setup_s, "threads": torch.get_num_threads(), "device": str(device),
           "params": sum(t.numel() for t in model.parameters() if not t.requires_grad or run != "peft"),
           "head_params": model.config.vocab_size * model.config.hidden_size,
           "adapter_params": sum(args.r * (d_in + d_out) for d_in, d_out in shapes),
           "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size}
    logits = {}
    for shape, tokens in SHAPES.items():
        ids = torch.randint(0, model.config.vocab_size, (n, tokens), generator=g).to(device)
        times = []
        with torch.no_grad():
            for _ in range(args.warmup + args.steps):
                sync()
                t = time.perf_counter()
                result = model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs).logits[:, -1]
                sync()
                times.append(time.perf_counter() - t)
        logits[shape] = result.cpu()
        timed = times[args.warmup:]
        out[shape] = {"best_s": min(timed), "mean_s": sum(timed) / len(timed), "times_s": timed}
    torch.save(logits, args.logits_out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapters", type=int, default=32, help="adapters = batch rows, one row each")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="bench/results/serve_ops.json")
    p.add_argument("--worker", choices=RUNS)
    p.add_argument("--logits-out")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    import torch

    import roofline   # bench/roofline.py: the machine measured first, while nothing else runs
    limits = roofline.machine() if args.device == "cpu" else None
    results, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in RUNS:
            path = Path(tmp) / f"{run}.pt"
            cmd = [sys.executable, __file__, "--worker", run, "--logits-out", str(path)] + sys.argv[1:]
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
            if done.returncode:
                sys.exit(f"{run} failed:\n{done.stderr[-3000:]}")
            results[run] = json.loads(done.stdout.strip().splitlines()[-1])
            logits[run] = torch.load(path)
    check = {shape: {"lorakit_vs_peft_all_rows": float((logits["lorakit"][shape] - logits["peft"][shape]).abs().max()),
                     "lorakit_vs_merged_row0": float((logits["lorakit"][shape][0] - logits["merged"][shape][0]).abs().max())}
             for shape in SHAPES}
    ratios = {shape: {"speedup_vs_peft": results["peft"][shape]["best_s"] / results["lorakit"][shape]["best_s"],
                      "fraction_of_merged": results["merged"][shape]["best_s"] / results["lorakit"][shape]["best_s"],
                      "adapter_overhead_vs_peft": (results["peft"][shape]["best_s"] - results["merged"][shape]["best_s"])
                      / max(1e-9, results["lorakit"][shape]["best_s"] - results["merged"][shape]["best_s"])}
              for shape in SHAPES}

    first = results["lorakit"]
    print(f"{first['model']}, {args.adapters} adapters x 1 row, r={args.r}, all-linear, fp32, {first['device']}, "
          f"{first['threads']} threads, "
          f"no KV cache, best of {args.steps} forwards after {args.warmup} warm-up\n")
    print(f"| run | decode {args.adapters}x1 (ms) | prefill {args.adapters}x{SHAPES['prefill']} (ms) |")
    print("| --- | ---: | ---: |")
    labels = {"merged": "one merged model (lower bound)", "lorakit": f"lorakit batched op ({args.adapters} slots)",
              "peft": "peft `adapter_names` mixed batch"}
    for run in RUNS:
        r = results[run]
        print(f"| {labels[run]} | {1e3 * r['decode']['best_s']:.1f} | {1e3 * r['prefill']['best_s']:.1f} |")
    for key, label, target in (("speedup_vs_peft", "lorakit speed-up over peft", ">= 5x"),
                               ("fraction_of_merged", "lorakit as a fraction of merged speed", ">= 0.7x"),
                               ("adapter_overhead_vs_peft", "adapter work only (minus merged): peft / lorakit", "")):
        print(f"| {label}{f' (target {target})' if target else ''} | x{ratios['decode'][key]:.2f} | "
              f"x{ratios['prefill'][key]:.2f} |")
    print(f"\nmax |logits diff|: lorakit vs peft (all rows) {check['decode']['lorakit_vs_peft_all_rows']:.1e} decode, "
          f"{check['prefill']['lorakit_vs_peft_all_rows']:.1e} prefill; lorakit vs merged (row 0) "
          f"{check['decode']['lorakit_vs_merged_row0']:.1e} / {check['prefill']['lorakit_vs_merged_row0']:.1e}")
    limits = roofline_lines(results, limits, args) if limits else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "ratios": ratios, "check": check,
                                          "machine": limits}, indent=2) + "\n")


def roofline_lines(results: dict, limits: dict, args) -> dict:
    """Decode against its floor (`roofline.decode_bound`: the base and every row's adapter read once,
    or their FLOPs at the fp32 peak), prefill as MFU (PaLM's 2N + 4LHT forward FLOPs per token, the
    output head counted for the last position only, as the prefill computes it)."""
    import roofline

    r = results["merged"]
    n, rows, tokens = r["params"], args.adapters, SHAPES["prefill"]
    floors = {"merged": roofline.decode_bound(rows, n, 0, 4 * n, 0, limits, "fp32"),
              "lorakit": roofline.decode_bound(rows, n, r["adapter_params"], 4 * n, 4 * r["adapter_params"], limits,
                                               "fp32")}
    floors["peft"] = floors["lorakit"]
    flops = 2 * (n - r["head_params"]) + 2 * r["head_params"] / tokens + 4 * r["layers"] * r["hidden"] * tokens
    cpu = limits["cpu"]
    print(f"\nroofline: {cpu['model']} ({', '.join(cpu['flags'])}), fp32 {limits['fp32_gflops']:.0f} GFLOP/s, copy "
          f"{limits['bandwidth_gbs']:.1f} GB/s. decode as a fraction of its floor ("
          f"{floors['lorakit']['floor_s'] * 1e3:.1f} ms with adapters, {floors['lorakit']['binds']}-bound): "
          + ", ".join(f"{run} {floors[run]['floor_s'] / results[run]['decode']['best_s']:.0%}" for run in RUNS)
          + "; prefill MFU: " + ", ".join(
              f"{run} {roofline.mfu(rows * tokens / results[run]['prefill']['best_s'], flops, limits['fp32_gflops']):.2f}"
              for run in RUNS))
    return limits


if __name__ == "__main__":
    main()

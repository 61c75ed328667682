"""Serving on a GPU, checked against the CPU: the same requests through `build(ServeConfig(device=...))`.

A tiny Llama with the serving tests' four adapters on disk (LoRA r=2, rsLoRA with some targets,
DoRA, a rank pattern), eight greedy requests (two per adapter) plus one on the base, run to
completion by the engine on the CPU and on `--device`. The greedy tokens must be equal and each first-step logit row within
`--atol` (fp32, TF32 off). This exercises the whole stack off the CPU: adapters read from disk into
device slots, the DoRA factor computed where the base is, the ragged forward, sampling.

    export PYTHONPATH=src LORAKIT_CACHE=/tmp/lorakit-cache
    python3 bench/gpu_check.py --device cuda                 # then, for speed:
    python3 bench/serve_ops.py --device cuda --threads 16
Without the embedded model installed, serve_ops uses a random Llama with SmolLM2-135M's shapes.
It runs on the CPU too (`--device cpu`: CPU against itself, for a dry run here).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # the repository root: the tests' adapters
from tests.serve.conftest import ADAPTERS, make_adapter  # noqa: E402

LLAMA_ADAPTERS = ADAPTERS["llama"]


def make_adapters(root: Path) -> None:
    for i, (name, config) in enumerate(LLAMA_ADAPTERS.items()):
        make_adapter(root / name, "llama", config, seed=10 + i)


def run(root: Path, device: str, tokens: int):
    from lorakit.serve import SamplingParams, ServeConfig, build
    from lorakit.serve.forward import Chunk

    served = build(ServeConfig(model="tiny-llama", adapters=str(root), device=device, max_lora_rank=8))
    names = [None] + [n for n in LLAMA_ADAPTERS for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200, (5 + i,), generator=g).tolist() for i in range(len(names))]
    first = []
    for name, prompt in zip(names, prompts):          # the first step's logits, one request at a time
        slot = -1 if name is None else served.adapters.acquire(name)
        runner = served.engine.runner
        first.append(runner.forward([Chunk(runner.new_cache(), torch.tensor(prompt), slot)])[0].cpu())
        if name is not None:
            served.adapters.release(name)
    t = time.perf_counter()
    out = served.engine.generate(prompts, names, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    seconds = time.perf_counter() - t
    served.close()
    return out, torch.stack(first), seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--atol", type=float, default=1e-4)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        make_adapters(Path(tmp))
        cpu, cpu_logits, cpu_s = run(Path(tmp), "cpu", args.tokens)
        dev, dev_logits, dev_s = run(Path(tmp), args.device, args.tokens)
    diff = float((cpu_logits - dev_logits).abs().max())
    same = sum(a == b for a, b in zip(cpu, dev))
    print(f"{args.device}: {same} of {len(cpu)} requests give the CPU's greedy tokens; first-step logits within "
          f"{diff:.2e} (atol {args.atol}); engine {dev_s:.2f} s vs CPU {cpu_s:.2f} s")
    ok = same == len(cpu) and diff <= args.atol
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

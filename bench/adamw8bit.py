"""optimizer.step() on CPU: torch.optim.AdamW, lorakit AdamW8bit and bitsandbytes AdamW8bit.

Each optimizer steps the same parameter set with a fixed random gradient: one untimed step creates
the state, then the mean of --steps timed steps per repeat, the libraries alternating repeat by repeat, the median
of --repeats. State bytes count every tensor
in optimizer.state once (`lorakit.optim.state_bytes`). Threads: torch's default (all cores).

Parameter sets:
  lora-r16-smollm2-135m  the A and B matrices of r=16 LoRA on every linear of SmolLM2-135M (30
                         layers; q, k, v, o, gate, up, down): 420 tensors, 4.9M parameters, some
                         B matrices below min_8bit_size (192 x 16), which keep fp32 moments
  mlp-11-layers          the gate, up and down weights of 11 SmolLM2-135M layers (1536 x 576):
                         33 tensors, 29.2M parameters, as in partial full fine-tuning

    .venv/bin/python bench/adamw8bit.py                 # both sets, ~1 minute on 2 cores
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from lorakit.optim import AdamW8bit, state_bytes

HIDDEN, KV, INTERMEDIATE, LAYERS = 576, 192, 1536, 30
LINEARS = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
           "gate": (HIDDEN, INTERMEDIATE), "up": (HIDDEN, INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN)}   # (in, out)
PARAM_SETS = {
    "lora-r16-smollm2-135m": [shape for _ in range(LAYERS) for i, o in LINEARS.values() for shape in ((16, i), (o, 16))],
    "mlp-11-layers": [(INTERMEDIATE, HIDDEN)] * 33,
}
RESULTS = Path(__file__).parent / "results" / "adamw8bit.json"


def optimizers() -> dict:
    makers = {"torch": lambda ps: torch.optim.AdamW(ps, lr=1e-4),
              "lorakit": lambda ps: AdamW8bit(ps, lr=1e-4)}
    try:
        import bitsandbytes as bnb
        makers["bitsandbytes"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
    except ImportError:
        pass
    return makers


def prepare(make, shapes):
    """A fresh optimizer over fresh parameters (the same for every library), its state created."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt = make(params)
    opt.step()                                         # creates the state (and compiles what compiles)
    return opt


def run(sizes=tuple(PARAM_SETS), steps: int = 3, repeats: int = 5) -> dict:
    """Per set, the libraries alternate repeat by repeat (this VM's speed drifts); each repeat is the
    mean of `steps` steps, and the median repeat is reported."""
    makers = optimizers()
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps, "repeats": repeats,
           "sets": {}}
    if "bitsandbytes" in makers:
        import bitsandbytes
        out["bitsandbytes"] = bitsandbytes.__version__
    for name in sizes:
        shapes = PARAM_SETS[name]
        row = {"tensors": len(shapes), "params": sum(a * b for a, b in shapes)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opts = {lib: prepare(make, shapes) for lib, make in makers.items()}
            times = {lib: [] for lib in opts}
            for _ in range(repeats):
                for lib, opt in opts.items():
                    start = time.perf_counter()
                    for _ in range(steps):
                        opt.step()
                    times[lib].append((time.perf_counter() - start) / steps)
        for lib, opt in opts.items():
            nbytes = state_bytes(opt)
            row[lib] = {"step_ms": round(statistics.median(times[lib]) * 1e3, 2), "state_bytes": nbytes,
                        "repeats_ms": [round(t * 1e3, 1) for t in times[lib]],
                        "bytes_per_param": round(nbytes / row["params"], 4)}
        del opts
        out["sets"][name] = row
    return out


# Bytes a step must move per parameter (read + write), whatever the implementation: the parameter
# (4 + 4), its gradient (4), and the two moments (fp32: 4 + 4 each; 8-bit: 1 + 1 each, absmax aside).
STEP_BYTES = {"torch": 28, "lorakit": 16, "bitsandbytes": 16}


def roofline_line(result: dict) -> str:
    """Each optimizer's step as a fraction of its bandwidth floor (bytes it must move / measured bandwidth)."""
    import roofline

    limits = roofline.machine()
    result["machine"] = limits
    cpu, parts = limits["cpu"], []
    for name, row in result["sets"].items():
        for lib, bytes_per_param in STEP_BYTES.items():
            if lib in row:
                floor = roofline.decode_floor_seconds(bytes_per_param * row["params"], limits["bandwidth_gbs"])
                row[lib]["fraction_of_floor"] = floor / (row[lib]["step_ms"] / 1e3)
        parts.append(f"{name}: " + ", ".join(f"{lib} {row[lib]['fraction_of_floor']:.0%}" for lib in STEP_BYTES
                                            if lib in row))
    return (f"{cpu['model']} ({', '.join(cpu['flags'])}), copy {limits['bandwidth_gbs']:.1f} GB/s; each step as a "
            "fraction of its bandwidth floor (28 B/param fp32, 16 B/param 8-bit, read + written): " + "; ".join(parts))


def table(result: dict) -> str:
    libs = [lib for lib in ("torch", "lorakit", "bitsandbytes") if lib in next(iter(result["sets"].values()))]
    head = (["set", "params"] + [f"{lib} step ms" for lib in libs] + ["lorakit / torch"]
            + (["lorakit / bitsandbytes"] if "bitsandbytes" in libs else []) + [f"{lib} B/param" for lib in libs])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["sets"].items():
        ms = {lib: row[lib]["step_ms"] for lib in libs}
        cells = [name, f"{row['params'] / 1e6:.1f}M"] + [f"{ms[lib]:.1f}" for lib in libs]
        cells.append(f"{ms['lorakit'] / ms['torch']:.1f}x")
        if "bitsandbytes" in libs:
            cells.append(f"{ms['lorakit'] / ms['bitsandbytes']:.2f}x")
        cells += [f"{row[lib]['bytes_per_param']:.3f}" for lib in libs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(PARAM_SETS), default=list(PARAM_SETS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="median of this many alternating repeats")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.sizes, args.steps, args.repeats)
    line = roofline_line(result)                     # measured after the timings, so it does not disturb them
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"torch {result['torch']}, bitsandbytes {result.get('bitsandbytes', 'not installed')}, "
          f"{result['threads']} threads")
    print(table(result))
    print(line)
    return result


if __name__ == "__main__":
    main()

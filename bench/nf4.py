"""NF4 on CPU, lorakit vs bitsandbytes in one run: quantize, dequantize, a 4-bit linear forward.

Both libraries work on the same tensors in the same process, alternating, best of --repeat runs.
Shapes are SmolLM2-135M's MLP projection and a 7B-class attention projection; the linear forward
uses a training-sized batch (8 x 128 tokens). Then the 8-bit AdamW step (bench/adamw8bit.py).

    .venv/bin/python bench/nf4.py          # writes bench/results/nf4.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = [(1536, 576), (4096, 4096)]


def best(fn, repeat: int) -> float:
    fn()                                        # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--skip-optimizer", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nf4.json"))
    args = ap.parse_args()

    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import Linear4bit as BnbLinear4bit

    from lorakit.quant import Linear4bit, dequantize_nf4, dequantize_nf4_reference, quantize_nf4

    rows = []
    torch.manual_seed(0)
    for d_out, d_in in SHAPES:
        w = torch.randn(d_out, d_in) * 0.02
        packed, state = quantize_nf4(w)
        b_packed, b_state = bnbf.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
        row = {"shape": f"{d_out}x{d_in}", "params": w.numel()}
        row["quantize_s"] = {"lorakit": best(lambda: quantize_nf4(w), args.repeat),
                             "bitsandbytes": best(lambda: bnbf.quantize_4bit(w, compress_statistics=True,
                                                                             quant_type="nf4"), args.repeat)}
        for dtype in (torch.float32, torch.bfloat16):
            row[f"dequantize_{str(dtype)[6:]}_s"] = {
                "lorakit": best(lambda: dequantize_nf4(packed, state, dtype), args.repeat),
                "lorakit_reference": best(lambda: dequantize_nf4_reference(packed, state, dtype), args.repeat),
                "bitsandbytes": best(lambda: bnbf.dequantize_4bit(b_packed, b_state).to(dtype), args.repeat)}
        lin = torch.nn.Linear(d_in, d_out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        x = torch.randn(args.tokens, d_in)
        for dtype in (torch.float32, torch.bfloat16):
            ours = Linear4bit.from_linear(lin, compute_dtype=dtype)
            theirs = BnbLinear4bit(d_in, d_out, bias=False, compute_dtype=dtype, compress_statistics=True,
                                   quant_type="nf4")
            theirs.load_state_dict(lin.state_dict())
            theirs = theirs.to("cpu")
            with torch.no_grad():
                row[f"linear_forward_{str(dtype)[6:]}_s"] = {
                    "lorakit": best(lambda: ours(x), args.repeat),
                    "bitsandbytes": best(lambda: theirs(x), args.repeat),
                    "dense_fp32": best(lambda: lin(x), args.repeat)}
        rows.append(row)

    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "tokens": args.tokens, "rows": rows}
    if not args.skip_optimizer:
        sys.path.insert(0, str(Path(__file__).parent))
        import adamw8bit
        result["adamw8bit"] = adamw8bit.run()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print("| shape | operation | lorakit ms | bitsandbytes ms | bitsandbytes / lorakit (higher: lorakit faster) |")
    print("|---|---|---|---|---|")
    for row in rows:
        for key, t in row.items():
            if isinstance(t, dict):
                print(f"| {row['shape']} | {key[:-2]} | {t['lorakit'] * 1e3:.2f} | {t['bitsandbytes'] * 1e3:.2f} | "
                      f"x{t['bitsandbytes'] / t['lorakit']:.2f} |")


if __name__ == "__main__":
    main()

"""Merge an adapter into its base model and write a plain transformers folder.

Example: `lorakit merge --model smollm2-135m-instruct --adapter runs/demo/adapter --out merged/`.
The output loads with plain transformers; it is written to a temporary folder and renamed into place.
"""
from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_folder
from ..io.peft_format import load_adapter
from ..merge import merge_and_unload
from ..models import load_base


def register(p):
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="a PEFT-format adapter folder")
    p.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def merge_to_folder(model_ref: str, adapter: str, out: str | Path, dtype: str = "float32") -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    model, tokenizer = load_base(model_ref, dtype=dtype)
    model = merge_and_unload(load_adapter(model, adapter))
    with atomic_folder(out) as tmp:             # an empty `out` is replaced
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def run(args) -> int:
    out = merge_to_folder(args.model, args.adapter, args.out, args.dtype)
    print(f"merged {args.adapter} into {args.model}: wrote {out}")
    return 0

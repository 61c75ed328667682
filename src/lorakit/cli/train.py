"""Train an adapter (or, with --method full, every weight) on a JSONL file; flags come from the configs.

--method lora|dora take LoraConfig's flags, prompt|prefix take --num-virtual-tokens (and
--prompt-init/--init-text, --projection), full takes none.

Example: `lorakit train --model smollm2-135m-instruct --data train.jsonl --eval-data heldout.jsonl
--out runs/x --r 16 --alpha 32 --targets all-linear --steps 100`. Data parallel:
`torchrun --nproc_per_node=2 -m lorakit train ...`. Resume: the same command plus `--resume runs/x`.
"""
from __future__ import annotations

import json
import sys

from ..methods import registry
from ..models import fast_bf16, resolve_device
from ..training.run import describe_precision, split_kwargs, train
from ..training import distributed
from ..training.trainer import TrainConfig
from .args import add_config_args, add_method_args, config_values


def register(p):
    add_config_args(p, TrainConfig, defaults={"bf16": "where the device computes bf16 in hardware"})
    add_method_args(p)


def run(args) -> int:
    values = config_values(TrainConfig, args)
    for method in registry.METHODS.values():
        values.update(config_values(method.config, args))
    why = "as asked"
    if values.get("bf16") is None:          # bf16 where the device computes it in hardware, else fp32
        values["bf16"], why = fast_bf16(resolve_device(values.get("device", "auto")))
    if distributed.is_main():
        cfg, _ = split_kwargs(values)
        print(f"precision: {describe_precision(cfg)} ({why}; --bf16/--no-bf16 to choose)", file=sys.stderr)
    summary = train(**values)
    if not distributed.is_main():            # under torchrun the summary is rank 0's to print
        return 0
    keys = ("weights", "steps", "final_loss", "eval_loss", "seconds", "tokens_per_s", "trainable_params")
    print(json.dumps({k: summary[k] for k in keys} | {"peak_memory_mb": summary["peak_memory"]["peak_above_baseline_bytes"] / 2**20}, indent=2))
    return 0


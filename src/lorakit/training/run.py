"""`lorakit.train(...)`: a whole run from names to files (what `lorakit train` calls).

Loads the base, reads the data, injects (or resumes) the adapter, trains, and writes the run folder:
adapter/ (model/ for full fine-tuning), checkpoints/, metrics.jsonl, loss.png, summary.json, and
bad_rows.jsonl if rows were skipped.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import FullConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from ..inject import inject, trainable_report
from ..atomic import write_text
from ..models import load_base, resolve_device
from ..optim import state_bytes
from ..quant import prepare_for_training, quantize
from . import checkpoint, distributed
from .data import load_dataset
from .memory import PeakMemory, TensorPeak, model_tensors, trim_heap
from .outputs import AdapterWeights, ModelWeights
from .trainer import Trainer, TrainConfig

METHODS = {"lora": LoraConfig, "dora": LoraConfig, "prompt": PromptTuningConfig, "prefix": PrefixTuningConfig,
           "full": FullConfig}


def split_kwargs(kwargs: dict) -> tuple[TrainConfig, object]:
    """One flat set of names (as on the command line) -> (TrainConfig, method config)."""
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    train_kw = {k: v for k, v in kwargs.items() if k in train_names}
    cfg = TrainConfig(**train_kw)
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r} is not available (choose from {sorted(METHODS)})")
    method_cls = METHODS[cfg.method]
    method_names = {f.name for f in dataclasses.fields(method_cls)}
    unknown = sorted(set(kwargs) - train_names - method_names)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown} for method {cfg.method!r}")
    if cfg.method == "full" and cfg.kl_base:
        raise ValueError("kl_base needs a frozen base to compare against; full fine-tuning has none")
    if cfg.method == "full" and cfg.quantize:
        raise ValueError("quantize needs a frozen base: a 4-bit base cannot be fully fine-tuned")
    method_kw = {k: v for k, v in kwargs.items() if k in method_names}
    if cfg.method == "dora":
        method_kw["use_dora"] = True
    return cfg, method_cls(**method_kw)


def train(**kwargs) -> dict:
    """Train an adapter; the keyword names are the `lorakit train` flags. Returns the run summary."""
    cfg, method_cfg = split_kwargs(kwargs)
    if cfg.data is None:
        raise ValueError("train needs data=<path to a JSONL file>")
    device = resolve_device(cfg.device)
    memory = PeakMemory(device).start()
    model, tokenizer = load_base(cfg.model, dtype=cfg.dtype)
    model.to(device)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} has no tokenizer; training needs one")
    return train_model(model, tokenizer, cfg, method_cfg, memory)


def train_model(model, tokenizer, cfg: TrainConfig, method_cfg, memory: PeakMemory | None = None,
                adapter: str = "default") -> dict:
    """The run on an already-loaded model (tests and sweeps reuse a base this way)."""
    memory = memory or PeakMemory(next(model.parameters()).device).start()
    train_set = load_dataset(cfg.data, tokenizer, cfg.max_len, cfg.skip_bad_rows)
    eval_set = load_dataset(cfg.eval_data, tokenizer, cfg.max_len) if cfg.eval_data else None
    if distributed.is_main():
        print(f"data: {len(train_set)} rows from {cfg.data} ({train_set.truncated} cut to max_len={cfg.max_len}, "
              f"{train_set.dropped} dropped with no loss tokens left, {len(train_set.bad_rows)} bad rows skipped, "
              f"{train_set.text_rows} text rows for the KL guard)", file=sys.stderr)
    out = Path(cfg.out)
    full = isinstance(method_cfg, FullConfig)
    weights = ModelWeights(tokenizer) if full else AdapterWeights(adapter)
    resume_from = None
    if cfg.resume:
        resume_from = checkpoint.latest(cfg.resume)
        if resume_from is None:
            raise FileNotFoundError(f"--resume {cfg.resume}: no complete checkpoint found there")
    if resume_from is None:
        torch.manual_seed(cfg.seed)
    if cfg.quantize:                       # QLoRA: a 4-bit frozen base under the adapter
        quantize(model, compute_dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
        prepare_for_training(model)
        trim_heap()                        # the float weights just freed leave RSS
    if full:
        model.requires_grad_(True)
    elif resume_from is None:
        inject(model, method_cfg, name=adapter, tokenizer=tokenizer)
    if resume_from is not None:
        weights.load(model, resume_from / weights.folder)
    trainer = Trainer(model, tokenizer, train_set, cfg, eval_set, adapter, weights)
    if resume_from is not None:
        trainer.restore(resume_from)
    if distributed.is_main() and train_set.bad_rows:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "bad_rows.jsonl", "".join(json.dumps(r) + "\n" for r in train_set.bad_rows))

    tracer = TensorPeak().seed(model_tensors(model, trainer.optimizer)) if cfg.trace_memory else None
    memory.reset_peak()      # measure training, not the load spike; the resident model still counts
    start = time.perf_counter()
    with tracer or nullcontext():
        history = trainer.run()
    seconds = time.perf_counter() - start
    report = trainable_report(model)
    last = history[-1] if history else {}
    summary = {
        "model": cfg.model, "method": cfg.method, "weights": str(out / weights.folder),
        "adapter": None if full else str(out / weights.folder),
        "method_config": dataclasses.asdict(method_cfg), "train_config": dataclasses.asdict(cfg),
        "resumed_from": str(resume_from) if resume_from else None,
        "steps": trainer.total, "final_loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
        "seconds": seconds, "tokens_per_s": last.get("tokens_per_s"), "world_size": trainer.world,
        "trainable_params": report.trainable, "total_params": report.total, "trainable_percent": report.percent,
        "data": {"rows": len(train_set), "truncated": train_set.truncated, "dropped_no_labels": train_set.dropped,
                 "bad_rows": len(train_set.bad_rows), "packed_rows": len(trainer.rows) if cfg.packing else None},
        "peak_memory": memory.summary(),
        "optimizer": {"name": cfg.optimizer, "class": type(trainer.optimizer).__name__,
                      "state_bytes": state_bytes(trainer.optimizer), "note": trainer.optimizer_note},
    }
    if tracer is not None:
        summary["peak_memory"]["tensor_peak_bytes"] = tracer.peak
    summary["planned_memory"] = planned = _planned(model, cfg, method_cfg, train_set, trainer.world)
    if "total_bytes" in planned:
        # the like-for-like comparison: live tensor bytes when traced; otherwise RSS (CPU), which
        # also holds what the allocator keeps (see memory.py), or the CUDA allocator's peak
        kind = "tensor_peak_bytes" if tracer is not None else "peak_above_baseline_bytes"
        planned["measured"] = kind
        planned["measured_over_planned"] = summary["peak_memory"][kind] / planned["total_bytes"]
    if distributed.is_main():
        write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_loss(history, out / "loss.png")
    return summary


def plot_loss(history: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
    evals = [r for r in history if r.get("eval_loss") is not None]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _planned(model, cfg: TrainConfig, method_cfg, train_set, world: int = 1) -> dict:
    """The planner's prediction for this run's configuration, recorded beside the measured peak."""
    import copy

    from ..plan.report import plan_model

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]      # plan exactly this model, whatever cfg.model says
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.dtype, 4)
    seq = cfg.max_len if cfg.packing else max(len(e.input_ids) for e in train_set.examples)  # batches pad to their longest
    micro = cfg.batch_size // world                                                          # rows per rank
    try:
        if isinstance(method_cfg, LoraConfig):
            shape = {"r": method_cfg.r, "alpha": method_cfg.alpha, "targets": method_cfg.targets}
        elif isinstance(method_cfg, (PromptTuningConfig, PrefixTuningConfig)):
            shape = {"virtual_tokens": method_cfg.num_virtual_tokens,
                     "projection": getattr(method_cfg, "projection", 0)}
        else:
            shape = {}
        method = "qlora" if cfg.quantize else cfg.method
        plan = plan_model(cfg.model, **shape, method=method, recipe="fp32", frozen_bytes=dtype_bytes, seq_len=seq,
                          micro_batch=micro, grad_checkpointing=cfg.grad_checkpointing, grad_accum=cfg.grad_accum,
                          activation_bytes=2 if cfg.bf16 else dtype_bytes, config=config,
                          optimizer="adamw" if cfg.optimizer == "adamw" else "adamw8bit")
    except (ValueError, OSError) as e:   # e.g. a model class transformers cannot rebuild from its config
        return {"error": str(e)}
    optimizer = next(c["bytes"] for c in plan["memory"]["components"] if c["component"].endswith("optimizer"))
    return {"total_bytes": plan["memory"]["total_bytes"], "components": plan["memory"]["components"],
            "optimizer_bytes": optimizer,
            "peak_rule": plan["memory"]["peak_rule"], "recipe": "fp32", "seq_len": seq, "micro_batch": micro}

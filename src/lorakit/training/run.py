"""`lorakit.train(...)`: a whole run from names to files (what `lorakit train` calls).

Loads the base; then `train_model` runs three steps: prepare (data, a 4-bit base if asked, the
adapter injected or resumed, from the method registry), the trainer's loop, and summarize (with
the planner's prediction beside the measured peak). It writes the run folder:
adapter/ (model/ for full fine-tuning), checkpoints/, metrics.jsonl, loss.png, summary.json, and
bad_rows.jsonl if rows were skipped.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_text
from ..inject import inject, trainable_report
from ..methods import registry
from ..plan.report import DTYPE_BYTES, PlanConfig, plan_model
from ..models import load_base, resolve_device
from ..optim import state_bytes
from ..quant import prepare_for_training, quantize
from . import checkpoint, distributed, fsdp
from .data import load_dataset
from .rows import parse_columns
from .memory import PeakMemory, TensorPeak, model_state_bytes, model_tensors, trim_heap
from .outputs import AdapterWeights, ModelWeights
from .trainer import Trainer, TrainConfig

def split_kwargs(kwargs: dict) -> tuple[TrainConfig, object]:
    """One flat set of names (as on the command line) -> (TrainConfig, method config)."""
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in kwargs.items() if k in train_names})
    method = registry.get(cfg.method)
    if cfg.dtype == "auto":               # a frozen base under bf16 compute is stored in bf16: half the bytes
        frozen = method.family != "full" and not cfg.quantize and not cfg.fsdp
        cfg = dataclasses.replace(cfg, dtype="bfloat16" if cfg.bf16 and frozen else "float32")
    unknown = sorted(set(kwargs) - train_names - method.option_names())
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown} for method {cfg.method!r}")
    if method.family == "full" and cfg.kl_base:
        raise ValueError("kl_base needs a frozen base to compare against; full fine-tuning has none")
    if cfg.method == "prefix" and cfg.grad_checkpointing:
        raise ValueError("prefix tuning with grad_checkpointing is not supported: the prefix reaches each layer as a "
                         "pre-filled KV cache, and transformers' gradient checkpointing drops the cache of a layer that "
                         "writes to it (GradientCheckpointingLayer sets cache=None), so the layers would never see "
                         "the prefix. Train prefixes without --grad-checkpointing")
    if method.family == "full" and cfg.quantize:
        raise ValueError("quantize needs a frozen base: a 4-bit base cannot be fully fine-tuned")
    return cfg, method.make(**{k: v for k, v in kwargs.items() if k in method.option_names()})


def describe_precision(cfg: TrainConfig) -> str:
    if not cfg.bf16:
        return "fp32"
    if registry.get(cfg.method).family == "full":
        return "bf16 autocast, weights and optimizer state fp32"
    return (f"bf16 autocast, frozen base stored in {'NF4 (4-bit)' if cfg.quantize else cfg.dtype}, adapters and "
            "optimizer state fp32, adapter sums fp32")


def train(**kwargs) -> dict:
    """Train an adapter; the keyword names are the `lorakit train` flags. Returns the run summary."""
    cfg, method_cfg = split_kwargs(kwargs)
    if cfg.data is None:
        raise ValueError("train needs data=<a data file, folder or glob>")
    device = resolve_device(cfg.device)
    memory = PeakMemory(device).start()
    model, tokenizer = load_base(cfg.model, dtype=cfg.dtype)
    model.to(device)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} has no tokenizer; training needs one")
    return train_model(model, tokenizer, cfg, method_cfg, memory)


def train_model(model, tokenizer, cfg: TrainConfig, method_cfg, memory: PeakMemory | None = None,
                adapter: str = "default") -> dict:
    """The run on an already-loaded model (tests and sweeps reuse a base this way): prepare, train,
    summarize. The summary holds the planner's prediction beside the measured peak."""
    memory = memory or PeakMemory(next(model.parameters()).device).start()
    run = _prepare(model, tokenizer, cfg, method_cfg, adapter)
    tracer = TensorPeak().seed(model_tensors(model, run.trainer.optimizer)) if cfg.trace_memory else None
    memory.reset_peak()      # measure training, not the load spike; the resident model still counts
    start = time.perf_counter()
    with tracer or nullcontext():
        history = run.trainer.run()
    summary = _summarize(model, cfg, method_cfg, run, history, time.perf_counter() - start, memory, tracer)
    if distributed.is_main():
        write_text(Path(cfg.out) / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_loss(history, Path(cfg.out) / "loss.png")
    return summary


@dataclass
class _Run:
    trainer: Trainer
    weights: object
    train_set: object
    resume_from: Path | None


def _prepare(model, tokenizer, cfg: TrainConfig, method_cfg, adapter: str) -> _Run:
    """Data read, base quantized if asked, adapter injected (or restored from a checkpoint)."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model: lorakit's trainer builds decoder-only "
                         "rows (one sequence, loss on the completion) and cannot train seq2seq yet. Its adapters "
                         "inject, merge and load both ways with peft; train them with peft or transformers' "
                         "Seq2SeqTrainer for now")
    columns = parse_columns(cfg.columns)
    show = cfg.progress and distributed.is_main()
    train_set = load_dataset(cfg.data, tokenizer, cfg.max_len, cfg.skip_bad_rows, cfg.format, columns, cfg.kl_data, show)
    eval_set = load_dataset(cfg.eval_data, tokenizer, cfg.max_len, fmt=cfg.format, columns=columns,
                            progress=show) if cfg.eval_data else None
    if distributed.is_main():
        print(f"data: {train_set.describe()}", file=sys.stderr)
        if cfg.kl_base and train_set.formats.get("text") and not train_set.kl_rows:
            print(f"warning: {train_set.formats['text']} 'text' rows train on every token (TRL's meaning) "
                  "and none feeds the KL guard alone; guard rows are {\"kl_text\": ...} or --kl-data FILE "
                  "(an earlier lorakit read text rows that way)", file=sys.stderr)
    full = registry.of(method_cfg).family == "full"
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
    sharded = resume_from is not None and checkpoint.is_sharded(resume_from)   # weights come with the state
    if sharded:
        _same_method(resume_from, method_cfg)
    if full:
        model.requires_grad_(True)
    elif resume_from is None or sharded:
        inject(model, method_cfg, name=adapter, tokenizer=tokenizer)
    if resume_from is not None and not sharded:
        weights.load(model, resume_from / weights.folder)
    trainer = Trainer(model, tokenizer, train_set, cfg, eval_set, adapter, weights,
                      method_config=dataclasses.asdict(method_cfg))
    if resume_from is not None:
        trainer.restore(resume_from)
    if distributed.is_main() and train_set.bad_rows:
        write_text(Path(cfg.out) / "bad_rows.jsonl", "".join(json.dumps(r) + "\n" for r in train_set.bad_rows))
    return _Run(trainer, weights, train_set, resume_from)


def _same_method(path: Path, method_cfg) -> None:
    """A sharded checkpoint holds tensors by name, not the adapter's config: it must be this run's."""
    saved = json.loads((path / checkpoint.STATE_JSON).read_text()).get("method_config")
    now = json.loads(json.dumps(dataclasses.asdict(method_cfg)))       # tuples as JSON lists, like `saved`
    if saved is not None and saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(f"--resume {path}: the checkpoint was trained with other adapter options ("
                         + ", ".join(f"{k}={saved.get(k)!r} there, {now.get(k)!r} here" for k in diff) + ")")


def _summarize(model, cfg: TrainConfig, method_cfg, run: _Run, history: list, seconds: float,
               memory: PeakMemory, tracer) -> dict:
    out, trainer, train_set = Path(cfg.out), run.trainer, run.train_set
    report, last = trainable_report(model), (history[-1] if history else {})
    full = registry.of(method_cfg).family == "full"
    summary = {
        "model": cfg.model, "method": cfg.method, "weights": str(out / run.weights.folder),
        "adapter": None if full else str(out / run.weights.folder),
        "method_config": dataclasses.asdict(method_cfg), "train_config": dataclasses.asdict(cfg),
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "steps": trainer.total, "final_loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
        "seconds": seconds, "tokens_per_s": last.get("tokens_per_s"), "world_size": trainer.world,
        "trainable_params": report.trainable, "total_params": report.total, "trainable_percent": report.percent,
        "data": {"rows": len(train_set), "formats": train_set.formats, "tokens": train_set.tokens,
                 "loss_tokens": train_set.loss_tokens, "kl_rows": train_set.kl_rows, "truncated": train_set.truncated, "dropped_no_labels": train_set.dropped,
                 "bad_rows": len(train_set.bad_rows), "packed_rows": len(trainer.rows) if cfg.packing else None},
        "peak_memory": memory.summary(),
        "optimizer": {"name": cfg.optimizer, "class": type(trainer.optimizer).__name__,
                      "state_bytes": state_bytes(trainer.optimizer), "note": trainer.optimizer_note},
    }
    if tracer is not None:
        summary["peak_memory"]["tensor_peak_bytes"] = tracer.peak
    if trainer.world > 1:       # each rank's own figures (rank 0's stand above); the plan is per rank
        summary["per_rank"] = distributed.gather_objects({"peak_memory": summary["peak_memory"],
                                                          "model_state_bytes": model_state_bytes(model, trainer.optimizer)})
        if tracer is not None:
            summary["peak_memory"]["tensor_peak_bytes"] = max(r["peak_memory"]["tensor_peak_bytes"]
                                                             for r in summary["per_rank"])
    summary["model_state_bytes"] = model_state_bytes(model, trainer.optimizer)
    summary["planned_memory"] = planned = _planned(model, cfg, method_cfg, train_set, trainer.world, trainer.sharded)
    if "total_bytes" in planned:
        # the like-for-like comparison: live tensor bytes when traced; otherwise RSS (CPU), which
        # also holds what the allocator keeps (see memory.py), or the CUDA allocator's peak
        kind = "tensor_peak_bytes" if tracer is not None else "peak_above_baseline_bytes"
        planned["measured"] = kind
        planned["measured_over_planned"] = summary["peak_memory"][kind] / planned["total_bytes"]
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


def _planned(model, cfg: TrainConfig, method_cfg, train_set, world: int = 1, sharded: bool = False) -> dict:
    """The planner's prediction for this run's configuration, recorded beside the measured peak."""
    config = copy.deepcopy(model.config)
    config.architectures = [fsdp.model_class(model).__name__]    # plan exactly this model, whatever cfg.model says
    seq = cfg.max_len if cfg.packing else train_set.examples.longest  # batches pad to their longest
    micro = cfg.batch_size // world                                                          # rows per rank
    try:
        run = PlanConfig(recipe="fp32", optimizer="adamw" if cfg.optimizer == "adamw" else "adamw8bit",
                         dtype=cfg.dtype if cfg.dtype in DTYPE_BYTES else "float32",
                         activation_dtype="bfloat16" if cfg.bf16 else None, seq_len=seq, micro_batch=micro,
                         grad_checkpointing=cfg.grad_checkpointing, grad_accum=cfg.grad_accum, quantize=cfg.quantize,
                         world_size=world, shard="full" if sharded else "none")
        plan = plan_model(cfg.model, method_cfg, run, config=config)
    except (ValueError, OSError) as e:   # e.g. a model class transformers cannot rebuild from its config
        return {"error": str(e)}
    memory = plan.get("memory_per_rank", plan["memory"])          # one rank's share when past one device
    optimizer = next(c["bytes"] for c in memory["components"] if c["component"].endswith("optimizer"))
    return {"total_bytes": memory["total_bytes"], "components": memory["components"],
            "optimizer_bytes": optimizer, "per_rank": "memory_per_rank" in plan, "world_size": world,
            "shard": "full" if sharded else "none",
            "peak_rule": memory["peak_rule"], "recipe": "fp32", "seq_len": seq, "micro_batch": micro}

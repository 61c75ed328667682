"""The training loop: AdamW on what requires grad, warmup + cosine, accumulation, clipping.

One readable loop, deterministic on CPU for a given seed. An optimizer step consumes
`grad_accum` global micro-batches of `batch_size` rows; under torchrun each rank takes its share of
every micro-batch (see `distributed`). The loss is the mean over all loss tokens of the step, so
accumulation and data parallelism change nothing but speed. The trainer knows nothing about
which adapter method it trains: it trains whatever requires grad.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import families
from ..atomic import write_text
from ..config import doc as _doc
from ..inject import disabled
from . import attention, checkpoint, distributed, fsdp
from .data import IGNORE, Dataset, collate, collate_packed, pack
from .rows import FORMATS, parse_columns
from ..optim import AdamW8bit
from .memory import return_freed_memory, trim_heap
from .outputs import AdapterWeights
from .schedule import lr_factor


@dataclass
class TrainConfig:
    """How to train. Adapter shape (r, alpha, targets, ...) lives in the method's own config."""

    model: str = field(default="smollm2-135m-instruct", metadata=_doc("base model: embedded name, .gguf, folder, or tiny-<family>"))
    data: str = field(default=None, metadata=_doc(
        "training rows: a JSONL, JSON, CSV or parquet file, a save_to_disk folder, or a folder or glob of shards"))
    eval_data: str = field(default=None, metadata=_doc("held-out rows (same kinds): loss during training, task score after"))
    format: str = field(default="auto", metadata=_doc(
        "row shape: auto (detected per row and reported), text, prompt-completion, messages, alpaca, sharegpt, kl-text"))
    columns: str = field(default=None, metadata=_doc(
        "map other column names, e.g. prompt=instruction,completion=output (NAME=COLUMN, comma-separated)"))
    kl_data: str = field(default=None, metadata=_doc(
        "rows of general text (text or kl_text) that carry no loss and feed only the KL-to-base penalty"))
    out: str = field(default="runs/train", metadata=_doc("run folder: adapter (or model), checkpoints, metrics, plots"))
    method: str = field(default="lora", metadata=_doc("lora, dora, prompt, prefix, or full (every weight trains; writes a model folder)"))
    steps: int = field(default=None, metadata=_doc("optimizer steps (overrides epochs)"))
    epochs: float = field(default=1.0, metadata=_doc("passes over the training set when steps is not given"))
    batch_size: int = field(default=8, metadata=_doc("rows per micro-batch, across all ranks"))
    grad_accum: int = field(default=1, metadata=_doc("micro-batches per optimizer step"))
    lr: float = field(default=2e-4, metadata=_doc("peak learning rate"))
    warmup: float = field(default=0.05, metadata=_doc("warmup: a fraction of the steps if < 1, else a step count"))
    optimizer: str = field(default="adamw", metadata=_doc(
        "adamw (fp32 moments, 8 B/param), adamw8bit (blockwise 8-bit moments, ~2 B/param), or paged_adamw8bit "
        "(bitsandbytes' paged optimizer on CUDA; on CPU paging does not apply and adamw8bit is used)"))
    weight_decay: float = field(default=0.0, metadata=_doc("AdamW weight decay on the trained parameters"))
    max_grad_norm: float = field(default=1.0, metadata=_doc("clip the global gradient norm (0 = off)"))
    max_len: int = field(default=512, metadata=_doc("truncate rows to this many tokens"))
    seed: int = field(default=0, metadata=_doc("seed for adapter init, data order and dropout"))
    resume: str = field(default=None, metadata=_doc("continue from a run folder or checkpoint folder"))
    save_every: int = field(default=0, metadata=_doc("checkpoint every N steps (0: only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=_doc("how many checkpoints to keep"))
    log_every: int = field(default=1, metadata=_doc("write metrics every N steps"))
    eval_every: int = field(default=0, metadata=_doc("held-out loss every N steps (0: only at the end)"))
    bf16: bool = field(default=False, metadata=_doc("bf16 autocast for the forward pass"))
    grad_checkpointing: bool = field(default=False, metadata=_doc("recompute activations in backward to save memory"))
    packing: bool = field(default=False, metadata=_doc("pack several rows into each max_len sequence"))
    skip_bad_rows: bool = field(default=False, metadata=_doc("count and list bad rows instead of stopping"))
    kl_base: float = field(default=0.0, metadata=_doc("weight of a KL penalty holding predictions on input tokens to the base model's"))
    kl_stride: int = field(default=2, metadata=_doc("apply the KL penalty at every N-th input position"))
    quantize: str = field(default=None, metadata=_doc(
        "nf4: store the frozen base's block linear layers in 4-bit NF4 with double quantization (QLoRA)"))
    dtype: str = field(default="auto", metadata=_doc(
        "base model dtype: float32, bfloat16, float16, or auto: the frozen base stored in bfloat16 under --bf16 "
        "(adapters and optimizer state stay fp32), else float32"))
    device: str = field(default="auto", metadata=_doc("cpu, cuda, cuda:N, or auto (cuda when available)"))
    release_memory: bool = field(default=False, metadata=_doc(
        "CPU/glibc: mmap tensors >= 64 KiB so freed activations leave RSS (~35% lower peak, ~1.8x step time)"))
    trace_memory: bool = field(default=False, metadata=_doc(
        "count live tensor bytes op by op: the exact peak the planner predicts, on any device (~5% slower)"))
    fsdp: bool = field(default=False, metadata=_doc(
        "under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2, ZeRO-3); checkpoints "
        "in torch.distributed.checkpoint format, resumable on any number of ranks"))
    progress: bool = field(default=True, metadata=_doc("show a progress bar"))

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_len", "keep_checkpoints", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)!r}: expected an integer >= 1")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"TrainConfig.steps = {self.steps!r}: expected an integer >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr = {self.lr!r}: expected a positive number")
        if self.epochs <= 0:
            raise ValueError(f"TrainConfig.epochs = {self.epochs!r}: expected > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer = {self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.format not in FORMATS:
            raise ValueError(f"TrainConfig.format = {self.format!r}: expected one of {', '.join(FORMATS)}")
        parse_columns(self.columns)
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"TrainConfig.quantize = {self.quantize!r}: expected 'nf4' or None")
        if self.fsdp and self.quantize:
            raise ValueError("TrainConfig.fsdp with quantize='nf4' is not supported: lorakit's NF4 base keeps its "
                             "packed bytes and constants in buffers, which FSDP2 replicates on every rank instead of "
                             "sharding; sharding them needs a storage-dtype parameter whose all-gather FSDP runs "
                             "(FSDP-QLoRA's approach), not built yet. Use --fsdp without --quantize, or --quantize "
                             "nf4 under plain torchrun (data parallel, the 4-bit base on every rank)")
        if self.fsdp and self.optimizer != "adamw":
            raise ValueError(f"TrainConfig.fsdp with optimizer={self.optimizer!r} is not supported: the 8-bit "
                             "optimizers quantize each parameter's moments in blocks laid over the whole tensor, "
                             "which a shard is not; use optimizer='adamw' (its moments shard with the weights)")


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


def make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, str | None]:
    """(optimizer, a note on what was substituted, if anything)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), None
    note = None
    if name == "paged_adamw8bit":
        if params[0].device.type == "cuda":
            try:
                import bitsandbytes as bnb
                return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay), None
            except ImportError:
                note = "paged_adamw8bit needs bitsandbytes on CUDA; it is not installed: using lorakit's 8-bit AdamW"
        else:
            note = (f"paging does not apply on {params[0].device.type} (optimizer state already lives in host "
                    "memory): using lorakit's 8-bit AdamW")
    return AdamW8bit(params, lr=lr, weight_decay=weight_decay), note


class NonFiniteLoss(RuntimeError):
    pass


# Families whose logits are exactly `head(last_hidden_state)` (`families.plain_head`): for them the
# loss runs the head only on positions that have a label, which skips most of a (tokens x vocab)
# matmul in SFT.


def logits_at(model: nn.Module, inputs: dict[str, torch.Tensor], *masks: torch.Tensor) -> list[torch.Tensor]:
    """Next-token logits at the positions each (B, T-1) mask selects: one (N_i, V) tensor per mask."""
    if families.plain_head(model.config):
        if hasattr(model, HEAD_LOGITS):          # sharded: the root unit gathered around the call
            return getattr(model, HEAD_LOGITS)(inputs, masks)
        return head_logits(model, inputs, masks)
    logits = model(**inputs, use_cache=False).logits[:, :-1]                            # (B, T-1, V)
    return [logits[m] for m in masks]


HEAD_LOGITS = "lorakit_head_logits"


def head_logits(model: nn.Module, inputs: dict[str, torch.Tensor], masks) -> list[torch.Tensor]:
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]      # (B, T-1, C)
    head = model.get_output_embeddings()
    return [head(hidden[m]) for m in masks]


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions, and how many there were."""
    labels = batch["labels"][:, 1:]                                      # (B, T-1)
    keep = labels != IGNORE
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "kl_mask")}
    (logits,) = logits_at(model, inputs, keep)
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), int(keep.sum())


def loss_and_kl_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy on labels, and summed KL(base || adapted) at `kl_mask` positions.

    The KL term keeps the adapted model's next-token predictions on the *inputs* (prompt tokens,
    which carry no loss) close to the base model's, computed in the same step with adapters
    disabled. It costs one extra forward without gradients and limits drift away from the base.
    """
    labels = batch["labels"][:, 1:]                                      # (B, T-1)
    keep, probe = labels != IGNORE, batch["kl_mask"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "kl_mask")}
    logits, adapted = logits_at(model, inputs, keep, probe)               # (N, V), (M, V)
    with torch.no_grad(), disabled(model):
        (base,) = logits_at(model, inputs, probe)                         # (M, V)
    kl = F.kl_div(F.log_softmax(adapted.float(), -1), F.log_softmax(base.float(), -1), log_target=True, reduction="sum")
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), kl


def kl_positions(ex, stride: int) -> list[int]:
    """Positions t whose next token is an input token (no label), every `stride`-th."""
    return [t for t in range(0, len(ex.input_ids) - 1, stride) if ex.labels[t + 1] == IGNORE]


def kl_mask(rows, width: int, stride: int) -> torch.Tensor:
    """(B, width-1) bool mask of the KL positions of each row in a batch padded to `width`."""
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, ex in enumerate(rows):
        mask[i, kl_positions(ex, stride)] = True
    return mask


class Trainer:
    def __init__(self, model: nn.Module, tokenizer, train_set: Dataset, cfg: TrainConfig,
                 eval_set: Dataset | None = None, adapter: str = "default", weights=None, method_config: dict | None = None):
        self.model, self.tokenizer, self.cfg, self.adapter = model, tokenizer, cfg, adapter
        self.method_config = method_config          # recorded in checkpoints: a sharded one holds no adapter config
        self.weights = weights or AdapterWeights(adapter)      # what checkpoints and the run write
        self.rank, self.world = distributed.init()
        if cfg.release_memory:
            return_freed_memory()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({self.world})")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows = pack(train_set.examples, cfg.max_len) if cfg.packing else train_set.examples
        self.collate = collate_packed if cfg.packing else collate
        self.eval_rows = eval_set.examples if eval_set else []
        if train_set.kl_rows and not cfg.kl_base:
            raise ValueError(f"{train_set.path}: {train_set.kl_rows} kl-text rows carry no loss of their own; "
                             "they only feed the KL-to-base penalty, so set kl_base > 0 (or remove them)")
        self.sharded = cfg.fsdp and self.world > 1
        self._setup_model(model)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters: inject an adapter first")
        self.names = {p: n for n, p in self.params.items()}
        self.optimizer, self.optimizer_note = make_optimizer(cfg.optimizer, list(self.params.values()), cfg.lr,
                                                             cfg.weight_decay)
        if self.optimizer_note and distributed.is_main():
            print(f"optimizer: {self.optimizer_note}", file=sys.stderr)
        self.per_epoch = math.ceil(len(self.rows) / cfg.batch_size)
        self.total = cfg.steps or max(1, math.ceil(cfg.epochs * self.per_epoch / cfg.grad_accum))
        self.warmup = int(cfg.warmup * self.total) if cfg.warmup < 1 else int(cfg.warmup)
        self.out = Path(cfg.out)
        self.step = 0
        self._order = (None, None)          # (epoch, its permutation of the rows)
        self.history: list[dict] = []

    def _setup_model(self, model: nn.Module) -> None:
        """Activation checkpointing, then (under --fsdp on several ranks) the sharding: both before
        the optimizer sees the parameters, which sharding replaces by their shards."""
        if self.cfg.grad_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.sharded:
            fsdp.shard(model, bf16=self.cfg.bf16)
            trim_heap()                    # the whole weights each rank loaded are freed: leave RSS too
            fsdp.forward_method(model, HEAD_LOGITS, head_logits)
        elif self.cfg.fsdp and distributed.is_main():
            print("fsdp: one process, nothing to shard; checkpoints are written sharded-format, so a run on "
                  "more ranks can resume them", file=sys.stderr)

    # -- data order ----------------------------------------------------------------------------
    def micro_batch(self, k: int) -> list:
        """Rows of global micro-batch k: epoch k // per_epoch, in a seeded permutation of that epoch."""
        epoch, i = divmod(k, self.per_epoch)
        if self._order[0] != epoch:        # one permutation per epoch, not per batch
            seed = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.rows), generator=seed))
        idx = self._order[1][i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size].tolist()
        return [self.rows[j] for j in idx]

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        batches = [self.micro_batch(self.step * cfg.grad_accum + a) for a in range(cfg.grad_accum)]
        n_tokens = max(1, sum(ex.n_labels for rows in batches for ex in rows))  # global: every rank knows all rows
        n_input = sum(len(ex.input_ids) for rows in batches for ex in rows)
        n_probe = sum(len(kl_positions(ex, cfg.kl_stride)) for rows in batches for ex in rows) if cfg.kl_base else 0
        total_kl = torch.zeros(())
        total_loss = torch.zeros(())
        autocast = torch.autocast("cuda" if self._device().type == "cuda" else "cpu", dtype=torch.bfloat16) \
            if cfg.bf16 else nullcontext()
        fast_attention = self._attention_mode()
        scale = fsdp.loss_scale() if self.sharded else 1      # FSDP averages over ranks; we want the sum
        for rows in batches:
            mine, weight = rows[self.rank::self.world], scale
            if not mine:                   # a short last batch: a sharded rank still runs every unit's
                if not self.sharded:       # collectives, on a row that counts zero
                    continue
                mine, weight = rows[:1], 0.0
            batch = self.collate(mine, self.pad_id)
            if n_probe:
                batch["kl_mask"] = kl_mask(mine, batch["labels"].shape[1], cfg.kl_stride)
            batch = {k: v.to(self._device()) for k, v in batch.items()}
            with autocast, fast_attention():
                if n_probe:
                    loss, kl = loss_and_kl_sum(model, batch)
                else:
                    loss, kl = loss_sum(model, batch)[0], torch.zeros(())
            ((loss / n_tokens + (cfg.kl_base * kl / n_probe if n_probe else 0)) * weight).backward()
            if weight:
                total_loss += loss.detach().float().cpu()
                total_kl += kl.detach().float().cpu()
        params = list(self.params.values())
        if not self.sharded:               # FSDP reduce-scatters in backward already
            distributed.sum_gradients(params)
        distributed.sum_tensor(total_loss)
        distributed.sum_tensor(total_kl)
        mean_loss = total_loss.item() / n_tokens
        grad_norm = fsdp.full(torch.nn.utils.clip_grad_norm_(
            params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
        if not math.isfinite(mean_loss) or not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            last = checkpoint.latest(self.out)
            raise NonFiniteLoss(f"non-finite loss ({mean_loss}) or gradient norm ({grad_norm.item()}) at step "
                                f"{self.step + 1}; training stopped, the weights were not updated. Last good "
                                f"checkpoint: {last or 'none yet'}. Try a lower --lr or --bf16 off.")
        lr = cfg.lr * lr_factor(self.step, self.total, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        row = {"step": self.step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item(),
               "tokens": n_input, "loss_tokens": n_tokens}
        if n_probe:
            row["kl_base"] = total_kl.item() / n_probe
        return row

    def _attention_mode(self):
        """bf16 on CPU: attention's backward in fp32 where faster (attention.py). Not on a checkpointed
        model: a checkpointed block recomputes its forward outside the mode, and must save what it saved."""
        checkpointed = self.cfg.grad_checkpointing or any(getattr(m, "gradient_checkpointing", False)
                                                          for m in self.model.modules())
        cpu = self._device().type == "cpu"
        return attention.fp32_backward if self.cfg.bf16 and cpu and not checkpointed else nullcontext

    def _device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @torch.no_grad()
    def eval_loss(self) -> float | None:
        if not self.eval_rows:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(self.eval_rows), self.cfg.batch_size):
            batch = {k: v.to(self._device()) for k, v in collate(self.eval_rows[i:i + self.cfg.batch_size], self.pad_id).items()}
            s, n = loss_sum(self.model, batch)
            total, count = total + s.item(), count + n
        return total / count

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        state = {"train_config": asdict(self.cfg), "adapter": self.adapter, "total_steps": self.total,
                 "world_size": self.world, "method_config": self.method_config}
        if self.cfg.fsdp:                  # every rank writes its shard
            return checkpoint.save_sharded(self.out, self.step, self.model, self.optimizer, state,
                                           keep=self.cfg.keep_checkpoints, trainable_only=not self.full)
        if not distributed.is_main():
            return None
        return checkpoint.save(self.out, self.step, self.model, self.weights, self.optimizer, self.names, state,
                               keep=self.cfg.keep_checkpoints)

    @property
    def full(self) -> bool:
        """Whether every weight trains (then checkpoints hold the whole model)."""
        return self.weights.folder == "model"

    def restore(self, path: Path) -> None:
        """Continue from checkpoint `path`; a sharded one restores weights too (any number of ranks)."""
        if checkpoint.is_sharded(path):
            state = checkpoint.load_sharded(path, self.model, self.optimizer, trainable_only=not self.full)
        else:
            state = checkpoint.load(path, self.optimizer, self.params)
        self.step = state["step"]
        if state.get("total_steps") != self.total:
            raise ValueError(f"{path}: the checkpoint was written by a run of {state.get('total_steps')} steps, "
                             f"this run has {self.total}; resume with the same --steps/--epochs and data")

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        cfg = self.cfg
        metrics_path = self.out / "metrics.jsonl"
        if distributed.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            kept = [r for r in _read_jsonl(metrics_path) if r.get("step", 0) <= self.step]
            write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            self.history = kept
        bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.progress and distributed.is_main()), dynamic_ncols=True)
        start, tokens = time.perf_counter(), 0
        with open(metrics_path, "a") if distributed.is_main() else nullcontext() as log:
            while self.step < self.total:
                row = self.train_step()
                tokens += row["tokens"]
                row["tokens_per_s"] = tokens / (time.perf_counter() - start)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total:
                    row["eval_loss"] = self.eval_loss()
                if self.step == self.total:
                    row["eval_loss"] = self.eval_loss()
                if log and (self.step % cfg.log_every == 0 or "eval_loss" in row or self.step == self.total):
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    self.history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total:
                    self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        with fsdp.gathered(self.model) if self.sharded else nullcontext():
            if distributed.is_main():
                self.weights.save(self.model, self.out / self.weights.folder)
        distributed.barrier()
        return self.history


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

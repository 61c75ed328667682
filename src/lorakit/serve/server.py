"""What `lorakit serve` serves: one base model with adapter slots, the adapter cache, the engine and the
tokenizer, built from a model reference and an adapter folder.

Every direct subfolder of the adapter root that holds an adapter_config.json is registered under its
folder name; registering reads only its config and the header of its tensor file (weights are read
from disk when first requested, so a thousand registered adapters cost a thousand headers, not a
thousand loads). A folder that cannot be registered (it leaves the root, is corrupt, or does not fit
the base) is skipped with one warning naming it and why, and listed in `ServedModel.skipped`;
`strict` stops the start-up instead.
What this does not do: speak HTTP (api.py) or parse command lines (cli/serve.py).
"""
from __future__ import annotations

import json
import logging

import torch
from dataclasses import dataclass, field
from pathlib import Path

from ..config import doc as _doc
from ..io.peft_format import CONFIG_NAME
from ..models import EMBEDDED, fast_bf16, load_base, resolve_device
from .adapter_cache import AdapterCache, AdapterError, confine
from .engine import Engine
from . import lora_rows, packed
from .forward import runner_for
from .slots import attach
from .structured import Grammars

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """What to serve and within which bounds; `lorakit serve` takes each field as a flag."""
    model: str = field(default=EMBEDDED, metadata=_doc("base model: embedded name, .gguf, folder, or tiny-<family>"))
    adapters: str = field(default=None, metadata=_doc("folder with one PEFT adapter folder per adapter, served "
                                                      "under the folder's name"))
    targets: str = field(default="all-linear", metadata=_doc("layers that get adapter slots (preset, names or "
                                                             "pattern); adapters may target any subset"))
    dtype: str = field(default="float32", metadata=_doc(
        "base weights and KV cache: float32, bfloat16 or float16 (adapter slots fp32; bf16 under bfloat16 on a "
        "GPU, or on a CPU with numba), "
        "or auto: bfloat16 where the device computes it in hardware, else float32"))
    device: str = field(default="auto", metadata=_doc("cpu, cuda, cuda:N, or auto (cuda when available)"))
    pack_weights: str = field(default="auto", metadata=_doc(
        "on a CPU, prepack the base's linear weights for oneDNN (serve/packed.py): on, off, or auto (pack when "
        "one of the model's layers measures faster packed at start-up)"))
    max_lora_rank: int = field(default=None, metadata=_doc("largest adapter rank (default: the largest under "
                                                           "--adapters, at least 16)"))
    max_num_seqs: int = field(default=16, metadata=_doc("requests decoded together in one forward step"))
    max_batch_tokens: int = field(default=512, metadata=_doc("tokens per forward step (decodes first, then "
                                                             "prompt chunks)"))
    max_queue: int = field(default=256, metadata=_doc("waiting requests before new ones get 429"))
    max_cpu_adapters: int = field(default=64, metadata=_doc("adapters kept in RAM (LRU)"))
    max_active_adapters: int = field(default=None, metadata=_doc("adapter slots on the device (default: "
                                                                 "max-num-seqs)"))
    max_model_len: int = field(default=None, metadata=_doc("longest prompt + completion (default: the model's)"))
    max_prompt_tokens: int = field(default=None, metadata=_doc("longest prompt accepted (default: max-model-len - 1)"))
    max_tokens: int = field(default=1024, metadata=_doc("largest max_tokens a request may ask for"))
    request_timeout: float = field(default=600.0, metadata=_doc("seconds a request may take"))
    served_model_name: str = field(default=None, metadata=_doc("the base model's name in the API (\"base\" "
                                                               "works too)"))
    max_request_bytes: int = field(default=1 << 20, metadata=_doc("largest request body in bytes (larger: 413)"))
    strict: bool = field(default=False, metadata=_doc("stop at start-up on an adapter folder that cannot be "
                                                      "registered (default: skip it with a warning)"))
    disable_any_whitespace: bool = field(default=False, metadata=_doc("structured JSON output without free "
                                                                      "whitespace between tokens (vLLM's option)"))

    def __post_init__(self):
        for key in ("max_num_seqs", "max_batch_tokens", "max_queue", "max_cpu_adapters", "max_tokens",
                    "max_request_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} = {getattr(self, key)} must be >= 1")
        if self.pack_weights not in ("auto", "on", "off"):
            raise ValueError(f"pack_weights = {self.pack_weights!r} must be auto, on or off")
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout = {self.request_timeout} must be > 0")


@dataclass
class ServedModel:
    name: str                                # the base model's public name ("base" is accepted too)
    engine: Engine
    adapters: AdapterCache
    tokenizer: object
    config: ServeConfig
    skipped: dict[str, str] = field(default_factory=dict)   # adapter folders not registered at start-up -> why
    precision: str = ""                      # the dtype served and why, as said at start-up
    packing: str = ""                        # whether the linear weights are oneDNN-packed and why

    def resolve(self, model: str) -> str | None:
        """A request's `model` field -> adapter name (None: the base); whether it exists is the caller's check."""
        return None if model in (self.name, "base") else model

    def close(self) -> None:
        self.engine.stop()
        self.adapters.close()


def adapter_folders(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(Path(root).iterdir()) if (p / CONFIG_NAME).is_file()}


def max_rank(folders) -> int:
    """The largest rank any adapter config under `folders` declares (its r or a rank_pattern value)."""
    ranks = [0]
    for folder in folders:
        try:
            raw = json.loads((Path(folder) / CONFIG_NAME).read_text())
            ranks += [int(raw.get("r", 0)), *map(int, (raw.get("rank_pattern") or {}).values())]
        except (OSError, ValueError, TypeError):
            continue                             # a broken adapter is reported when it is requested
    return max(ranks)


def build(config: ServeConfig) -> ServedModel:
    """Load the base, attach adapter slots, register every adapter folder under `config.adapters`.
    Starts nothing: the API's lifespan starts the engine thread."""
    if config.adapters is None:
        raise ValueError("--adapters is required: a folder holding one adapter folder per adapter (may be empty)")
    root = Path(config.adapters)
    if not root.is_dir():
        raise FileNotFoundError(f"--adapters {root}: not a folder (it should hold one subfolder per adapter)")
    device = resolve_device(config.device)
    dtype, why = serve_dtype(config.dtype, device)
    base, tokenizer = load_base(config.model, dtype=dtype)
    base.to(device)                          # slots, KV caches and the runner follow the base's device
    if tokenizer is None:
        raise ValueError(f"{config.model}: the model folder has no tokenizer; the HTTP API needs one")
    skipped: dict[str, str] = {}
    folders = {}
    for adapter, folder in adapter_folders(root).items():
        try:
            folders[adapter] = confine(root.absolute(), folder.name)     # read nothing that leaves the root
        except AdapterError as e:
            _skip(config, skipped, adapter, e)
    r_max = config.max_lora_rank or max(max_rank(folders.values()), 16)
    slots = config.max_active_adapters or config.max_num_seqs
    handle = attach(base, config.targets, slots=slots, r_max=r_max, dtype=_slot_dtype(base, device))
    packing = _pack(base, config, device)
    cache = AdapterCache(handle, root, max_cpu_adapters=config.max_cpu_adapters, max_active_adapters=slots)
    for adapter, folder in folders.items():
        try:
            cache.register(adapter, folder.name, load=False, check=True)
        except AdapterError as e:
            _skip(config, skipped, adapter, e)
    eos_ids = set()
    for eos in (tokenizer.eos_token_id, getattr(getattr(base, "generation_config", None), "eos_token_id", None)):
        eos_ids |= set(eos if isinstance(eos, list) else [eos]) - {None}
    vocab = base.get_input_embeddings().num_embeddings
    runner = runner_for(base, handle)
    runner.warm_up()
    engine = Engine(runner, cache, eos_ids, max_num_seqs=config.max_num_seqs,
                    max_batch_tokens=config.max_batch_tokens, max_queue=config.max_queue,
                    max_model_len=config.max_model_len, vocab_size=vocab,
                    grammars=_grammars(tokenizer, vocab, config.disable_any_whitespace))
    name = config.served_model_name or Path(str(base.config._name_or_path or config.model)).name
    log.info("serving %s with %d adapters (r_max %d, %d slots)", name, len(cache.names()), r_max, slots)
    return ServedModel(name, engine, cache, tokenizer, config, skipped, f"{dtype} ({why})", packing)


def _pack(base, config: ServeConfig, device) -> str:
    """Prepack the base's linear layers for oneDNN where that pays (after `attach`: the slots wrap
    the layers, the packing replaces what they wrap). Returns the start-up line's words."""
    if device.type != "cpu" or config.pack_weights == "off":
        return "as loaded" + (" (--pack-weights off)" if config.pack_weights == "off" else f" (on {device.type})")
    if config.pack_weights == "on":
        pays, why = packed.available(), "--pack-weights on"
        if not pays:
            raise ValueError("--pack-weights on: this torch build has no oneDNN")
    else:
        pays, why = packed.packing_pays(base, config.max_num_seqs)
        why = f"--pack-weights auto, measured {why}"
    if not pays:
        return f"as loaded ({why})"
    return f"{packed.pack_linears(base)} linear layers oneDNN-packed ({why})"


def _slot_dtype(base, device) -> torch.dtype | None:
    """Adapter slots in the base's dtype on a bf16 base (half the bytes each decode step reads) on a GPU,
    and on a CPU where the row kernel reads them (serve/lora_rows.py: bf16 widened to fp32 in
    registers; torch's own rank-r bf16 bmm's measured 4-6x slower than fp32 ones without AMX);
    fp32 otherwise (the slots' default)."""
    bf16 = next(base.parameters()).dtype == torch.bfloat16
    return torch.bfloat16 if bf16 and (device.type == "cuda" or lora_rows.kernel() is not None) else None


def serve_dtype(name: str, device) -> tuple[str, str]:
    """--dtype -> (the dtype to load, why): auto is bfloat16 where `device` computes bf16 in hardware."""
    if name != "auto":
        return name, "--dtype"
    fast, why = fast_bf16(device)
    return ("bfloat16" if fast else "float32"), f"--dtype auto: {why}"


def _grammars(tokenizer, vocab: int, disable_any_whitespace: bool) -> Grammars | None:
    """The grammar engine for structured output; None (requests for it get 400) when the tokenizer is not
    one it reads, said at start-up."""
    try:
        return Grammars(tokenizer, vocab, disable_any_whitespace)
    except (ValueError, ImportError) as e:
        log.warning("structured output is off (requests for it get 400): %s", e)
        return None


def _skip(config: ServeConfig, skipped: dict, adapter: str, error: Exception) -> None:
    if config.strict:
        raise ValueError(f"--adapters {config.adapters}: adapter folder {adapter!r} cannot be served: {error} "
                         "(--strict)") from error
    why = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())    # one line per folder
    skipped[adapter] = why
    log.warning("skipping adapter folder %r: %s", adapter, why)

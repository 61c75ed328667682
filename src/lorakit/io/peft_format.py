"""Adapter folders in the Hugging Face PEFT format: adapter_config.json + adapter_model.safetensors.

Tensor keys are `base_model.model.<module path>.lora_A.weight` (r, d_in) and `.lora_B.weight`
(d_out, r), adapter name stripped; a DoRA adapter (`use_dora: true`) adds peft's
`.lora_magnitude_vector` (d_out,), with no `.weight` suffix. modules_to_save copies are stored
under their own path.
Reading is two steps: `read_folder` reads a folder on its own (config, tensor names), and
`match_adapter` matches it to a model (or to a served model's slot layers, which count as the
layers they wrap). It is tolerant of what we can honour and strict about what we cannot: an
unsupported feature, a missing or unexpected tensor, a shape mismatch or a corrupt file raises
before the model is touched. Only safetensors are ever read (never pickles).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import families, models
from ..atomic import atomic_path, write_text
from ..config import LoraConfig, PrefixTuningConfig, PromptTuningConfig
from ..inject import adapter_layers, configs, inject, input_adapters, saved_wrappers
from ..linear import shape as linear_shape
from ..methods import registry
from ..methods.param import ParamLayer, find_parameters, lora_shapes, peft_path
from ..methods.prefix import kv_layout
from ..methods.registry import MAGNITUDE
from ..state import state
from ..targets import TargetError, classifier_heads, portable_targets, resolve, resolve_modules_to_save

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Keys we read and honour, keys that carry no meaning for the weights, and friendlier words for
# features we refuse. Any other key with a non-empty value is refused by name.
_HONOURED = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora",
             "fan_in_fan_out", "bias", "modules_to_save", "rank_pattern", "alpha_pattern", "init_lora_weights",
             "use_dora", "target_parameters"}
_INFORMATIONAL = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
                  "megatron_core", "qalora_group_size", "layers_pattern"}
_REFUSED = {
    "lora_bias": "LoRA bias terms (lora_bias)",
    "layers_to_transform": "adapters restricted to some layers (layers_to_transform)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA",
    "megatron_config": "Megatron-parallel layers",
}
_PORTABLE_INITS = (True, False, "gaussian", "eva", "orthogonal")  # these only change initial values
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
# peft writes `<module>.lora_magnitude_vector`; its in-memory name `...vector.<adapter>.weight` is read too
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$")


class AdapterFormatError(ValueError):
    """An adapter folder that lorakit cannot load faithfully."""


# ---------------------------------------------------------------------------------------------
# writing
task_type = families.task_type


base_model_name = models.base_reference


def peft_config_dict(model: nn.Module, name: str) -> dict:
    cfg = configs(model)[name]
    targets = state(model).targets[name]
    layers = [layer for _, layer in adapter_layers(model) if name in layer.adapters]
    return {
        "peft_type": "LORA",
        "task_type": task_type(model),
        "base_model_name_or_path": base_model_name(model),
        "r": cfg.r,
        "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": portable_targets(model, targets) if targets else [],
        "target_parameters": cfg.target_parameters,
        "exclude_modules": None,
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "bias": cfg.bias,
        "init_lora_weights": True if cfg.init == "default" else cfg.init,
        "modules_to_save": cfg.modules_to_save,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "use_dora": cfg.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }


def input_config_dict(model: nn.Module, name: str) -> dict:
    """peft's PROMPT_TUNING / PREFIX_TUNING config (as peft 0.21 writes it, inference mode)."""
    cfg = configs(model)[name]
    layers, kv_heads, head_dim = kv_layout(model.config)
    common = {"task_type": task_type(model), "base_model_name_or_path": base_model_name(model),
              "num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1, "num_layers": layers,
              "inference_mode": True, "modules_to_save": None, "revision": None, "auto_mapping": None}
    if registry.of(cfg).peft_type == "PROMPT_TUNING":
        return {"peft_type": "PROMPT_TUNING", **common, "token_dim": model.get_input_embeddings().weight.shape[1],
                "num_attention_heads": model.config.num_attention_heads,
                "prompt_tuning_init": {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[cfg.prompt_init],
                "prompt_tuning_init_text": cfg.init_text, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
    return {"peft_type": "PREFIX_TUNING", **common, "token_dim": kv_heads * head_dim, "num_attention_heads": kv_heads,
            "prefix_projection": bool(cfg.projection), "encoder_hidden_size": cfg.projection or kv_heads * head_dim,
            "init_weights": None}


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    if name in input_adapters(model):              # the prompt embeddings, or the prefix after any MLP
        values = input_adapters(model)[name].values()
        return {"prompt_embeddings": values.detach().to("cpu").contiguous().clone()}
    out = {}
    names = registry.of(configs(model)[name]).tensors      # lora_A.weight, lora_B.weight (, the magnitude)
    for lname, layer in adapter_layers(model):
        if isinstance(layer, ParamLayer) and name in layer.adapters:     # peft's nested ParamWrapper names
            for p, lora in layer.adapters[name].items():
                path = peft_path(lname, layer.params(), p)
                out[f"{PREFIX}{path}.lora_A.weight"], out[f"{PREFIX}{path}.lora_B.weight"] = lora.A, lora.B
        elif name in layer.adapters:
            adapter = layer.adapters[name]
            values = {"lora_A.weight": adapter.A, "lora_B.weight": adapter.B, MAGNITUDE: getattr(adapter, "m", None)}
            out.update({f"{PREFIX}{lname}.{t}": values[t] for t in names})
    for wname, wrapper in saved_wrappers(model):
        if name in wrapper.copies:
            for key, value in wrapper.copies[name].state_dict().items():
                out[f"{PREFIX}{wname}.{key}"] = value
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def save_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> Path:
    """Write adapter `name` as a PEFT folder. Each file is replaced atomically (weights first)."""
    state(model).require(name)
    if name not in input_adapters(model):
        _head_is_saved(model, name)
    directory = Path(directory)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(adapter_state_dict(model, name), str(tmp), metadata={"format": "pt"})
    config = input_config_dict(model, name) if name in input_adapters(model) else peft_config_dict(model, name)
    write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return directory


def _head_is_saved(model: nn.Module, name: str) -> None:
    """peft loads a classifier adapter (SEQ_CLS, TOKEN_CLS) only with its head saved whole."""
    heads = classifier_heads(model)
    if not heads:
        return
    try:
        found = resolve_modules_to_save(model, heads)
    except TargetError:
        return                                   # no head by either name: nothing peft would look for
    saved = {w for w, wrapper in saved_wrappers(model) if name in wrapper.copies}
    unsaved = [h for h in found if h not in saved]
    if unsaved:
        raise AdapterFormatError(f"adapter {name!r}: {task_type(model)} model's head {unsaved} is not in "
                                 "modules_to_save, and peft cannot load a classifier adapter without its head "
                                 "(it expects the head's weights in the file). Train it whole: "
                                 f"modules_to_save={heads[:1]}, and leave it out of the LoRA targets")


# ---------------------------------------------------------------------------------------------
# reading
def read_config(directory: str | Path) -> tuple[dict, Path]:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw, path


def config_from_peft(raw: dict, source: str | Path = CONFIG_NAME) -> LoraConfig:
    """Translate a PEFT LoRA config dict into a LoraConfig, refusing what we cannot honour."""
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{source}: unsupported peft_type {peft_type!r} (lorakit reads LORA adapters)")
    for key, value in raw.items():
        if key in _HONOURED or key in _INFORMATIONAL or not value:
            continue
        what = _REFUSED.get(key, f"the PEFT option {key!r}")
        raise AdapterFormatError(f"{source}: {key} = {value!r} is not supported: lorakit cannot load {what}")
    init = raw.get("init_lora_weights", True)
    if init not in _PORTABLE_INITS:
        raise AdapterFormatError(f"{source}: init_lora_weights = {init!r} is not supported: such adapters expect a "
                                 "base model whose weights were changed at initialisation")
    if raw.get("bias", "none") != "none":
        raise AdapterFormatError(f"{source}: bias = {raw['bias']!r} is not supported (lorakit trains no biases)")
    if not raw.get("target_modules") and not raw.get("target_parameters"):
        raise AdapterFormatError(f"{source}: target_modules is missing or empty")
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise AdapterFormatError(f"{source}: required key {key!r} is missing")
    try:
        return LoraConfig(
            r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0) or 0.0,
            targets=raw.get("target_modules") or [], exclude=raw.get("exclude_modules") or None,
            target_parameters=sorted(raw["target_parameters"]) if raw.get("target_parameters") else None,
            use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
            init="gaussian" if init == "gaussian" else "default",
            modules_to_save=raw.get("modules_to_save") or None,
            rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {})
    except ValueError as e:
        raise AdapterFormatError(f"{source}: {e}") from None


def read_tensors(path: Path, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; `lazy`: meta tensors of the right shapes, read from the header
    only (to check a folder against a model without reading its weights)."""
    if not path.is_file():
        pickled = [p.name for p in path.parent.glob("*.bin")] + [p.name for p in path.parent.glob("*.pt")]
        hint = f" (found {pickled}: lorakit reads only safetensors, never pickles)" if pickled else ""
        raise FileNotFoundError(f"{path} is missing{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            if lazy:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise AdapterFormatError(f"{path} is not a readable safetensors file: {e}") from None


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> nn.Module:
    """Load a PEFT-format LoRA folder (written by lorakit or by peft) into `model` as adapter `name`."""
    raw, config_path = read_config(directory)
    state(model).check_new(name)
    if raw.get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING"):
        return _load_input_adapter(model, raw, config_path, Path(directory) / WEIGHTS_NAME, name)
    cfg, targets, saved, found = check_adapter(model, directory)
    inject(model, cfg, name)
    with torch.no_grad():
        for t in targets:
            adapter = model.get_submodule(t).adapters[name]
            adapter.A.copy_(found[f"{t}.lora_A"])
            adapter.B.copy_(found[f"{t}.lora_B"])
            if cfg.use_dora:
                adapter.m.copy_(found[f"{t}.{MAGNITUDE}"])
        for owner, params in find_parameters(model, cfg.target_parameters or []).items():
            layer = model.get_submodule(owner)
            for p in params:
                path = peft_path(owner, params, p)
                layer.adapters[name][p].A.copy_(found[f"{path}.lora_A"])
                layer.adapters[name][p].B.copy_(found[f"{path}.lora_B"])
        for s in saved:
            copy = model.get_submodule(s).copies[name]
            for key, value in copy.state_dict().items():
                value.copy_(found[f"{s}.{key}"])
    return model


@dataclass
class AdapterFolder:
    """A PEFT LoRA folder as read, before any model is involved."""

    config: LoraConfig
    raw: dict                              # adapter_config.json as written
    config_path: Path
    weights_path: Path
    tensors: dict[str, torch.Tensor]       # "<module>.lora_A" / ".lora_B" / ".lora_magnitude_vector" / "<saved>.<key>"


def read_folder(directory: str | Path, lazy: bool = False) -> AdapterFolder:
    """Read and check a PEFT LoRA folder on its own: config, tensor names normalised (adapter names and
    `.weight` suffixes dropped). `lazy`: meta tensors from the file's header, nothing read."""
    raw, config_path = read_config(directory)
    cfg = config_from_peft(raw, config_path)
    weights_path = Path(directory) / WEIGHTS_NAME
    found: dict[str, torch.Tensor] = {}
    for key, value in read_tensors(weights_path, lazy).items():
        short = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if ".lora_embedding_" in short:
            raise AdapterFormatError(f"{weights_path}: tensor {key} belongs to a feature lorakit does not support "
                                     "(LoRA on embeddings)")
        if (m := _MAGNITUDE_KEY.match(short)) is not None:
            if not cfg.use_dora:
                raise AdapterFormatError(f"{weights_path}: tensor {key} is a DoRA magnitude, but {config_path} "
                                         "does not set use_dora: true")
            found[f"{m['module']}.{MAGNITUDE}"] = value
            continue
        m = _LORA_KEY.match(short)
        found[f"{m['module']}.lora_{m['ab']}" if m else short] = value
    return AdapterFolder(cfg, raw, config_path, weights_path, found)


def match_adapter(model: nn.Module, folder: AdapterFolder) -> tuple[list[str], list[str]]:
    """Match a read folder to `model`, changing nothing: (target module names, modules_to_save names).
    Every problem raises AdapterFormatError naming the file and the tensors."""
    cfg, config_path, weights_path = folder.config, folder.config_path, folder.weights_path
    theirs, ours = folder.raw.get("base_model_name_or_path"), base_model_name(model)
    if theirs and ours and not models.same_base(theirs, ours):
        warnings.warn(f"{config_path} was trained on base model {theirs!r}, but it is being loaded into {ours!r}",
                      stacklevel=3)
    try:
        targets = resolve(model, cfg.targets, cfg.exclude, what=f"{config_path}: target_modules")
        saved = resolve_modules_to_save(model, cfg.modules_to_save or [])
    except TargetError as e:
        raise AdapterFormatError(str(e)) from None
    expected = _expected_shapes(model, cfg, targets, saved, folder)
    found = folder.tensors
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    no_magnitude = [k for k in missing if k.endswith(MAGNITUDE)]
    if no_magnitude:
        raise AdapterFormatError(f"{config_path} sets use_dora: true, but {weights_path} lacks the DoRA magnitude "
                                 f"vectors of {len(no_magnitude)} modules: {_listing(no_magnitude)}")
    if missing or unexpected:
        parts = ([f"missing tensors for {_listing(missing)}"] if missing else []) + \
                ([f"unexpected tensors {_listing(unexpected)}"] if unexpected else [])
        raise AdapterFormatError(f"{weights_path} does not match {config_path} on this model: " + "; ".join(parts))
    wrong = [f"{k}: expected {expected[k]}, found {tuple(found[k].shape)}" for k in expected
             if tuple(found[k].shape) != expected[k]]
    if wrong:
        raise AdapterFormatError(f"{weights_path}: shape mismatch for {len(wrong)} tensors: " + "; ".join(wrong[:8]))
    return targets, saved


def _expected_shapes(model: nn.Module, cfg: LoraConfig, targets: list[str], saved: list[str],
                     folder: AdapterFolder) -> dict[str, tuple]:
    expected: dict[str, tuple] = {}
    for t in targets:
        layer = model.get_submodule(t)
        layer = getattr(layer, "base_layer", layer)          # an AdapterLayer or a served slot layer
        d_in, d_out = linear_shape(layer)
        r = cfg.rank_for(t)
        expected[f"{t}.lora_A"] = (r, d_in)
        expected[f"{t}.lora_B"] = (d_out, r)
        if cfg.use_dora:
            expected[f"{t}.{MAGNITUDE}"] = (d_out,)
        if isinstance(layer, nn.Linear) and folder.raw.get("fan_in_fan_out"):
            warnings.warn(f"{folder.config_path}: fan_in_fan_out is true but {t} is an nn.Linear; using the "
                          "layer's own layout", stacklevel=4)
    for owner, params in find_parameters(model, cfg.target_parameters or []).items():
        module = model.get_submodule(owner)
        base = getattr(module, "base_layer", module)
        for p in params:
            a, b = lora_shapes(tuple(getattr(base, p).shape), cfg.rank_for(f"{owner}.{p}"),
                               bool(getattr(base, "is_transposed", False)))
            path = peft_path(owner, params, p)
            expected[f"{path}.lora_A"], expected[f"{path}.lora_B"] = a, b
    for s in saved:
        module = model.get_submodule(s)
        module = getattr(module, "original", module)
        for key, value in module.state_dict().items():
            expected[f"{s}.{key}"] = tuple(value.shape)
    return expected


def check_adapter(model: nn.Module, directory: str | Path, lazy: bool = False):
    """Read a PEFT LoRA folder and check it against `model`, changing nothing: (LoraConfig, target module
    names, modules_to_save names, tensors keyed as in `AdapterFolder.tensors`).
    `lazy`: the tensors are meta tensors from the file's header (names and shapes checked, nothing read)."""
    folder = read_folder(directory, lazy)
    targets, saved = match_adapter(model, folder)
    return folder.config, targets, saved, folder.tensors


def _load_input_adapter(model: nn.Module, raw: dict, config_path: Path, weights_path: Path, name: str) -> nn.Module:
    """A prompt- or prefix-tuning folder: check its shapes against this model, then inject and fill."""
    n = raw.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise AdapterFormatError(f"{config_path}: num_virtual_tokens = {n!r}, expected an integer >= 1")
    if raw.get("num_transformer_submodules", 1) != 1:
        raise AdapterFormatError(f"{config_path}: num_transformer_submodules = {raw['num_transformer_submodules']} "
                                 "(encoder-decoder prompts) is not supported")
    tensors = read_tensors(weights_path)
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterFormatError(f"{weights_path}: expected exactly one tensor 'prompt_embeddings', found "
                                 f"{_listing(tensors)}")
    values = tensors["prompt_embeddings"]
    if raw["peft_type"] == "PROMPT_TUNING":
        dim = model.get_input_embeddings().weight.shape[1]
        if tuple(values.shape) != (n, dim):
            raise AdapterFormatError(f"{weights_path}: prompt_embeddings has shape {tuple(values.shape)}, this model "
                                     f"needs ({n}, {dim}) (num_virtual_tokens x hidden size)")
        inject(model, PromptTuningConfig(num_virtual_tokens=n), name)
        target = input_adapters(model)[name].embeddings
    else:
        layers, kv_heads, head_dim = kv_layout(model.config)
        theirs = (raw.get("num_layers"), raw.get("num_attention_heads"),
                  (raw.get("token_dim") or 0) // max(1, raw.get("num_attention_heads") or 1))
        width = layers * 2 * kv_heads * head_dim
        if theirs != (layers, kv_heads, head_dim) or tuple(values.shape) != (n, width):
            raise ValueError(f"{config_path}: a prefix for (layers, kv_heads, head_dim) = {theirs}, shape "
                             f"{tuple(values.shape)}, does not fit {type(model).__name__} with "
                             f"{(layers, kv_heads, head_dim)}, which needs ({n}, {width})")
        inject(model, PrefixTuningConfig(num_virtual_tokens=n), name)
        target = input_adapters(model)[name].prefix
    with torch.no_grad():
        target.copy_(values)
    return model

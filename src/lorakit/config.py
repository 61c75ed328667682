"""Adapter configurations: flat dataclasses, documented once, validated on construction.

Each field's `help` metadata is the one place it is documented; the CLI builds its flags from it
(`lorakit.cli.args.add_config_args`). Configs describe *what* to build, never a model.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Union

Targets = Union[str, list]


def doc(text: str, **kw) -> dict:
    """A field's `help` (and CLI `aliases`): its one piece of documentation, read by `cli/args.py`."""
    return {"help": text, **kw}


_doc = doc


@dataclass
class LoraConfig:
    """Low-rank adaptation: h = W0 x + s * B A dropout(x) (Hu et al., 2021, arXiv:2106.09685).

    With `use_dora`, DoRA (Liu et al., 2024, arXiv:2402.09353): W' = m (W0 + s B A) / ||W0 + s B A||.
    """

    # `--rank` too: torchrun's own parser rejects `--r` as an ambiguous prefix of its flags.
    r: int = field(default=16, metadata=_doc("rank of the update B A", aliases=["--rank"]))
    alpha: float = field(default=32, metadata=_doc("scaling numerator: s = alpha/r (alpha/sqrt(r) with rsLoRA)"))
    dropout: float = field(default=0.0, metadata=_doc("dropout on the adapter's input x, in [0, 1)"))
    targets: Targets = field(
        default="all-linear",
        metadata=_doc("preset (qv, attention, mlp, all-linear), a list of names/.suffixes, or a full-match regex"),
    )
    exclude: Targets = field(default=None, metadata=_doc("modules never adapted; same rules as targets"))
    target_parameters: list = field(default=None, metadata=_doc(
        "parameters adapted directly, peft's target_parameters: fused MoE expert stacks (e.g. gate_up_proj, "
        "down_proj) and routers (gate.weight); `module.param` equal to an entry or ending with `.entry`"))
    use_rslora: bool = field(default=False, metadata=_doc("rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski, 2023)"))
    use_dora: bool = field(
        default=False,
        metadata=_doc("DoRA (Liu et al., 2024): learn a magnitude per output channel, W' = m V / ||V||, V = W0 + s B A"),
    )
    init: str = field(
        default="default",
        metadata=_doc("A init: 'default' Kaiming-uniform, 'gaussian' N(0, (1/r)^2); B is always zero"),
    )
    bias: str = field(default="none", metadata=_doc("only 'none' is supported: biases stay frozen"))
    modules_to_save: list = field(default=None, metadata=_doc("modules trained in full beside the adapter (e.g. a classifier head)"))
    rank_pattern: dict = field(default_factory=dict, metadata=_doc("per-module rank overrides {regex: r}, PEFT semantics"))
    alpha_pattern: dict = field(default_factory=dict, metadata=_doc("per-module alpha overrides {regex: alpha}"))

    def __post_init__(self):
        _check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, "r", self.r, "an integer >= 1")
        _check(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a positive number")
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        _check(isinstance(self.use_dora, bool), "use_dora", self.use_dora, "true or false")
        _check(self.init in ("default", "gaussian"), "init", self.init, "'default' or 'gaussian'")
        _check(self.bias == "none", "bias", self.bias, "'none' (training biases is not supported)")
        if self.target_parameters is not None:
            _check(isinstance(self.target_parameters, (list, tuple)) and len(self.target_parameters) > 0
                   and all(isinstance(p, str) and p for p in self.target_parameters),
                   "target_parameters", self.target_parameters, "a non-empty list of parameter names")
            self.target_parameters = list(self.target_parameters)
            _check(not self.use_dora and not self.dropout, "target_parameters", self.target_parameters,
                   "no DoRA and no dropout with it (as in peft: neither factors out of a raw parameter)")
        if self.target_parameters and self.targets in ([], ()):
            self.targets = []                  # parameters only, as peft's target_modules=[]
        else:
            self.targets = _check_targets("targets", self.targets, allow_none=False)
        self.exclude = _check_targets("exclude", self.exclude, allow_none=True)
        if self.modules_to_save is not None:
            _check(isinstance(self.modules_to_save, (list, tuple)) and all(isinstance(m, str) and m for m in self.modules_to_save),
                   "modules_to_save", self.modules_to_save, "a list of module names")
            self.modules_to_save = list(self.modules_to_save)
        for name, pattern, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, (int, float))):
            _check(isinstance(pattern, dict), name, pattern, "a dict {regex: value}")
            for key, value in pattern.items():
                _check(isinstance(value, kind) and value > 0, f"{name}[{key!r}]", value, "a positive number")
                _compile(f"{name}[{key!r}]", key)

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scale_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _pattern_value(pattern: dict, module_name: str, default):
    # PEFT's rule: the first key that matches a whole dotted suffix of the module name wins.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"LoraConfig.{name} = {value!r}: expected {expected}")


def _compile(name: str, pattern: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoraConfig.{name}: {pattern!r} is not a valid regex ({e})") from None


def _check_targets(name: str, value, allow_none: bool):
    if value is None:
        _check(allow_none, name, value, "a preset, a list of module names, or a regex")
        return None
    if isinstance(value, str):
        _check(bool(value), name, value, "a non-empty string")
        _compile(name, value)
        return value
    _check(isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) and v for v in value),
           name, value, "a non-empty list of module names")
    return list(value)


@dataclass
class FullConfig:
    """Full fine-tuning: every parameter of the base trains, and the run writes a whole model folder.

    The reference point LoRA is measured against (memory: 16 bytes per parameter in fp32 with
    AdamW, see `lorakit plan --method full`). It has no options of its own.
    """

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptTuningConfig:
    """Prompt tuning: learned virtual-token embeddings before the input (Lester et al., 2021, arXiv:2104.08691)."""

    num_virtual_tokens: int = field(default=20, metadata=_doc("virtual tokens (prompt and prefix tuning)",
                                                              aliases=["--virtual-tokens"]))
    prompt_init: str = field(default="random", metadata=_doc(
        "prompt embeddings' init: random (N(0,1), as peft), vocab (sampled token embeddings) or text"))
    init_text: str = field(default=None, metadata=_doc("text whose token embeddings start the prompt (prompt_init=text)"))

    def __post_init__(self):
        _check_n(self, "PromptTuningConfig")
        if self.prompt_init not in ("random", "vocab", "text"):
            raise ValueError(f"PromptTuningConfig.prompt_init = {self.prompt_init!r}: expected random, vocab or text")
        if self.prompt_init == "text" and not self.init_text:
            raise ValueError("PromptTuningConfig.init_text: prompt_init='text' needs a non-empty text")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PrefixTuningConfig:
    """Prefix tuning: learned keys and values at every attention layer (Li & Liang, 2021, arXiv:2101.00190)."""

    num_virtual_tokens: int = field(default=20, metadata=_doc("virtual tokens (prompt and prefix tuning)",
                                                              aliases=["--virtual-tokens"]))
    projection: int = field(default=0, metadata=_doc(
        "hidden size of the reparameterisation MLP that produces the prefix while training (0: none)"))
    prefix_init: str = field(default="random", metadata=_doc(
        "prefix init: random (N(0,1), as peft) or text (the base's own keys and values for init_text)"))
    prefix_text: str = field(default=None, metadata=_doc("text whose keys and values start the prefix (prefix_init=text)"))

    def __post_init__(self):
        _check_n(self, "PrefixTuningConfig")
        if self.prefix_init not in ("random", "text"):
            raise ValueError(f"PrefixTuningConfig.prefix_init = {self.prefix_init!r}: expected random or text")
        if self.prefix_init == "text" and (not self.prefix_text or self.projection):
            raise ValueError("PrefixTuningConfig.prefix_init='text' needs prefix_text and no projection MLP")
        if not isinstance(self.projection, int) or isinstance(self.projection, bool) or self.projection < 0:
            raise ValueError(f"PrefixTuningConfig.projection = {self.projection!r}: expected an integer >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


INPUT_CONFIGS = (PromptTuningConfig, PrefixTuningConfig)


def _check_n(config, cls: str) -> None:
    n = config.num_virtual_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{cls}.num_virtual_tokens = {n!r}: expected an integer >= 1")

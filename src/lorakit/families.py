"""Model families: what lorakit knows about each transformers `model_type`, in one table.

A family gives a label (the Llama, GPT-2 or BERT shape it follows: display only, presets go by
role in `targets.py`), and says whether its output head is a bare linear over the last hidden state (the trainer's head-only
loss, `training/trainer.py`), whether serving's Llama decoder runs it (`serve/forward.py`), and
whether the planner's activation census (7h + 4kv + 4i values per token and layer, measured on
Llama-shaped blocks) applies. A model type missing here still trains and serves through the
generic paths; this table only turns on what has been checked for it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    label: str                       # "llama", "gpt2", "bert": the shape it follows (for display)
    plain_head: bool = False         # lm_head(hidden) is the whole head: no final soft-capping or scaling
    llama_forward: bool = False      # serve/forward.py's batched Llama decoder
    activation_census: bool = False  # plan/report.py's activation formula
    swiglu_mlp: bool = False         # mlp = down(silu(gate(x)) * up(x)): methods/fused_mlp.py's fused LoRA block


_LLAMA = Family("llama", plain_head=True, llama_forward=True, activation_census=True, swiglu_mlp=True)
_LLAMA_MLP = Family("llama", plain_head=True, swiglu_mlp=True)
MODEL_TYPES: dict[str, Family] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "qwen3": Family("llama", plain_head=True, activation_census=True, swiglu_mlp=True),
    "olmo": _LLAMA_MLP, "olmo2": _LLAMA_MLP, "smollm3": _LLAMA_MLP,
    "gemma": Family("llama"), "gemma2": Family("llama"), "granite": Family("llama", swiglu_mlp=True),
    "gpt2": Family("gpt2", plain_head=True),
    "bert": Family("bert"), "roberta": Family("bert"), "xlm-roberta": Family("bert"),
}


_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
          ("ForConditionalGeneration", "SEQ_2_SEQ_LM"))


# peft's all-linear on these MoE models also adapts the fused expert stacks and the router, as
# target_parameters, with the fused gate_up stack at twice the rank and alpha (gate and up are two
# projections fused into one). Measured against peft 0.21.2 + transformers 5.24 in the suite.
MOE_ALL_LINEAR = {"mixtral": ("gate_up_proj", "down_proj", "gate.weight"),
                  "qwen3_moe": ("gate_up_proj", "down_proj", "gate.weight")}
FUSED_TWICE = "gate_up_proj"


def task_type(model) -> str | None:
    """peft's task_type for a transformers model, read from its class name (None: a bare model)."""
    cls = type(model).__name__
    return next((task for suffix, task in _TASKS if cls.endswith(suffix)), None)


def family(config) -> Family | None:
    """The family of a transformers config (None: not in the table)."""
    return MODEL_TYPES.get(getattr(config, "model_type", None))


def label(config) -> str | None:
    fam = family(config)
    return fam.label if fam else None


def plain_head(config) -> bool:
    fam = family(config)
    return bool(fam and fam.plain_head)


def llama_forward(config) -> bool:
    fam = family(config)
    return bool(fam and fam.llama_forward)


def swiglu_mlp(config) -> bool:
    fam = family(config)
    return bool(fam and fam.swiglu_mlp)


def activation_census(config) -> bool:
    fam = family(config)
    return bool(fam and fam.activation_census)

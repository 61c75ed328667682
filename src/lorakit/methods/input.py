"""Input adapters: learned state that enters through the inputs or the KV cache, not through weights.

Prompt tuning prepends virtual-token embeddings; prefix tuning prepends per-layer keys and values.
Both enter through one pair of hooks on the model's decoder stack (`model.base_model`), so every
path that runs the decoder, the full forward, the trainer's head-only loss and `generate` with its
KV cache, sees the adapter without knowing it exists:

- before the decoder runs, `InputAdapter.enter(kwargs, first)` rewrites its keyword arguments;
  `first` is True when no cache holds earlier tokens yet (a plain forward, or generation's prefill);
- the 2-D attention mask gets `n_virtual` leading ones on every call; explicit position ids (what
  `generate` derives from a left-padded mask) are shifted by `n_virtual`, and a prompt's own
  positions 0..n-1 are put in front, so a left-padded row sees the positions of an unpadded one.
  Without explicit ids the model counts positions from the cache length, which includes the
  virtual tokens. (peft drops explicit position ids instead, so its left-padded generation
  shifts positions; without padding both agree exactly.)
- after it runs, `InputAdapter.leave(output, first)` may trim the output (prompt tuning removes the
  virtual positions, so logits line up with the caller's tokens).

The adapters live in `model.lorakit_inputs` (a ModuleDict, so their parameters train and save like
any other; the model's `AdapterState` owns it and the hook handles), and the hooks apply the
active one, if any.
"""
from __future__ import annotations

import torch
from torch import nn

class InputAdapter(nn.Module):
    n_virtual: int
    extends_input: bool = False         # True: the virtual tokens are part of the input sequence (prompt)

    def values(self) -> torch.Tensor:
        """The learned state as saved (peft's `prompt_embeddings`)."""
        raise NotImplementedError

    def enter(self, kwargs: dict, first: bool) -> dict:
        raise NotImplementedError

    def leave(self, output, first: bool):
        return output


def decoder(model: nn.Module) -> nn.Module:
    """The module that takes input_ids / inputs_embeds and a cache: LlamaModel, GPT2Model, ..."""
    inner = getattr(model, "base_model", model)
    if inner is model and not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"{type(model).__name__}: no decoder stack (base_model) to attach an input adapter to")
    return inner


def _cache_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return 0 if cache is None else cache.get_seq_length()


def install(model: nn.Module, active) -> tuple:
    """Hook the decoder; `active(model)` returns the InputAdapter to apply now, or None. Returns the
    hook handles (the caller keeps them, and removes them to uninstall)."""
    inner = decoder(model)
    state = {}

    def pre(module, args, kwargs):
        adapter = active(model)
        state["adapter"] = adapter
        if adapter is None:
            return None
        if args:                                    # normalise a positional input_ids
            kwargs = dict(kwargs, input_ids=args[0])
            args = ()
        first = _cache_length(kwargs) == 0
        state["first"] = first
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            ones = mask.new_ones(mask.shape[0], adapter.n_virtual)
            kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None:
            positions = positions + adapter.n_virtual
            if first and adapter.extends_input:
                own = torch.arange(adapter.n_virtual, device=positions.device).expand(positions.shape[0], -1)
                positions = torch.cat([own, positions], dim=1)
            kwargs["position_ids"] = positions
        return args, adapter.enter(kwargs, first)

    def post(module, args, kwargs, output):
        adapter = state.pop("adapter", None)
        if adapter is None:
            return None
        return adapter.leave(output, state.pop("first"))

    return (inner.register_forward_pre_hook(pre, with_kwargs=True),
            inner.register_forward_hook(post, with_kwargs=True))


def batch_size(kwargs: dict) -> int:
    x = kwargs.get("input_ids")
    return (x if x is not None else kwargs["inputs_embeds"]).shape[0]

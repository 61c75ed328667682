"""Prompt tuning: n learned virtual-token embeddings prepended to the input (Lester et al., 2021,
arXiv:2104.08691).

The base model is untouched; on a first call the decoder sees [prompt ; embeddings of the input]
and the hidden states of the virtual positions are dropped from its output, so logits, labels and
loss masks line up with the caller's tokens as if nothing were there. Later calls (generation with
a KV cache) find the virtual tokens already in the cache.
"""
from __future__ import annotations

import torch
from torch import nn

from .input import InputAdapter, batch_size


class PromptTuning(InputAdapter):
    extends_input = True

    def __init__(self, n_virtual: int, dim: int, dtype=torch.float32, device=None):
        super().__init__()
        self.n_virtual = n_virtual
        self.embeddings = nn.Parameter(torch.zeros(n_virtual, dim, dtype=dtype, device=device))   # (n, d)

    def initialise(self, how: str, embedding: nn.Embedding, token_ids: list[int] | None = None,
                   generator: torch.Generator | None = None) -> None:
        """'random': N(0, 1) as torch.nn.Embedding (peft's default); 'vocab': rows of the embedding
        matrix sampled uniformly; 'text': the embeddings of `token_ids`, repeated to length n."""
        with torch.no_grad():
            weight = embedding.weight
            if how == "random":
                self.embeddings.normal_(generator=generator)
            elif how == "vocab":
                rows = torch.randint(0, weight.shape[0], (self.n_virtual,), generator=generator)
                self.embeddings.copy_(weight[rows.to(weight.device)])
            elif how == "text":
                if not token_ids:
                    raise ValueError("prompt init 'text' needs a non-empty init_text")
                ids = (token_ids * -(-self.n_virtual // len(token_ids)))[: self.n_virtual]
                self.embeddings.copy_(weight[torch.tensor(ids, device=weight.device)])
            else:
                raise ValueError(f"prompt init {how!r}: expected 'random', 'vocab' or 'text'")

    def values(self) -> torch.Tensor:
        """The prompt, (n, d): what is saved."""
        return self.embeddings

    def enter(self, kwargs: dict, first: bool) -> dict:
        if not first:
            return kwargs
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = self._embed(ids)
        prompt = self.embeddings.to(embeds.dtype).unsqueeze(0).expand(batch_size({"inputs_embeds": embeds}), -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        kwargs["input_ids"] = None
        return kwargs

    def leave(self, output, first: bool):
        if first:
            output.last_hidden_state = output.last_hidden_state[:, self.n_virtual:]
            if getattr(output, "hidden_states", None) is not None:
                output.hidden_states = tuple(h[:, self.n_virtual:] for h in output.hidden_states)
        return output

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def bind(self, embedding: nn.Embedding) -> "PromptTuning":
        """Remember the model's input embedding (not as a submodule: it is the base's, not ours)."""
        self.__dict__["embed_tokens"] = embedding
        return self

    def extra_repr(self) -> str:
        return f"n_virtual={self.n_virtual}, dim={self.embeddings.shape[1]}"

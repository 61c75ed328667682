"""The model side of continuous batching: one forward over a ragged list of chunks.

Each step the engine hands `Runner.forward` a list of `Chunk`s: some sequences prefilling (many new
tokens, possibly one piece of a long prompt), others decoding (one token), each with its own KV
cache (`SeqCache`) and its own adapter slot. The runner appends every chunk's tokens to its cache
and returns the fp32 logits of each chunk's last token; a chunk marked `every` (a request that asked
for prompt log-probabilities) also gets the logits of each of its positions in `chunk.logits`.

- `LlamaRunner` (llama, qwen2, mistral): all chunks' tokens are one (N, hidden) set of rows, so
  every projection and MLP is one (adapter-batched) matmul per layer for the whole mixed batch;
  attention is per sequence, over the sequence's own cache (no copies): on the CPU every decoding
  sequence of a step in one `decode_attention` kernel call per layer (numba; 6 ms against 33 ms for
  16 decodes x 30 layers), prompt chunks one SDPA each. Padding the decodes into one batched SDPA
  was measured on SmolLM2-135M, 16 decodes, 2 cores: no faster at context 100 and 1.4x slower at
  context 1000 (the padded copy of every key). It calls the model's own modules (embedding, norms,
  projections, MLP, rotary embedding, head) and reads no weights itself, except the RMSNorm
  scale where the norm is one of RMS_NORMS (their forward, as torch's fused `rms_norm`). Sliding
  windows are honoured by masking; the cache still keeps every token.
- `HFRunner` (every other causal LM): each chunk through the transformers model with its own
  `DynamicCache`, one sequence at a time; correct, not fast.
What this does not do: sampling, scheduling, admission or paging (the engine does); a cache lives
as long as the engine holds it.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import families
from . import decode_attention

LLAMA_ATTENTION = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")      # weight * x.float() / rms, same forward
STATIC_ROPE = ("default", "linear", "yarn", "llama3")   # inv_freq does not depend on the sequence length


class SeqCache:
    """One sequence's KV state; `length` tokens cached. Made by `Runner.new_cache`, freed when dropped."""
    length: int = 0

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


@dataclass
class Chunk:
    cache: SeqCache
    tokens: torch.Tensor      # (n,) long, appended at positions cache.length .. cache.length + n - 1
    slot: int = -1            # the adapter slot of every token of this chunk (-1: the base model)
    every: bool = False       # also keep the logits of every position, in `logits` (n, vocab) fp32
    logits: torch.Tensor | None = None


class Runner:
    """Appends chunks to their caches and returns each chunk's last-token logits."""
    cache_type: type = SeqCache

    def __init__(self, model, handle=None):
        self.model, self.handle = model, handle
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_length: int = int(limit) if limit else sys.maxsize       # no positional limit known
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def new_cache(self) -> SeqCache:
        raise NotImplementedError

    def warm_up(self) -> None:
        """One prompt and one decode on a throwaway cache (slot 0 when there are slots, empty or not), so
        the CPU kernels compile at start-up, not in the first request (numba: ~3 s once per install)."""
        cache, slot = self.new_cache(), (0 if self.handle is not None else -1)
        self.forward([Chunk(cache, torch.zeros(2, dtype=torch.long), slot)])
        self.forward([Chunk(cache, torch.zeros(1, dtype=torch.long), slot)])

    def forward(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """fp32 logits (len(chunks), vocab) of each chunk's last token; the caches grow by its tokens.
        All or nothing: a forward that raises leaves every cache as it was, so the engine can retry
        each chunk alone to find the one that fails."""
        raise NotImplementedError

    def _check(self, chunks: Sequence[Chunk]) -> None:
        """Everything is checked before any cache changes."""
        if not chunks:
            raise ValueError("forward needs at least one chunk")
        seen = set()
        n_slots = 0 if self.handle is None else self.handle.n_slots
        for i, c in enumerate(chunks):
            if not isinstance(c.cache, self.cache_type):
                raise TypeError(f"chunk {i}: its cache is a {type(c.cache).__name__}, not one made by this "
                                f"runner's new_cache() ({self.cache_type.__name__})")
            if id(c.cache) in seen:
                raise ValueError(f"chunk {i}: its sequence (cache) appears more than once in this forward; "
                                 "give each sequence at most one chunk per step")
            seen.add(id(c.cache))
            if c.tokens.dim() != 1 or c.tokens.numel() < 1 or c.tokens.dtype != torch.long:
                raise ValueError(f"chunk {i}: tokens must be a non-empty 1-D long tensor, got "
                                 f"{c.tokens.dtype} of shape {tuple(c.tokens.shape)}")
            end = c.cache.length + c.tokens.numel()
            if end > self.max_length:
                raise ValueError(f"chunk {i}: {c.cache.length} cached + {c.tokens.numel()} new tokens = {end}, "
                                 f"past the model's max_length = {self.max_length}")
            if not -1 <= c.slot < n_slots:
                raise ValueError(f"chunk {i}: slot {c.slot} out of range [-1, {n_slots})"
                                 + ("" if self.handle else " (this runner has no adapter handle)"))

    def _set_rows(self, slots: list[int], counts: list[int] | None = None) -> None:
        """Slot per row of the next layer inputs: each chunk's slot repeated over its `counts` rows."""
        if self.handle is None:
            return
        if all(s < 0 for s in slots):
            self.handle.set_rows(None)       # the base only: no row plan at all
            return
        idx = torch.tensor(slots)
        self.handle.set_rows(idx if counts is None else idx.repeat_interleave(torch.tensor(counts)))


# -- the Llama family ---------------------------------------------------------------------------------
class KVCache(SeqCache):
    """K and V of every layer in one tensor (layers, 2, kv_heads, capacity, head_dim); capacity doubles."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device, max_length: int):
        self.length, self.max_length = 0, max_length
        self.kv = torch.empty(layers, 2, kv_heads, 0, head_dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    def reserve(self, n: int) -> None:
        """Room for n tokens; copies the cached ones once per doubling (amortised O(1) per token)."""
        cap = self.kv.shape[3]
        if n <= cap:
            return
        cap = min(max(n, 2 * cap, 16), self.max_length)
        kv = self.kv.new_empty(*self.kv.shape[:3], cap, self.kv.shape[4])
        kv[:, :, :, :self.length] = self.kv[:, :, :, :self.length]
        self.kv = kv


def llama_unsupported(model) -> str | None:
    """Why `LlamaRunner` cannot compute this model exactly (None: it can)."""
    config = model.config
    if not families.llama_forward(config):
        served = sorted(t for t, f in families.MODEL_TYPES.items() if f.llama_forward)
        return f"model_type {config.model_type!r} is not one of {served}"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model does not have the Llama layout (model.embed_tokens, layers, norm, rotary_emb)"
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if type(attn).__name__ not in LLAMA_ATTENTION:
            return f"attention module {type(attn).__name__} is not one of {LLAMA_ATTENTION}"
        if any(hasattr(attn, a) for a in ("q_norm", "k_norm")):
            return "the attention has q/k norms"
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope_type {rope!r} changes its frequencies with the sequence length"
    return None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it (rotate_half): x (N, heads, D), cos/sin (N, 1, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaRunner(Runner):
    """A compact ragged forward for llama / qwen2 / mistral that calls the model's own modules."""
    cache_type = KVCache

    def __init__(self, model, handle=None):
        reason = llama_unsupported(model)
        if reason:
            raise ValueError(f"LlamaRunner cannot serve this model: {reason}; use HFRunner")
        super().__init__(model, handle)
        config, inner = model.config, model.model
        attn = inner.layers[0].self_attn
        self.inner, self.head = inner, model.get_output_embeddings()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        # a sliding window per layer: qwen2's attention has it per layer type, mistral's config for all
        every = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self.windows = [getattr(layer.self_attn, "sliding_window", every) for layer in inner.layers]
        norms = [m for layer in inner.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        # transformers' RMSNorm is six ops and a module call; where it is exactly that, torch's fused op
        self.fused_norm = all(type(m).__name__ in RMS_NORMS and hasattr(m, "variance_epsilon")
                              for m in norms + [inner.norm])
        # decodes through one kernel call per layer where it runs (fp32 or bf16 on the CPU), else SDPA per chunk
        self.fast_decode = decode_attention.usable(self.dtype, self.device) and self.n_heads % self.n_kv == 0

    def new_cache(self) -> KVCache:
        return KVCache(len(self.inner.layers), self.n_kv, self.head_dim, self.dtype, self.device, self.max_length)

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        self._check(chunks)
        counts = [c.tokens.numel() for c in chunks]
        starts = [c.cache.length for c in chunks]
        cnt = torch.tensor(counts)
        ends = cnt.cumsum(0)                                                       # (B,) row after each chunk
        n = int(ends[-1])
        tokens = torch.cat([c.tokens for c in chunks]).to(self.device)             # (N,)
        pos = torch.arange(n) + (torch.tensor(starts) - ends + cnt).repeat_interleave(cnt)   # (N,) absolute
        for c, k in zip(chunks, counts):
            c.cache.reserve(c.cache.length + k)
        plan = self._plan(chunks, counts, starts)
        try:
            self._set_rows([c.slot for c in chunks], counts)
            # the residual stream accumulates in fp32 whatever the weights' dtype (bf16 sums of
            # 30 layers' outputs cost ~2x the logit error); each block reads it in the weights' dtype
            x = self.inner.embed_tokens(tokens).float()                                # (N, hidden)
            dt = self.dtype
            cos, sin = self.inner.rotary_emb(x[None].to(dt), pos[None].to(self.device))  # (1, N, D) each
            cos, sin = cos[0, :, None], sin[0, :, None]                                # (N, 1, D)
            for li, layer in enumerate(self.inner.layers):
                h = self._norm(layer.input_layernorm, x).to(dt)
                x = x + self._attention(li, layer.self_attn, h, cos, sin, plan)
                x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x).to(dt))
            kept = [k if c.every else 1 for c, k in zip(chunks, counts)]              # rows the head sees
            rows = torch.cat([torch.arange(b - m, b) for b, m in zip(ends.tolist(), kept)])
            self._set_rows([c.slot for c in chunks], kept)
            final = self._norm(self.inner.norm, x[rows.to(self.device)]).to(dt)
            logits = self.head(final).float()                                           # (sum(kept), vocab)
        finally:
            if self.handle is not None:
                self.handle.set_rows(None)
        for c, k in zip(chunks, counts):
            c.cache.length += k
        if not any(c.every for c in chunks):
            return logits
        last = torch.tensor(kept).cumsum(0)
        for c, b, m in zip(chunks, last.tolist(), kept):
            if c.every:
                c.logits = logits[b - m:b]
        return logits[last - 1]

    def _norm(self, norm, x: torch.Tensor) -> torch.Tensor:
        """norm(x), x the fp32 residual: `weight * x / rms(x)` as transformers' RMS_NORMS compute it,
        in torch's one fused `rms_norm` (measured ~8% of a 16-row bf16 decode step), else the module."""
        if not self.fused_norm:
            return norm(x)
        return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon)

    def _plan(self, chunks, counts, starts) -> dict:
        """Per window: (prompt chunks [(cache, rows a:b, positions p:end, first key s, mask, causal)],
        the decodes' arrays for `decode_attention` or None). Without the kernel every chunk is a prompt."""
        ends = torch.tensor(counts).cumsum(0).tolist()
        plan = {}
        for w in set(self.windows):
            per, dec = [], []
            for c, k, p, b in zip(chunks, counts, starts, ends):
                s = 0 if w is None else max(0, p - w + 1)     # the first key any query of the chunk sees
                if k == 1 and self.fast_decode:
                    decode_attention.check(c.cache.kv, p, len(self.windows))
                    dec.append((b - 1, c.cache.kv.data_ptr(), c.cache.kv.shape[3], p, s))
                    continue
                mask = None
                if k > 1 and (p > 0 or (w is not None and k > w)):
                    q = torch.arange(p, p + k)[:, None]
                    kp = torch.arange(s, p + k)[None]
                    mask = (kp <= q) if w is None else (kp <= q) & (kp > q - w)      # (k, keys)
                    mask = mask.to(self.device)
                # one query sees every key from s on; a fresh prompt within the window is SDPA's square causal
                per.append((c.cache, b - k, b, p, p + k, s, mask, k > 1 and mask is None))
            plan[w] = (per, tuple(np.ascontiguousarray(np.array(dec, np.int64).T)) if dec else None)
        return plan

    def _attention(self, li, attn, h, cos, sin, plan) -> torch.Tensor:
        n, d = h.shape[0], self.head_dim
        q = rotate(attn.q_proj(h).view(n, self.n_heads, d), cos, sin)                 # (N, H, D)
        k = rotate(attn.k_proj(h).view(n, self.n_kv, d), cos, sin)                    # (N, KV, D)
        v = attn.v_proj(h).view(n, self.n_kv, d)
        prompts, decodes = plan[self.windows[li]]
        out = q.new_empty(n, self.n_heads, d, dtype=q.dtype if decodes is None else torch.float32)   # (N, H, D)
        if decodes is not None:          # every decode's append + attention: one kernel call (module notes)
            decode_attention.kernel()(q.float().numpy(), decode_attention.raw(k), decode_attention.raw(v.contiguous()),
                                      *decodes, li, np.float32(self.scaling), out.numpy())
        if prompts:
            qt, kv = q.transpose(0, 1), torch.stack((k, v)).transpose(1, 2)            # (H, N, D), (2, KV, N, D)
        for cache, a, b, p, end, s, mask, causal in prompts:     # one SDPA per prompt chunk
            layer = cache.kv[li]                                                       # (2, KV, capacity, D)
            layer[:, :, p:end] = kv[:, :, a:b]
            out[a:b] = F.scaled_dot_product_attention(
                qt[None, :, a:b], layer[None, 0, :, s:end], layer[None, 1, :, s:end], attn_mask=mask,
                is_causal=causal, scale=self.scaling, enable_gqa=True)[0].transpose(0, 1)   # (n, H, D)
        return attn.o_proj(out.view(n, -1).to(self.dtype))                             # (N, hidden)


# -- every other causal LM ----------------------------------------------------------------------------
class HFCache(SeqCache):
    """A transformers DynamicCache and the number of tokens in it."""

    def __init__(self, config):
        from transformers import DynamicCache
        self.cache, self.length = DynamicCache(config=config), 0

    def truncate(self, length: int) -> None:
        """Back to the first `length` tokens in every layer (the layers a failed forward reached hold more)."""
        for layer in self.cache.layers:
            for attr in ("keys", "values"):
                t = getattr(layer, attr, None)
                if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-2] > length:
                    setattr(layer, attr, t[..., :length, :])              # (batch, heads, length, head_dim)
        self.length = length

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.cache.layers for t in (getattr(layer, "keys", None),
                                                                     getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))


class HFRunner(Runner):
    """Each chunk through the transformers model itself, one sequence at a time."""
    cache_type = HFCache

    def __init__(self, model, handle=None):
        super().__init__(model, handle)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_last = "logits_to_keep" in params

    def new_cache(self) -> HFCache:
        return HFCache(self.model.config)

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        self._check(chunks)
        out, starts = [], [c.cache.length for c in chunks]
        try:
            for c in chunks:
                self._set_rows([c.slot])
                kw = {self.cache_arg: c.cache.cache, "use_cache": True}
                if self.keep_last and not c.every:
                    kw["logits_to_keep"] = 1
                logits = self.model(input_ids=c.tokens[None].to(self.device), **kw).logits    # (1, n | 1, vocab)
                out.append(logits[0, -1].float())
                if c.every:
                    c.logits = logits[0].float()
                c.cache.length += c.tokens.numel()
        except BaseException:
            for c, start in zip(chunks, starts):      # all or nothing, as LlamaRunner: the engine may retry
                c.cache.truncate(start)
            raise
        finally:
            if self.handle is not None:
                self.handle.set_rows(None)
        return torch.stack(out)                                                        # (B, vocab)


def runner_for(model, handle=None) -> Runner:
    """`LlamaRunner` where it computes the model exactly, else `HFRunner`."""
    reason = llama_unsupported(model)
    if reason is None:
        return LlamaRunner(model, handle)
    if families.llama_forward(model.config):
        warnings.warn(f"serving {model.config.model_type} through the slower HFRunner: {reason}", stacklevel=2)
    return HFRunner(model, handle)

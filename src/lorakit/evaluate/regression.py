"""Regression evaluation: did the adapter cost the model its general ability?

Two probes, each run with the adapter off (inside `lorakit.disabled`) and on:
- perplexity on general English prose: the Python language reference's own text, which ships with
  every Python (`pydoc_data.topics`), so the check needs no download and no data file;
- greedy answers to a few general-knowledge chat prompts, compared with the base model's answers.
A narrow adapter should leave both nearly unchanged. This module only measures; `report.verdict`
decides what the numbers mean.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..inject import disabled
from .prose import passages, prose_paragraphs
from .task import generate, inference

GENERAL_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 7 times 8?",
    "Translate 'good morning' into Spanish.",
    "How many days are there in a week?",
    "What do bees make?",
    "Give one word that means the opposite of 'hot'.",
    "Which planet is closest to the Sun?",
]

def general_text(n_passages: int = 24, chars: int = 600) -> list[str]:
    """`n_passages` prose passages of ~`chars` characters from the Python language reference.

    Deterministic for a given Python version: topics in sorted order, passages evenly spaced over
    all of them so the set covers the whole reference, not just the first few topics.
    """
    from pydoc_data.topics import topics

    if n_passages < 1 or chars < 50:
        raise ValueError(f"need n_passages >= 1 and chars >= 50, got {n_passages}, {chars}")
    pool = [p for name in sorted(topics) for p in passages(prose_paragraphs(topics[name]), chars)]
    if len(pool) <= n_passages:
        return pool
    return [pool[i * len(pool) // n_passages] for i in range(n_passages)]


def _position_limit(model) -> int | None:
    # GPT-2-style learned positions fail past their table, and no model is meaningful past the
    # context it was trained for; RoPE models would run but score garbage.
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


def perplexity(model, tokenizer, texts: list[str], max_len: int = 256, batch_size: int = 4,
               progress: bool = True) -> float:
    """Token-weighted perplexity exp(Σ NLL / Σ predicted tokens) over all texts.

    Each text is tokenized with the tokenizer's default special tokens and cut to `max_len` tokens
    (and to the model's context). A text of n tokens predicts n-1 of them, as `labels=input_ids` does.
    """
    limit = _position_limit(model)
    max_len = min(max_len, limit) if limit else max_len
    encoded = [tokenizer(t)["input_ids"][:max_len] for t in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with inference(model):
        for start in tqdm(range(0, len(encoded), batch_size), desc="perplexity", disable=not progress, leave=False):
            chunk = encoded[start:start + batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, e in enumerate(chunk):          # right padding: real tokens keep positions 0..n-1
                ids[i, :len(e)] = torch.tensor(e, dtype=torch.long)
                mask[i, :len(e)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()   # (B, T-1, V)
            target, keep = ids[:, 1:], mask[:, 1:].bool()                                # (B, T-1)
            loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")      # (B, T-1)
            nll += loss[keep].double().sum().item()
            count += int(keep.sum())
    if count == 0:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    return math.exp(nll / count)


def render_chat(tokenizer, prompt: str) -> str:
    """One user turn, rendered with the generation prompt; a tokenizer without a template gets the text as is."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


@dataclass
class RegressionResult:
    ppl_off: float
    ppl_on: float
    ppl_change: float              # relative: (on - off) / off
    prompts: list = field(default_factory=list)   # {"prompt", "reference", "adapted", "same", "similarity"}
    agreement: float = 1.0         # fraction of prompts whose adapted answer equals the reference
    mean_similarity: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def compare_answers(prompts: list[str], references: list[str], adapted: list[str]) -> list[dict]:
    return [{"prompt": p, "reference": r, "adapted": a, "same": r.strip() == a.strip(),
             "similarity": difflib.SequenceMatcher(None, r.strip(), a.strip()).ratio()}
            for p, r, a in zip(prompts, references, adapted)]


def regression_eval(model, tokenizer, texts: list[str] | None = None, prompts: list[str] | None = None,
                    references: list[str] | None = None, max_new_tokens: int = 32,
                    progress: bool = True) -> RegressionResult:
    """Perplexity and general-prompt answers with the adapters off and on.

    `references`: the base answers to `prompts` if you already have them (e.g. from an earlier run
    of the base model); otherwise they are generated here with the adapters disabled.
    """
    texts = general_text() if texts is None else texts
    prompts = GENERAL_PROMPTS if prompts is None else prompts
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"got {len(references)} references for {len(prompts)} prompts")
    rendered = [render_chat(tokenizer, p) for p in prompts]
    with disabled(model):
        ppl_off = perplexity(model, tokenizer, texts, progress=progress)
        if references is None:
            references = generate(model, tokenizer, rendered, max_new_tokens, progress=progress)
    ppl_on = perplexity(model, tokenizer, texts, progress=progress)
    adapted = generate(model, tokenizer, rendered, max_new_tokens, progress=progress)
    rows = compare_answers(prompts, references, adapted)
    agreement = sum(r["same"] for r in rows) / len(rows) if rows else 1.0
    similarity = sum(r["similarity"] for r in rows) / len(rows) if rows else 1.0
    return RegressionResult(ppl_off, ppl_on, (ppl_on - ppl_off) / ppl_off, rows, agreement, similarity)

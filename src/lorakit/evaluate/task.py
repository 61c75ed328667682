"""Task evaluation: greedy answers to held-out rows, scored by exact match, with a Wilson interval.

Rows are the training data's JSONL rows (`lorakit.training.data`): the prompt is everything before
the last assistant turn, the expected answer is that turn. An answer is right when the normalized
generation equals the normalized reference, optionally after both go through a user regex. This
module knows nothing about adapters: to score the base, call it inside `lorakit.disabled(model)`.
"""
from __future__ import annotations

import contextlib
import math
import re
import string
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..training.data import prompt_text

# Stripped from both ends of an answer: ASCII punctuation plus typographic quotes and markdown's
# bold/backtick decorations, which small chat models like to wrap codes in.
_EDGE = string.punctuation + string.whitespace + "\u201c\u201d\u2018\u2019\u00ab\u00bb"
_PROMPT_CHARS = 300   # records keep a readable excerpt of the question, not the whole rendered prompt


@contextlib.contextmanager
def inference(model):
    """eval mode and no gradients for the block; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T), padded on the left.

    Decoder-only models continue from the last position, so every prompt must end at column T-1.
    We pad by hand rather than flipping `tokenizer.padding_side`: a shared tokenizer is never
    mutated, and tokenizers without a pad token work too.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the model's own EOS ids and the tokenizer's (the chat end-of-turn)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 16,
             progress: bool = True) -> list[str]:
    """Greedy continuations of already-rendered prompts, in order; only the new text, stripped."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0] if eos else 0
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # Batch prompts of similar length together (less padding); answers go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    with inference(model):
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
            chunk = order[start:start + batch_size]
            ids, mask = _left_pad([encoded[i] for i in chunk], pad_id)
            new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos or None, pad_token_id=pad_id)[:, ids.shape[1]:]   # (B, new)
            for i, row in zip(chunk, new):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


def normalize(text: str) -> str:
    """First non-empty line, edge punctuation and quotes removed, inner whitespace collapsed, upper case."""
    line = next((ln for ln in text.splitlines() if ln.strip(_EDGE)), "")
    return " ".join(line.strip(_EDGE).split()).upper()


def extract(text: str, pattern: re.Pattern | None) -> str | None:
    """The answer inside `text`: the pattern's group 1 (or whole match if it has no groups); None if no match."""
    if pattern is None:
        return text
    m = pattern.search(text)
    if m is None:
        return None
    return (m.group(1) if pattern.groups else m.group(0)) or ""


def is_correct(got: str, expected: str, pattern: re.Pattern | None = None) -> bool:
    answer = extract(got, pattern)
    if answer is None:                     # the model never produced anything answer-shaped
        return False
    reference = extract(expected, pattern)
    return normalize(answer) == normalize(expected if reference is None else reference)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (Wilson, 1927, JASA 22:209).

    Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at p = 0 or 1,
    which matters for the small held-out sets a fine-tuning check uses.
    """
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class TaskResult:
    accuracy: float
    low: float                     # 95% Wilson interval on the accuracy
    high: float
    n: int
    correct: int
    records: list = field(default_factory=list)   # {"prompt", "expected", "got", "correct"} per row

    def to_dict(self) -> dict:
        return asdict(self)


def question(row: dict) -> str:
    """A short, human-readable version of what the row asks (its last user turn, or its prompt)."""
    if "instruction" in row:
        text = row["instruction"]
    elif "messages" in row or isinstance(row.get("prompt"), list):
        msgs = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        users = [m["content"] for m in msgs[:last] if m["role"] == "user"]
        text = users[-1] if users else msgs[last - 1]["content"] if last else ""
    else:
        text = row["prompt"]
    text = " ".join(text.split())
    return text if len(text) <= _PROMPT_CHARS else text[:_PROMPT_CHARS - 1] + "\u2026"


def task_eval(model, tokenizer, rows: list[dict], answer_regex: str | None = None, max_new_tokens: int = 16,
              batch_size: int = 16, progress: bool = True) -> TaskResult:
    """Exact-match accuracy of greedy answers on `rows` (training-format dicts)."""
    if not rows:
        raise ValueError("task_eval needs at least one row")
    if any("prompt" not in r and "messages" not in r and "instruction" not in r for r in rows):
        raise ValueError("task_eval rows need a prompt and an answer (prompt/completion, messages or alpaca rows); "
                         "text and kl_text rows have none")
    pattern = re.compile(answer_regex) if answer_regex else None
    pairs = [prompt_text(row, tokenizer) for row in rows]
    answers = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, progress)
    records = [{"prompt": question(row), "expected": expected, "got": got, "correct": is_correct(got, expected, pattern)}
               for row, (_, expected), got in zip(rows, pairs, answers)]
    k, n = sum(r["correct"] for r in records), len(records)
    low, high = wilson_interval(k, n)
    return TaskResult(k / n, low, high, n, k, records)

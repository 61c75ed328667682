"""Supervised fine-tuning data: rows (`rows.py`) -> token ids with loss masks -> padded or packed batches.

Which tokens carry loss, shape by shape (TRL's SFTTrainer semantics, checked against TRL's own
tokenization in tests/training/test_formats.py):
- text: every token, with the tokenizer's EOS appended as TRL does;
- prompt-completion, strings: prompt + completion + EOS tokenized together, loss from where the
  prompt's own tokens end (TRL's common-prefix rule);
- prompt-completion, conversational (and Alpaca with a chat template): the chat template renders
  prompt (with the generation prompt) and prompt + completion; loss on what the completion adds;
- messages (and ShareGPT): loss on every assistant turn, its text or tool calls and its
  end-of-turn marker, as the template renders them. A template with `{% generation %}` marks says
  so itself (TRL's assistant_only_loss); otherwise turns are rendered one prefix at a time;
- kl-text: no loss; the KL-to-base penalty reads these positions.
Labels use -100 for "no loss", as transformers does. Tokens live in flat arrays, a few bytes per
token, so a million-row file is not a million Python objects; rows stream in batches.
"""
from __future__ import annotations

import json
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .rows import DataError, RowError, normalize, read_rows, scan

__all__ = ["IGNORE", "DataError", "Example", "Dataset", "load_dataset", "read_rows", "tokenize", "prompt_text",
           "resolve", "collate", "collate_packed", "pack"]

IGNORE = -100
BATCH = 512            # rows tokenized per call into the (Rust) tokenizer


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_labels(self) -> int:  # positions that contribute to the loss after the causal shift
        return sum(1 for t in self.labels[1:] if t != IGNORE)


class Tokens(Sequence):
    """Examples stored flat: int32 ids, one loss bit per token, one offset per row."""

    def __init__(self):
        self.ids, self.loss, self.starts = array("i"), array("b"), array("q", [0])
        self.loss_tokens = 0                # loss-bearing positions after the causal shift
        self.longest = 0

    def append(self, ids: list[int], mask: list[int]) -> None:
        self.ids.extend(ids)
        self.loss.extend(mask)
        self.starts.append(len(self.ids))
        self.loss_tokens += sum(mask[1:])
        self.longest = max(self.longest, len(ids))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        a, b = self.starts[i], self.starts[i + 1]
        ids = self.ids[a:b].tolist()
        return Example(ids, [t if m else IGNORE for t, m in zip(ids, self.loss[a:b])])


@dataclass
class Dataset:
    examples: Tokens
    path: str = ""
    bad_rows: list[dict] = field(default_factory=list)   # {"file", "line" (JSONL) or "row" (others), "error"}
    truncated: int = 0                                    # rows cut to max_len
    dropped: int = 0                                      # rows left with no loss tokens after the cut
    kl_rows: int = 0                                      # context-only rows (for the KL penalty)
    formats: dict = field(default_factory=dict)           # row shape -> rows

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def tokens(self) -> int:
        return len(self.examples.ids)

    @property
    def loss_tokens(self) -> int:
        return self.examples.loss_tokens

    def describe(self) -> str:
        """What was read, for the line printed before training."""
        shapes = ", ".join(f"{k} x{v}" for k, v in self.formats.items())
        return (f"{len(self)} rows from {self.path} ({shapes}): {self.tokens:,} tokens, {self.loss_tokens:,} carry "
                f"loss; {self.truncated} cut to max_len, {self.dropped} dropped with no loss tokens left, "
                f"{len(self.bad_rows)} bad rows skipped, {self.kl_rows} kl-text rows for the KL guard")


# ---------------------------------------------------------------------------------------------
# rendering: a row -> text pieces, each marked with whether it carries loss
ALPACA = ("Below is an instruction that describes a task{paired}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def resolve(shape: str, row: dict, tokenizer) -> tuple[str, dict]:
    """An Alpaca row as the prompt-completion row it stands for: a chat turn when the tokenizer has
    a chat template, else the Stanford Alpaca prompt. Other shapes pass through."""
    if shape != "alpaca":
        return shape, row
    if tokenizer.chat_template:
        user = row["instruction"] + (f"\n\n{row['input']}" if "input" in row else "")
        system = [{"role": "system", "content": row["system"]}] if "system" in row else []
        return "prompt-completion", {"prompt": system + [{"role": "user", "content": user}],
                                     "completion": [{"role": "assistant", "content": row["output"]}]}
    paired = ", paired with an input that provides further context" if "input" in row else ""
    prompt = ALPACA.format(paired=paired, instruction=row["instruction"],
                           input=f"### Input:\n{row['input']}\n\n" if "input" in row else "")
    return "prompt-completion", {"prompt": (row["system"] + "\n\n" if "system" in row else "") + prompt,
                                 "completion": row["output"]}


def render(tokenizer, msgs: list[dict], tools=None, **kwargs) -> str:
    """The chat template's text for `msgs`; RowError when the template cannot render them."""
    if not tokenizer.chat_template:
        raise RowError("the tokenizer has no chat template, which message rows need; use prompt/completion rows")
    try:
        text = tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, **kwargs)
    except Exception as e:     # jinja raises TemplateError, templates raise their own exceptions
        raise RowError(f"the chat template cannot render this row ({type(e).__name__}: {str(e)[:200]})") from None
    for i, m in enumerate(msgs):
        for call in m.get("tool_calls", ()):
            if call["function"]["name"] not in text:
                raise RowError(f"the chat template drops tool_calls (message {i} calls {call['function']['name']!r}, "
                               "which the rendered text never mentions): use a tokenizer whose template renders tools")
        said = m["content"].strip()             # templates may write a tool result as JSON (`| tojson`)
        if m["role"] == "tool" and said and said not in text and json.dumps(said)[1:-1] not in text:
            raise RowError(f"the chat template drops the tool turn (message {i})")
    for t in tools or ():
        name = (t.get("function") or t).get("name")
        if name and name not in text:
            raise RowError(f"the chat template does not render 'tools' (tool {name!r} never appears)")
    return text


def segments(row: dict, tokenizer) -> list[tuple[str, bool]]:
    """A messages row as text pieces, each True where the loss applies: each assistant turn is what
    rendering the conversation up to it adds to rendering the conversation before it."""
    msgs, tools, out, done = row["messages"], row.get("tools"), [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, msgs[:i], tools, add_generation_prompt=True)
        full = render(tokenizer, msgs[: i + 1], tools)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise RowError("the tokenizer's chat template does not render turns as prefixes of each other; "
                           "use prompt/completion rows, or a template with {% generation %} marks")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    if msgs[-1]["role"] != "assistant":                    # turns after the last assistant one
        out.append((render(tokenizer, msgs, tools)[len(done):], False))
    return out


def pieces(shape: str, row: dict, tokenizer):
    """How one row tokenizes: ("segments", [(text, trained)], specials) tokenized piece by piece;
    ("prefix", prompt, full, specials): loss on the tokens of `full` past its common prefix with
    `prompt`; or ("ids", ids, mask) already tokenized."""
    shape, row = resolve(shape, row, tokenizer)
    eos = tokenizer.eos_token or ""
    if shape == "kl-text":
        return "segments", [(row["kl_text"], False)], True
    if shape == "text":
        text = row["text"]
        return "segments", [(text if text.endswith(eos) else text + eos, True)], True
    if shape == "prompt-completion" and isinstance(row["prompt"], str):
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        return "prefix", row["prompt"], row["prompt"] + completion, True
    if shape == "prompt-completion":
        tools = row.get("tools")
        return ("prefix", render(tokenizer, row["prompt"], tools, add_generation_prompt=True),
                render(tokenizer, row["prompt"] + row["completion"], tools), False)
    if isinstance(tokenizer.chat_template, str) and _GENERATION.search(tokenizer.chat_template):
        render(tokenizer, row["messages"], row.get("tools"))            # the checks above, then the marks
        out = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return "ids", list(out["input_ids"]), list(out["assistant_masks"])
    return "segments", segments(row, tokenizer), False


def encode(plans: list, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) for each plan from `pieces`, with one tokenizer call per special-tokens setting."""
    texts: dict[bool, list[str]] = {True: [], False: []}
    for plan in plans:
        if plan[0] == "segments":
            for k, (text, _) in enumerate(plan[1]):
                texts[plan[2] and k == 0].append(text)
        elif plan[0] == "prefix":
            texts[plan[3]] += [plan[1], plan[2]]
    ids = {s: iter(tokenizer(t, add_special_tokens=s)["input_ids"]) if t else iter(()) for s, t in texts.items()}
    out = []
    for plan in plans:
        if plan[0] == "ids":
            out.append((plan[1], plan[2]))
        elif plan[0] == "prefix":
            prompt, full = next(ids[plan[3]]), next(ids[plan[3]])
            n = _common_prefix(prompt, full)
            out.append((full, [0] * n + [1] * (len(full) - n)))
        else:
            row_ids, mask = [], []
            for k, (_, trained) in enumerate(plan[1]):
                piece = next(ids[plan[2] and k == 0])
                row_ids += piece
                mask += [int(trained)] * len(piece)
            out.append((row_ids, mask))
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize(row: dict, tokenizer, max_len: int | None = None, shape: str | None = None) -> tuple[Example, bool]:
    """Token ids and labels for one row; returns (example, was_truncated)."""
    if shape is None:
        shape, row = normalize(row)
    [(ids, mask)] = encode([pieces(shape, row, tokenizer)], tokenizer)
    truncated = max_len is not None and len(ids) > max_len
    ids, mask = (ids[:max_len], mask[:max_len]) if truncated else (ids, mask)
    return Example(ids, [t if m else IGNORE for t, m in zip(ids, mask)]), truncated


def prompt_text(row: dict, tokenizer) -> tuple[str, str]:
    """(text to generate from, expected answer) for evaluation: everything before the last assistant turn."""
    shape, row = resolve("alpaca" if "instruction" in row else "", row, tokenizer)
    if "messages" in row or isinstance(row.get("prompt"), list):
        msgs = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return render(tokenizer, msgs[:last], row.get("tools"), add_generation_prompt=True), msgs[last]["content"]
    if "prompt" not in row:
        raise ValueError("a task evaluation row needs a prompt and an answer: prompt/completion, messages or "
                         "alpaca rows, not text rows")
    return row["prompt"], row["completion"]


# ---------------------------------------------------------------------------------------------
# a whole file
def load_dataset(path, tokenizer, max_len: int = 512, skip_bad_rows: bool = False, fmt: str = "auto",
                 columns: dict | None = None, kl_data=None, progress: bool = True) -> Dataset:
    """Every row of `path` (and `kl_data`'s rows as kl-text), tokenized, truncated to max_len.
    A bad row stops with DataError('FILE:LINE: what'), or with skip_bad_rows is listed in bad_rows."""
    ds = Dataset(Tokens(), str(path) + (f" + {kl_data}" if kl_data else ""))
    sources = [scan(path, fmt, columns, skip_bad_rows, ds.bad_rows)]
    if kl_data:
        sources.append(_as_kl(scan(kl_data, "auto", None, skip_bad_rows, ds.bad_rows), kl_data, skip_bad_rows,
                              ds.bad_rows))
    bar = tqdm(desc="tokenizing", unit=" rows", disable=None if progress else True, leave=False, mininterval=1.0)
    for source in sources:
        batch = []
        for item in source:
            batch.append(item)
            if len(batch) == BATCH:
                _add(ds, batch, tokenizer, max_len, skip_bad_rows)
                bar.update(len(batch))
                batch = []
        _add(ds, batch, tokenizer, max_len, skip_bad_rows)
        bar.update(len(batch))
    bar.close()
    if not len(ds):
        if not ds.formats:
            raise DataError(f"{path}: no usable rows" + (f" ({len(ds.bad_rows)} bad)" if ds.bad_rows else ""))
        raise DataError(f"{path}: every row lost its completion to max_len={max_len}; raise max_len")
    return ds


def _as_kl(items, path, skip_bad_rows: bool, bad: list):
    for shape, row, where in items:
        if shape in ("text", "kl-text"):
            yield "kl-text", {"kl_text": row.get("text", row.get("kl_text"))}, where
            continue
        error = f"--kl-data {path} takes text or kl_text rows, found a {shape} row"
        if not skip_bad_rows:
            raise DataError(f"{where}: {error}")
        bad.append(where.bad(error))


def _add(ds: Dataset, batch: list, tokenizer, max_len: int, skip_bad_rows: bool) -> None:
    plans, kept = [], []
    for shape, row, where in batch:
        try:
            plans.append(pieces(shape, row, tokenizer))
            kept.append(shape)
        except RowError as e:
            if not skip_bad_rows:
                raise DataError(f"{where}: {e}") from None
            ds.bad_rows.append(where.bad(str(e)))
    for shape, (ids, mask) in zip(kept, encode(plans, tokenizer)):
        ds.formats[shape] = ds.formats.get(shape, 0) + 1
        ds.kl_rows += shape == "kl-text"
        if len(ids) > max_len:
            ds.truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if shape != "kl-text" and not any(mask[1:]):
            ds.dropped += 1
        else:
            ds.examples.append(ids, mask)


# ---------------------------------------------------------------------------------------------
# batching
def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class PackedExample(Example):
    position_ids: list[int] = field(default_factory=list)


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Greedy first-fit packing of whole examples into rows of at most max_len tokens.

    A packed row carries `position_ids` that restart at each example; with no attention mask,
    transformers turns that into a block-diagonal causal mask, so examples never see each other.
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        for i, free in enumerate(room):
            if len(e.input_ids) <= free:
                rows[i].append(e)
                room[i] -= len(e.input_ids)
                break
        else:
            rows.append([e])
            room.append(max_len - len(e.input_ids))
    packed = []
    for group in rows:
        p = PackedExample([], [], [])
        for e in group:
            p.input_ids += e.input_ids
            p.labels += [IGNORE] + e.labels[1:]   # never predict one example's start from another
            p.position_ids += list(range(len(e.input_ids)))
        packed.append(p)
    return packed


def collate_packed(examples: list[PackedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed batch: input_ids, position_ids, labels (B, T); no attention mask (see `pack`)."""
    batch = collate(examples, pad_id)
    width = batch["input_ids"].shape[1]
    pos = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.position_ids)
        pos[i, :n] = torch.tensor(e.position_ids)
        pos[i, n:] = torch.arange(width - n)     # padding forms its own block
    del batch["attention_mask"]
    batch["position_ids"] = pos
    return batch

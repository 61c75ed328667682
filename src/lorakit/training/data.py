"""Supervised fine-tuning data: JSONL rows -> token ids with loss masks -> padded or packed batches.

Three row shapes:
- `{"prompt": ..., "completion": ...}`: plain text; loss on the completion and the EOS after it.
- `{"messages": [{"role", "content"}, ...]}`: rendered with the tokenizer's chat template; loss on
  every assistant turn (its text and its end-of-turn marker), nowhere else.
- `{"text": ...}`: general text with no loss of its own; only the KL-to-base penalty reads it
  (it holds the adapted model's predictions on such text to the base model's).
Labels use -100 for "no loss", as transformers does. Other keys in a row (e.g. "meta") are ignored.
Rows are validated before any training starts; errors name the file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad row: the message names the file, the line and what is wrong."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_labels(self) -> int:  # positions that contribute to the loss after the causal shift
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class Dataset:
    examples: list[Example]
    path: str = ""
    bad_rows: list[dict] = field(default_factory=list)   # {"line" (JSONL) or "row" (others): n, "error": text}
    truncated: int = 0                                    # rows cut to max_len
    dropped: int = 0                                      # rows left with no loss tokens after the cut
    text_rows: int = 0                                    # context-only rows (for the KL penalty)
    formats: dict = field(default_factory=dict)           # row shape -> rows: prompt-completion, messages, text

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def loss_tokens(self) -> int:
        return sum(e.n_labels for e in self.examples)

    def describe(self) -> str:
        """What was read, for the line printed before training."""
        shapes = ", ".join(f"{k} x{v}" for k, v in self.formats.items())
        return (f"{len(self)} rows from {self.path} ({shapes}): {self.tokens:,} tokens, {self.loss_tokens:,} carry "
                f"loss; {self.truncated} cut to max_len, {self.dropped} dropped with no loss tokens left, "
                f"{len(self.bad_rows)} bad rows skipped, {self.text_rows} text rows for the KL guard")


# ---------------------------------------------------------------------------------------------
# reading and checking rows
def check_row(row) -> str | None:
    """What is wrong with a parsed row, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, found {type(row).__name__}"
    if "text" in row:
        return None if isinstance(row["text"], str) and row["text"].strip() else "'text' must be a non-empty string"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return f"messages[{i}] must be an object with 'role' and 'content'"
            if m["role"] not in ROLES:
                return f"messages[{i}] has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
            if not isinstance(m["content"], str):
                return f"messages[{i}].content must be a string"
            if m["role"] == "assistant" and not m["content"].strip():
                return f"messages[{i}] is an empty assistant reply"
        if not any(m["role"] == "assistant" for m in msgs):
            return "'messages' has no assistant turn to learn from"
        return None
    missing = [k for k in ("prompt", "completion") if k not in row]
    if missing:
        return f"missing key {missing[0]!r} (a row needs 'prompt' and 'completion', 'messages', or 'text')"
    if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
        return "'prompt' and 'completion' must be strings"
    if not row["completion"].strip():
        return "empty completion"
    return None


def read_rows(path: str | Path, skip_bad_rows: bool = False) -> tuple[list[dict], list[dict]]:
    """Parse and check every row; returns (rows, bad_rows). Raises DataError on the first bad row
    unless `skip_bad_rows`. JSONL is read line by line (errors name the line); a JSON array, CSV,
    parquet file or `datasets` save_to_disk folder is read through the `datasets` library (errors
    name the row)."""
    path = Path(path)
    kind = _kind_of(path)
    numbered = _jsonl_rows(path) if kind == "jsonl" else _columnar_rows(path, kind)
    where = "" if kind == "jsonl" else "row "
    rows, bad = [], []
    for n, row, error in numbered:
        if error is None:
            rows.append(row)
        elif skip_bad_rows:
            bad.append({"line" if kind == "jsonl" else "row": n, "error": error})
        else:
            raise DataError(f"{path}:{where}{n}: {error}")
    if not rows:
        raise DataError(f"{path}: no usable rows" + (f" ({len(bad)} bad)" if bad else ""))
    return rows, bad


def _jsonl_rows(path: Path):
    with path.open("rb") as f:
        for lineno, line in _lines(f, path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield lineno, row, check_row(row)
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _columnar_rows(path: Path, kind: str):
    import datasets        # pyarrow underneath: loaded only for the files that need it

    try:
        if kind == "save_to_disk":
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                raise DataError(f"{path} holds splits {list(table)}: name one, e.g. {path / next(iter(table))}")
        else:
            loader = {"parquet": datasets.Dataset.from_parquet, "csv": datasets.Dataset.from_csv,
                      "json": datasets.Dataset.from_json}[kind]
            table = loader(str(path))
    except DataError:
        raise
    except Exception as e:        # pyarrow and datasets raise many types for a file they cannot parse
        raise DataError(f"{path}: not a readable {kind} file ({type(e).__name__}: {str(e)[:200]})") from None
    for i, row in enumerate(table, start=1):
        row = {k: v for k, v in row.items() if v is not None}     # columns a row does not use read as None
        yield i, row, check_row(row)


def _kind_of(path: Path) -> str:
    """jsonl, json (an array), csv, parquet or save_to_disk; anything else gets a message saying what it is."""
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "save_to_disk"
        raise DataError(f"{path} is a folder but not a `datasets` save_to_disk folder: --data takes a JSONL, JSON, "
                        "CSV or parquet file, or such a folder")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"PAR1") or path.suffix.lower() == ".parquet":
        return "parquet"
    if path.suffix.lower() == ".csv":
        return "csv"
    for magic, what in ((b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "a gzip file")):
        if head.startswith(magic):
            raise DataError(f"{path} is {what}: --data takes a JSONL, JSON, CSV or parquet file; unpack it first")
    return "json" if head.lstrip().startswith(b"[") else "jsonl"


def _lines(f, path: Path):
    """(line number, text) of a binary file, each line decoded as UTF-8 on its own, so a bad byte is
    reported on its line."""
    for lineno, raw in enumerate(f, start=1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                            "--data takes a JSONL file") from None


# ---------------------------------------------------------------------------------------------
# rendering and tokenizing
def segments(row: dict, tokenizer) -> list[tuple[str, bool]]:
    """The row as text pieces, each marked True where the loss applies."""
    if "text" in row:
        return [(row["text"], False)]
    if "messages" not in row:
        return [(row["prompt"], False), (row["completion"], True)]
    msgs, out, done = row["messages"], [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the tokenizer's chat template does not render turns as prefixes of each other; "
                            "use prompt/completion rows with this tokenizer")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return out


def prompt_text(row: dict, tokenizer) -> tuple[str, str]:
    """(text to generate from, expected answer) for evaluation: everything before the last assistant turn."""
    if "messages" not in row:
        return row["prompt"], row["completion"]
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return tokenizer.apply_chat_template(msgs[:last], add_generation_prompt=True, tokenize=False), msgs[last]["content"]


def tokenize(row: dict, tokenizer, max_len: int | None = None) -> tuple[Example, bool]:
    """Token ids and labels for one row; returns (example, was_truncated)."""
    ids, labels = [], []
    for i, (text, trained) in enumerate(segments(row, tokenizer)):
        # plain prompts get the tokenizer's own special tokens (e.g. BOS); chat templates write theirs
        specials = i == 0 and "messages" not in row
        piece = tokenizer(text, add_special_tokens=specials)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if "prompt" in row and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)    # learn to stop after a completion
        labels.append(tokenizer.eos_token_id)
    truncated = max_len is not None and len(ids) > max_len
    if truncated:
        ids, labels = ids[:max_len], labels[:max_len]
    return Example(ids, labels), truncated


def load_dataset(path: str | Path, tokenizer, max_len: int = 512, skip_bad_rows: bool = False) -> Dataset:
    rows, bad = read_rows(path, skip_bad_rows)
    ds = Dataset([], str(path), bad)
    for row in rows:
        ex, cut = tokenize(row, tokenizer, max_len)
        ds.truncated += cut
        ds.text_rows += "text" in row
        shape = "text" if "text" in row else "messages" if "messages" in row else "prompt-completion"
        ds.formats[shape] = ds.formats.get(shape, 0) + 1
        if ex.n_labels == 0 and "text" not in row:
            ds.dropped += 1
        else:
            ds.examples.append(ex)
    if not ds.examples:
        raise DataError(f"{path}: every row lost its completion to max_len={max_len}; raise max_len")
    return ds


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

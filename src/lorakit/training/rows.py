"""Training rows: which files `--data` names, which shape each row has, and what is wrong with it.

Shapes carry TRL's names and semantics (its "dataset formats" page), plus two common layouts and
lorakit's own guard rows:

    text               {"text"}: language modeling, loss on every token
    prompt-completion  {"prompt", "completion"}: strings, or message lists (conversational); loss on
                       the completion
    messages           {"messages": [...]}, optional "tools": loss on the assistant turns only
    alpaca             {"instruction", "input"?, "output", "system"?}: read as a prompt-completion row
    sharegpt           {"conversations": [{"from", "value"}]}: read as a messages row
    kl-text            {"kl_text"}: context only, no loss; the KL-to-base guard reads it

A message is {"role": system|user|assistant|tool, "content": ...}; content is a string or a list of
parts, of which only {"type": "text"} parts are read (joined with no separator, as the server joins
them), and an assistant turn may carry `tool_calls` instead of text.

Files: JSONL is read line by line (an error names the line; rows of different shapes may mix);
a JSON array, CSV, parquet file or `datasets` save_to_disk folder is read through the `datasets`
library in batches (an error names the row); a folder of such files or a glob reads them as
shards, in name order. Rows stream: nothing here holds a whole file.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator, NamedTuple

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("auto", "text", "prompt-completion", "messages", "alpaca", "sharegpt", "kl-text")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_response": "tool"}
COLUMNS = ("text", "prompt", "completion", "messages", "tools", "instruction", "input", "output", "system",
           "conversations", "kl_text")
# the keys that say which shape a row has, in the order auto-detection tries them
KEYS = (("prompt-completion", ("prompt", "completion")), ("messages", ("messages",)),
        ("sharegpt", ("conversations",)), ("kl-text", ("kl_text",)), ("text", ("text",)),
        ("alpaca", ("instruction", "output")))           # TRL reads "prompt" before "messages" and "text"


class DataError(ValueError):
    """A bad file or row: the message names the file, the line or row, and what is wrong."""


class RowError(ValueError):
    """What is wrong with one row (the caller adds the file and row)."""


class Where(NamedTuple):
    """A row's place: 'FILE:LINE' for JSONL, 'FILE:row N' for columnar files."""
    file: str
    key: str          # "line" or "row"
    n: int

    def __str__(self) -> str:
        return f"{self.file}:{self.n}" if self.key == "line" else f"{self.file}:row {self.n}"

    def bad(self, error: str) -> dict:
        return {"file": self.file, self.key: self.n, "error": error}


# ---------------------------------------------------------------------------------------------
# shapes
def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """'prompt=instruction,completion=output' -> {"prompt": "instruction", "completion": "output"}."""
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, dict) else (p.partition("=")[::2] for p in spec.split(",") if p.strip())
    out = {}
    for target, source in pairs:
        target, source = target.strip(), source.strip()
        if target not in COLUMNS or not source:
            raise ValueError(f"--columns {spec!r}: each entry is NAME=COLUMN with NAME one of {', '.join(COLUMNS)}; "
                             f"got {target!r}={source!r}")
        out[target] = source
    return out


def normalize(row, fmt: str = "auto", columns: dict | None = None) -> tuple[str, dict]:
    """(shape, row in its canonical form) or RowError. ShareGPT becomes a messages row; message
    content parts become strings; alpaca stays alpaca (how it renders depends on the tokenizer)."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, found {type(row).__name__}")
    for target, source in (columns or {}).items():
        if source not in row:
            raise RowError(f"missing column {source!r} (--columns maps it to {target!r})")
        row = {k: v for k, v in row.items() if k != source} | {target: row[source]}
    shape = detect(row) if fmt == "auto" else fmt
    if fmt != "auto":
        missing = [k for k in dict(KEYS)[fmt] if k not in row]
        if missing:
            raise RowError(f"missing key {missing[0]!r} for --format {fmt}")
    return shape, CHECKS[shape](row)


def detect(row: dict) -> str:
    for shape, keys in KEYS:
        if all(k in row for k in keys):
            return shape
    if "prompt" in row:
        raise RowError("missing key 'completion' (a prompt needs a completion)")
    raise RowError(f"no known row shape in keys {sorted(row)[:8]}: expected 'text', 'prompt'+'completion', "
                   "'messages', 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca) or 'kl_text'; "
                   "--columns NAME=COLUMN maps other column names")


def _string(row: dict, key: str, empty_ok: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise RowError(f"{key!r} must be a string, found {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise RowError(f"empty {key!r}" if key != "completion" else "empty completion")
    return value


def _text(row):
    return {"text": _string(row, "text")}


def _kl_text(row):
    return {"kl_text": _string(row, "kl_text")}


def _prompt_completion(row):
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": _string(row, "completion")}
    if isinstance(prompt, list) and isinstance(completion, list):
        out = {"prompt": messages(prompt, "prompt"), "completion": messages(completion, "completion")}
        if not any(m["role"] == "assistant" for m in out["completion"]):
            raise RowError("'completion' has no assistant turn to learn from")
        return out | _tools(row)
    raise RowError("'prompt' and 'completion' must both be strings or both be message lists, found "
                   f"{type(prompt).__name__} and {type(completion).__name__}")


def _messages(row):
    msgs = messages(row["messages"], "messages")
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError("'messages' has no assistant turn to learn from")
    return {"messages": msgs} | _tools(row)


def _sharegpt(row):
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RowError("'conversations' must be a non-empty list")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise RowError(f"conversations[{i}] must be an object with 'from' and 'value'")
        if t["from"] not in SHAREGPT_ROLES:
            raise RowError(f"conversations[{i}] has unknown 'from' {t['from']!r} "
                           f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return _messages({"messages": msgs} | ({"tools": row["tools"]} if "tools" in row else {}))


def _alpaca(row):
    out = {"instruction": _string(row, "instruction"), "output": _string(row, "output")}
    for key in ("input", "system"):
        if row.get(key) not in (None, ""):
            out[key] = _string(row, key)
    return out


CHECKS = {"text": _text, "kl-text": _kl_text, "prompt-completion": _prompt_completion, "messages": _messages,
          "sharegpt": _sharegpt, "alpaca": _alpaca}


def messages(msgs, key: str) -> list[dict]:
    """Checked messages with string content (text parts joined); RowError names the message."""
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"{key!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"{key}[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise RowError(f"{where} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError(f"{where} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        calls = m.get("tool_calls")
        if calls is not None:
            _check_calls(calls, where)
        if "content" not in m and not calls:
            raise RowError(f"{where} must be an object with 'role' and 'content'")
        content = _content(m.get("content"), where)
        if m["role"] == "assistant" and not content.strip() and not calls:
            raise RowError(f"{where} is an empty assistant reply")
        out.append({k: v for k, v in m.items() if v is not None} | {"content": content})
    return out


def _content(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RowError(f"{where}.content must be a string or a list of parts, found {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RowError(f"{where}.content[{j}] is a {kind or type(part).__name__!s} part: lorakit trains text "
                           "models and reads only {'type': 'text', 'text': ...} parts")
        texts.append(part["text"])
    return "".join(texts)


def _check_calls(calls, where: str) -> None:
    if not isinstance(calls, list):
        raise RowError(f"{where}.tool_calls must be a list")
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(f"{where}.tool_calls[{k}] must be {{'type': 'function', 'function': {{'name': ..., "
                           "'arguments': ...}}}")


def _tools(row: dict) -> dict:
    tools = row.get("tools")
    if tools is None:
        return {}
    if isinstance(tools, str):          # TRL accepts the JSON schema list as a string (what Arrow stores well)
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RowError(f"'tools' is a string but not JSON ({e.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("'tools' must be a list of JSON schema objects")
    return {"tools": tools}


# ---------------------------------------------------------------------------------------------
# files
def files_of(spec: str | Path) -> list[Path]:
    """The files (or save_to_disk folders) `--data` names: one file, a save_to_disk folder, a folder
    of data files, or a glob."""
    text = str(spec)
    if any(c in text for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file() or _is_saved(Path(p)))
        if not found:
            raise FileNotFoundError(f"data pattern {text} matches no file")
        return found
    path = Path(text)
    if path.is_dir() and not _is_saved(path):
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        found += sorted(p for p in path.iterdir() if p.is_dir() and _is_saved(p))
        if not found:
            raise DataError(f"{path} is a folder with no data files ({', '.join(SUFFIXES)}) and not a `datasets` "
                            "save_to_disk folder: --data takes a JSONL, JSON, CSV or parquet file, a folder or glob "
                            "of them, or a save_to_disk folder")
        return found
    return [path]


def _is_saved(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def kind_of(path: Path) -> str:
    """jsonl, json (an array), csv, parquet or save_to_disk; anything else gets a message saying what it is."""
    if _is_saved(path):
        return "save_to_disk"
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(64).removeprefix(b"\xef\xbb\xbf")
    if head.startswith(b"PAR1") or path.suffix.lower() == ".parquet":
        return "parquet"
    if path.suffix.lower() == ".csv":
        return "csv"
    for magic, what in ((b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "a gzip file")):
        if head.startswith(magic):
            raise DataError(f"{path} is {what}: --data takes a JSONL, JSON, CSV or parquet file; unpack it first")
    return "json" if head.lstrip().startswith(b"[") else "jsonl"


def raw_rows(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """(line or row number, parsed row, parse error) for every row of one file."""
    kind = kind_of(path)
    yield from _jsonl(path) if kind == "jsonl" else _columnar(path, kind)


def _jsonl(path: Path):
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")      # a byte-order mark is not data
            except UnicodeDecodeError as e:
                yield lineno, None, f"not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _columnar(path: Path, kind: str):
    import datasets        # pyarrow underneath: loaded only for the files that need it

    try:
        if kind == "save_to_disk":
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                raise DataError(f"{path} holds splits {list(table)}: name one, e.g. {path / next(iter(table))}")
        else:
            loader = {"parquet": datasets.Dataset.from_parquet, "json": datasets.Dataset.from_json,
                      "csv": _read_csv}[kind]
            table = loader(str(path))
    except DataError:
        raise
    except Exception as e:        # pyarrow and datasets raise many types for a file they cannot parse
        raise DataError(f"{path}: not a readable {kind} file ({type(e).__name__}: {str(e)[:200]})") from None
    n = 0
    for batch in table.iter(batch_size=1024):
        for values in zip(*batch.values()):
            n += 1
            yield n, _drop_nulls(dict(zip(batch, values))), None


def _read_csv(path: str):
    """CSV cells are text: "4" is an answer, not the integer pandas would infer, and an empty cell
    is an empty string."""
    import csv

    import datasets
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.Dataset.from_csv(path, features=features, keep_default_na=False)


def _drop_nulls(value):
    """Arrow gives every row every column and every struct every field, as None where a row has
    none; the row as written has no such keys."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def scan(spec, fmt: str = "auto", columns: dict | None = None, skip_bad_rows: bool = False,
         bad: list | None = None) -> Iterator[tuple[str, dict, Where]]:
    """(shape, canonical row, where) for every good row of every file `spec` names. A bad row raises
    DataError('FILE:LINE: what') or, with skip_bad_rows, is appended to `bad`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    for path in files_of(spec):
        key = "line" if kind_of(path) == "jsonl" else "row"
        for n, row, error in raw_rows(path):
            where = Where(str(path), key, n)
            if error is None:
                try:
                    shape, row = normalize(row, fmt, columns)
                except RowError as e:
                    error = str(e)
            if error is None:
                yield shape, row, where
            elif skip_bad_rows:
                if bad is not None:
                    bad.append(where.bad(error))
            else:
                raise DataError(f"{where}: {error}")


def read_rows(path, skip_bad_rows: bool = False, fmt: str = "auto", columns: dict | None = None):
    """Every good row of a (small) file as a list: (rows, bad_rows). For evaluation sets; training
    streams through `scan`."""
    bad: list = []
    rows = [row for _, row, _ in scan(path, fmt, columns, skip_bad_rows, bad)]
    if not rows:
        raise DataError(f"{path}: no usable rows" + (f" ({len(bad)} bad)" if bad else ""))
    return rows, bad

"""English prose that ships with Python: paragraph filters, passages, and a docstring corpus.

Two disjoint sources: the language reference (`pydoc_data.topics`), which the regression
evaluation reads, and the standard library's own docstrings, which training may use as general
text for the KL-to-base guard. Keeping them apart means the guard is judged on text it never saw.
The module lives in `evaluate` (not `datasets`) because the regression check reads it and
`evaluate` sits below `datasets` in the layering.
"""
from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")   # a split point between two sentences
_FOOTNOTE = re.compile(r"\s*\[\d+\]")                       # the reference's "[5]" footnote marks
_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}$")


def prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of one topic that are running prose, each joined into one line.

    Code, grammar rules and `>>>` sessions are indented (or start with `>>>`) in the reference;
    headings are underlined. What survives must also be mostly letters and end like a sentence.
    """
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines or any(ln.startswith((" ", "\t", ">>>")) for ln in lines):
            continue
        if any(_HEADING_RULE.match(ln.strip()) for ln in lines):
            continue
        para = _FOOTNOTE.sub("", " ".join(" ".join(lines).split()))
        letters = sum(c.isalpha() or c == " " for c in para)
        if letters >= 0.7 * len(para) and para.endswith((".", "!", "?")):
            out.append(para)
    return out


def passages(paragraphs: list[str], chars: int) -> list[str]:
    """Greedy passages of at most ~`chars` characters, cut between sentences (paragraphs kept apart)."""
    passages, current = [], ""
    for para in paragraphs:
        for i, sentence in enumerate(_SENTENCE_END.split(para)):
            sep = "" if not current else "\n\n" if i == 0 else " "
            if current and len(current) + len(sep) + len(sentence) > chars:
                passages.append(current)
                current, sep = "", ""
            current += sep + sentence
    if current:
        passages.append(current)
    # a topic's short tail (or a lone huge sentence) is not a representative passage
    return [p for p in passages if chars // 3 <= len(p) <= 2 * chars]


# Modules whose docstrings hold a good deal of running prose (not the ones the reference documents
# as language topics; those live in pydoc_data and are the evaluation's).
DOCSTRING_MODULES = (
    "argparse", "difflib", "heapq", "bisect", "textwrap", "string", "json", "subprocess", "threading", "logging",
    "unittest", "doctest", "random", "decimal", "fractions", "statistics", "calendar", "smtplib", "http.cookiejar",
    "email.message", "collections", "functools", "itertools", "pathlib", "tarfile", "zipfile", "socket", "shutil",
    "tempfile", "urllib.request", "xml.etree.ElementTree", "sqlite3", "csv", "configparser", "datetime", "enum",
    "dataclasses", "typing", "contextlib", "copy", "pprint", "queue", "sched", "selectors", "struct", "codecs",
    "locale", "gettext", "optparse", "pdb", "timeit", "trace", "warnings", "weakref", "gzip", "hashlib", "hmac",
    "secrets", "uuid", "ipaddress", "mailbox", "mimetypes", "base64", "html.parser", "webbrowser", "wave", "cmd",
    "shlex",
)


def docstring_prose(n: int = 100, chars: int = 400, seed: int = 0) -> list[str]:
    """`n` prose passages from standard-library docstrings, shuffled deterministically."""
    paragraphs = []
    for name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a Python built without some module (e.g. no sqlite3)
            continue
        with warnings.catch_warnings():  # reading members touches deprecated aliases (typing.io, ...)
            warnings.simplefilter("ignore", DeprecationWarning)
            docs = [module.__doc__ or ""] + [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module)
                                             if (inspect.isclass(obj) or inspect.isfunction(obj))
                                             and getattr(obj, "__module__", None) == module.__name__]
        for doc in docs:
            paragraphs += prose_paragraphs(doc)
    pool = passages(paragraphs, chars)
    random.Random(seed).shuffle(pool)
    return pool[:n]

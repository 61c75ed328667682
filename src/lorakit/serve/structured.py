"""Structured output: a request's JSON schema, regex, choice or grammar as a token mask per step.

The grammar engine is llguidance (guidance-ai, MIT). Of the three vLLM offers, it is the one that
installs as one self-contained wheel with no dependencies (xgrammar pulls triton, apache-tvm-ffi
and a torch pin; outlines-core builds a full index per schema up front), computes a mask for a
49k vocabulary in ~20 us on one CPU core, and is vLLM's `guidance` backend, so schemas mean what
they mean there. Each constrained sequence owns an `LLMatcher`; the engine asks it for the next
token mask, sets the barred tokens to -inf in that row alone, and feeds it the drawn token. Rows
without a constraint are not touched, so a free row's text does not depend on its neighbours.
Semantics as vLLM's guidance backend has them: JSON allows any whitespace between tokens unless
the server was started with `disable_any_whitespace`; a schema's own `x-guidance` options win;
`json_object` is `{"type": "object"}`; `choice` is one of the strings, verbatim; `grammar` is
llguidance's Lark dialect. The request finishes with "stop" when the grammar is complete (only
EOS could follow) or EOS is drawn.
What this does not do: decide which requests are constrained (protocol.py) or sample (sampling.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .sampling import BadParam

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Structured:
    """One request's constraint; `spec` is the schema as JSON text, the regex, the choices as a JSON
    list, or the grammar. `param` is the request field it came from, for error messages."""
    kind: str
    spec: str = ""
    param: str = "response_format"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise BadParam(self.param, f"{self.param}: unknown constraint {self.kind!r} (one of {', '.join(KINDS)})")


class Grammars:
    """Compiles constraints for one tokenizer and makes a matcher per request (thread-safe)."""

    def __init__(self, tokenizer, vocab_size: int, disable_any_whitespace: bool = False):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.any_whitespace = not disable_any_whitespace
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        except ValueError as e:
            raise ValueError(f"structured output needs a fast (Rust) tokenizer: {e}") from None

    def grammar(self, c: Structured) -> str:
        """The llguidance grammar text of a constraint."""
        M = self._ll.LLMatcher
        defaults = {"whitespace_flexible": self.any_whitespace}
        if c.kind == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, defaults=defaults)
        if c.kind == "json":
            try:
                return M.grammar_from_json_schema(c.spec, defaults=defaults)
            except ValueError as e:
                raise BadParam(c.param, f"{c.param}: not a JSON schema: {e}") from None
        if c.kind == "regex":
            return M.grammar_from_regex(c.spec)
        if c.kind == "choice":
            # a Lark grammar of quoted literals: the output is one of the strings, byte for byte
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in json.loads(c.spec)))
        return M.grammar_from_lark(c.spec)

    def matcher(self, c: Structured):
        """A fresh matcher for one request; BadParam names the field when the constraint does not compile."""
        grammar = self.grammar(c)
        error, messages = self._ll.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if error:
            raise BadParam(c.param, f"{c.param}: the {c.kind} constraint does not compile: {messages[0]}")
        m = self._ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise BadParam(c.param, f"{c.param}: the {c.kind} constraint does not compile: {m.get_error()}")
        return m

    def allowed(self, matcher) -> torch.Tensor:
        """(vocab_size,) bool: the tokens the grammar allows next."""
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[:self.vocab_size].astype(bool))


def constrain(rows: torch.Tensor, grammars: Grammars, matchers: list) -> None:
    """Bar, in place, every token row i's matcher does not allow (rows without a matcher: untouched)."""
    for i, m in enumerate(matchers):
        if m is not None:
            rows[i].masked_fill_(~grammars.allowed(m).to(rows.device), float("-inf"))


def advance(matcher, token: int) -> bool:
    """Feed the drawn token; True when the grammar is complete (the request stops). Raises when the
    matcher refuses it (a bug: the mask allowed it)."""
    if not matcher.consume_token(token) or matcher.is_error():
        raise RuntimeError(f"the grammar engine refused token {token}: {matcher.get_error()}")
    return matcher.is_stopped()

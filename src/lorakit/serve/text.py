"""Token ids -> text as they arrive: incremental detokenization and stop strings.

Each new token re-decodes the request's tokens and hands out what was not handed out yet, so merges
across token boundaries come out right; text that ends in an unfinished UTF-8 character, or that
could still be the start of a stop string, is held back until the next token settles it.
What this does not do: tokenize prompts, or anything with token ids beyond decoding them.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str] = (), skip_special_tokens: bool = True):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.skip_special_tokens = skip_special_tokens
        self.hold = max((len(s) for s in self.stops), default=1) - 1    # chars a stop string could still claim
        self.ids: list[int] = []
        self.text, self.sent = "", 0

    def add(self, token: int) -> tuple[str, bool]:
        """(new text safe to send, whether a stop string ended the text; the stop string is not sent)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        self.text = text
        settled = len(text.rstrip("\ufffd"))          # a trailing half character waits for the rest of its bytes
        found = [at for stop in self.stops if (at := text.find(stop, max(0, self.sent - len(stop) + 1))) != -1]
        if found:                                        # the earliest stop string wins
            self.text = text[:min(found)]
            return self._take(len(self.text)), True
        return self._take(max(self.sent, min(settled, len(text) - self.hold))), False

    def flush(self) -> str:
        """Whatever is left to send when the request ends without a stop string (a half character too)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out

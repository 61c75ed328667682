"""Log-probabilities on the wire, as vLLM's OpenAI server writes them.

Each position is a `sampling.Logprob` (the token there, its log-probability, the top k) or None
(the first prompt token, which nothing predicts). The top entries are the position's own token
first, then the k most likely, one per token id, so k or k + 1 of them; tokens are decoded one by
one. Two ids that decode to the same text (byte tokens of a split UTF-8 character all read
U+FFFD) share one key: here the first keeps its value, so the position's own token always shows
its own logprob (vLLM lets the later one win, which can break lm-eval's `is_greedy` test, a
token's logprob equal to the best of its top entries). -inf is written as -9999.0, as vLLM clamps
it, since JSON has no infinity.
What this does not do: compute them (the engine does, from the step's own logits).
"""
from __future__ import annotations

FLOOR = -9999.0


def _clamp(value: float) -> float:
    return max(value, FLOOR)


def _tops(lp, decode) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, value in ((lp.token, lp.logprob), *lp.top):      # the token first; a text seen before keeps its value
        out.setdefault(decode(token), _clamp(value))
    return out


def completion_logprobs(positions: list, tokens: list[int], decode, offset: int = 0) -> dict:
    """`/v1/completions`' logprobs object: tokens, token_logprobs, top_logprobs, text_offset (a
    running sum of the token strings' lengths, from `offset`: 0, or where a stream's last chunk ended)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp in zip(tokens, positions):
        text = decode(token)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if lp is None else _clamp(lp.logprob))
        out["top_logprobs"].append(None if lp is None else _tops(lp, decode))
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(positions: list, k: int, decode) -> dict:
    """`/v1/chat/completions`' logprobs object: per token its text, logprob, UTF-8 bytes and the
    first k of its top entries (the chosen token first, as vLLM takes them)."""
    def entry(text: str, value: float) -> dict:
        return {"token": text, "logprob": _clamp(value), "bytes": list(text.encode("utf-8", errors="replace"))}
    content = []
    for lp in positions:
        tops = list(_tops(lp, decode).items())[:k]
        content.append(entry(decode(lp.token), lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in tops]})
    return {"content": content}

"""Choosing the next token: greedy, temperature, top-k, top-p, each request with its own seeded generator.

A request's generator is its own (seeded from `seed`, or from the OS when none is given), so the
tokens it draws do not depend on which other requests share its batch.
Numerically safe for every value `SamplingParams` admits: a temperature below `GREEDY_EPS` is greedy
(vLLM's rule: dividing logits by 1e-40 overflows to inf and the softmax to NaN), filtering runs in
float64, and a row whose logits are not finite fails alone (`NonFiniteLogits`), never the batch.
Log-probabilities (`token_logprobs`) are of the model's own distribution, before temperature and
filtering (vLLM's default `logprobs_mode="raw_logprobs"`), from the logits the step computed anyway.
Logit processors, as vLLM applies them before sampling: `min_tokens` (EOS and stop tokens barred
until that many are generated), `logit_bias` (added), `repetition_penalty` (tokens seen in the
prompt or the output: positive logits divided by it, negative multiplied), `frequency_penalty`
(minus penalty x count in the output) and `presence_penalty` (minus penalty once a token is in the
output). Greedy rows see them too; logprobs stay the raw distribution's (a structured-output mask, which
comes before them, is part of it, as in vLLM).
What this does not do: stop strings (text is the HTTP layer's business; the engine sees token ids).
"""
from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass

import torch


GREEDY_EPS = 1e-5          # temperatures below this sample greedily, as vLLM's _SAMPLING_EPS
MAX_LOGPROBS = 20          # top-k log-probabilities a request may ask for (vLLM's max_logprobs default)


class BadParam(ValueError):
    """A request field out of range; `param` names it (the OpenAI error body's `param`)."""
    status = 400

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16                    # tokens to generate at most
    temperature: float = 1.0                # 0: greedy
    top_p: float = 1.0                      # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0                          # keep the k most likely tokens (0: all)
    seed: int | None = None                 # the same seed and prompt give the same tokens
    stop_token_ids: tuple[int, ...] = ()    # finish after generating one of these (it is kept in the output)
    ignore_eos: bool = False                # keep going past the model's end-of-sequence tokens
    presence_penalty: float = 0.0           # OpenAI's: subtracted once from a token already in the output
    frequency_penalty: float = 0.0          # OpenAI's: subtracted per occurrence in the output
    repetition_penalty: float = 1.0         # vLLM's: >1 discourages tokens of the prompt and the output
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit), in [-100, 100]
    min_tokens: int = 0                     # EOS and stop_token_ids barred until this many are generated
    logprobs: int | None = None             # each generated token's log-probability and the top k (None: off)
    prompt_logprobs: int | None = None      # the same for every prompt token after the first (None: off)
    structured: object = None               # a structured.Structured constraint on the output (None: free)

    def __post_init__(self):
        checks = [("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
                  ("temperature", _number(self.temperature) and 0 <= self.temperature <= 100, "a number in [0, 100]"),
                  ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
                  ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0: off)"),
                  ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
                  ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                   "a list of token ids")]
        checks += [("presence_penalty", _number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                    "a number in [-2, 2]"),
                   ("frequency_penalty", _number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                    "a number in [-2, 2]"),
                   ("repetition_penalty", _number(self.repetition_penalty) and 0 < self.repetition_penalty <= 2,
                    "a number in (0, 2]"),
                   ("logit_bias", all(isinstance(t, int) and t >= 0 and _number(b) and -100 <= b <= 100
                                      for t, b in self.logit_bias), "token ids mapped to numbers in [-100, 100]"),
                   ("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
                    "an integer in [0, max_tokens]")]
        checks += [(name, v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LOGPROBS),
                    f"an integer in [0, {MAX_LOGPROBS}]")
                   for name, v in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs))]
        for field, ok, what in checks:
            if not ok:
                raise BadParam(field, f"{field} must be {what}, got {getattr(self, field)!r}")

    @property
    def processed(self) -> bool:
        """Whether any logit processor applies (most requests: none, and their rows are left alone)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


@dataclass(frozen=True)
class Logprob:
    """One position: the log-probability of the token that is there, and the k most likely tokens."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()        # (token, log-probability), most likely first


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[Logprob]:
    """Row i of `logits` (n, V) scored at tokens[i]: its raw log-probability and the row's top k.
    -inf is a barred token (a grammar mask); NaN or +inf, a broken row."""
    if (logits.isnan() | logits.isposinf()).any():
        raise NonFiniteLogits("the model produced non-finite logits (NaN or inf) for this request")
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if not k:
        return [Logprob(t, c) for t, c in zip(tokens, chosen)]
    values, ids = lp.topk(k, -1)
    return [Logprob(t, c, tuple(zip(i, v))) for t, c, i, v in zip(tokens, chosen, ids.tolist(), values.tolist())]


class NonFiniteLogits(ArithmeticError):
    """The model produced NaN or inf logits for one request (a diverged adapter, an overflow)."""


def generator_for(params: SamplingParams) -> torch.Generator:
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator().manual_seed(seed % (1 << 63))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(V,) logits -> (V,) float64 log-probabilities with everything outside top-k / top-p set to -inf.
    float64: finite fp32 logits over a temperature >= GREEDY_EPS cannot overflow (3.4e38 / 1e-5 < 1.8e308)."""
    logits = logits.double() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return logits.log_softmax(-1)


def process(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int],
            stop_ids=frozenset()) -> torch.Tensor:
    """One row's (V,) logits after the request's processors, in vLLM's order: min_tokens, logit_bias,
    then the penalties."""
    logits = logits.clone()
    vocab = logits.numel()
    if p.min_tokens and len(output) < p.min_tokens:
        barred = [t for t in (*stop_ids, *p.stop_token_ids) if t < vocab]
        logits[barred] = float("-inf")
    for token, bias in p.logit_bias:
        if token < vocab:
            logits[token] += bias
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted({t for t in (*prompt, *output) if t < vocab}), dtype=torch.long)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if output and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(output), minlength=vocab)[:vocab].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator]) -> list[int | Exception]:
    """One next token per row of `logits` (B, V), row i drawn with params[i] and generators[i]; a row that
    cannot be sampled gets its exception instead of a token (the others are unaffected)."""
    # -inf is a barred token (min_tokens, a -inf bias); NaN, +inf or nothing left to draw is a broken row
    finite = (~(logits.isnan() | logits.isposinf()).any(-1)).tolist()                  # (B,)
    open_ = (logits > float("-inf")).any(-1).tolist()
    out: list[int | Exception] = logits.argmax(-1).tolist()   # greedy rows are done here, in one call
    for i, p in enumerate(params):
        if not finite[i]:
            out[i] = NonFiniteLogits("the model produced non-finite logits (NaN or inf) for this request")
        elif not open_[i]:
            out[i] = BadParam("min_tokens" if p.min_tokens else "logit_bias", "every token is barred: the "
                              "request's structured output, min_tokens and logit_bias leave nothing to draw")
        elif not p.greedy:
            try:
                # on the CPU: the request's generator is a CPU one, and the draw then does not depend on the device
                probs = filter_logits(logits[i].cpu(), p.temperature, p.top_k, p.top_p).exp()
                out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
            except Exception as e:                     # a bug here must not take the batch with it
                out[i] = e
    return out

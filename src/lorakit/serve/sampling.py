"""Choosing the next token: greedy, temperature, top-k, top-p, each request with its own seeded generator.

A request's generator is its own (seeded from `seed`, or from the OS when none is given), so the
tokens it draws do not depend on which other requests share its batch.
Numerically safe for every value `SamplingParams` admits: a temperature below `GREEDY_EPS` is greedy
(vLLM's rule: dividing logits by 1e-40 overflows to inf and the softmax to NaN), filtering runs in
float64, and a row whose logits are not finite fails alone (`NonFiniteLogits`), never the batch.
Log-probabilities (`token_logprobs`) are of the model's own distribution, before temperature and
filtering (vLLM's default `logprobs_mode="raw_logprobs"`), from the logits the step computed anyway.
What this does not do: stop strings (text is the HTTP layer's business; the engine sees token ids)
or penalties (repetition, presence, frequency), which lorakit does not offer yet.
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
    logprobs: int | None = None             # each generated token's log-probability and the top k (None: off)
    prompt_logprobs: int | None = None      # the same for every prompt token after the first (None: off)

    def __post_init__(self):
        checks = [("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
                  ("temperature", _number(self.temperature) and 0 <= self.temperature <= 100, "a number in [0, 100]"),
                  ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
                  ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0: off)"),
                  ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
                  ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                   "a list of token ids")]
        checks += [(name, v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LOGPROBS),
                    f"an integer in [0, {MAX_LOGPROBS}]")
                   for name, v in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs))]
        for field, ok, what in checks:
            if not ok:
                raise BadParam(field, f"{field} must be {what}, got {getattr(self, field)!r}")

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
    """Row i of `logits` (n, V) scored at tokens[i]: its raw log-probability and the row's top k."""
    if not torch.isfinite(logits).all():
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


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator]) -> list[int | Exception]:
    """One next token per row of `logits` (B, V), row i drawn with params[i] and generators[i]; a row that
    cannot be sampled gets its exception instead of a token (the others are unaffected)."""
    finite = torch.isfinite(logits).all(-1).tolist()   # (B,)
    out: list[int | Exception] = logits.argmax(-1).tolist()   # greedy rows are done here, in one call
    for i, p in enumerate(params):
        if not finite[i]:
            out[i] = NonFiniteLogits("the model produced non-finite logits (NaN or inf) for this request")
        elif not p.greedy:
            try:
                # on the CPU: the request's generator is a CPU one, and the draw then does not depend on the device
                probs = filter_logits(logits[i].cpu(), p.temperature, p.top_k, p.top_p).exp()
                out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
            except Exception as e:                     # a bug here must not take the batch with it
                out[i] = e
    return out

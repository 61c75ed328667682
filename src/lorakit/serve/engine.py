"""The serving engine: token ids in, token ids out, many requests on many adapters in one forward step.

`Engine.step()` asks the scheduler for the next batch, runs it through the runner (one ragged
forward, each sequence on its own adapter slot and KV cache), samples one token per sequence that
has read its whole prompt, and reports each token as an `Event` to the request's callback.
`start()` runs steps on a background thread while there is work; `submit` and `abort` may be called
from any thread (they only touch an inbox the engine thread drains between steps).
Fault isolation: whatever one request brings (its sampling parameters, a non-finite logit, an
adapter that fails to load or to run), that request alone finishes with reason "error" and the
exception; the others keep stepping. A forward that raises is retried chunk by chunk (forwards are
all or nothing) so only the failing sequence goes. Only a failure of the loop itself stops the
engine: then `failure` is set, every request finishes with an error, and `submit` raises
EngineUnavailable (the API answers 503 and /health reports it).
What this does not do: tokenize or detokenize, stop strings, HTTP (the API layer does), or choose
which adapters are resident (the adapter cache does).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .adapter_cache import AdapterCache, UnknownAdapter
from .forward import Chunk, Runner
from .sampling import BadParam, Logprob, SamplingParams, process, sample, token_logprobs
from .scheduler import QueueFull, Scheduler, Sequence
from .structured import Grammars, advance, constrain

log = logging.getLogger(__name__)

# While `run()` steps, threads hand over the GIL every 0.5 ms instead of Python's 5 ms: a step
# releases the GIL in each of its ~2,000 torch calls, and when an adapter-loading thread takes it
# meanwhile, the engine waits for the interval to pass before it can continue.
SWITCH_INTERVAL = 0.0005


class EngineUnavailable(RuntimeError):
    """The engine cannot take work: it failed (see `Engine.failure`) or is shutting down."""
    status = 503


class RequestFailed(RuntimeError):
    """A request the server could not finish through no fault of its own parameters (status 500)."""
    status = 500


@dataclass
class Event:
    request_id: str
    token: int | None                    # the token drawn this step (None when finishing without one)
    finish_reason: str | None = None     # "stop" (EOS / stop token), "length", "abort" or "error"
    error: Exception | None = None       # why a request finished with "error" (or "abort" by the server)
    logprob: Logprob | None = None       # the drawn token's, when the request asked for logprobs
    prompt_logprobs: list | None = None  # with the first token, when asked: None, then one Logprob per prompt token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _attempt(fn, *args):
    """fn(*args)[0], or the exception it raised."""
    try:
        return fn(*args)[0]
    except Exception as e:
        return e


class Engine:
    def __init__(self, runner: Runner, adapters: AdapterCache | None = None, eos_token_ids: Iterable[int] = (),
                 max_num_seqs: int = 16, max_batch_tokens: int = 512, max_queue: int = 256,
                 max_model_len: int | None = None, vocab_size: int | None = None, grammars: Grammars | None = None):
        self.runner, self.adapters, self.grammars = runner, adapters, grammars
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.max_model_len = min(runner.max_length, max_model_len or runner.max_length)
        self.vocab_size = vocab_size
        self.scheduler = Scheduler(adapters, max_num_seqs, max_batch_tokens, max_queue)
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: BaseException | None = None   # set when the loop itself failed: no more work
        self.counts = Counter()        # requests, tokens, steps, finish reasons: read by /metrics
        self.last_batch = (0, 0)       # (sequences, tokens) of the latest step

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, prompt: list[int], adapter: str | None = None, params: SamplingParams | None = None,
               callback: Callable[[Event], None] | None = None, matcher=None) -> str:
        """Queue a request; returns its id. Raises BadParam (400), UnknownAdapter (404), QueueFull (429),
        EngineUnavailable (503). The queue bound counts requests waiting for a row: a request the
        engine can admit now (a row is free) never gets QueueFull. A structured request's `matcher`
        may be made beforehand (off the caller's event loop); otherwise it is made here."""
        if self.failure is not None or self._stopping:
            raise EngineUnavailable("the engine is not running" + (f": it failed ({self.failure!r})"
                                                                     if self.failure is not None else ""))
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise BadParam("prompt", "the prompt is empty")
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in prompt):
            raise BadParam("prompt", f"token ids must lie in [0, {self.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise BadParam("prompt", f"the prompt has {len(prompt)} tokens; this model takes at most "
                                     f"{self.max_model_len - 1} (max_model_len = {self.max_model_len})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise BadParam("max_tokens", f"max_tokens = {params.max_tokens} with a {len(prompt)}-token prompt "
                                         f"exceeds max_model_len = {self.max_model_len}; ask for at most "
                                         f"{self.max_model_len - len(prompt)}")
        if adapter is not None and (self.adapters is None or adapter not in self.adapters):
            raise UnknownAdapter.named(adapter)
        if params.structured is not None and matcher is None:
            if self.grammars is None:
                raise BadParam(params.structured.param, f"{params.structured.param}: structured output is not "
                                                        "available on this server (it has no grammar engine)")
            matcher = self.grammars.matcher(params.structured)
        seq = Sequence(prompt, adapter, params, callback, matcher=matcher)
        with self._lock:
            free_rows = max(0, self.scheduler.max_num_seqs - len(self.scheduler.running))
            if self.queue_depth >= self.scheduler.max_queue + free_rows:
                self.counts["rejected_queue_full"] += 1
                raise QueueFull(f"{self.scheduler.max_queue} requests are already waiting for a row "
                                f"(max_queue = {self.scheduler.max_queue}, every one of the "
                                f"{self.scheduler.max_num_seqs} rows taken); retry later")
            self._inbox.append(seq)
            self.counts["requests"] += 1
            self.counts["prompt_tokens"] += len(prompt)
        self._wake.set()
        return seq.id

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone, timeout, stop string); it finishes with reason "abort" within a step."""
        self._aborts.append(request_id)
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.waiting or self.scheduler.running)

    # -- the engine thread --------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One scheduling round and (if anything can run) one forward; returns the events it emitted."""
        events = []
        with self._lock:
            while self._inbox:
                self.scheduler.add(self._inbox.popleft())
        while self._aborts:
            seq = self.scheduler.find(self._aborts.popleft())
            if seq is not None:
                events.append(self._finish(seq, None, "abort"))
        batch, failed = self.scheduler.schedule(self.runner.new_cache)
        for seq, error in failed:
            events.append(self._fail(seq, error))
        if not batch:
            return events
        batch, logits = self._forward(batch, events)              # logits: (len(batch), vocab)
        if not batch:
            return events
        batch, logits = self._score_prompts(batch, logits, events)
        if not batch:
            return events
        self.last_batch = (len(batch), sum(len(t) for _, t in batch))
        self.counts["steps"] += 1
        self.counts["batched_seqs"] += self.last_batch[0]
        self.counts["batched_tokens"] += self.last_batch[1]
        ready = []
        for row, (seq, tokens) in enumerate(batch):
            if not seq.decoding:
                seq.prefilled += len(tokens)
                if not seq.decoding:
                    continue                                      # more prompt to read first
            ready.append(row)
        if ready:
            seqs = [batch[row][0] for row in ready]
            raw = self._constrained(logits[ready], seqs)           # a copy: the grammar masks go in place
            rows, failed = self._processed(raw, seqs)
            drawn = sample(rows, [s.params for s in seqs], [s.generator for s in seqs])
            drawn = [failed.get(i, token) for i, token in enumerate(drawn)]
            scored = self._logprobs(raw, seqs, drawn)
            for seq, token in zip(seqs, drawn):
                lp = scored.get(seq.id)
                failure = token if isinstance(token, Exception) else lp if isinstance(lp, Exception) else None
                events.append(self._fail(seq, failure) if failure is not None else self._emit(seq, token, lp))
        return events

    def _processed(self, rows: torch.Tensor, seqs: list) -> tuple[torch.Tensor, dict[int, Exception]]:
        """The rows after each request's logit processors (penalties, bias, min_tokens); a row whose
        processing fails gets its exception (by row) and fails alone."""
        failed = {}
        if not any(seq.params.processed for seq in seqs):
            return rows, failed
        rows = rows.clone()
        for i, seq in enumerate(seqs):
            if seq.params.processed:
                try:
                    rows[i] = process(rows[i], seq.params, seq.prompt, seq.output, self.eos)
                except Exception as e:                 # a bug here must not take the batch with it
                    failed[i] = e
        return rows, failed

    def _constrained(self, rows: torch.Tensor, seqs: list) -> torch.Tensor:
        """The rows with each structured request's grammar mask applied (the others untouched); a
        request whose mask cannot be computed fails alone, as a row of NaN the sampler reports."""
        if any(seq.matcher is not None for seq in seqs):
            for i, seq in enumerate(seqs):
                try:
                    constrain(rows[i:i + 1], self.grammars, [seq.matcher])
                except Exception as e:
                    log.error("request %s: the grammar mask failed: %r", seq.id, e)
                    rows[i] = float("nan")
        return rows

    @staticmethod
    def _logprobs(logits, seqs: list, drawn: list) -> dict[str, Logprob]:
        """The drawn tokens' log-probabilities for the requests that asked, by request id (row i of
        `logits` is seqs[i]'s)."""
        want = [(row, seq, tok) for row, (seq, tok) in enumerate(zip(seqs, drawn))
                if seq.params.logprobs is not None and not isinstance(tok, Exception)]
        out = {}
        for k in {seq.params.logprobs for _, seq, _ in want}:           # one call per top-k size
            group = [(row, seq, tok) for row, seq, tok in want if seq.params.logprobs == k]
            try:
                scored = token_logprobs(logits[[row for row, _, _ in group]], [tok for _, _, tok in group], k)
            except Exception:                          # find the row at fault: it alone fails
                scored = [_attempt(token_logprobs, logits[row:row + 1], [tok], k) for row, _, tok in group]
            out.update((seq.id, lp) for (_, seq, _), lp in zip(group, scored))
        return out

    def _score_prompts(self, batch: list, logits: torch.Tensor, events: list) -> tuple[list, torch.Tensor]:
        """Prompt logprobs for the prefilling rows that asked; a row that fails here fails alone
        (returns the rows left and their logits)."""
        kept = []
        for row, (seq, _) in enumerate(batch):
            try:
                if seq.params.prompt_logprobs is not None and not seq.decoding:
                    self._prompt_logprobs(seq, seq.chunk.logits)
                kept.append(row)
            except Exception as e:
                events.append(self._fail(seq, e))
        if len(kept) == len(batch):
            return batch, logits
        return [batch[row] for row in kept], logits[kept]

    @staticmethod
    def _prompt_logprobs(seq: Sequence, logits: torch.Tensor) -> None:
        """Score the prompt tokens this prefill chunk predicts; position j's logits predict token j + 1."""
        start = seq.prefilled                                     # the chunk's first position (not yet counted)
        if start == 0:
            seq.prompt_lp = [None]                                # nothing predicts the first token
        targets = seq.prompt[start + 1:start + 1 + len(logits)]   # one short at the prompt's end
        seq.prompt_lp += token_logprobs(logits[:len(targets)], targets, seq.params.prompt_logprobs)

    def _forward(self, batch: list, events: list) -> tuple[list, torch.Tensor | None]:
        """Run the batch; when it raises, each chunk alone (forwards are all or nothing), failing only the
        sequences whose chunk fails by itself. Returns the batch that ran and its logits."""
        def chunk(seq, tokens):
            every = seq.params.prompt_logprobs is not None and not seq.decoding
            seq.chunk = Chunk(seq.cache, torch.tensor(tokens, dtype=torch.long), seq.slot, every)
            return seq.chunk
        try:
            return batch, self.runner.forward([chunk(s, t) for s, t in batch])
        except Exception as e:
            if len(batch) == 1:
                events.append(self._fail(batch[0][0], e))
                return [], None
            log.warning("a forward step of %d sequences failed (%r); retrying them one by one", len(batch), e)
        kept, rows = [], []
        for seq, tokens in batch:
            try:
                rows.append(self.runner.forward([chunk(seq, tokens)]))
                kept.append((seq, tokens))
            except Exception as e:
                events.append(self._fail(seq, e))
        return kept, (torch.cat(rows) if rows else None)

    def _fail(self, seq: Sequence, error: Exception) -> Event:
        where = f"adapter {seq.adapter!r}" if seq.adapter else "the base model"
        log.error("request %s (%s) failed: %r", seq.id, where, error)
        return self._finish(seq, None, "error", error)

    def _emit(self, seq: Sequence, token: int, logprob: Logprob | None = None) -> Event:
        try:
            complete = seq.matcher is not None and advance(seq.matcher, token)
        except Exception as e:
            return self._fail(seq, e)
        seq.output.append(token)
        seq.logprob = logprob
        self.counts["generation_tokens"] += 1
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        p = seq.params
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids or complete:
            return self._finish(seq, token, "stop")
        if len(seq.output) >= p.max_tokens or len(seq.prompt) + len(seq.output) >= self.max_model_len:
            return self._finish(seq, token, "length")
        event = self._event(seq, token)
        self._call(seq, event)
        return event

    @staticmethod
    def _event(seq: Sequence, token: int | None, reason: str | None = None, error: Exception | None = None) -> Event:
        first = token is not None and len(seq.output) == 1
        return Event(seq.id, token, reason, error, seq.logprob if token is not None else None,
                     seq.prompt_lp if first else None)

    def _finish(self, seq: Sequence, token: int | None, reason: str, error: Exception | None = None) -> Event:
        self.scheduler.finish(seq)
        self.counts[f"finished_{reason}"] += 1
        if reason in ("stop", "length"):          # where a completed request's time went, for /metrics
            now = time.monotonic()
            self.counts["timed_requests"] += 1
            self.counts["queue_seconds"] += seq.admitted - seq.arrived
            self.counts["first_token_seconds"] += seq.first_token - seq.arrived
            self.counts["request_seconds"] += now - seq.arrived
        event = self._event(seq, token, reason, error)
        self._call(seq, event)
        return event

    def _call(self, seq: Sequence, event: Event) -> None:
        if seq.callback is not None:
            try:
                seq.callback(event)
            except Exception:                                        # a listener's bug is not the engine's
                log.exception("callback of %s failed", seq.id)

    # -- running ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], adapters: list[str | None] | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """Run requests to completion on this thread (tests, benchmarks); each one's generated tokens.
        Not while `start()`'s thread runs: one thread steps the engine."""
        if self._thread is not None:
            raise RuntimeError("the engine runs on its background thread; submit requests instead of generate()")
        adapters = adapters or [None] * len(prompts)
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.submit(p, a, s) for p, a, s in zip(prompts, adapters, params)]
        out, errors, done = {i: [] for i in ids}, {}, set()
        while len(done) < len(ids) and self.has_work():
            for ev in self.step():
                if ev.request_id in out:
                    if ev.token is not None:
                        out[ev.request_id].append(ev.token)
                    if ev.error is not None:
                        errors[ev.request_id] = ev.error
                    if ev.finished:
                        done.add(ev.request_id)
            if not self.scheduler.running and self.scheduler.waiting:
                time.sleep(0.001)                                    # waiting on an adapter load
        if errors:
            raise next(iter(errors.values()))
        return [out[i] for i in ids]

    def start(self) -> "Engine":
        """Run steps on a background thread until `stop()` (tests, the demo: where speed is secondary)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Run steps on the calling thread until `stop()` (from another thread) or KeyboardInterrupt.
        `lorakit serve` runs the engine on the main thread, which loaded the model: torch's CPU thread
        pool belongs to the thread that first used it, and steps on another thread measured ~40%
        slower on 2 cores (the HTTP server runs on a background thread instead)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping, self._thread = False, threading.current_thread()
        interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            self._loop()
        finally:
            sys.setswitchinterval(interval)
            self._thread = None

    def stop(self) -> None:
        """Ask the loop to end; joins a thread `start()` made. Requests still queued finish as "abort"."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.name == "lorakit-engine":
            thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self.has_work():
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                ran = self.step()
                if not self.scheduler.running and self.scheduler.waiting and not ran:
                    self._wake.wait(0.002)                           # only adapter loads to wait for
                    self._wake.clear()
        except BaseException as e:      # the loop itself broke: say so everywhere, take no new work
            self.failure = e
            log.critical("the serving engine stopped: %r; in-flight requests fail, new ones get 503", e,
                         exc_info=True)
        finally:                                                     # on the engine's own thread
            with self._lock:
                while self._inbox:
                    self.scheduler.add(self._inbox.popleft())
                pending = [*self.scheduler.running, *self.scheduler.waiting]
            why = (RequestFailed(f"the serving engine failed: {self.failure!r}") if self.failure is not None
                   else EngineUnavailable("the server is shutting down"))
            for seq in pending:
                self._finish(seq, None, "error" if self.failure is not None else "abort", why)

    def metrics(self) -> dict:
        running = list(self.scheduler.running)
        return {**self.counts, "queue_depth": self.queue_depth, "healthy": self.failure is None, "running": len(running),
                "batch_seqs": self.last_batch[0], "batch_tokens": self.last_batch[1],
                "kv_cache_bytes": sum(s.cache.nbytes for s in running if s.cache is not None),
                "max_num_seqs": self.scheduler.max_num_seqs, "max_model_len": self.max_model_len}

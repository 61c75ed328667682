"""Which requests run in the next forward step, and how many tokens each feeds it (continuous batching).

Every step, in this order (as vLLM's scheduler does since v1):
1. admit waiting requests, oldest first, while fewer than `max_num_seqs` run. A request on an
   adapter joins only once its adapter is in RAM (its load was started on the loading threads when
   it arrived); then it takes a device slot. A request whose adapter is still loading, or finds every
   slot pinned, stays waiting without holding up the requests behind it.
2. give every decoding request one token of the step's budget (`max_batch_tokens`);
3. give what is left to prompts still being read, oldest first, in chunks (chunked prefill), so a
   long prompt never stalls the decoding requests beside it.
Requests leave the moment they finish; their slot pin and KV cache go with them.
What this does not do: run the model or sample (the engine does), or know about text and HTTP.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter_cache import AdapterCache, AdapterError, NoFreeSlot
from .sampling import SamplingParams, generator_for


class QueueFull(Exception):
    status = 429


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request as it moves through the engine."""
    prompt: list[int]
    adapter: str | None                     # None: the base model
    params: SamplingParams
    callback: Callable | None = None        # called on the engine thread with each Event
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrived: float = field(default_factory=time.monotonic)
    slot: int = -1                           # device slot while running (-1: base, or not placed yet)
    pinned: bool = False
    cache: object = None                     # the runner's SeqCache while running
    prefilled: int = 0                       # prompt tokens already in the cache
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    load: object = None                      # the adapter's load future while waiting on it
    admitted: float | None = None            # when it joined the running batch (its adapter in a slot)
    first_token: float | None = None
    chunk: object = None                     # the runner Chunk of the current step
    prompt_lp: list | None = None            # prompt log-probabilities so far, when asked for
    logprob: object = None                   # the latest drawn token's Logprob, when asked for
    matcher: object = None                   # the grammar matcher of a structured-output request

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)

    def next_tokens(self, budget: int) -> list[int]:
        """The tokens to feed next: the rest of the prompt (up to `budget`), else the last token drawn."""
        if self.decoding:
            return self.output[-1:]
        return self.prompt[self.prefilled:self.prefilled + budget]


class Scheduler:
    def __init__(self, adapters: AdapterCache | None = None, max_num_seqs: int = 16, max_batch_tokens: int = 512,
                 max_queue: int = 256):
        if max_num_seqs < 1 or max_batch_tokens < 1 or max_queue < 1:
            raise ValueError(f"max_num_seqs = {max_num_seqs}, max_batch_tokens = {max_batch_tokens} and "
                             f"max_queue = {max_queue} must all be >= 1")
        self.adapters = adapters
        self.max_num_seqs, self.max_batch_tokens, self.max_queue = max_num_seqs, max_batch_tokens, max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. The bound (`max_queue` waiting for a row) is the engine's to enforce at submit;
        here a sequence is never refused (it is already accepted)."""
        if seq.adapter is not None and self.adapters is not None:
            seq.load = self.adapters.prefetch(seq.adapter)     # reading from disk starts now, off this thread
        self.waiting.append(seq)

    def schedule(self, new_cache: Callable) -> tuple[list[tuple[Sequence, list[int]]], list[tuple[Sequence, Exception]]]:
        """The next step's (sequence, tokens to feed) pairs, and the waiting requests that failed to start."""
        failed = self._admit(new_cache)
        budget = self.max_batch_tokens
        batch = []
        for seq in sorted(self.running, key=lambda s: not s.decoding):    # decodes first, then prompts
            if budget <= 0:
                break
            tokens = seq.next_tokens(budget)
            batch.append((seq, tokens))
            budget -= len(tokens)
        return batch, failed

    def _admit(self, new_cache: Callable) -> list[tuple[Sequence, Exception]]:
        failed, kept = [], deque()
        while self.waiting:
            seq = self.waiting.popleft()
            if len(self.running) >= self.max_num_seqs:
                kept.append(seq)
                continue
            try:
                if seq.adapter is not None and not self._place(seq):
                    kept.append(seq)
                    continue
            except AdapterError as e:
                failed.append((seq, e))
                continue
            seq.cache = new_cache()
            seq.generator = generator_for(seq.params)
            seq.admitted = time.monotonic()
            self.running.append(seq)
        self.waiting = kept
        return failed

    def _place(self, seq: Sequence) -> bool:
        """Pin a slot for the sequence's adapter if it is in RAM; False while it is still loading or every
        slot is pinned; raises the load's error if the load failed."""
        if self.adapters is None:
            raise AdapterError(f"adapter {seq.adapter!r} requested, but this engine serves the base model only")
        if seq.load is not None and seq.load.done() and seq.load.exception() is not None:
            raise seq.load.exception()
        if not self.adapters.ready(seq.adapter):
            if seq.load is None or seq.load.done():           # evicted from RAM since: read it again
                seq.load = self.adapters.prefetch(seq.adapter)
            return False
        try:
            seq.slot = self.adapters.acquire(seq.adapter)
        except NoFreeSlot:
            return False
        seq.pinned, seq.load = True, None
        return True

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished, aborted or failed): unpin its slot, drop its KV cache."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if seq.pinned:
            self.adapters.release(seq.adapter)
            seq.pinned = False
        seq.cache = None

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in itertools.chain(self.running, self.waiting) if s.id == request_id), None)

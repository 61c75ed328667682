"""Prometheus metrics of the served stack, read from the engine's, the adapter cache's and the API's
counters at scrape time (nothing to keep in sync).
What this does not do: count anything itself (the engine, the cache and the API do).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

if TYPE_CHECKING:
    from .service import Service


class Collector:
    """Reads the engine's, the adapter cache's and the API's counters at scrape time."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self):
        served = self.service.served
        e, c = served.engine.metrics(), served.adapters.metrics()
        counters = {"requests": "requests accepted", "prompt_tokens": "prompt tokens accepted",
                    "generation_tokens": "tokens generated", "rejected_queue_full": "requests refused, queue full"}
        for key, doc in counters.items():
            yield CounterMetricFamily(f"lorakit_{key}", doc, value=e.get(key, 0))
        yield CounterMetricFamily("lorakit_client_disconnects", "requests aborted because their client went away",
                                  value=self.service.counts["client_disconnects"])
        yield CounterMetricFamily("lorakit_request_errors", "accepted requests that ended in an error answer",
                                  value=self.service.counts["request_errors"])
        finished = CounterMetricFamily("lorakit_requests_finished", "finished requests by reason", labels=["reason"])
        for reason in ("stop", "length", "abort", "error"):
            finished.add_metric([reason], e.get(f"finished_{reason}", 0))
        yield finished
        yield SummaryMetricFamily("lorakit_batch_sequences", "sequences per forward step",
                                  count_value=e.get("steps", 0), sum_value=e.get("batched_seqs", 0))
        yield SummaryMetricFamily("lorakit_batch_tokens", "tokens per forward step",
                                  count_value=e.get("steps", 0), sum_value=e.get("batched_tokens", 0))
        for key, doc in (("queue_seconds", "arrival to admission (adapter loaded, slot pinned)"),
                         ("first_token_seconds", "arrival to first token"),
                         ("request_seconds", "arrival to last token")):
            yield SummaryMetricFamily(f"lorakit_{key}", f"completed requests: {doc}",
                                      count_value=e.get("timed_requests", 0), sum_value=e.get(key, 0.0))
        gauges = {"queue_depth": "requests waiting", "running": "requests in the running batch",
                  "batch_seqs": "sequences in the latest step", "kv_cache_bytes": "bytes of KV cache held"}
        for key, doc in gauges.items():
            yield GaugeMetricFamily(f"lorakit_{key}", doc, value=e[key])
        yield GaugeMetricFamily("lorakit_healthy", "1 while the engine runs, 0 after it failed", value=e["healthy"])
        yield GaugeMetricFamily("lorakit_adapters_skipped", "adapter folders skipped at start-up",
                                value=len(served.skipped))
        for key in ("cpu_hits", "cpu_misses", "cpu_evictions", "device_hits", "device_misses", "device_evictions",
                    "loads", "load_errors"):
            yield CounterMetricFamily(f"lorakit_adapter_{key}", f"adapter cache: {key.replace('_', ' ')}",
                                      value=c[key])
        for key in ("registered", "cpu_adapters", "cpu_bytes", "active_adapters", "device_bytes", "device_slot_bytes",
                    "pinned", "loading"):
            yield GaugeMetricFamily(f"lorakit_adapter_{key}", f"adapter cache: {key.replace('_', ' ')}",
                                    value=c[key])

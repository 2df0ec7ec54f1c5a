"""Prometheus metrics of the server (prometheus-client), in a registry of their own.

`ServeMetrics()` holds: requests running and waiting (gauges, in sequences), prompt tokens
prefilled and taken from another slot's cache, generated tokens (counters), finished
sequences by reason, time to first token and inter-token latency (histograms, seconds), and
batch occupancy (histogram of the fraction of the slot pool decoding at each step).
`render()` gives the text format for GET /metrics.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("andromeda_requests_running", "Sequences holding a cache slot", registry=r)
        self.waiting = Gauge("andromeda_requests_waiting", "Sequences queued for a cache slot", registry=r)
        self.prompt_tokens = Counter("andromeda_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.prompt_tokens_reused = Counter("andromeda_prompt_tokens_reused",
                                            "Prompt tokens whose keys/values were copied from a running sequence "
                                            "with the same prefix instead of prefilled", registry=r)
        self.generation_tokens = Counter("andromeda_generation_tokens", "Tokens generated", registry=r)
        self.requests_finished = Counter("andromeda_sequences_finished", "Sequences finished, by reason",
                                         ["finish_reason"], registry=r)
        self.http_errors = Counter("andromeda_http_errors", "Requests refused, by HTTP status", ["status"],
                                   registry=r)
        self.ttft = Histogram("andromeda_time_to_first_token_seconds", "From submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("andromeda_inter_token_latency_seconds", "Between consecutive tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.batch_occupancy = Histogram("andromeda_batch_occupancy", "Fraction of cache slots decoding per step",
                                         buckets=(0.0625, 0.125, 0.25, 0.5, 0.75, 1.0), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

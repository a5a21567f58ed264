"""Prometheus metrics of one engine, in its own registry (several engines, e.g. in tests, never
collide); the server exposes `prometheus_client.generate_latest(engine.metrics.registry)`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a few ms (a cache hit on a GPU) to minutes (a long queue on a CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("flamingo_queue_length", "Requests waiting to join the decode batch", registry=r)
        self.running_sequences = Gauge("flamingo_running_sequences", "Sequences in the running decode batch",
                                       registry=r)
        self.generated_tokens = Counter("flamingo_generated_tokens", "Generated tokens (tokens/s = rate)",
                                        registry=r)
        self.time_to_first_token = Histogram("flamingo_time_to_first_token_seconds",
                                             "From submission to the first generated token", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.request_latency = Histogram("flamingo_request_latency_seconds", "From submission to the last delta",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.prefix_cache_hits = Counter("flamingo_prefix_cache_hits", "Prompts whose prefix state was cached",
                                         registry=r)
        self.prefix_cache_misses = Counter("flamingo_prefix_cache_misses", "Prompts whose prefix was encoded",
                                           registry=r)
        self.prefix_cache_evictions = Counter("flamingo_prefix_cache_evictions",
                                              "Prefix states dropped to stay within the byte bound", registry=r)
        self.prefix_cache_bytes = Gauge("flamingo_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r)
        self.image_cache_hits = Counter("flamingo_image_cache_hits", "Images whose visual tokens were cached",
                                        registry=r)
        self.image_cache_misses = Counter("flamingo_image_cache_misses", "Images encoded (not in the image cache)",
                                          registry=r)
        self.image_cache_evictions = Counter("flamingo_image_cache_evictions",
                                             "Images' visual tokens dropped to stay within the byte bound", registry=r)
        self.image_cache_bytes = Gauge("flamingo_image_cache_bytes", "Bytes held by the image cache", registry=r)
        self.requests_rejected = Counter("flamingo_requests_rejected", "Requests refused, by reason",
                                         ["reason"], registry=r)

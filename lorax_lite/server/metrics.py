"""Prometheus metrics for GET /metrics: per-request figures observed by the HTTP layer, and the
engine's own state (queues, KV blocks, batch sizes, adapter cache) from its latest snapshot at scrape time.
The engine's state is also reported under the `vllm:` names the Gateway API Inference Extension's endpoint
picker reads for load- and LoRA-affinity routing (its Model Server Protocol; see docs/architecture.md).

Each app has its own CollectorRegistry, so several apps can live in one process (tests). Label
values are bounded: `adapter` is the base model's name or an id the engine accepted, never raw input.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lorax_lite.engine.async_llm import BATCH_SIZE_BUCKETS, EngineSnapshot
from lorax_lite.engine.request import RequestOutput
from lorax_lite.lora.errors import CorruptWeightsError

PREFIX = "lorax"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
disable_created_metrics()  # no *_created series: they double the output and nobody graphs them

# Outcomes: finished; aborted (the client left, before or after its first token); timeout (its deadline passed);
# error (the request's own fault: a refused adapter, a failure isolated to it); server_error (the server's fault:
# a damaged adapter store, the engine stopped); shutdown (stopped by the drain's deadline).
OUTCOMES = ("finished", "aborted", "timeout", "error", "server_error", "shutdown")
FINISHED = {"length": "finished", "eos": "finished", "stop": "finished", "abort": "aborted", "error": "error",
            "timeout": "timeout"}


class ServerMetrics:
    """The app's metrics; `observe_finished` is called once per request that reached the engine."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "Requests that reached the engine, by adapter and outcome "
                                f"({', '.join(OUTCOMES)}; see docs/reliability.md).", ["adapter", "outcome"],
                                registry=self.registry)
        self.error_responses = Counter(f"{PREFIX}_http_error_responses",
                                       "Responses with a 4xx or 5xx status, by status.",
                                       ["status"], registry=self.registry)
        self.unhandled = Counter(f"{PREFIX}_unhandled_exceptions", "Exceptions no route handled (each answered with "
                                 "a JSON 500 when the response had not started; logged with the request id).",
                                 registry=self.registry)
        self.refused_connections = Counter(f"{PREFIX}_refused_connections",
                                           "Connections refused with a 503 past max_connections.",
                                           registry=self.registry)
        self.timed_out_connections = Counter(
            f"{PREFIX}_timed_out_connections", "Connections closed because a request's headers did not arrive in "
            "header_timeout, or requests answered 408 because the body did not arrive in body_timeout.",
            registry=self.registry)
        tenant_labels = ["tenant", "key", "adapter"]
        self.tenant_requests = Counter(f"{PREFIX}_tenant_requests", "Requests that reached the engine, by tenant, "
                                       "API key and adapter (what `lorax-lite usage` counts).", tenant_labels,
                                       registry=self.registry)
        self.tenant_prompt_tokens = Counter(f"{PREFIX}_tenant_prompt_tokens", "Prompt tokens, by tenant, API key "
                                            "and adapter.", tenant_labels, registry=self.registry)
        self.tenant_generated_tokens = Counter(f"{PREFIX}_tenant_generated_tokens", "Generated tokens, by tenant, "
                                               "API key and adapter.", tenant_labels, registry=self.registry)
        self.rate_limited = Counter(f"{PREFIX}_rate_limited_requests", "Requests refused with a 429 by their API "
                                    "key's rate limits, by tenant and key.", ["tenant", "key"], registry=self.registry)
        self.queue_time = self._latency("request_queue_seconds", "Time from arrival to first scheduled step.")
        self.ttft = self._latency("time_to_first_token_seconds", "Time from arrival to the first generated token.")
        self.tpot = self._latency("time_per_output_token_seconds",
                                  "Mean time between output tokens after the first, per request.")
        self.e2e = self._latency("request_latency_seconds", "Time from arrival to the last token.")
        self.prompt_tokens = Histogram(f"{PREFIX}_request_prompt_tokens", "Prompt tokens per request.", ["adapter"],
                                       buckets=TOKEN_BUCKETS, registry=self.registry)
        self.generated_tokens = Histogram(f"{PREFIX}_request_generated_tokens", "Generated tokens per request.",
                                          ["adapter"], buckets=TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(snapshot))

    def _latency(self, name: str, documentation: str) -> Histogram:
        return Histogram(
            f"{PREFIX}_{name}", documentation, ["adapter"], buckets=LATENCY_BUCKETS, registry=self.registry
        )

    def observe_error_status(self, status: int) -> None:
        self.error_responses.labels(str(status)).inc()

    def observe_usage(self, tenant: str, key: str, adapter: str, prompt_tokens: int, generated_tokens: int) -> None:
        self.tenant_requests.labels(tenant, key, adapter).inc()
        self.tenant_prompt_tokens.labels(tenant, key, adapter).inc(prompt_tokens)
        self.tenant_generated_tokens.labels(tenant, key, adapter).inc(generated_tokens)

    def observe_rate_limited(self, tenant: str, key: str) -> None:
        self.rate_limited.labels(tenant, key).inc()

    def observe_unanswered(self, adapter: str, exc: BaseException) -> None:
        """Count a request that ended before its first output: the client left (aborted), or the engine could
        not take it (server_error). A request refused as invalid (ValueError) is a 4xx, not counted here."""
        if isinstance(exc, asyncio.CancelledError):
            self.requests.labels(adapter, "aborted").inc()
        elif not isinstance(exc, ValueError):
            self.requests.labels(adapter, "server_error").inc()

    def observe_finished(self, adapter: str, out: RequestOutput, outcome: str | None = None) -> None:
        """Count a request that left the engine (finished, failed or aborted) and its timings; `outcome`
        overrides the one its finish reason gives."""
        if outcome is None:
            outcome = FINISHED.get(out.finish_reason or "abort", "aborted")
            if outcome == "error" and isinstance(out.exception, CorruptWeightsError):
                outcome = "server_error"
        self.requests.labels(adapter, outcome).inc()
        self.prompt_tokens.labels(adapter).observe(len(out.prompt_token_ids))
        self.generated_tokens.labels(adapter).observe(out.num_generated_tokens)
        m = out.metrics
        if m is None:
            return
        if m.queue_time is not None:
            self.queue_time.labels(adapter).observe(m.queue_time)
        if m.time_to_first_token is not None:
            self.ttft.labels(adapter).observe(m.time_to_first_token)
        if m.finished_time is not None:
            self.e2e.labels(adapter).observe(m.finished_time - m.arrival_time)
            if m.first_token_time is not None and out.num_generated_tokens > 1:
                per_token = (m.finished_time - m.first_token_time) / (out.num_generated_tokens - 1)
                self.tpot.labels(adapter).observe(per_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector:
    """Reports the engine's latest snapshot when scraped."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator:
        snap = self.snapshot()
        stats = snap.stats
        yield _gauge("num_requests_waiting", "Requests waiting to be scheduled.", snap.num_waiting)
        yield _gauge("num_requests_running", "Requests in the running batch.", snap.num_running)
        yield from _inference_gateway(snap)
        yield _gauge("kv_blocks_used", "KV cache blocks in use.", snap.num_kv_blocks_used)
        yield _gauge("kv_blocks_total", "KV cache blocks.", snap.num_kv_blocks)
        yield _counter("preemptions", "Requests preempted (KV cache full) and recomputed later.", snap.num_preemptions)
        yield from _prefix_cache(snap)
        yield _counter("engine_steps", "Forward passes.", stats.steps)
        yield _counter("batched_tokens", "Tokens run through the model.", stats.batched_tokens)
        cumulative, buckets = 0, []
        for bound, count in zip(BATCH_SIZE_BUCKETS, stats.batch_size_buckets, strict=True):
            cumulative += count
            buckets.append((str(bound), cumulative))
        buckets.append(("+Inf", stats.steps))
        yield HistogramMetricFamily(f"{PREFIX}_batch_size", "Sequences per forward pass.", buckets=buckets,
                                    sum_value=stats.batch_size_sum)
        adapters = snap.adapter_cache
        if adapters is None:
            return
        cache = adapters.stats
        yield _gauge("adapters_in_slots", "Adapters in device slots.", sum(k is not None for k in adapters.slot_keys))
        yield _gauge("adapters_in_host", "Adapters cached in host memory.", len(adapters.host_keys))
        yield _counter("adapter_slot_hits", "Requests whose adapter was already in a device slot.", cache.slot_hits)
        yield _counter("adapter_host_hits", "Adapters copied from host memory into a slot.", cache.host_hits)
        yield _counter("adapter_misses", "Adapters loaded from disk.", cache.misses)
        yield _counter("adapter_load_failures", "Adapter loads that failed.", cache.load_failures)
        yield _counter("adapter_evictions", "Adapters moved out of a device slot to make room.", cache.evictions)
        yield _counter("adapter_host_evictions", "Adapters dropped from host memory to make room.",
                       cache.host_evictions)
        yield _counter("adapter_load_seconds", "Time spent loading adapters from disk.", cache.load_seconds)
        yield _counter("adapter_slot_load_seconds", "Time spent copying adapters into slots.", cache.slot_load_seconds)


def _prefix_cache(snap: EngineSnapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    cache = snap.prefix_cache
    yield _counter("prefix_cache_queries", "Tokens looked up in the prefix cache when requests were admitted "
                   "(prompts, and what preempted requests had generated).", cache.stats.num_queried_tokens)
    yield _counter("prefix_cache_hits", "Tokens found in the prefix cache (not computed again).",
                   cache.stats.num_hit_tokens)
    yield _gauge("prefix_cache_blocks", "KV cache blocks holding prefix-cached K/V (in use or evictable).",
                 cache.num_cached_blocks)


def _inference_gateway(snap: EngineSnapshot) -> Iterator[GaugeMetricFamily]:
    """The engine's queues, KV cache use and adapters under the names the Gateway API Inference Extension's
    endpoint picker scrapes (vLLM's, its defaults)."""
    yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be scheduled.", value=snap.num_waiting)
    yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch.", value=snap.num_running)
    usage = snap.num_kv_blocks_used / snap.num_kv_blocks if snap.num_kv_blocks else 0.0
    yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", value=usage)
    yield GaugeMetricFamily("vllm:gpu_cache_usage_perc", "Fraction of KV cache blocks in use (0-1); the older name "
                            "of vllm:kv_cache_usage_perc.", value=usage)
    max_loras = 0 if snap.adapter_cache is None else len(snap.adapter_cache.slot_keys)
    info = GaugeMetricFamily("vllm:lora_requests_info", "Adapters of the running and waiting requests (ids, "
                             "comma-separated) and max_loras; the value is the time of the scrape (Unix seconds).",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    info.add_metric([str(max_loras), ",".join(snap.running_adapters), ",".join(snap.waiting_adapters)], time.time())
    yield info


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)

"""The server's Prometheus metrics (``GET /metrics``), with vLLM's names under the ``flashserve:`` prefix.

Gauges: ``num_requests_running``, ``num_requests_waiting``, ``kv_cache_usage_perc`` (fraction 0–1 of the KV blocks
held by requests). Counters: ``prompt_tokens_total`` (prompt tokens computed, i.e. not read from the prefix
cache), ``generation_tokens_total``, ``num_preemptions_total``, ``prefix_cache_queries_total`` and
``prefix_cache_hits_total`` (in tokens), ``request_success_total{finished_reason}`` ("stop", "length", "abort").
Histograms (seconds): ``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``e2e_request_latency_seconds``.

The per-request times are recorded when the driver adds a request or aborts one (in the engine thread) and when
an output has been detokenized (in its event loop's thread); the gauges and counters from the engine's own
statistics at each scrape (the counters advance by what the statistics gained since the previous scrape, so a
prefix-cache reset never makes them go back).
"""
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from flashserve.engine.llm_engine import LLMEngine
from flashserve.outputs import RequestOutput

PREFIX = "flashserve:"
LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0)


class ServerMetrics:
    """The metrics of one server (their own registry, so that several servers in one process do not collide)."""

    def __init__(self, served_model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": served_model_name}

        def gauge(name, doc):
            return Gauge(PREFIX + name, doc, labelnames=list(labels), registry=self.registry).labels(**labels)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, labelnames=list(labels), registry=self.registry).labels(**labels)

        def histogram(name, doc):
            return Histogram(PREFIX + name, doc, labelnames=list(labels), buckets=LATENCY_BUCKETS_S,
                             registry=self.registry).labels(**labels)

        self.running = gauge("num_requests_running", "Requests being computed.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled (or preempted).")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of the KV-cache blocks held by requests (0-1).")
        self._engine_counters = {
            "prompt_tokens": counter("prompt_tokens", "Prompt tokens computed (recomputation after preemption too)."),
            "generation_tokens": counter("generation_tokens", "Tokens generated."),
            "preemptions": counter("num_preemptions", "Requests preempted (to be recomputed)."),
            "prefix_queries": counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
            "prefix_hits": counter("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
        }
        self._last_totals = dict.fromkeys(self._engine_counters, 0)
        self._success = Counter(PREFIX + "request_success", "Requests finished, by finish reason.",
                                labelnames=[*labels, "finished_reason"], registry=self.registry)
        self._model_name = served_model_name
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between two generated tokens of a request.")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.")
        self._arrival: dict[str, float] = {}
        self._last_token: dict[str, float] = {}

    def on_added(self, request_ids: list[str]) -> None:
        """Requests entered the engine now."""
        now = time.perf_counter()
        for request_id in request_ids:
            self._arrival[request_id] = now

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs were handed over now."""
        now = time.perf_counter()
        for output in outputs:
            request_id = output.request_id
            arrival = self._arrival.get(request_id)
            if arrival is None:
                continue
            new_tokens = sum(len(completion.token_ids) for completion in output.outputs)
            last = self._last_token.get(request_id)
            if new_tokens:
                if last is None:
                    self.ttft.observe(now - arrival)
                else:
                    for _ in range(new_tokens):
                        self.itl.observe((now - last) / new_tokens)
                self._last_token[request_id] = now
            if output.finished:
                self.e2e.observe(now - arrival)
                reason = output.outputs[0].finish_reason or "stop"
                self._success.labels(model_name=self._model_name, finished_reason=reason).inc()
                self._forget(request_id)

    def on_aborted(self, request_ids: list[str]) -> None:
        """Requests left the engine unfinished (client gone, server closing)."""
        for request_id in request_ids:
            if request_id in self._arrival:
                self._success.labels(model_name=self._model_name, finished_reason="abort").inc()
                self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._arrival.pop(request_id, None)
        self._last_token.pop(request_id, None)

    def render(self, engine: LLMEngine) -> bytes:
        """The metrics in Prometheus' text format, the gauges and counters read from ``engine`` now."""
        scheduler, manager = engine.scheduler, engine.block_manager
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.kv_usage.set(1.0 - manager.num_free_blocks / manager.num_blocks)
        totals = {"prompt_tokens": engine.stats.prefill_tokens, "generation_tokens": engine.stats.generated_tokens,
                  "preemptions": scheduler.num_preemptions, "prefix_queries": manager.num_queried_tokens,
                  "prefix_hits": manager.num_hit_tokens}
        for name, total in totals.items():
            gained = total - self._last_totals[name]
            self._engine_counters[name].inc(gained if gained >= 0 else total)  # a reset restarts the statistic
            self._last_totals[name] = total
        return generate_latest(self.registry)

"""Prometheus metrics under the names vLLM users already chart (`vllm:*`), plus pagoda's exact block counts.

Updated from the engine thread after every step (prometheus_client is thread-safe); served by GET /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagoda.engine.llm_engine import EngineStats, LLMEngine
from pagoda.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                          0.5, 0.75, 1.0, 2.5, 5.0)
_REQUEST_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch (one per sample).")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled (one per sample).")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (0-1).")
        self.kv_blocks_total = gauge("pagoda:kv_cache_blocks_total", "KV-cache blocks in the pool.")
        self.kv_blocks_used = gauge("pagoda:kv_cache_blocks_used", "KV-cache blocks held by requests.")
        self.preemptions = counter("vllm:num_preemptions", "Requests preempted (recomputed later) for lack of blocks.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of requests that produced output.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Mean time per output token after the first.",
                              _TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.",
                                    _LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds", "First scheduled to first token.",
                                      _LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds", "First token to finish.", _LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                                               _REQUEST_TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Generated tokens per finished request (all n samples).",
            _REQUEST_TOKEN_BUCKETS)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total", "Tokens computed per engine step.",
                                          _ITERATION_TOKEN_BUCKETS)
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache (on admission).")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        # memory, per rank (the largest rank's figure), set once the engine is loaded
        self.weight_bytes = gauge("pagoda:weight_bytes", "Bytes of the weights (parameters and buffers) per rank.")
        self.kv_cache_bytes = gauge("pagoda:kv_cache_bytes", "Bytes of the KV cache per rank.")
        self.kv_cache_tokens = gauge("pagoda:kv_cache_tokens", "Tokens the KV cache holds.")
        self.kv_bytes_per_token = gauge("pagoda:kv_cache_bytes_per_token", "KV-cache bytes per token per rank.")
        self.activation_bytes = gauge("pagoda:activation_reserve_bytes",
                                      "Memory kept free for the largest step's activations per rank: the larger "
                                      "of the planner's formula and the measured peak.")
        self.activation_measured = gauge("pagoda:activation_measured_bytes",
                                         "Resident memory the largest step added when measured at load, per rank "
                                         "(0: not measured on this device).")
        self.max_concurrency = gauge("pagoda:max_concurrency",
                                     "Requests of max_model_len tokens the KV cache holds at once.")
        self._model_name = model_name
        self._preemptions_seen = 0
        self._steps_seen = 0
        self._prefix_queries_seen = 0
        self._prefix_hits_seen = 0
        self._first_token_seen: set[str] = set()

    def on_engine_ready(self, engine: LLMEngine) -> None:
        plans = engine.plans
        self.weight_bytes.set(max(p.weight_bytes for p in plans))
        self.kv_cache_bytes.set(max(p.kv_cache_bytes for p in plans))
        self.kv_cache_tokens.set(engine.kv_layout.num_tokens)
        self.kv_bytes_per_token.set(max(p.kv_bytes_per_token for p in plans))
        self.activation_bytes.set(max(p.activation_reserve_bytes for p in plans))
        self.activation_measured.set(max(p.activation_measured_bytes or 0 for p in plans))
        self.max_concurrency.set(engine.max_concurrency)
        self.kv_blocks_total.set(engine.kv_layout.num_blocks)

    def on_step(self, stats: EngineStats, outputs: list[RequestOutput]) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_blocks_total.set(stats.num_blocks)
        self.kv_blocks_used.set(stats.num_blocks - stats.num_free_blocks)
        if stats.num_preemptions_total > self._preemptions_seen:
            self.preemptions.inc(stats.num_preemptions_total - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions_total
        if stats.num_steps_total > self._steps_seen:  # called once per step, or after aborts (no step)
            self._steps_seen = stats.num_steps_total
            self.iteration_tokens.observe(stats.last_step_num_tokens)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries_total - self._prefix_queries_seen)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits_total - self._prefix_hits_seen)
        self._prefix_queries_seen, self._prefix_hits_seen = (stats.prefix_cache_queries_total,
                                                             stats.prefix_cache_hits_total)
        for out in outputs:
            generated = sum(len(o.delta_token_ids) for o in out.outputs)
            if generated:
                self.generation_tokens.inc(generated)
            prefilled = out.num_generated_tokens or out.prompt_logprobs is not None  # max_tokens 0: no tokens
            if out.request_id not in self._first_token_seen and prefilled:
                self._first_token_seen.add(out.request_id)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
            if out.finished:
                self._first_token_seen.discard(out.request_id)
                self._observe_finished(out)

    def _observe_finished(self, out: RequestOutput) -> None:
        for sample in out.outputs:
            self.success.labels(self._model_name, sample.finish_reason or "abort").inc()
        m = out.metrics
        if m is None or m.finished_time is None:
            return
        self.e2e.observe(m.finished_time - m.arrival_time)
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        self.request_generation_tokens.observe(out.num_generated_tokens)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            self.decode_time.observe(m.finished_time - m.first_token_time)
            if m.first_scheduled_time is not None:
                self.prefill_time.observe(m.first_token_time - m.first_scheduled_time)
            longest = max(len(o.token_ids) for o in out.outputs)
            if longest > 1 and m.last_token_time is not None:
                self.tpot.observe((m.last_token_time - m.first_token_time) / (longest - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)

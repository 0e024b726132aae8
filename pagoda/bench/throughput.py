"""`pagoda bench throughput`: the offline engine's throughput on a workload, every request submitted at once.

Requests are greedy and ignore EOS, so each generates exactly its output length (unless the context window is
smaller). The clock runs from the first submission to the last finished request; loading the model is not timed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from pagoda.bench.workload import BenchmarkError, BenchRequest

logger = logging.getLogger("pagoda")


@dataclass(frozen=True)
class ThroughputResult:
    num_requests: int
    failed: int
    elapsed_s: float
    total_input_tokens: int
    total_output_tokens: int

    @property
    def requests_per_s(self) -> float:
        return (self.num_requests - self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.total_output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def total_tokens_per_s(self) -> float:
        return (self.total_input_tokens + self.total_output_tokens) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "requests_per_s": self.requests_per_s, "output_tokens_per_s": self.output_tokens_per_s,
                "total_tokens_per_s": self.total_tokens_per_s}

    def format(self) -> str:
        width = 52
        rows = [
            ("Elapsed (s)", f"{self.elapsed_s:.2f}"),
            ("Requests", str(self.num_requests)),
            ("Failed requests", str(self.failed)),
            ("Total input tokens", str(self.total_input_tokens)),
            ("Total output tokens", str(self.total_output_tokens)),
            ("Request throughput (req/s)", f"{self.requests_per_s:.2f}"),
            ("Output token throughput (tok/s)", f"{self.output_tokens_per_s:.2f}"),
            ("Total token throughput (tok/s)", f"{self.total_tokens_per_s:.2f}"),
        ]
        lines = [" Offline throughput ".center(width, "="), *(f"{name:<38}{value:>14}" for name, value in rows)]
        return "\n".join([*lines, "=" * width])


def run_throughput_benchmark(engine, requests: Sequence[BenchRequest], progress: bool = True) -> ThroughputResult:
    """Submit every request to `engine` (an LLMEngine with no other requests), then step until all finish."""
    from tqdm import tqdm

    from pagoda.sampling_params import SamplingParams

    if not requests:
        raise BenchmarkError("the workload is empty")
    start = time.perf_counter()
    for index, request in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
        engine.add_request(f"bench-{index}", request.prompt, params)
    finals = {}
    with tqdm(total=len(requests), desc="requests", unit="req", disable=not progress) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id not in finals:
                    finals[out.request_id] = out
                    bar.update(1)
    elapsed = time.perf_counter() - start
    failed = [out for out in finals.values() if out.error is not None]
    for out in failed:
        logger.warning("request %s failed: %s", out.request_id, out.error)
    succeeded = [out for out in finals.values() if out.error is None]
    return ThroughputResult(
        num_requests=len(requests), failed=len(failed), elapsed_s=elapsed,
        total_input_tokens=sum(len(out.prompt_token_ids) for out in succeeded),
        total_output_tokens=sum(out.num_generated_tokens for out in succeeded))

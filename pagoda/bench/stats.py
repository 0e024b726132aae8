"""From per-request measurements to the summary of a serving benchmark: throughput and latency distributions.

Latencies are measured in seconds and reported in milliseconds. Percentiles interpolate linearly between the
closest ranks (numpy's default), so p50 of [1, 2, 3, 4] is 2.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request as the client saw it. Latencies in seconds; None when not measured (e.g. a failed request)."""

    index: int  # position in the workload
    prompt_len: int  # tokens, as the workload counted them
    output_len: int  # max_tokens asked for
    success: bool = False
    error: str | None = None
    prompt_tokens: int | None = None  # as the server's usage reported them, when it did
    output_tokens: int = 0  # the server's usage count when reported, else the number of content chunks
    ttft: float | None = None  # time to the first non-empty content chunk
    e2e: float | None = None  # time to the end of the response
    itl: list[float] = field(default_factory=list)  # gaps between consecutive content chunks

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if not self.success or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def input_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.prompt_len

    def to_json(self) -> dict:
        return {**asdict(self), "tpot": self.tpot}


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of one latency, in milliseconds; all None when nothing was measured."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Distribution:
        if len(values) == 0:
            return cls(0, None, None, None, None)
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(len(ms), float(ms.mean()), p50, p90, p99)


@dataclass(frozen=True)
class ServeSummary:
    """Token counts and latencies cover the completed (successful) requests only."""

    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second
    total_token_throughput: float  # input + output tokens per second
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution  # pooled over every gap of every completed request
    e2e_ms: Distribution

    def to_json(self) -> dict:
        return asdict(self)


def summarize(records: Sequence[RequestRecord], duration_s: float) -> ServeSummary:
    done = [r for r in records if r.success]
    input_tokens = sum(r.input_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    per_second = 1.0 / duration_s if duration_s > 0 else 0.0
    return ServeSummary(
        duration_s=duration_s,
        completed=len(done),
        failed=len(records) - len(done),
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(done) * per_second,
        output_throughput=output_tokens * per_second,
        total_token_throughput=(input_tokens + output_tokens) * per_second,
        ttft_ms=Distribution.of_seconds([r.ttft for r in done if r.ttft is not None]),
        tpot_ms=Distribution.of_seconds([r.tpot for r in done if r.tpot is not None]),
        itl_ms=Distribution.of_seconds([gap for r in done for gap in r.itl]),
        e2e_ms=Distribution.of_seconds([r.e2e for r in done if r.e2e is not None]),
    )


def format_summary(summary: ServeSummary, title: str = "Serving benchmark") -> str:
    """A fixed-width table for the terminal."""
    width = 52
    rows = [
        ("Duration (s)", f"{summary.duration_s:.2f}"),
        ("Completed requests", str(summary.completed)),
        ("Failed requests", str(summary.failed)),
        ("Total input tokens", str(summary.total_input_tokens)),
        ("Total output tokens", str(summary.total_output_tokens)),
        ("Request throughput (req/s)", f"{summary.request_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{summary.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{summary.total_token_throughput:.2f}"),
    ]
    lines = [f" {title} ".center(width, "="), *(f"{name:<38}{value:>14}" for name, value in rows)]
    header = f"{'(ms)':<12}" + "".join(f"{name:>10}" for name in ("mean", "p50", "p90", "p99"))
    lines += ["-" * width, header]
    for name, dist in (("TTFT", summary.ttft_ms), ("TPOT", summary.tpot_ms), ("ITL", summary.itl_ms),
                       ("E2E", summary.e2e_ms)):
        values = (dist.mean, dist.p50, dist.p90, dist.p99)
        lines.append(f"{name:<12}" + "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in values))
    lines.append("=" * width)
    return "\n".join(lines)

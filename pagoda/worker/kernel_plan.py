"""KernelPlan: which path each quantized linear layer takes for a call of a given number of rows, chosen by timing
the candidates on this model's own shapes on the CPU it runs on, not by assuming what the CPU is good at.

Candidates per layer shape (out x in features and weight format):
- the compiled kernel (pagoda/kernels/quant_linear.cpp, built for this CPU): reads each packed weight byte once per
  call, so it wins while a call is bound by memory (decode: few rows);
- a bf16 GEMM on the dequantized weight (layers/quantized.dense_bf16_gemm: bf16 products, fp32 sums and output):
  on a CPU with AMX or AVX512-BF16, pagoda/kernels/bf16_gemm.h on a weight packed once in bf16; elsewhere torch's
  oneDNN on an fp32 copy (emulated, slowly, and the measurement says so). It wins
  once a call is bound by arithmetic (prefill chunks, large decode batches) on CPUs with bf16 units.

For each shape the plan is a row threshold: bf16 from the smallest bucket (powers of two up to the largest call the
scheduler makes) at which bf16 is faster there and at every larger bucket; None: the kernel at every size. The
buckets are timed from the largest down and the search stops at the first bucket bf16 loses, so a CPU without bf16
units pays about one call per shape. Calls timed alone find weights warm in the caches and pay no callback, so the
decoder choices are then checked on whole decode steps of the native stack (`check_steps`: kernels only against
the plan at each candidate size), which raises the decoder thresholds to the first size whole steps gain from. A
plan is measured once per machine, model and kernel build and cached as JSON under $PAGODA_HOME/kernel-plans/; a
warm start reads it.

Modes (`--kernel-plan`): "kernel" (the default: the compiled kernels at every size), "auto" (measured or cached),
"bf16:N" (bf16 from N rows on, every layer: an override). Why "auto" is not the default although it meets the
fidelity bar on SmolLM2 (against fp32 weights: 8 of 8 identical 64-token greedy outputs, mean |delta logprob| 0.0061
< 0.01; benchmarks/quantized_e2e.py, BENCHMARKS.md stop 18): a call's path depends on the number of rows in the
step, so a request's numbers depend on what else runs beside it and on preemption (a recomputed token may take the
other path). The kernels give every output row bit-identical whatever the batch, which the default promises
(tests/test_server.py: seeded n=2 samples equal with other requests in flight; tests/test_smollm2.py: greedy under
preemption equals transformers'); both fail under "auto" on an AMX machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pagoda import kernels
from pagoda.layers.quantized import (
    Bf16Linear,
    QuantizedLinear,
    dense_bf16_gemm,
    dense_bf16_weight,
    packed_bf16_kernel,
)
from pagoda.model_store import store_root

logger = logging.getLogger("pagoda")

MIN_BUCKET = 8  # below this a call is memory-bound on every CPU seen: the kernel, unmeasured
REPEATS = 3  # timed calls per candidate and bucket (the fastest counts), after one untimed warm-up call
FORMAT_VERSION = 2  # of the cached JSON


@dataclass(frozen=True)
class ShapeChoice:
    """The choice for one layer shape: `bf16_min_rows` (None: the kernel at every size) and the timings it was made
    from, (rows, kernel seconds, bf16 seconds or None when not timed)."""

    fmt: str  # the weight format: "q4a16", "q4a8", "int8" or "bf16"
    n: int
    k: int
    bf16_min_rows: int | None
    timings: tuple[tuple[int, float, float | None], ...] = ()
    head: bool = False  # the LM head's shape (outside the native stack)


@dataclass(frozen=True)
class StepCheck:
    """The per-shape choices checked on whole decode steps of the native stack: the bf16 paths start at `floor`
    tokens (None: never); `timings`: (tokens, seconds on the kernels only, seconds on the plan)."""

    floor: int | None
    timings: tuple[tuple[int, float, float], ...] = ()


@dataclass(frozen=True)
class KernelPlan:
    mode: str  # "auto", "kernel" or "bf16:N"
    source: str  # where the choices come from: "measured in 1.2 s", "cached (path)", "override", ...
    shapes: tuple[ShapeChoice, ...]
    step: StepCheck | None = None  # set by check_steps (auto plans with a native stack)
    cache_path: Path | None = None  # where an auto plan is cached

    @property
    def needs_step_check(self) -> bool:
        """An auto plan in which some decoder shape takes a bf16 path, not yet checked on whole steps."""
        return (self.mode == "auto" and self.step is None
                and any(s.bf16_min_rows is not None and not s.head for s in self.shapes))

    def min_rows(self, layer: QuantizedLinear) -> int | None:
        key = (layer_format(layer), layer.out_features, layer.padded_in_features)
        return next((s.bf16_min_rows for s in self.shapes if (s.fmt, s.n, s.k) == key), None)

    def apply(self, model: nn.Module) -> None:
        for layer in quantized_layers(model):
            layer.use_bf16(self.min_rows(layer))

    def summary(self) -> str:
        if not self.shapes:
            return f"{self.mode}: {self.source}"
        parts = [f"{s.fmt} {s.n}x{s.k} " + ("kernel" if s.bf16_min_rows is None else f"bf16 from {s.bf16_min_rows}")
                 for s in self.shapes]
        if self.step is not None:
            parts.append("decoder bf16 " + ("never" if self.step.floor is None else f"from {self.step.floor}")
                         + " after the step check")
        return f"{self.mode} ({self.source}): {', '.join(parts)}"

    def table(self) -> str:
        """The timings as a human-readable table (`pagoda kernel-plan`)."""
        lines = [f"kernel plan {self.mode} ({self.source}); CPU {kernels.host_isa() or 'unknown ISA'}, "
                 f"{torch.get_num_threads()} threads; bf16 path: {bf16_path()}",
                 f"{'layer':<22}{'rows':>6}{'kernel ms':>12}{'bf16 ms':>10}"]
        for s in self.shapes:
            choice = "kernel only" if s.bf16_min_rows is None else f"bf16 from {s.bf16_min_rows} rows"
            lines.append(f"{s.fmt} {s.n}x{s.k}: {choice}")
            for rows, kernel_s, bf16_s in s.timings:
                bf16 = "-" if bf16_s is None else f"{bf16_s * 1e3:.3f}"
                lines.append(f"{'':<22}{rows:>6}{kernel_s * 1e3:>12.3f}{bf16:>10}")
        if self.step is not None:
            lines.append("decode steps of the native stack, kernels only vs this plan: bf16 paths "
                         + ("never" if self.step.floor is None else f"from {self.step.floor} tokens"))
            lines.append(f"{'':<22}{'tokens':>6}{'kernels ms':>12}{'plan ms':>10}")
            for tokens, kernel_s, plan_s in self.step.timings:
                lines.append(f"{'':<22}{tokens:>6}{kernel_s * 1e3:>12.3f}{plan_s * 1e3:>10.3f}")
        return "\n".join(lines)


def bf16_path() -> str:
    """Which bf16 GEMM the plan's bf16 choices run here."""
    kernel = packed_bf16_kernel()
    return {"amx": "the AMX kernel", "avx512bf16": "the AVX512-BF16 kernel"}.get(kernel, "oneDNN on an fp32 copy")


def layer_format(layer: QuantizedLinear) -> str:
    if isinstance(layer, Bf16Linear):
        return "bf16"
    activations = getattr(layer, "activations", None)
    return "int8" if activations is None else f"q4a{activations.removeprefix('int')}"


def quantized_layers(model: nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def parse_mode(mode: str) -> int | None:
    """Validate a --kernel-plan value; returns N for "bf16:N", else None. Raises ValueError."""
    if mode in ("auto", "kernel"):
        return None
    if mode.startswith("bf16:"):
        try:
            rows = int(mode.removeprefix("bf16:"))
        except ValueError:
            rows = 0
        if rows >= 1:
            return rows
    raise ValueError(f"kernel plan {mode!r} is not one of auto, kernel, bf16:N (N >= 1: bf16 GEMMs from N rows on)")


def _distinct_shapes(model: nn.Module) -> dict[tuple[str, int, int], QuantizedLinear]:
    shapes: dict[tuple[str, int, int], QuantizedLinear] = {}
    for layer in quantized_layers(model):
        shapes.setdefault((layer_format(layer), layer.out_features, layer.padded_in_features), layer)
    return shapes


def _buckets(largest: int) -> list[int]:
    buckets, rows = [], MIN_BUCKET
    while rows < largest:
        buckets.append(rows)
        rows *= 2
    return [*buckets, largest] if largest >= MIN_BUCKET else []


def _seconds(fn, x: torch.Tensor, budget: float | None = None) -> float:
    """The fastest of REPEATS calls after an untimed warm-up call; a first timed call slower than `budget` is the
    answer (no repeats). The warm-up is never the answer: a path's first call in a process pays one-off costs
    (oneDNN creates and JITs its primitive for the shape, the kernel asks for the AMX tile state), 40-70 ms on
    a call that then takes 1 ms, which made the first shape measured lose its bf16 path."""
    fn(x)
    start = time.perf_counter()
    fn(x)
    best = time.perf_counter() - start
    if budget is not None and best > budget:
        return best
    for _ in range(REPEATS - 1):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best


def measure_shape(layer: QuantizedLinear, largest_rows: int) -> ShapeChoice:
    """Time the kernel and the bf16 path on `layer`'s shape from `largest_rows` down (see the module doc)."""
    saved = layer.bf16_min_rows
    layer.use_bf16(None)  # forward runs the kernel (or its torch fallback) only
    dense = dense_bf16_weight(layer.weight_fp32_t().t())
    timings, threshold = [], None
    generator = torch.Generator().manual_seed(0)
    try:
        for rows in reversed(_buckets(largest_rows)):
            x = torch.randn(rows, layer.padded_in_features, generator=generator)
            kernel_s = _seconds(layer, x)
            bf16_s = _seconds(lambda t: dense_bf16_gemm(t, dense), x, budget=3 * kernel_s)
            timings.append((rows, kernel_s, bf16_s))
            if bf16_s >= kernel_s:
                break
            threshold = rows
    finally:
        layer.use_bf16(saved)
    return ShapeChoice(layer_format(layer), layer.out_features, layer.padded_in_features, threshold,
                       tuple(sorted(timings)))


def _cache_path(model: nn.Module, largest_rows: int, head_rows: int) -> Path:
    cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    identity = {"version": FORMAT_VERSION, "cpu": cpu, "isa": kernels.host_isa(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "kernels": kernels.source_digest(), "bf16": bf16_path(),
                "rows": largest_rows, "head_rows": head_rows, "shapes": sorted(_distinct_shapes(model))}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return store_root() / "kernel-plans" / f"{key}.json"


def _read_cache(path: Path) -> KernelPlan | None:
    try:
        data = json.loads(path.read_text())
        shapes = tuple(ShapeChoice(e["fmt"], e["n"], e["k"], e["bf16_min_rows"], tuple(tuple(t) for t in e["timings"]),
                                   e["head"]) for e in data["shapes"])
        step = data["step"]
        step = None if step is None else StepCheck(step["floor"], tuple(tuple(t) for t in step["timings"]))
        return KernelPlan("auto", f"cached in {path}", shapes, step, path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(plan: KernelPlan) -> None:
    data = {"shapes": [asdict(s) for s in plan.shapes], "step": None if plan.step is None else asdict(plan.step)}
    try:
        plan.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = plan.cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, plan.cache_path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError as exc:
        logger.warning("kernel plan not cached (%s): it is measured again at the next start", exc)


def resolve(mode: str, model: nn.Module, largest_rows: int, head_rows: int, remeasure: bool = False) -> KernelPlan:
    """The plan for `model` (already quantized) under `mode`. `largest_rows`: the most tokens of one step (the
    decoder layers' largest call); `head_rows`: the most rows the LM head scores at once (requests of a step).
    A measured plan is cached here, and again by `check_steps` once the native stack has checked it."""
    forced = parse_mode(mode)
    shapes = _distinct_shapes(model)
    head = getattr(model, "lm_head", None)
    if not shapes:
        return KernelPlan(mode, "no quantized layers", ())
    if mode == "kernel":
        return KernelPlan(mode, "override", tuple(ShapeChoice(*key, None, head=layer is head)
                                                  for key, layer in shapes.items()))
    if forced is not None:
        return KernelPlan(mode, "override", tuple(ShapeChoice(*key, forced, head=layer is head)
                                                  for key, layer in shapes.items()))
    path = _cache_path(model, largest_rows, head_rows)
    cached = None if remeasure else _read_cache(path)
    if cached is not None and {(s.fmt, s.n, s.k) for s in cached.shapes} == set(shapes):
        return cached
    start = time.perf_counter()
    with torch.inference_mode():
        measured = tuple(replace(measure_shape(layer, head_rows if layer is head else largest_rows),
                                 head=layer is head) for layer in shapes.values())
    plan = KernelPlan(mode, f"measured in {time.perf_counter() - start:.1f} s", measured, None, path)
    _write_cache(plan)
    return plan


def _decode_batch(tokens: int, block_size: int, context: int):
    """A decode step of `tokens` requests of `context` tokens, all reading blocks 0.. and writing one slot: the
    cache is empty while the engine loads, so nothing of value is overwritten."""
    from pagoda.layers.attention import BatchLayout

    blocks = -(-context // block_size)
    return BatchLayout(np.arange(tokens + 1, dtype=np.int64), np.full(tokens, context, dtype=np.int64),
                       np.tile(np.arange(blocks, dtype=np.int64), (tokens, 1)), tokens, block_size,
                       torch.full((tokens,), context - 1, dtype=torch.int64))


def check_steps(plan: KernelPlan, model: nn.Module, stack, backend, kv_caches: list[torch.Tensor],
                block_size: int, context: int = 64) -> KernelPlan:
    """Check the per-shape choices on whole decode steps of the native stack, where weights arrive cold from
    memory and each dense GEMM pays its callback: from the smallest decoder threshold up, time a step on the
    kernels only against the same step on the plan; the plan's bf16 paths start at the first size where it wins
    (there and at the next size), or never. Applies the result to the model and the stack and caches it."""
    from pagoda.layers.attention import Attention, ForwardContext, forward_context

    decoder = [s for s in plan.shapes if not s.head]
    lowest = min((s.bf16_min_rows for s in decoder if s.bf16_min_rows is not None), default=None)
    sizes = sorted({rows for s in decoder for rows, _, _ in s.timings if lowest is not None and rows >= lowest})
    context = min(context, kv_caches[0].shape[1] // block_size * block_size)
    windows = {m.sliding_window for m in model.modules() if isinstance(m, Attention)}
    kernels_only = replace(plan, shapes=tuple(replace(s, bf16_min_rows=None) if not s.head else s
                                              for s in plan.shapes))
    timings, floor, start = [], None, time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for tokens in sizes:
            ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=generator)
            positions = torch.full((tokens,), context - 1, dtype=torch.int64)
            metadata = backend.build_metadata(_decode_batch(tokens, block_size, context), windows)
            times = []
            for candidate in (kernels_only, plan):
                candidate.apply(model)
                stack.follow_layers()
                with forward_context(ForwardContext(backend, metadata, kv_caches)):
                    times.append(_seconds(lambda t, p=positions: stack(t, p), ids))
            timings.append((tokens, *times))
            wins = [planned < kernel for _, kernel, planned in timings]
            if wins[-1] and (len(wins) >= 2 and wins[-2] or tokens == sizes[-1]):
                floor = timings[-2][0] if len(wins) >= 2 and wins[-2] else tokens
                break
    step = StepCheck(floor, tuple(timings))
    shapes = tuple(s if s.head or s.bf16_min_rows is None else
                   replace(s, bf16_min_rows=None if floor is None else max(floor, s.bf16_min_rows))
                   for s in plan.shapes)
    checked = replace(plan, shapes=shapes, step=step,
                      source=f"{plan.source}; checked on steps in {time.perf_counter() - start:.1f} s")
    checked.apply(model)
    stack.follow_layers()
    if checked.cache_path is not None:
        _write_cache(checked)
    return checked

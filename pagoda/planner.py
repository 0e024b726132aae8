"""`pagoda plan`: how much memory a model needs at a context length and a number of concurrent requests, in a
precision, and which devices (and how many, by tensor parallelism) hold it. Plans in bytes, from the model's
config alone (a config.json is enough, so a 70B model can be planned without its weights) or from its files.

The three parts, per tensor-parallel rank:
- weights: parameters counted from the config (embedding, per layer the q/k/v/o and gate/up/down projections and
  norms, final norm, LM head unless tied), times the bytes per parameter of the precision; from a GGUF file its
  tensors' stored bytes by block type, from safetensors their headers. Quantized precisions apply to the linear
  layers (the embedding and LM head stay in the 8-bit format for int4 and in the type itself otherwise, as GGUF
  files and Pagoda's int8 path keep them); norms stay fp32. Tensor parallelism splits the projections, the
  embedding and the LM head by `tp` and replicates the norms.
- KV cache: 2 (K and V) x layers x KV heads (this rank's: ceil(heads / tp), replicated when tp > heads) x head dim
  x element size per token (8-bit caches: + 4 bytes of scale per head); Pagoda allocates every layer at the full
  context. Layers with a sliding window need at most `window` tokens each: `kv_window_capped_bytes` is that lower
  bound (what an engine that drops out-of-window blocks needs), shown beside Pagoda's figure.
- activations and workspace: the largest step's fp32 buffers (a prefill chunk of `max_prefill_tokens` plus decodes:
  hidden states, q/k/v, attention output, gate/up, activation; the LM head's logits for up to `max_num_seqs`
  rows, twice for sampling), plus a fixed runtime overhead (the Python process with torch loaded).

Then, for each device of a table of common accelerators and this machine's memory, the smallest TP degree whose
per-rank total fits `utilization` of the device, and the utilisation it reaches.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pagoda.config import ModelConfig

# bytes per parameter of the linear layers; int8 and int4 carry an fp16 scale (int4: and an offset) per group of
# 32, as Pagoda's Q8_0-style int8 and GGUF Q4_1 do; fp8 (e4m3) a per-channel scale (negligible).
PRECISIONS = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0 + 2 / 32, "int4": 0.5 + 4 / 32}
# the embedding's and LM head's format for each precision of the linear layers
EMBEDDING_PRECISION = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "bf16", "int8": "int8", "int4": "int8"}
KV_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
KV_ROW_EXTRA = {"int8": 4, "fp8_e4m3": 4, "fp8_e5m2": 4}  # bytes after each row: its scale (layers/kv_quant.py)
# the seed's context classes: 4-8k chat and Q&A, 32-128k documents, 128k+ agents (planned at the top of the class)
CONTEXT_PRESETS = {"chat": 8192, "docs": 131072, "agent": 262144}
RUNTIME_OVERHEAD = 512 * 2 ** 20  # a Python process with torch loaded, the server and the tokenizer (RSS, rounded up)
TP_DEGREES = (1, 2, 4, 8)
GB = 10 ** 9
# name, memory in bytes (as sold: GB)
DEVICES = (("L4", 24 * GB), ("A10", 24 * GB), ("L40S", 48 * GB), ("A100 40GB", 40 * GB), ("A100 80GB", 80 * GB),
           ("H100 80GB", 80 * GB), ("H200", 141 * GB), ("B200", 192 * GB), ("MI300X", 192 * GB))


class PlanError(ValueError):
    """The model or a setting cannot be planned (the message says why)."""


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the whole model's weights by part, and where the numbers come from."""

    linear: int
    embedding: int
    lm_head: int
    norms: int
    source: str  # "config" or the file read
    buffers: int = 0  # the rotary tables (every rank holds them)
    by_type: dict[str, int] = field(default_factory=dict)  # a file's bytes by stored type (GGUF block types)

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.lm_head + self.norms + self.buffers

    def per_rank(self, tp: int) -> int:
        return math.ceil((self.linear + self.embedding + self.lm_head) / tp) + self.norms + self.buffers


@dataclass(frozen=True)
class DeviceFit:
    device: str
    memory_bytes: int
    tp: int | None  # the smallest TP degree that fits; None: none of TP_DEGREES does
    utilization: float | None  # per-rank total / device memory at that degree


@dataclass(frozen=True)
class Plan:
    model: str
    precision: str
    kv_cache_dtype: str
    context: int
    concurrency: int
    tp: int
    parameters: int
    weights: WeightBytes
    weights_per_rank: int
    kv_bytes_per_token: int  # this rank's, every layer at the full context (as Pagoda allocates)
    kv_bytes: int  # this rank's, for `concurrency` requests of `context` tokens
    kv_window_capped_bytes: int  # the same with sliding-window layers capped at their window
    activation_bytes: int
    overhead_bytes: int
    total_per_rank: int
    max_position_embeddings: int
    context_length: int  # the longest context the model's rotary reaches (with its rope scaling)
    devices: tuple[DeviceFit, ...]
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        data = asdict(self)
        data["weights"]["total"] = self.weights.total
        return data


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameters by part, from the config (Llama-family layout: q/k/v/o, gated MLP, RMS norms)."""
    h, d, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if config.attention_bias else 0)
    mlp = 3 * h * config.intermediate_size
    head_norms = 2 * d if config.model_type in ("qwen3", "gemma3_text") else 0
    norms_per_layer = (4 if config.model_type == "gemma3_text" else 2) * h + head_norms
    embedding = config.vocab_size * h
    return {"linear": layers * (attention + mlp), "embedding": embedding,
            "lm_head": 0 if config.tie_word_embeddings else embedding, "norms": layers * norms_per_layer + h}


def weight_bytes_from_config(config: ModelConfig, precision: str) -> WeightBytes:
    counts = count_parameters(config)
    linear = PRECISIONS[precision]
    embedding = PRECISIONS[EMBEDDING_PRECISION[precision]]
    return WeightBytes(linear=round(counts["linear"] * linear), embedding=round(counts["embedding"] * embedding),
                       lm_head=round(counts["lm_head"] * embedding), norms=counts["norms"] * 4,
                       buffers=rotary_bytes(config), source="config")


# GGUF block types Pagoda computes on as stored (layers/quantized.py: Q4Linear, Int8Linear); other types are
# dequantized to fp32 when the model loads
NATIVE_GGUF_TYPES = ("Q4_1", "Q8_0")


def rotary_bytes(config: ModelConfig, positions: int | None = None) -> int:
    """The rotary cos/sin tables (fp32, positions x head_dim / 2 each; Gemma 3 has a local and a global one), held
    by every rank; made for the context served (default: the model's context length)."""
    tables = 2 if config.model_type == "gemma3_text" else 1
    return tables * 2 * (positions or config.context_length) * (config.head_dim // 2) * 4


def weight_bytes_from_gguf(gguf, config: ModelConfig) -> WeightBytes:
    """A GGUF model's bytes as Pagoda holds them (default quantization "gguf"): Q4_1 and Q8_0 tensors as stored,
    other matrices dequantized to fp32, norms in fp32, a tied embedding shared with its Q8_0 LM head; plus the
    rotary tables. `by_type` lists the file's own bytes by block type."""
    parts = {"linear": 0, "embedding": 0, "lm_head": 0, "norms": 0}
    by_type: dict[str, int] = {}
    tied = not any(t.name == "output.weight" for t in gguf.tensors())
    for t in gguf.tensors():
        stored, qtype = int(t.data.nbytes), t.qtype.name
        by_type[qtype] = by_type.get(qtype, 0) + stored
        held = stored if qtype in NATIVE_GGUF_TYPES or qtype == "F32" else 4 * math.prod(t.shape)
        if t.name == "token_embd.weight":
            fp32 = 4 * math.prod(t.shape)
            if not tied:
                parts["embedding"] += fp32  # lookups read an fp32 table
            elif qtype == "Q8_0":
                parts["lm_head"] += stored  # the head keeps the Q8_0 blocks; lookups share them
            elif qtype in NATIVE_GGUF_TYPES:
                parts["lm_head"] += stored  # a Q4_1 head, beside an fp32 table for lookups
                parts["embedding"] += fp32
            else:
                parts["embedding"] += fp32  # one fp32 table, the head tied to it
        elif t.name == "output.weight":
            parts["lm_head"] += held
        elif len(t.shape) == 1:
            parts["norms"] += held
        else:
            parts["linear"] += held
    return WeightBytes(**parts, buffers=rotary_bytes(config), source=f"{gguf.path} (as Pagoda holds it)",
                       by_type=by_type)


def weight_bytes_from_safetensors(directory: Path) -> WeightBytes:
    """A Hugging Face checkpoint's stored tensor bytes (safetensors headers only: nothing is loaded)."""
    from safetensors import safe_open

    from pagoda.loader.hf_loader import safetensors_files

    parts = {"linear": 0, "embedding": 0, "lm_head": 0, "norms": 0}
    by_type: dict[str, int] = {}
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                shape = piece.get_shape()
                size = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I32": 4,
                        "I64": 8, "F64": 8}.get(piece.get_dtype(), 4)
                n = math.prod(shape) * size
                by_type[piece.get_dtype()] = by_type.get(piece.get_dtype(), 0) + n
                if "embed_tokens" in name:
                    parts["embedding"] += n
                elif name.startswith("lm_head"):
                    parts["lm_head"] += n
                elif len(shape) == 1:
                    parts["norms"] += n
                else:
                    parts["linear"] += n
    return WeightBytes(**parts, source=str(directory), by_type=by_type)


def kv_heads_per_rank(config: ModelConfig, tp: int) -> int:
    return math.ceil(config.num_key_value_heads / tp)


def layer_windows(config: ModelConfig) -> list[int | None]:
    """Each layer's sliding window (None: full attention)."""
    if config.model_type == "gemma3_text":
        from pagoda.models.gemma3 import layer_types

        return [config.sliding_window if t == "sliding_attention" else None for t in layer_types(config)]
    return [config.sliding_window] * config.num_hidden_layers


def activation_bytes(config: ModelConfig, tp: int, max_prefill_tokens: int, max_num_seqs: int) -> int:
    """The largest step's fp32 buffers on one rank (see the module doc)."""
    tokens = max_prefill_tokens + max_num_seqs  # a prefill chunk beside a full batch of decodes
    h, d = config.hidden_size, config.head_dim
    q = math.ceil(config.num_attention_heads / tp) * d
    kv = kv_heads_per_rank(config, tp) * d
    inter = math.ceil(config.intermediate_size / tp)
    per_token = 4 * h + (q + 2 * kv) + q + 3 * inter  # h, x, residual out, norm out; qkv; attention; gate/up, act
    logits = 2 * max_num_seqs * math.ceil(config.vocab_size / tp)  # the head's rows and the sampler's copy
    return 4 * (tokens * per_token + logits)


def local_memory_bytes() -> int:
    """This machine's memory available to this process: MemAvailable, capped by a cgroup limit."""
    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            available = min(available, int(text))
    return available


def fits(per_rank: dict[int, int], memory: int, utilization: float) -> tuple[int | None, float | None]:
    for tp in TP_DEGREES:
        if tp in per_rank and per_rank[tp] <= utilization * memory:
            return tp, per_rank[tp] / memory
    return None, None


def plan(config: ModelConfig, *, model: str = "", weights: WeightBytes | None = None, precision: str = "bf16",
         kv_cache_dtype: str = "bfloat16", context: int = 8192, concurrency: int = 1, tp: int = 1,
         max_prefill_tokens: int = 512, max_num_seqs: int | None = None, utilization: float = 0.9) -> Plan:
    """The plan for `concurrency` requests of `context` tokens on `tp` ranks; `weights` from a file (else counted
    from the config in `precision`). The device table tries every TP degree."""
    if precision not in PRECISIONS:
        raise PlanError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if kv_cache_dtype not in KV_ELEMENT_BYTES:
        raise PlanError(f"KV cache dtype {kv_cache_dtype!r} is not one of {', '.join(KV_ELEMENT_BYTES)}")
    if context < 1 or concurrency < 1 or tp < 1:
        raise PlanError("context, concurrency and tensor-parallel size must be at least 1")
    if not 0 < utilization <= 1:
        raise PlanError(f"utilization {utilization} is not in (0, 1]")
    if config.num_attention_heads % tp:
        raise PlanError(f"{config.num_attention_heads} attention heads do not split over {tp} ranks")
    seqs = max_num_seqs or concurrency
    weights = weights or weight_bytes_from_config(config, precision)
    weights = replace(weights, buffers=rotary_bytes(config, context))  # the tables cover the context planned
    element = KV_ELEMENT_BYTES[kv_cache_dtype]

    def per_rank(degree: int) -> tuple[int, int, int, int, int]:
        row = config.head_dim * element + KV_ROW_EXTRA.get(kv_cache_dtype, 0)
        token = 2 * config.num_hidden_layers * kv_heads_per_rank(config, degree) * row
        layer_token = token // config.num_hidden_layers
        capped = sum(layer_token * min(context, w or context) for w in layer_windows(config)) * concurrency
        act = activation_bytes(config, degree, max_prefill_tokens, seqs)
        total = weights.per_rank(degree) + token * context * concurrency + act + RUNTIME_OVERHEAD
        return token, token * context * concurrency, capped, act, total

    token, kv, capped, act, total = per_rank(tp)
    degrees = {d: per_rank(d)[4] for d in TP_DEGREES if config.num_attention_heads % d == 0}
    devices = [DeviceFit(name, memory, *fits(degrees, memory, utilization)) for name, memory in DEVICES]
    local = local_memory_bytes()
    devices.append(DeviceFit("this machine (RAM available)", local, *fits({1: degrees[1]}, local, utilization)))
    notes = []
    if context > config.context_length:
        notes.append(f"the context {context} exceeds the model's {config.context_length} tokens (max_position_"
                     f"embeddings {config.max_position_embeddings}; a longer context needs rope scaling such as yarn)")
    if capped < kv:
        notes.append("sliding-window layers need at most their window: the KV cache could be "
                     f"{capped / 2 ** 30:.2f} GiB instead of {kv / 2 ** 30:.2f} GiB where out-of-window blocks are "
                     "freed (Pagoda keeps every layer at the full context)")
    params = sum(count_parameters(config).values())
    return Plan(model=model, precision=precision if weights.source == "config" else "as stored",
                kv_cache_dtype=kv_cache_dtype, context=context, concurrency=concurrency, tp=tp, parameters=params,
                weights=weights, weights_per_rank=weights.per_rank(tp), kv_bytes_per_token=token, kv_bytes=kv,
                kv_window_capped_bytes=capped, activation_bytes=act, overhead_bytes=RUNTIME_OVERHEAD,
                total_per_rank=total, max_position_embeddings=config.max_position_embeddings,
                context_length=config.context_length,
                devices=tuple(devices), notes=tuple(notes))


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def format_plan(p: Plan) -> str:
    w = p.weights
    lines = [f"model {p.model}: {p.parameters / 1e9:.3f} B parameters, weights {p.precision} (from {w.source})",
             f"  context {p.context} tokens x {p.concurrency} concurrent requests, KV cache {p.kv_cache_dtype}, "
             f"tensor parallel {p.tp}",
             f"  weights      {_size(w.total):>12} in all ({_size(p.weights_per_rank)} per rank): linear "
             f"{_size(w.linear)}, embedding {_size(w.embedding)}, LM head {_size(w.lm_head)}, norms {_size(w.norms)}, "
             f"rotary tables {_size(w.buffers)}"]
    if w.by_type:
        types = ", ".join(f"{k} {_size(v)}" for k, v in sorted(w.by_type.items()))
        lines.append(f"               by stored type: {types}")
    lines += [f"  KV cache     {_size(p.kv_bytes):>12} per rank ({p.kv_bytes_per_token:,} bytes per token per rank)",
              f"  activations  {_size(p.activation_bytes):>12} per rank (largest step, fp32)",
              f"  runtime      {_size(p.overhead_bytes):>12}",
              f"  total        {_size(p.total_per_rank):>12} per rank",
              "", f"  {'device':<30}{'memory':>10}{'smallest TP':>13}{'utilisation':>13}"]
    for d in p.devices:
        tp = "does not fit" if d.tp is None else str(d.tp)
        use = "" if d.utilization is None else f"{100 * d.utilization:.0f}%"
        lines.append(f"  {d.device:<30}{d.memory_bytes / GB:>8.0f} GB{tp:>13}{use:>13}")
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


def load_for_plan(name_or_path: str) -> tuple[ModelConfig, WeightBytes | None, str]:
    """(config, stored weight bytes or None, label) for a registry name (pulled), a GGUF file, a Hugging Face
    directory, or a config.json alone."""
    from pagoda import model_store

    path = Path(name_or_path).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        try:
            return ModelConfig.from_hf_config(json.loads(path.read_text())), None, str(path)
        except (ValueError, KeyError) as exc:
            raise PlanError(f"{path} is not a model config.json ({exc})") from None
    try:
        path = model_store.resolve_model(name_or_path, pull_if_missing=False, progress=False)
    except model_store.ModelNotFoundError as exc:
        raise PlanError(str(exc)) from None
    if path.is_file():
        from pagoda.loader.gguf_file import GGUFFile
        from pagoda.loader.gguf_loader import config_from_gguf

        gguf = GGUFFile(path)
        config = config_from_gguf(gguf)
        return config, weight_bytes_from_gguf(gguf, config), name_or_path
    from pagoda.loader.hf_loader import read_config

    has_weights = any(path.glob("*.safetensors"))
    return read_config(path), weight_bytes_from_safetensors(path) if has_weights else None, name_or_path

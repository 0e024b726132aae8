"""Quantized-weight linear layers with fp32 activations in and out, and the swap of a loaded model's linear
layers (and LM head) for them. Two weight formats, both in groups of 32 along K:

- int8 (Int8Linear): Q8_0-style symmetric int8 with an fp16 scale. `quantization="int8"` requantizes every
  linear layer to it; a GGUF Q8_0 tensor converts to it exactly.
- q4 (Q4Linear): Q4_1's 4-bit codes with an fp16 scale and offset (w = d * c + m). Built only from a GGUF
  file's own Q4_1 blocks (`quantization="gguf"` or `"gguf-a8"`), so the weights are exactly the checkpoint's.
A bf16 model's layers (Bf16Linear, `dtype=bfloat16`, no quantization) share the kernel interface: their weights
stay bf16 and the kernel widens them to fp32, so the native stack can run the model.

Small batches (decode) run the AVX2 kernels of pagoda/kernels/quant_linear.cpp (their VNNI variant where the CPU
has it: the same integer sums in fewer instructions), which read each weight byte
once per call whatever the batch, so a decode step moves a quarter (int8) or a sixth (q4) of the fp32 weight
bytes. To multiply exactly in integers they round x per group of 32 inside the call: to int16 by default (at
most half a step of max|x_group| / 32767 per element, about 2e-5 relative on the model's shapes), or to int8
with "gguf-a8" (half a step of max|x_group| / 127, as llama.cpp does: the 4-bit codes times int8 x take half
the instructions, so the q4 kernel runs ~1.5x faster, but greedy outputs drift from fp32's; BENCHMARKS.md). Large
batches (prefill) are compute-bound: for int8 layers above 64 rows the weight is dequantized to fp32 for the
call and torch's GEMM runs; the q4 kernels beat that at every size (BENCHMARKS.md), so they always run. Every
path computes x @ dequantize(W)^T up to its rounding of x. On CPUs with bf16 units the kernel plan
(worker/kernel_plan.py) may send large calls to a bf16 GEMM with fp32 output instead (`use_bf16`,
`dense_bf16_gemm`): the kernels of pagoda/kernels/bf16_gemm.h on a weight packed once in bf16 where the CPU
has AMX or AVX512-BF16, else oneDNN on an fp32 copy.
"""

from __future__ import annotations

import ctypes
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pagoda import kernels
from pagoda.layers.linear import Embedding, Linear, WeightShard
from pagoda.loader.tensors import TensorSource
from pagoda.models.loading import read_parameter

logger = logging.getLogger("pagoda")

GROUP = 32  # weights per scale along K (Q8_0's block)
TILE = 16  # output rows per packed tile: the kernels' layout unit (see quant_linear.cpp)
INT8_KERNEL_MAX_ROWS = 64  # above this many input rows the fp32 GEMM on a dequantized int8 weight is faster
QUANTIZATIONS = ("int8", "gguf", "gguf-a8")
Q4_ACTIVATIONS = {"gguf": "int16", "gguf-a8": "int8"}  # how each GGUF method rounds x for the q4 kernel
GGUF_KERNEL_TYPES = ("Q4_1", "Q8_0")  # GGUF block types the kernels compute on as they are stored


QUANTIZE_ROWS = 4096  # rows quantized at a time: bounds the fp32 temporaries (a 262k-row table is 0.7 GB each)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W[N, K] float -> (q int8 [N, K'], scales fp16 [N, K'/32]), K' = K rounded up to 32 (zero padding).
    q = round(W / s) with s = max|group| / 127 rounded up to fp16, so q is in [-127, 127] without clamping and
    |W - q * s| <= s / 2 for every weight. Works QUANTIZE_ROWS rows at a time (each row is independent)."""
    n, k = weight.shape
    padded = k + -k % GROUP
    q = torch.empty(n, padded, dtype=torch.int8)
    scales = torch.empty(n, padded // GROUP, dtype=torch.float16)
    up = torch.tensor(torch.inf, dtype=torch.float16)
    for r0 in range(0, n, QUANTIZE_ROWS):
        r1 = min(n, r0 + QUANTIZE_ROWS)
        w = F.pad(weight[r0:r1].detach().to(torch.float32), (0, padded - k))
        groups = w.view(r1 - r0, -1, GROUP)
        exact = groups.abs().amax(dim=-1) / 127
        s16 = exact.to(torch.float16)
        s16 = torch.where(s16.to(torch.float32) < exact, torch.nextafter(s16, up), s16)
        if not torch.isfinite(s16).all():
            raise ValueError("weight has values too large (or not finite) for int8 with fp16 scales")
        s = s16.to(torch.float32).unsqueeze(-1)
        codes = torch.where(s > 0, groups / s, 0.0).round_().clamp_(-127, 127)  # clamp: fp32 slop
        q[r0:r1] = codes.view(r1 - r0, -1)
        scales[r0:r1] = s16
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(q [N, K'], scales [N, K'/32]) -> W [N, K'] fp32: the weight every path of Int8Linear multiplies by."""
    n = q.shape[0]
    return (q.view(n, -1, GROUP).to(torch.float32) * scales.to(torch.float32).unsqueeze(-1)).view(n, -1)


def pack(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major (q, scales) -> the kernel's tiles of 16 rows: q [T, K'/2, 16, 2] (a k pair of each row adjacent),
    scales [T, K'/32, 16]; pad rows are zero."""
    pad = -q.shape[0] % TILE
    q, scales = F.pad(q, (0, 0, 0, pad)), F.pad(scales, (0, 0, 0, pad))
    return (q.view(-1, TILE, q.shape[1] // 2, 2).transpose(1, 2).contiguous(),
            scales.view(-1, TILE, scales.shape[1]).transpose(1, 2).contiguous())


def unpack(qt: torch.Tensor, st: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack: tiles -> row-major (q [N, K'], scales [N, K'/32])."""
    k = qt.shape[1] * 2
    return qt.transpose(1, 2).reshape(-1, k)[:n], untile_scales(st, n)


def untile_scales(st: torch.Tensor, n: int) -> torch.Tensor:
    """Per-group values in tiles [T, K'/32, 16] -> row-major [N, K'/32]."""
    return st.transpose(1, 2).reshape(-1, st.shape[1])[:n]


def pack_q4(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row-major Q4_1 values (codes uint8 [N, K] in [0, 15], d and m fp16 [N, K/32]) -> the q4 kernel's tiles:
    codes [T, K/4, 32] uint8 (chunk (t, kq), byte 4 * r + i: the code of row 16 t + r, column 4 kq + i in the low
    nibble, that of row 16 t + 8 + r in the high one), d and m [T, K/32, 16]; pad rows are zero."""
    n, k = codes.shape
    if k % GROUP:
        raise ValueError(f"q4 weights need K divisible by {GROUP}, got {k}")
    _, d_tiles = pack(codes.view(torch.int8), d.view(torch.int16))
    _, m_tiles = pack(codes.view(torch.int8), m.view(torch.int16))
    c = F.pad(codes, (0, 0, 0, -n % TILE)).view(-1, 2, TILE // 2, k // 4, 4)  # [T, half, r, kq, i]
    chunks = c[:, 0] | (c[:, 1] << 4)  # [T, r, kq, i]
    return chunks.permute(0, 2, 1, 3).contiguous().view(-1, k // 4, 32), d_tiles, m_tiles


def unpack_q4_codes(qweight: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_q4's chunking: [T, K/4, 32] uint8 -> codes [N, K] uint8."""
    t, kq, _ = qweight.shape
    b = qweight.view(t, kq, TILE // 2, 4).permute(0, 2, 1, 3)  # [T, r, kq, i]
    codes = torch.stack((b & 0x0F, b >> 4), dim=1)  # [T, half, r, kq, i]
    return codes.reshape(t * TILE, kq * 4)[:n]


def pack_q4a16(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row-major Q4_1 values (codes uint8 [N, K] in [0, 15], d and m fp16 [N, K/32]) -> the q4a16 kernel's tiles:
    codes [T, K/4, 32] uint8 (two of the int8 layout's 32-byte k-pair units A, B per chunk of 16 uint16 words,
    word L = A[L] | A[16+L] << 4 | B[L] << 8 | B[16+L] << 12), d and m [T, K/32, 16]; pad rows are zero."""
    n, k = codes.shape
    if k % GROUP:
        raise ValueError(f"q4 weights need K divisible by {GROUP}, got {k}")
    units, d_tiles = pack(codes.view(torch.int8), d.view(torch.int16))
    _, m_tiles = pack(codes.view(torch.int8), m.view(torch.int16))
    u = units.view(torch.uint8).reshape(units.shape[0], k // 4, 2, 32).to(torch.int32)
    words = u[:, :, 0, :16] | (u[:, :, 0, 16:] << 4) | (u[:, :, 1, :16] << 8) | (u[:, :, 1, 16:] << 12)
    return words.to(torch.int16).contiguous().view(torch.uint8), d_tiles, m_tiles


def unpack_q4a16_units(qweight: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_q4a16's chunking: [T, K/4, 32] uint8 -> the int8 layout's units [T, K/2, 16, 2]."""
    words = qweight.view(torch.int16).to(torch.int32) & 0xFFFF  # [T, K/4, 16]
    a = torch.cat((words & 0xF, (words >> 4) & 0xF), dim=-1)
    b = torch.cat(((words >> 8) & 0xF, (words >> 12) & 0xF), dim=-1)
    units = torch.stack((a, b), dim=2).to(torch.int8)  # [T, K/4, 2, 32]
    return units.view(qweight.shape[0], -1, TILE, 2)


def _blocks_tensor(blocks: np.ndarray) -> torch.Tensor:
    """Stored blocks (often a read-only view of the checkpoint's memory map) as a uint8 tensor, read, never
    written: no copy."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(blocks))


def q4_1_codes(blocks: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 data ([N, K/32 * 20] bytes: fp16 d, fp16 m, 16 bytes of nibbles, element j in the low nibble
    of byte j and element j + 16 in its high nibble) -> (codes uint8 [N, K], d fp16 [N, K/32], m fp16 [N, K/32])."""
    b = _blocks_tensor(blocks).reshape(n * (k // GROUP), 20)
    d = b[:, 0:2].contiguous().view(torch.float16).view(n, -1)
    m = b[:, 2:4].contiguous().view(torch.float16).view(n, -1)
    qs = b[:, 4:]
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=1).view(n, k)
    return codes, d, m


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_library: ctypes.CDLL | bool | None = None  # None: not loaded yet; False: cannot be built (torch path)
_packed_kinds: int | None = None  # bf16_packed_kinds' answer (bit flags), once asked
PACKED_AVX512BF16, PACKED_AMX = 1, 2  # the kinds of bf16_gemm.h


_SIGNATURES = {
    "int8_linear": [_P, _I64, _I64, _I64, _P, _P, _I64, _P, _I64, ctypes.c_int],
    "int8_dequantize_t": [_P, _P, _I64, _I64, _P, ctypes.c_int],
    "q4_linear": [_P, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _I64, ctypes.c_int],
    "q4a16_linear": [_P, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _I64, ctypes.c_int],
    "bf16_linear": [_P, _I64, _I64, _I64, _P, _I64, _P, _I64, ctypes.c_int],
    "bf16_packed_linear": [ctypes.c_int, _P, _I64, _I64, _I64, _P, _I64, _P, _I64, ctypes.c_int],
}


def load_kernels(defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """quant_linear.cpp built for this CPU (with extra `defines`, e.g. the AVX2 baseline), its functions typed.
    Raises kernels.KernelBuildError."""
    lib = kernels.load("quant_linear", defines)
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.quant_linear_variant.argtypes, lib.quant_linear_variant.restype = [], ctypes.c_char_p
    lib.bf16_packed_kinds.argtypes, lib.bf16_packed_kinds.restype = [], ctypes.c_int
    return lib


def _kernel() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged once) when they cannot be built: then the torch path runs."""
    global _library
    if _library is None:
        try:
            _library = load_kernels()
        except kernels.KernelBuildError as exc:
            logger.warning("quantized-linear kernels unavailable, using the slower torch path: %s", exc)
            _library = False
    return _library or None


def kernel_variant() -> str:
    """The integer dot products the compiled kernels use on this CPU ("avx512vnni", "avxvnni", "avx2"), or
    "torch" when they could not be built."""
    lib = _kernel()
    return "torch" if lib is None else lib.quant_linear_variant().decode()


def bf16_gemm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T for fp32 x [M, K] and weight [N, K], multiplied in bf16 by oneDNN (AMX tiles or AVX512-BF16
    where the CPU has them; emulated, slowly, elsewhere: the kernel plan measures that), accumulated and returned
    in fp32. Rounding x and the weight to bf16 (8 significant bits) is its only approximation; a bf16 result
    (F.linear on bf16 tensors) would also round every output, which doubled the logprob error (BENCHMARKS.md).
    The precision switch is process-wide while the call runs: only the engine's step thread computes. `out`: an
    fp32 [M, N] tensor to write into."""
    mkldnn = torch.backends.mkldnn.matmul
    previous = mkldnn.fp32_precision
    mkldnn.fp32_precision = "bf16"
    try:
        return F.linear(x, weight) if out is None else torch.mm(x, weight.t(), out=out)
    finally:
        mkldnn.fp32_precision = previous


def packed_bf16_kinds() -> int:
    """Which bf16 GEMM kernels of pagoda/kernels/bf16_gemm.h run here (bit flags: PACKED_AVX512BF16, the kernels
    were built for AVX512-BF16; PACKED_AMX, for AMX-BF16, and the OS grants the tile state)."""
    global _packed_kinds
    if _packed_kinds is None:
        lib = _kernel()
        _packed_kinds = lib.bf16_packed_kinds() if lib is not None else 0
    return _packed_kinds


def packed_bf16_kernel() -> str:
    """The packed kernel dense_bf16_gemm uses: "amx", "avx512bf16", or "" (none: oneDNN on an fp32 copy)."""
    kinds = packed_bf16_kinds()
    return "amx" if kinds & PACKED_AMX else "avx512bf16" if kinds & PACKED_AVX512BF16 else ""


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] (N % 16 == 0, K % 32 == 0) rounded to bf16 (to nearest even) in the packed layout both kernels read
    [N/16, K/32, 16 k pairs, 16 columns, 2] (see bf16_gemm.h)."""
    n, k = weight.shape
    return (weight.detach().to(torch.bfloat16).view(n // TILE, TILE, k // GROUP, TILE, 2)
            .permute(0, 2, 3, 1, 4).contiguous())


def dense_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """The copy of W [N, K] the bf16 path reads (QuantizedLinear.use_bf16): packed bf16 where a packed kernel runs
    and the shape fits it (2 bytes per weight, converted once), else fp32 [N, K] for bf16_gemm (oneDNN converts it
    at every call)."""
    n, k = weight.shape
    if packed_bf16_kinds() and n % TILE == 0 and k % GROUP == 0:
        return pack_bf16(weight)
    return weight.detach().to(torch.float32).contiguous()


def dense_bf16_gemm(x: torch.Tensor, dense: torch.Tensor, out: torch.Tensor | None = None,
                    kind: int = 0) -> torch.Tensor:
    """x @ W^T for fp32 x [M, K] (contiguous) and a `dense_bf16_weight` of W: bf16 products, fp32 sums and output,
    by a packed kernel (a packed weight; `kind` PACKED_AMX or PACKED_AVX512BF16, 0: the best here) or through
    oneDNN (an fp32 one). `out`: fp32 [M, N] to write."""
    if dense.dtype != torch.bfloat16:
        return bf16_gemm(x, dense, out)
    m, k = x.shape
    n = dense.shape[0] * TILE
    y = torch.empty((m, n), dtype=torch.float32) if out is None else out
    _library.bf16_packed_linear(kind, x.data_ptr(), m, k, k, dense.data_ptr(), n, y.data_ptr(), n,
                                torch.get_num_threads())
    return y


class QuantizedLinear(nn.Module, ABC):
    """y = x @ W^T (+ bias) for a packed quantized W; x of any float dtype (computed in fp32, returned in x's).
    Subclasses hold the packed buffers and say how to run the kernel and how to dequantize."""

    kind = 0  # the fused decoder's code for this format (pagoda/kernels/llama_stack.cpp)
    prebuilt = True  # built with its weights (the bias too): the model's load_weights leaves it alone
    # Batches of more rows than this take torch's GEMM on the dequantized weight; None: the kernel always.
    kernel_max_rows: int | None = None
    # Set by use_bf16 (the kernel plan, worker/kernel_plan.py): from this many rows on, dense_bf16_gemm on the
    # dequantized weight runs instead of the kernel (a packed bf16 kernel or oneDNN, see dense_bf16_weight).
    bf16_min_rows: int | None = None
    k_per_packed_row = 1  # input columns per index of the packed weight's dimension 1

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
        self.register_buffer("dense_weight", None, persistent=False)  # a dense_bf16_weight while use_bf16 is on
        _kernel()  # load (build) the kernels now, not in the first forward

    def _pointers(self) -> None:
        # The kernel's arguments that do not change between calls, as plain attributes: module attribute
        # lookups cost about a microsecond each, and a decode step makes over a hundred calls.
        self.weight_pointers = tuple(t.data_ptr() for t in self.packed())
        self._weight_args = (self.out_features, self.padded_in_features, self.bias is not None)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)  # .to(), .share_memory() ... may move the buffers
        self._pointers()
        return module

    @abstractmethod
    def packed(self) -> tuple[torch.Tensor, ...]:
        """The packed weight buffers, in the order the kernel takes their pointers."""

    @abstractmethod
    def run_kernel(self, lib: ctypes.CDLL, rows: torch.Tensor, y: torch.Tensor) -> None:
        """y = rows @ W^T with the compiled kernel (rows: contiguous fp32 [M, padded K])."""

    @abstractmethod
    def weight_fp32_t(self) -> torch.Tensor:
        """The dequantized weight, transposed: [K', N] (a view; padded input columns give zero rows)."""

    def use_bf16(self, min_rows: int | None) -> None:
        """Run calls of at least `min_rows` rows with dense_bf16_gemm (None: never). Keeps the dequantized weight
        (dense_bf16_weight: 2 bytes per weight with a packed kernel, else 4, beside the packed ones) only while it is
        used."""
        self.bf16_min_rows = min_rows
        if min_rows is None:
            self.dense_weight = None
        elif self.dense_weight is None:
            self.dense_weight = dense_bf16_weight(self.weight_fp32_t().t())

    @property
    def padded_in_features(self) -> int:
        return self.packed()[0].shape[1] * self.k_per_packed_row

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.packed()) + (0 if self.dense_weight is None else self.dense_weight.nbytes)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fast path first: the model passes contiguous fp32 [tokens, K] (cheap checks only, see _pointers).
        n, k, has_bias = self._weight_args
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.float32 or x.shape[-1] != k or not rows.is_contiguous():
            rows = F.pad(rows.to(torch.float32), (0, k - x.shape[-1])).contiguous()
        lib = _library
        limit = self.kernel_max_rows
        bf16_from = self.bf16_min_rows
        if bf16_from is not None and rows.shape[0] >= bf16_from:
            y = dense_bf16_gemm(rows, self.dense_weight)
        elif lib and (limit is None or rows.shape[0] <= limit):
            y = torch.empty((rows.shape[0], n), dtype=torch.float32)
            self.run_kernel(lib, rows, y)
        else:
            y = torch.mm(rows, self.weight_fp32_t())
        if has_bias:
            y += self.bias
        if x.dim() != 2 or x.dtype != torch.float32:
            y = y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
        return y


class Int8Linear(QuantizedLinear):
    """W quantized to int8 on construction (exact for weights that were Q8_0)."""

    kind = 1
    kernel_max_rows = INT8_KERNEL_MAX_ROWS
    k_per_packed_row = 2  # qweight [T, K/2, 16, 2]

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                 codes: tuple[torch.Tensor, torch.Tensor, int] | None = None):
        """From a float `weight` (quantized here), or from `codes`: (q int8 [N, K'], scales fp16 [N, K'/32], K)."""
        q, scales, k = codes if weight is None else (*quantize(weight), weight.shape[1])
        super().__init__(q.shape[0], k, bias)
        qt, st = pack(q, scales)
        self.register_buffer("qweight", qt)  # [T, K'/2, 16, 2] int8
        self.register_buffer("scales", st.view(torch.int16))  # [T, K'/32, 16] fp16 bits
        self._pointers()

    @classmethod
    def from_linear(cls, linear: nn.Module) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    @classmethod
    def from_q8_0(cls, blocks: np.ndarray, k: int, bias: torch.Tensor | None = None) -> Int8Linear:
        """From a GGUF Q8_0 tensor's stored blocks [N, K/32 * 34] (fp16 d, then 32 int8 codes): the same codes and
        scales (w = d * q), without an fp32 copy of the weight."""
        n = blocks.shape[0]
        b = _blocks_tensor(blocks).view(n, -1, 34)
        scales = b[:, :, :2].contiguous().view(torch.float16).view(n, -1)
        q = b[:, :, 2:].contiguous().view(torch.int8).view(n, -1)
        return cls(None, bias, (q, scales, k))

    def packed(self) -> tuple[torch.Tensor, ...]:
        return self.qweight, self.scales

    def run_kernel(self, lib: ctypes.CDLL, rows: torch.Tensor, y: torch.Tensor) -> None:
        q, s = self.weight_pointers
        m, k = rows.shape
        lib.int8_linear(rows.data_ptr(), m, k, k, q, s, self.out_features, y.data_ptr(), self.out_features,
                        torch.get_num_threads())

    def weight_fp32_t(self) -> torch.Tensor:
        lib = _kernel()
        if lib is None:
            return dequantize(*unpack(self.qweight, self.scales.view(torch.float16), self.out_features)).t()
        out = torch.empty(self.padded_in_features, self.qweight.shape[0] * TILE, dtype=torch.float32)
        lib.int8_dequantize_t(self.qweight.data_ptr(), self.scales.data_ptr(), self.out_features,
                              self.padded_in_features, out.data_ptr(), torch.get_num_threads())
        return out[:, :self.out_features]


class Int8Embedding(Embedding):
    """Embedding lookups from an Int8Linear's packed rows (a tied LM head's, whose copy of the table then serves
    both), so no fp32 table stays in memory. Exact for a GGUF table stored as Q8_0; under "int8" the table's
    requantized rows. Keeps the embedding's vocabulary range (tensor parallelism): the head holds the same rows."""

    def __init__(self, head: Int8Linear, like: Embedding):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = like.num_embeddings, head.in_features
        self.vocab_start, self.vocab_end, self.tp = like.vocab_start, like.vocab_end, like.tp
        self.register_buffer("qweight", head.qweight)  # the head's tensors, shared, not copied
        self.register_buffer("scales", head.scales)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        tile, row = flat // TILE, flat % TILE
        codes = self.qweight[tile, :, row, :].reshape(len(flat), -1, GROUP)  # [N, K'/32, 32]
        scales = self.scales[tile, :, row].view(torch.float16).to(torch.float32)  # [N, K'/32]
        rows = (codes.to(torch.float32) * scales.unsqueeze(-1)).reshape(len(flat), -1)
        return rows[:, :self.embedding_dim].reshape(*ids.shape, self.embedding_dim)


class Q4Linear(QuantizedLinear):
    """W given as Q4_1 values: codes [N, K] in [0, 15], fp16 d and m per group of 32 (w = d * c + m). The kernel
    runs at every batch size: on this machine it beats torch's fp32 GEMM even on a pre-dequantized weight, at
    1 to 512 rows (BENCHMARKS.md). `activations`: "int16" rounds x to int16 per group inside the kernel (outputs
    within fp32 rounding of x @ W^T), "int8" to int8 (as llama.cpp does; ~1.5x the speed, less accurate)."""

    k_per_packed_row = 4  # qweight [T, K/4, 32]

    def __init__(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None = None,
                 activations: str = "int16"):
        super().__init__(*codes.shape, bias)
        if activations not in ("int8", "int16"):
            raise ValueError(f"q4 activations must be int8 or int16, got {activations!r}")
        self.activations = activations
        self.kind = 2 if activations == "int8" else 3
        qt, dt, mt = (pack_q4 if activations == "int8" else pack_q4a16)(codes, d, m)
        self.register_buffer("qweight", qt)  # [T, K/4, 32] uint8
        self.register_buffer("scales", dt)  # [T, K/32, 16] fp16 bits
        self.register_buffer("offsets", mt)  # [T, K/32, 16] fp16 bits
        self._pointers()

    def packed(self) -> tuple[torch.Tensor, ...]:
        return self.qweight, self.scales, self.offsets

    def run_kernel(self, lib: ctypes.CDLL, rows: torch.Tensor, y: torch.Tensor) -> None:
        q, d, mo = self.weight_pointers
        m, k = rows.shape
        fn = lib.q4_linear if self.activations == "int8" else lib.q4a16_linear
        fn(rows.data_ptr(), m, k, k, q, d, mo, self.out_features, y.data_ptr(), self.out_features,
           torch.get_num_threads())

    def weight_fp32_t(self) -> torch.Tensor:
        # Only the torch fallback (no compiler) and the tests need this: the kernel runs at every batch size.
        k, n = self.padded_in_features, self.out_features
        if self.activations == "int8":
            codes = unpack_q4_codes(self.qweight, n)
        else:
            codes = unpack(unpack_q4a16_units(self.qweight), self.scales, n)[0].view(torch.uint8)
        d, m = untile_scales(self.scales, n), untile_scales(self.offsets, n)
        w = codes.float().view(n, -1, GROUP)
        w = w * d.view(torch.float16).float().unsqueeze(-1) + m.view(torch.float16).float().unsqueeze(-1)
        return w.view(n, k).t()


class Bf16Linear(QuantizedLinear):
    """A bf16 weight [N, K] as it is (a `--dtype bfloat16` model's own, shared, not copied), for the kernel and the
    native stack: the kernel widens each weight to fp32 and multiplies fp32 activations, so y is x @ W^T up to
    fp32 rounding, closer to exact than torch's bf16 linear (which also rounds x and y to bf16). The kernel plan
    may send large calls to bf16_gemm like any quantized layer."""

    kind = 4

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(*weight.shape, bias)
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())  # [N, K]
        self._pointers()

    def packed(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,)

    def run_kernel(self, lib: ctypes.CDLL, rows: torch.Tensor, y: torch.Tensor) -> None:
        m, k = rows.shape
        lib.bf16_linear(rows.data_ptr(), m, k, k, self.weight_pointers[0], self.out_features, y.data_ptr(),
                        self.out_features, torch.get_num_threads())

    def weight_fp32_t(self) -> torch.Tensor:
        return self.weight.float().t()


def use_bf16_kernels(model: nn.Module) -> int:
    """Swap a bf16 model's Linear layers (the LM head included) for Bf16Linear over the same weights, so the
    native stack can run it; the number swapped (0 when the kernels cannot be built: the model stays as it is)."""
    if _kernel() is None:
        return 0
    swapped = 0
    for name, module in _linears(model):
        if module.weight.dtype == torch.bfloat16:
            _swap(model, name, Bf16Linear(module.weight, module.bias))
            swapped += 1
    logger.info("bfloat16: %d linear layers run the bf16-weight kernel", swapped)
    return swapped


def resolve_quantization(method: str | None, device: torch.device, dtype: torch.dtype, is_gguf: bool) -> str | None:
    """The method to use: "auto" becomes "gguf" for a GGUF checkpoint run in fp32 on the CPU (the file's own
    blocks, so the weights are exactly the checkpoint's), else None. Raises ValueError for a method that cannot
    run here."""
    if method == "auto":
        return "gguf" if is_gguf and torch.device(device).type == "cpu" and dtype == torch.float32 else None
    check_quantization(method, device)
    return method


def check_quantization(method: str | None, device: torch.device) -> None:
    """Raise ValueError unless `method` (None: no quantization) can run on `device`."""
    if method is None:
        return
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization {method!r} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantization {method!r} runs on the CPU only")


def _linears(model: nn.Module) -> list[tuple[str, Linear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Linear)]


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def _stored_blocks(name: str, module: Linear, sources: Mapping[str, TensorSource],
                   ) -> tuple[list[tuple[str, np.ndarray]], set[str]] | None:
    """The checkpoint's stored blocks for exactly the slices `module` holds (its shards, in row order) and the
    names of the tensors they come from, or None when a slice has none (not a GGUF tensor, or cut through
    blocks)."""
    shards = module.shards or [WeightShard(name.rpartition(".")[2], 0, 0, module.out_features)]
    parent = name.rpartition(".")[0]
    found, names = [], set()
    for shard in shards:
        source_name = shard.source if "." in shard.source else f"{parent}.{shard.source}".lstrip(".")
        source = sources.get(f"{source_name}.weight")
        span = (shard.start, shard.stop)
        raw = None if source is None else source.raw(*((span, None) if shard.dim == 0 else (None, span)))
        if raw is None:
            return None
        found.append(raw)
        names.add(f"{source_name}.weight")
    return found, names


def _gguf_linear(module: Linear, shards: list[tuple[str, np.ndarray]], bias: torch.Tensor | None,
                 activations: str) -> QuantizedLinear:
    """The quantized layer holding exactly the checkpoint's blocks for `module` (shards of one GGUF_KERNEL_TYPES
    type, concatenated along N)."""
    if shards[0][0] == "Q4_1":
        values = [q4_1_codes(blocks, blocks.shape[0], module.in_features) for _, blocks in shards]
        codes, d, m = (torch.cat(parts) for parts in zip(*values))
        return Q4Linear(codes, d, m, bias, activations)
    return Int8Linear.from_q8_0(np.concatenate([blocks for _, blocks in shards]), module.in_features, bias)


def quantize_model(model: nn.Module, method: str, sources: Mapping[str, TensorSource] | None = None) -> set[str]:
    """Swap the Linear layers of a model shard, the LM head included, for quantized ones, in place. Returns the
    names of the checkpoint tensors the quantized layers were built from.

    With `sources` (the checkpoint's tensors) the model's weights are not loaded yet: each layer reads only its
    own slices (layers/linear.py `shards`), so no fp32 copy of the model is ever made, and the model's
    load_weights fills what is left, given the returned names. Without, the loaded weights are requantized.

    "int8": every layer, requantized. "gguf" / "gguf-a8" (need `sources`): each layer whose checkpoint slices are
    stored as Q4_1 or Q8_0, with exactly those values (Q4_1 layers rounding x to int16 / int8); other layers stay
    in fp32. A tied embedding is then looked up from the int8 LM head's rows (exact for a Q8_0 table), and under
    "int8" an untied one from its own int8 copy."""
    check_quantization(method, next(model.parameters()).device)
    consumed: set[str] = set()

    def parameter(name: str, module: nn.Module, leaf: str) -> torch.Tensor | None:
        value = getattr(module, leaf)
        if value is None or sources is None:
            return value
        return read_parameter(name, module, leaf, sources, consumed)

    if method in Q4_ACTIVATIONS:
        if sources is None:
            raise ValueError(f"quantization {method!r} needs a GGUF checkpoint (its quantized blocks are used as they "
                             "are)")
        for name, module in _linears(model):
            stored = _stored_blocks(name, module, sources)
            if stored is None or len({kind for kind, _ in stored[0]}) != 1 or stored[0][0][0] not in GGUF_KERNEL_TYPES:
                continue  # stays a float layer, loaded by the model
            consumed |= stored[1]
            _swap(model, name, _gguf_linear(module, stored[0], parameter(name, module, "bias"), Q4_ACTIVATIONS[method]))
    else:
        for name, module in _linears(model):
            _swap(model, name, Int8Linear(parameter(name, module, "weight"), parameter(name, module, "bias")))
    _int8_embedding(model, method, parameter)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    counts = {cls.__name__: sum(isinstance(m, cls) for m in layers) for cls in (Int8Linear, Q4Linear)}
    logger.info("%s: %s quantized layers (%s), %.0f MiB of weights; %d linear layers left in fp32", method,
                len(layers), ", ".join(f"{v} {k}" for k, v in counts.items() if v),
                sum(m.nbytes for m in layers) / 2**20, len(_linears(model)))
    return consumed


def _int8_embedding(model: nn.Module, method: str, parameter) -> None:
    """Embedding lookups from int8 rows (Int8Embedding), so no fp32 table stays in memory: a tied table shares
    the LM head's copy when the head is int8 (under "gguf" that is a Q8_0 table: the lookups are exact); under
    "int8" any other table gets its own int8 copy. `parameter(name, module, leaf)` reads a weight."""
    embed, head = getattr(model.model, "embed_tokens", None), getattr(model, "lm_head", None)
    if not isinstance(embed, Embedding) or isinstance(embed, Int8Embedding):
        return
    if model.config.tie_word_embeddings and isinstance(head, Int8Linear):
        model.model.embed_tokens = Int8Embedding(head, embed)
    elif method == "int8":
        model.model.embed_tokens = Int8Embedding(Int8Linear(parameter("model.embed_tokens", embed, "weight")), embed)

"""Int8-weight linear layers: Q8_0-style weights (symmetric int8, one fp16 scale per group of 32 along K) with
fp32 activations in and out, and the swap of a loaded model's linear layers (and LM head) for them.

Small batches (decode) run the AVX2 kernel pagoda/kernels/int8_linear.cpp, which reads each weight byte once
per call whatever the batch, so a decode step moves about a quarter of the fp32 weight bytes. To multiply
exactly in integers it rounds x to int16 per group of 32 inside the call: at most half a step of
max|x_group| / 32767 per element, about 2e-5 relative on the model's shapes, far below the int8 rounding of
the weights. Large batches (prefill) are compute-bound: there the weight is dequantized to fp32 for the call
and torch's GEMM runs. Both paths compute x @ dequantize(W)^T up to that rounding.
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import kernels
from pagoda.layers.linear import Linear

logger = logging.getLogger("pagoda")

GROUP = 32  # weights per scale along K (Q8_0's block)
TILE = 16  # output rows per packed tile: the kernel's layout unit (see int8_linear.cpp)
KERNEL_MAX_ROWS = 64  # above this many input rows the fp32 GEMM on a dequantized weight is faster (measured)
QUANTIZATIONS = ("int8",)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W[N, K] float -> (q int8 [N, K'], scales fp16 [N, K'/32]), K' = K rounded up to 32 (zero padding).
    q = round(W / s) with s = max|group| / 127 rounded up to fp16, so q is in [-127, 127] without clamping and
    |W - q * s| <= s / 2 for every weight."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    w = F.pad(w, (0, -k % GROUP))
    groups = w.view(n, -1, GROUP)
    exact = groups.abs().amax(dim=-1) / 127
    scales = exact.to(torch.float16)
    scales = torch.where(scales.to(torch.float32) < exact, torch.nextafter(scales, torch.tensor(torch.inf,
                         dtype=torch.float16)), scales)
    if not torch.isfinite(scales).all():
        raise ValueError("weight has values too large (or not finite) for int8 with fp16 scales")
    s = scales.to(torch.float32).unsqueeze(-1)
    q = torch.where(s > 0, groups / s, torch.zeros_like(groups)).round_().clamp_(-127, 127)  # clamp: fp32 slop
    return q.to(torch.int8).view(n, -1), scales


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
    return (qt.transpose(1, 2).reshape(-1, k)[:n], st.transpose(1, 2).reshape(-1, st.shape[1])[:n])


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_library: ctypes.CDLL | bool | None = None  # None: not loaded yet; False: cannot be built (torch path)


def _kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None (logged once) when it cannot be built: then the torch path runs."""
    global _library
    if _library is None:
        try:
            lib = kernels.load("int8_linear")
        except kernels.KernelBuildError as exc:
            logger.warning("int8 kernel unavailable, using the slower torch path: %s", exc)
            _library = False
            return None
        lib.int8_linear.argtypes = [_P, _I64, _I64, _I64, _P, _P, _I64, _P, _I64, ctypes.c_int]
        lib.int8_linear.restype = None
        lib.int8_dequantize_t.argtypes = [_P, _P, _I64, _I64, _P, ctypes.c_int]
        lib.int8_dequantize_t.restype = None
        _library = lib
    return _library or None


class Int8Linear(nn.Module):
    """y = x @ dequantize(quantize(W))^T (+ bias), x of any float dtype (computed in fp32, returned in x's)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scales = quantize(weight)
        qt, st = pack(q, scales)
        _kernel()  # load (build) the kernel now, not in the first forward
        self.register_buffer("qweight", qt)  # [T, K'/2, 16, 2] int8
        self.register_buffer("scales", st.view(torch.int16))  # [T, K'/32, 16] fp16 bits
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
        self._pointers()

    def _pointers(self) -> None:
        # The kernel's arguments that do not change between calls, as plain attributes: module attribute
        # lookups cost about a microsecond each, and a decode step makes over a hundred calls.
        self._weight_args = (self.qweight.data_ptr(), self.scales.data_ptr(), self.out_features,
                             self.padded_in_features, self.bias is not None)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)  # .to(), .share_memory() ... may move the buffers
        self._pointers()
        return module

    @classmethod
    def from_linear(cls, linear: nn.Module) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    @property
    def padded_in_features(self) -> int:
        return self.qweight.shape[1] * 2

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def weight_fp32_t(self) -> torch.Tensor:
        """The dequantized weight, transposed: [K', N] (a view; padded input columns give zero rows)."""
        lib = _kernel()
        if lib is None:
            return dequantize(*unpack(self.qweight, self.scales.view(torch.float16), self.out_features)).t()
        out = torch.empty(self.padded_in_features, self.qweight.shape[0] * TILE, dtype=torch.float32)
        lib.int8_dequantize_t(self.qweight.data_ptr(), self.scales.data_ptr(), self.out_features,
                              self.padded_in_features, out.data_ptr(), torch.get_num_threads())
        return out[:, :self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fast path first: the model passes contiguous fp32 [tokens, K] (cheap checks only, see _pointers).
        qweight, scales, n, k, has_bias = self._weight_args
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.float32 or x.shape[-1] != k or not rows.is_contiguous():
            rows = F.pad(rows.to(torch.float32), (0, k - x.shape[-1])).contiguous()
        m, lib = rows.shape[0], _library
        if lib and m <= KERNEL_MAX_ROWS:
            y = torch.empty((m, n), dtype=torch.float32)
            lib.int8_linear(rows.data_ptr(), m, k, k, qweight, scales, n, y.data_ptr(), n, torch.get_num_threads())
        else:
            y = torch.mm(rows, self.weight_fp32_t())
        if has_bias:
            y += self.bias
        if x.dim() != 2 or x.dtype != torch.float32:
            y = y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
        return y


def check_quantization(method: str | None, device: torch.device) -> None:
    """Raise ValueError unless `method` (None: no quantization) can run on `device`."""
    if method is None:
        return
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization {method!r} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantization {method!r} runs on the CPU only")


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Swap every Linear of a loaded model, and the LM head (the tied embedding too, as a separate int8 copy:
    the embedding table stays for lookups), for int8 ones. Returns the model, changed in place."""
    check_quantization(method, next(model.parameters()).device)
    swaps = [(name, module) for name, module in model.named_modules() if isinstance(module, Linear)]
    for name, module in swaps:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, Int8Linear.from_linear(module))
    if getattr(model, "lm_head", False) is None:  # tied output projection: compute_logits uses lm_head if set
        model.lm_head = Int8Linear(model.model.embed_tokens.weight)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    size = sum(m.qweight.nbytes + m.scales.nbytes for m in layers)
    logger.info("int8: %d linear layers quantized, %.0f MiB of int8 weights and scales", len(layers), size / 2**20)
    return model

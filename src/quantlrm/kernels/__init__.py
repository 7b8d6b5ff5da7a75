"""Low-bit matmul y = x @ W^T for `KernelWeight`s: Triton on CUDA, a torch reference anywhere.

`qmatmul` picks, per (shape, bits, group size, batch bucket), the fastest of a few kernel
configurations and dequantize-then-cuBLAS by timing them once on the first call (like
`triton.autotune`, but the candidates include split-K with its fp32 buffer and the cuBLAS
path, so prefill is never slower than dequantize-then-matmul as measured). Calls made while a
CUDA graph is being captured never time anything: warm up before capturing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from quantlrm.kernels.layout import KernelWeight, dequantize, reference_matmul

__all__ = ["KernelWeight", "Config", "qmatmul", "candidates", "run_config", "triton_available",
           "dequantize", "reference_matmul"]


def triton_available() -> bool:
    """True when Triton can run here (a CUDA device, or the CPU interpreter TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_compat() -> None:
    """Triton 3.6's CPU interpreter calls int() on 1-element arrays, which NumPy >= 2.4 refuses;
    patch that one conversion so TRITON_INTERPRET=1 (CPU correctness runs) works."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    if getattr(ti, "_quantlrm_patched", False):
        return
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched
    ti._quantlrm_patched = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_compat()


@dataclass(frozen=True)
class Config:
    """One way to compute the product. kind: 'gemv' | 'gemm' | 'dequant' (then cuBLAS)."""

    kind: str
    block_m: int = 16
    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def _unit(bits: int) -> int:
    return 32 if bits == 3 else 32 // bits


def _gemv_ok(kw: KernelWeight) -> bool:
    # One 32-code unit must sit inside one group (or there is one group only).
    return kw.group_size % _unit(kw.bits) == 0 or kw.group_size == kw.in_features


def candidates(kw: KernelWeight, m: int) -> list[Config]:
    """The configurations tried for `m` activation rows."""
    if m == 1:
        out = [Config("gemv", block_n=bn, block_k=bk, split_k=sk, num_warps=w)
               for bn, bk, sk, w in ((16, 512, 1, 4), (32, 512, 1, 4), (8, 1024, 1, 4),
                                     (16, 1024, 1, 8), (32, 256, 2, 4), (16, 512, 4, 4))]
        out = out if _gemv_ok(kw) else []
        return out + [Config("gemm", block_m=16, block_n=64, block_k=128, split_k=2)]
    if m <= 16:
        tiles = ((16, 64, 128, 1, 4, 3), (16, 32, 128, 4, 4, 3), (16, 128, 64, 2, 4, 3))
    elif m <= 64:
        tiles = ((32, 64, 128, 1, 4, 3), (64, 64, 64, 1, 4, 3), (32, 128, 64, 2, 4, 3))
    else:
        tiles = ((64, 128, 64, 1, 4, 3), (128, 128, 64, 1, 8, 3), (128, 64, 64, 1, 4, 4))
    out = [Config("gemm", bm, bn, bk, sk, w, st) for bm, bn, bk, sk, w, st in tiles]
    return out + [Config("dequant", block_n=64, block_k=128)]


def _strides(kw: KernelWeight) -> tuple[int, int, int]:
    p1 = kw.planes[1] if len(kw.planes) > 1 else kw.planes[0]
    return kw.planes[0].stride(0), p1.stride(0), kw.scale.stride(0)


def _plane_args(kw: KernelWeight) -> tuple:
    p0 = kw.planes[0]
    p1 = kw.planes[1] if len(kw.planes) > 1 else p0
    bits0 = 2 if kw.bits == 3 else kw.bits
    bits1 = 1 if kw.bits == 3 else 0
    return p0, p1, bits0, bits1


def dequant_triton(kw: KernelWeight, dtype: torch.dtype, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """Dense [out, in] weight written by the Triton decoder."""
    from quantlrm.kernels import triton_kernels as tk

    n, k = kw.out_features, kw.in_features
    w = torch.empty(n, k, dtype=dtype, device=kw.scale.device)
    p0, p1, b0, b1 = _plane_args(kw)
    sp0, sp1, ss = _strides(kw)
    grid = (tk.cdiv(n, block_n), tk.cdiv(k, block_k))
    tk._dequant_kernel[grid](p0, p1, kw.scale, kw.zero, w, n, k, sp0, sp1, ss, kw.group_size,
                             BITS0=b0, BITS1=b1, BLOCK_N=block_n, BLOCK_K=block_k)
    return w


def run_config(x2: torch.Tensor, kw: KernelWeight, cfg: Config) -> torch.Tensor:
    """y [M, N] = x2 [M, K] @ W^T with one configuration."""
    from quantlrm.kernels import triton_kernels as tk

    m, k = x2.shape
    n = kw.out_features
    p0, p1, b0, b1 = _plane_args(kw)
    sp0, sp1, ss = _strides(kw)
    if cfg.kind == "dequant":
        return x2 @ dequant_triton(kw, x2.dtype, cfg.block_n, cfg.block_k).t()
    split = cfg.split_k
    y = (torch.zeros if split > 1 else torch.empty)(m, n, dtype=torch.float32 if split > 1 else x2.dtype,
                                                      device=x2.device)
    if cfg.kind == "gemv":
        unit = _unit(kw.bits)
        n_units = tk.cdiv(k, unit)
        block_u = cfg.block_k // unit
        per = tk.cdiv(tk.cdiv(n_units, split), block_u) * block_u
        grid = (tk.cdiv(n, cfg.block_n), tk.cdiv(n_units, per))
        tk._gemv_kernel[grid](x2, p0, p1, kw.scale, kw.zero, y, n, k, n_units, per, sp0, sp1, ss,
                              kw.group_size, BITS0=b0, BITS1=b1, BLOCK_N=cfg.block_n, BLOCK_U=block_u,
                              SPLIT_K=grid[1], num_warps=cfg.num_warps)
    else:
        per = tk.cdiv(tk.cdiv(k, split), cfg.block_k) * cfg.block_k
        grid = (tk.cdiv(m, cfg.block_m), tk.cdiv(n, cfg.block_n), tk.cdiv(k, per))
        tk._gemm_kernel[grid](x2, p0, p1, kw.scale, kw.zero, y, m, n, k, per, x2.stride(0), y.stride(0),
                              sp0, sp1, ss, kw.group_size, BITS0=b0, BITS1=b1, BLOCK_M=cfg.block_m,
                              BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=grid[2],
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x2.dtype) if y.dtype != x2.dtype else y


def _bucket(m: int) -> int:
    if m == 1:
        return 1
    return min(1 << (m - 1).bit_length(), 1024)


# (bucket, N, K, bits, group, dtype) -> chosen Config
_TUNED: dict[tuple, Config] = {}


def _time(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def choose(x2: torch.Tensor, kw: KernelWeight) -> Config:
    """The tuned configuration for this call's key (tuning on first use)."""
    m = x2.shape[0]
    key = (_bucket(m), kw.out_features, kw.in_features, kw.bits, kw.group_size, x2.dtype)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    cands = candidates(kw, m)
    if not x2.is_cuda or torch.cuda.is_current_stream_capturing():
        return cands[0]  # no timing possible now: the first candidate is always valid
    best = min(cands, key=lambda c: _time(lambda: run_config(x2, kw, c)))
    _TUNED[key] = best
    return best


def qmatmul(x: torch.Tensor, kw: KernelWeight, config: Config | None = None) -> torch.Tensor:
    """y = x @ W^T for x [..., in] in fp16/bf16; Triton on CUDA, the torch reference on CPU."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if not x2.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        y = reference_matmul(x2, kw)
    else:
        y = run_config(x2, kw, config or choose(x2, kw))
    return y.view(*shape[:-1], kw.out_features)

"""Low-bit matmul y = x @ W^T for `KernelWeight`s: Triton on CUDA, a torch reference anywhere.

`qmatmul` picks, per (shape, bits, group size, batch bucket), the fastest of a few kernel
configurations and dequantize-then-cuBLAS by timing them once on the first call (like
`triton.autotune`, but the candidates include split-K with its fp32 buffer and the cuBLAS
path, so prefill is never slower than dequantize-then-matmul as measured). Calls made while a
CUDA graph is being captured never time anything: warm up before capturing.
"""

from __future__ import annotations

import math
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


def _tile_k(kw: KernelWeight, block_k: int) -> int | None:
    """A K tile that stays inside one group and covers whole words, or None (generic path)."""
    if kw.group_size == kw.in_features:
        return block_k
    bk = math.gcd(block_k, kw.group_size)
    return bk if bk >= 32 else None


_SMS = 132  # H100/H200; only used to size split-K


def _auto_split(n: int, k: int, block_n: int, block_k: int) -> int:
    """Split K until about two waves of programs run, keeping >= 2 tiles per split."""
    blocks = -(-n // block_n)
    max_split = max(1, k // (2 * block_k))
    return max(1, min(max_split, -(-2 * _SMS // blocks)))


def candidates(kw: KernelWeight, m: int) -> list[Config]:
    """The configurations tried for `m` activation rows."""
    n, k = kw.out_features, kw.in_features
    out: list[Config] = []
    # Few candidates on purpose: each one is a Triton compile (seconds) on first use.
    if m == 1 and _gemv_ok(kw):
        if kw.bits == 3:
            tiles = ((128, 512, 4), (128, 1024, 4))
        else:
            tiles = ((128, 256, 4), (64, 512, 4))
        for bn, bk, w in tiles:
            out.append(Config("gemv", block_n=bn, block_k=bk, num_warps=w,
                              split_k=_auto_split(n, k, bn, bk)))
        bn, bk, w = tiles[0]
        out.append(Config("gemv", block_n=bn, block_k=bk, num_warps=w, split_k=1))
        return out
    if m <= 16:
        tiles = ((16, 64, 128, 4, 3), (16, 128, 128, 4, 3))
    elif m <= 64:
        tiles = ((32, 64, 128, 4, 3), (64, 128, 64, 4, 3))
    else:
        tiles = ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3))
    for bm, bn, bk, w, st in tiles:
        sk = _auto_split(-(-m // bm) * n, k, bn, bk) if m <= 64 else 1
        out.append(Config("gemm", bm, bn, bk, sk, w, st))
    return out + [Config("dequant", block_n=32, block_k=128)]


def _plane_args(kw: KernelWeight) -> tuple:
    p0 = kw.planes[0]
    p1 = kw.planes[1] if len(kw.planes) > 1 else p0
    bits0 = 2 if kw.bits == 3 else kw.bits
    bits1 = 1 if kw.bits == 3 else 0
    return p0, p1, bits0, bits1


def dequant_triton(kw: KernelWeight, dtype: torch.dtype, block_n: int = 32, block_k: int = 128) -> torch.Tensor:
    """Dense [out, in] weight written by the Triton decoder."""
    from quantlrm.kernels import triton_kernels as tk

    n, k = kw.out_features, kw.in_features
    w = torch.empty(n, k, dtype=dtype, device=kw.scale.device)
    p0, p1, b0, b1 = _plane_args(kw)
    bk = _tile_k(kw, block_k)
    if bk is None:
        grid = (tk.cdiv(n, block_n), tk.cdiv(k, block_k))
        tk._dequant_kernel[grid](p0, p1, kw.scale, kw.zero, w, n, k, p0.stride(0), p1.stride(0),
                                 kw.scale.stride(0), kw.group_size, BITS0=b0, BITS1=b1,
                                 BLOCK_N=block_n, BLOCK_K=block_k)
        return w
    grid = (tk.cdiv(n, block_n), tk.cdiv(k, bk))
    tk._dequant_block_kernel[grid](p0, p1, kw.scale, kw.zero, w, n, k, p0.shape[1], p1.shape[1],
                                   p0.stride(0), p1.stride(0), kw.scale.stride(0), kw.group_size,
                                   BITS0=b0, BITS1=b1, BLOCK_N=block_n, BLOCK_K=bk)
    return w


def run_config(x2: torch.Tensor, kw: KernelWeight, cfg: Config) -> torch.Tensor:
    """y [M, N] = x2 [M, K] @ W^T with one configuration."""
    from quantlrm.kernels import triton_kernels as tk

    m, k = x2.shape
    n = kw.out_features
    p0, p1, b0, b1 = _plane_args(kw)
    sp0, sp1, ss = p0.stride(0), p1.stride(0), kw.scale.stride(0)
    if cfg.kind == "dequant":
        return x2 @ dequant_triton(kw, x2.dtype, cfg.block_n, cfg.block_k).t()
    split = cfg.split_k
    y = (torch.zeros if split > 1 else torch.empty)(m, n, dtype=torch.float32 if split > 1 else x2.dtype,
                                                      device=x2.device)
    if cfg.kind == "gemv":
        unit = _unit(kw.bits)
        n_units = tk.cdiv(k, unit)
        block_u = max(1, cfg.block_k // unit)
        per = tk.cdiv(tk.cdiv(n_units, split), block_u) * block_u
        grid = (tk.cdiv(n, cfg.block_n), tk.cdiv(n_units, per))
        tk._gemv_kernel[grid](x2, p0, p1, kw.scale, kw.zero, y, n, k, n_units, per, sp0, sp1, ss,
                              kw.group_size, BITS0=b0, BITS1=b1, BLOCK_N=cfg.block_n, BLOCK_U=block_u,
                              SPLIT_K=grid[1], num_warps=cfg.num_warps)
    else:
        bk = _tile_k(kw, cfg.block_k)
        per = tk.cdiv(tk.cdiv(k, split), bk or cfg.block_k) * (bk or cfg.block_k)
        grid = (tk.cdiv(m, cfg.block_m), tk.cdiv(n, cfg.block_n), tk.cdiv(k, per))
        common = dict(BITS0=b0, BITS1=b1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=grid[2],
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if bk is None:
            tk._gemm_kernel[grid](x2, p0, p1, kw.scale, kw.zero, y, m, n, k, per, x2.stride(0), y.stride(0),
                                  sp0, sp1, ss, kw.group_size, BLOCK_K=cfg.block_k, **common)
        else:
            tk._gemm_block_kernel[grid](x2, p0, p1, kw.scale, kw.zero, y, m, n, k, per, p0.shape[1],
                                        p1.shape[1], x2.stride(0), y.stride(0), sp0, sp1, ss,
                                        kw.group_size, BLOCK_K=bk, **common)
    return y.to(x2.dtype) if y.dtype != x2.dtype else y


def _bucket(m: int) -> int:
    if m == 1:
        return 1
    return min(1 << (m - 1).bit_length(), 1024)


# (bucket, N, K, bits, group, dtype) -> chosen Config
_TUNED: dict[tuple, Config] = {}


def _time(fn, reps: int = 5) -> float:
    """Median ms of a CUDA-graph replay of `fn`: launch overhead stays out, as in a decode graph.

    A configuration that fails to compile here (e.g. out of shared memory) is skipped (inf)."""
    try:
        fn()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 -- triton's OutOfResources and friends; never inside a capture
        return float("inf")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _copies(kw: KernelWeight) -> list[KernelWeight]:
    """Enough copies of the weight to overflow L2, so tuning sees DRAM, not cache, speed."""
    n = max(1, min(16, -(-(128 << 20) // max(1, kw.nbytes()))))
    return [kw] + [KernelWeight([p.clone() for p in kw.planes], kw.scale.clone(), kw.zero.clone(), kw.bits,
                                kw.group_size, kw.in_features, kw.out_features) for _ in range(n - 1)]


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
    kws = _copies(kw)
    best = min(cands, key=lambda c: _time(lambda: [run_config(x2, w, c) for w in kws]))
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

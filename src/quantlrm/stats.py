"""Exact order statistics (median, minimum) of a stream of non-negative fp32 values.

Why: the global median of all weight updates of a model (7e10 values for 70B) must be
exact, yet the values never fit in memory at once, and `torch.quantile` refuses inputs
over 16M elements. Positive IEEE-754 floats order exactly like their int32 bit patterns,
so the k-th smallest value can be found by radix selection on the bits:

1. Pass 1 (`add`): a 65536-bin histogram of the high 16 bits of every value (sign,
   exponent, top 7 mantissa bits: the bf16 prefix). A cumulative sum gives the bucket
   that holds rank k and the rank r inside that bucket.
2. Pass 2 (`refine`, only if needed): a 65536-bin histogram of the low 16 bits of the
   values inside that bucket gives the exact bit pattern.

Pass 2 is often unnecessary: pass 1 also counts, per bucket, the values whose low 16 bits
are non-zero. Values with zero low bits are the smallest in their bucket, so if rank r
falls among them the answer is the bucket's base value. Updates between two bf16
checkpoints usually have at most 8 significant bits, so they are exactly representable in
bf16 and the median is known after one pass.

Memory: two int64 histograms of 65536 bins (1 MiB), plus one per bucket being refined.
Zeros are counted separately; ranks are among the strictly positive values. Works on any
torch device (`torch.bincount` on CPU or CUDA).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

BINS = 1 << 16
BATCH = 1 << 20  # values per histogram call at least (small chunks are concatenated)


def bits_to_float(bits: int) -> float:
    """The fp32 value with this (non-negative) int32 bit pattern, as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def float_to_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


@dataclass
class _Pending:
    bucket: int
    rank: int  # rank inside the bucket, 0-based


class PositiveSelect:
    """k-th smallest strictly positive value of a stream of finite, non-negative fp32 tensors.

    Usage: `add` every chunk; `plan(ranks)`; if it returns True, `refine` every chunk again
    (same values, any order/chunking); then `values()` gives the selected values in the
    order of `ranks`. Rank k is 0-based among the positive values, so the median that
    `torch.median` returns for n positive values is rank (n - 1) // 2 (the lower middle).
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.hi = torch.zeros(BINS, dtype=torch.int64, device=self.device)
        self.hi_lowset = torch.zeros(BINS, dtype=torch.int64, device=self.device)
        self.zeros = torch.zeros((), dtype=torch.int64, device=self.device)
        self._pending: list[_Pending | None] = []
        self._exact: list[int | None] = []
        self._lo: dict[int, torch.Tensor] = {}
        self._ranks: list[int] = []
        self._planned = False
        self._small: list[torch.Tensor] = []
        self._small_n = 0

    # -- pass 1 -------------------------------------------------------------------------
    def add(self, x: torch.Tensor, n_zero: torch.Tensor | int | None = None) -> None:
        """Count a chunk of non-negative finite fp32 values (`n_zero`: its count of zeros, if known)."""
        bits = _bits(x)
        self.zeros += (bits == 0).sum() if n_zero is None else n_zero
        self._batch(bits, self._count)

    def _count(self, bits: torch.Tensor) -> None:
        hi = bits >> 16  # values are non-negative: the shift never sees a sign bit
        _accumulate(self.hi, hi)
        lowset = (bits & 0xFFFF) != 0
        _accumulate(self.hi_lowset, hi[lowset])

    def _batch(self, bits: torch.Tensor, fn) -> None:
        """Small chunks are gathered (up to BATCH values) so each histogram call is worth its cost."""
        if bits.numel() >= BATCH:
            fn(bits)
            return
        self._small.append(bits.clone())
        self._small_n += bits.numel()
        if self._small_n >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self._small:
            fn = self._refine_bits if self._planned else self._count
            bits = torch.cat(self._small)
            self._small, self._small_n = [], 0
            fn(bits)

    @property
    def n_positive(self) -> int:
        return int(self.hi.sum().item() - self.zeros.item())

    @property
    def n_zero(self) -> int:
        return int(self.zeros.item())

    def plan(self, ranks: list[int]) -> bool:
        """Locate each rank's bucket; return True if a second pass (`refine`) is needed."""
        self.flush()
        n = self.n_positive
        for k in ranks:
            if not 0 <= k < n:
                raise ValueError(f"rank {k} out of range for {n} positive values")
        hi = self.hi.cpu()
        hi[0] -= self.zeros.cpu()  # zeros sit in bucket 0 with zero low bits; drop them
        lowset = self.hi_lowset.cpu()
        cum = torch.cumsum(hi, 0)
        self._ranks = list(ranks)
        self._pending, self._exact = [], []
        for k in ranks:
            b = int(torch.searchsorted(cum, torch.tensor(k), right=True).item())
            r = k - (int(cum[b - 1]) if b > 0 else 0)
            n_base = int(hi[b] - lowset[b])  # values equal to the bucket's base b << 16
            if r < n_base:
                self._exact.append(b << 16)
                self._pending.append(None)
            else:
                self._exact.append(None)
                self._pending.append(_Pending(b, r))
                if b not in self._lo:
                    self._lo[b] = torch.zeros(BINS, dtype=torch.int64, device=self.device)
        self._planned = True
        return bool(self._lo)

    # -- pass 2 -------------------------------------------------------------------------
    def refine(self, x: torch.Tensor) -> None:
        """Second look at a chunk: histogram the low bits of values in the pending buckets."""
        self._batch(_bits(x), self._refine_bits)

    def _refine_bits(self, bits: torch.Tensor) -> None:
        hi = bits >> 16
        for b, hist in self._lo.items():
            sel = bits[hi == b] & 0xFFFF
            if b == 0:
                sel = sel[sel != 0]  # zeros are not positive values
            if sel.numel():
                _accumulate(hist, sel)

    def values(self) -> list[float]:
        """The selected values (exact fp32 values as Python floats), in the order of `ranks`."""
        if not self._planned:
            raise RuntimeError("call plan() first")
        self.flush()
        out = []
        for exact, pend in zip(self._exact, self._pending, strict=True):
            if exact is not None:
                out.append(bits_to_float(exact))
                continue
            assert pend is not None
            cum = torch.cumsum(self._lo[pend.bucket].cpu(), 0)
            if int(cum[-1]) <= pend.rank:
                raise RuntimeError("refine() did not see the same values as add()")
            j = int(torch.searchsorted(cum, torch.tensor(pend.rank), right=True).item())
            out.append(bits_to_float((pend.bucket << 16) | j))
        return out


def _accumulate(hist: torch.Tensor, idx: torch.Tensor) -> None:
    """hist += bincount(idx). On CPU numpy's single-threaded bincount and add avoid the
    thread-pool start-up that dominates torch's versions on 65536 bins."""
    if hist.device.type == "cpu":
        h = hist.numpy()
        np.add(h, np.bincount(idx.numpy(), minlength=BINS), out=h)
    elif idx.numel():
        hist += torch.bincount(idx, minlength=BINS)


def _bits(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise TypeError(f"expected float32 values, got {x.dtype}")
    return x.contiguous().reshape(-1).view(torch.int32)


def select_positive(x: torch.Tensor, ranks: list[int], chunk: int | None = None) -> list[float]:
    """One-call helper over an in-memory tensor (optionally fed in chunks, as a stream would be)."""
    flat = x.reshape(-1).float()
    parts = [flat] if not chunk else list(flat.split(chunk))
    sel = PositiveSelect(x.device)
    for p in parts:
        sel.add(p)
    if sel.plan(ranks):
        for p in parts:
            sel.refine(p)
    return sel.values()

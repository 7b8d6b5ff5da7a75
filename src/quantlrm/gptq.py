"""GPTQ rounding: quantize a linear column by column, pushing each column's rounding error
onto the columns not yet quantized so that the layer's OUTPUT error stays small.

Used after the scale search (`QuantizeOptions.rounding="gptq"`): the searched scales are
already folded into the weight, so the Hessian must be that of the scaled inputs
(`scale_hessian`). The grid is exactly `quantlrm.quantizer.quantize`'s (asymmetric,
per group of input channels), so the result is a `QuantResult` every export format takes.

Facts from the GPTQ paper (Frantar et al., 2022): objective ||W X - Q X||^2 with Hessian
H = 2/n X^T X; the optimal update after rounding column j is -err_j / [H^-1]_jj times row j
of H^-1, after which j is removed from H^-1 (a Schur complement); the rows of the upper
Cholesky factor of H^-1 give all these rows at once, and updates are applied lazily per
block of columns. Groups take their grid from the already-updated weights when the group
starts (no static groups, no act-order, so the group layout stays contiguous).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from quantlrm.errors import QuantLRMError
from quantlrm.quantizer import QuantResult, check_config, quantize

DAMP_RETRIES = 4  # damping x10 per retry when H (+damping) is not positive definite


class HessianAccumulator:
    """Running sum of x^T x over calibration tokens; memory is [in, in] whatever the token count."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", chunk_tokens: int = 4096):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        self.chunk_tokens = chunk_tokens

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        for c in x2.split(self.chunk_tokens):  # bounded fp32 copy of the (16-bit) activations
            c = c.to(self.sum.device, torch.float32)
            self.sum.addmm_(c.T, c)
        self.n += x2.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2/n X^T X (fp32)."""
        if self.n == 0:
            raise QuantLRMError("no calibration tokens reached this linear.", "give more calibration samples.")
        return self.sum * (2.0 / self.n)


def scale_hessian(h: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """Hessian of the inputs x / s that a linear sees after its columns were multiplied by s."""
    if s is None:
        return h
    inv = 1.0 / s.to(h)
    return h * inv[:, None] * inv[None, :]


@dataclass
class GPTQStats:
    loss: float  # GPTQ's sum of (w - q)^2 / [H^-1]_jj / 2: the objective 1/2 tr(E H E^T)
    loss_rtn: float  # the same objective for round-to-nearest on the same grid rule
    damp: float  # relative damping that made H positive definite
    dead_inputs: int  # input channels no calibration token used (weight column zeroed)

    def as_dict(self) -> dict:
        return {"loss": self.loss, "loss_rtn": self.loss_rtn, "damp": self.damp, "dead_inputs": self.dead_inputs}


def _with_damping(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I: GPTQ's relative damping."""
    return h + damp * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def _without_dead(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of H with diagonal 1 at inputs no token used, and the mask of those inputs."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    return h, dead


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retrying with more damping."""
    d = damp
    for _ in range(DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(_with_damping(h, d))
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, d
        d *= 10
    raise QuantLRMError(
        f"the calibration Hessian is not positive definite even with damping {d / 10:g}.",
        "raise --gptq-damp (e.g. 0.1), or give more / more varied calibration text.",
    )


def damped_hessian(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H with GPTQ's handling of dead inputs (diagonal 1) and relative damping added."""
    return _with_damping(_without_dead(h)[0], damp)


def objective(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """1/2 tr((W - Q) H (W - Q)^T): with H = 2/n X^T X, the mean over tokens of ||(W - Q) x||^2."""
    return float(_row_objective(w, wq, h).sum())


def _row_objective(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    e = (w - wq).to(h)
    return 0.5 * ((e @ h) * e).sum(1)


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int = 128,
    clip_max: torch.Tensor | None = None,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
) -> tuple[QuantResult, GPTQStats]:
    """Quantize `w` [out, in] with GPTQ's error compensation under Hessian `h` [in, in].

    Works in fp64 when `h` is fp64 (tests), else fp32. `clip_max` [out, in/g] clamps each
    group to [-clip, clip] before its grid is chosen and before rounding, as `quantize` does.
    `act_order`: columns in order of decreasing H diagonal (the most used inputs first, while
    the most columns remain to absorb their error), with every group's grid fixed beforehand
    ("static" groups), so the group layout and every export format stay as they are.
    """
    return gptq_quantize_shared([w], h, bits, group_size, [clip_max], damp, block, act_order)[0]


@torch.no_grad()
def gptq_quantize_shared(
    ws: list[torch.Tensor],
    h: torch.Tensor,
    bits: int,
    group_size: int = 128,
    clips: list[torch.Tensor | None] | None = None,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
) -> list[tuple[QuantResult, GPTQStats]]:
    """`gptq_quantize` of several linears that read the same input (q/k/v, gate/up) in one pass.

    GPTQ treats every output row on its own under the shared H, so stacking the rows gives each
    linear the result it would get alone, with one sequential column loop instead of several.
    """
    clips = clips if clips is not None else [None] * len(ws)
    if len(ws) == 1:
        w, clip_max = ws[0], clips[0]
    else:
        if len({w.shape[1] for w in ws}) != 1:
            raise QuantLRMError("linears quantized under one Hessian must have the same input size.",
                                "group only linears that read the same input.")
        w = torch.cat(ws)
        clip_max = None
        if any(c is not None for c in clips):  # an unclipped linear's rows clip at infinity
            g = check_config(bits, group_size, w.shape[1])
            clip_max = torch.cat([c.float() if c is not None else x.new_full((x.shape[0], x.shape[1] // g), float("inf"), dtype=torch.float32)
                                  for x, c in zip(ws, clips, strict=True)])
    result, loss, loss_rtn, used_damp, dead = _gptq_rows(w, h, bits, group_size, clip_max, damp, block, act_order)
    out, r0 = [], 0
    for x in ws:
        r1 = r0 + x.shape[0]
        part = QuantResult(codes=result.codes[r0:r1].clone(), scale=result.scale[r0:r1].clone(),
                           zero=result.zero[r0:r1].clone(), bits=bits, group_size=result.group_size)
        out.append((part, GPTQStats(loss=float(loss[r0:r1].sum()), loss_rtn=float(loss_rtn[r0:r1].sum()),
                                    damp=used_damp, dead_inputs=dead)))
        r0 = r1
    return out


def _gptq_rows(w, h, bits, group_size, clip_max, damp, block, act_order=False):
    """The GPTQ pass; per-row GPTQ and RTN objectives, the damping used, the dead inputs."""
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise QuantLRMError(
            f"GPTQ needs a weight [out, in] and a Hessian [in, in]; got {tuple(w.shape)} and {tuple(h.shape)}.",
            "pass the Hessian of this linear's inputs.",
        )
    if damp <= 0 or block < 1:
        raise QuantLRMError(f"GPTQ damping {damp} / block {block} is invalid.", "use damp > 0 and block >= 1.")
    out, inp = w.shape
    g = check_config(bits, group_size, inp)
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    W = w.detach().to(dt).clone()
    H, dead = _without_dead(h.detach().to(dt))
    W[:, dead] = 0
    w0 = W.clone()  # after dead-column zeroing: what the objective is measured against
    perm = None
    if act_order:  # columns by decreasing H diagonal; the groups keep their grids from w0 (static)
        static = quantize(w0, bits, g, clip_max=clip_max)
        scale, zero = static.scale, static.zero
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        scale = torch.empty(out, inp // g, dtype=torch.float32, device=W.device)
        zero = torch.empty(out, inp // g, dtype=torch.uint8, device=W.device)
    U, used_damp = _inverse_cholesky(H, damp)
    codes = torch.empty(out, inp, dtype=torch.uint8, device=W.device)
    loss = torch.zeros(out, dtype=dt, device=W.device)
    inv_d = 1.0 / torch.diagonal(U)  # err_j = (w_j - q_j) / U[j, j]
    grid = _GroupGrid(bits, g, clip_max, dt, scale, zero, perm)
    fused = _block_kernel_ok(W, block, 1 if act_order else g)  # given grids: any block will do
    # The column loop is sequential, so its cost is the number of small ops per column (each a
    # kernel launch on a GPU): one Triton launch per block where it applies, else about ten
    # torch ops per column; the loss and the codes are taken per block.
    for i1 in range(0, inp, block):
        i2 = min(i1 + block, inp)
        if fused:
            from quantlrm.kernels.gptq_block import gptq_block

            if act_order:
                Q1, E1, _, _ = gptq_block(W[:, i1:i2], U[i1:i2, i1:i2], inv_d[i1:i2], clip_max, bits, g,
                                          static=(scale, zero, perm[i1:i2] // g))
            else:
                clip1 = clip_max[:, i1 // g : i2 // g] if clip_max is not None else None
                Q1, E1, s1, z1 = gptq_block(W[:, i1:i2], U[i1:i2, i1:i2], inv_d[i1:i2], clip1, bits, g)
                scale[:, i1 // g : i2 // g], zero[:, i1 // g : i2 // g] = s1, z1.to(torch.uint8)
        else:
            Q1, E1 = _column_loop(W, U, inv_d, i1, i2, grid)
        codes[:, i1:i2] = Q1.to(torch.uint8)
        loss += 0.5 * E1.pow(2).sum(1)  # sum of (w - deq)^2 / (2 d^2)
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # the block's deferred update of all later columns
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]

    result = QuantResult(codes=codes, scale=scale, zero=zero, bits=bits, group_size=g)
    hd = damped_hessian(h.to(dt), used_damp)
    rtn = quantize(w0, bits, g, clip_max=clip_max).dequant(torch.float32)
    return result, loss, _row_objective(w0, rtn, hd), used_damp, int(dead.sum())


class _GroupGrid:
    """The grid (scale, zero point, code bounds) of the column GPTQ is about to round.

    In column order a group's grid is taken from its weights as they are when the group starts
    (already updated by the earlier columns; written into scale/zero). With act-order (`perm`)
    the grids were fixed from the weights before GPTQ, and each column takes its own group's.
    """

    def __init__(self, bits, g, clip_max, dt, scale, zero, perm):
        self.bits, self.g, self.clip_max, self.dt = bits, g, clip_max, dt
        self.scale, self.zero = scale, zero
        self.group_of = (perm // g).tolist() if perm is not None else None
        self.current = -1
        self.params = None

    def for_column(self, col: int, W, W1, E1, U, i1: int, i2: int, i: int):
        """(s, z, z * s, lo, hi) for column `col` (position i of the block i1:i2)."""
        if self.group_of is None:
            gi = col // self.g
            if gi != self.current:
                cur = _current_group(W, W1, E1, U, i1, i2, i, col, self.g)  # [out, g]
                clip = self.clip_max[:, gi : gi + 1] if self.clip_max is not None else None
                gq = quantize(cur, self.bits, self.g, clip_max=clip)
                self.scale[:, gi], self.zero[:, gi] = gq.scale[:, 0], gq.zero[:, 0]
                self._set(gi)
        elif self.group_of[col] != self.current:
            self._set(self.group_of[col])
        return self.params

    def _set(self, gi: int) -> None:
        s, z = self.scale[:, gi].to(self.dt), self.zero[:, gi].to(self.dt)
        max_int = 2**self.bits - 1
        # clipping to [-c, c] then rounding and clamping the code to [0, max] is the same as
        # rounding then clamping the code to [lo, hi]
        lo, hi = torch.zeros_like(z), torch.full_like(z, max_int)
        if self.clip_max is not None:
            c = self.clip_max[:, gi].to(self.dt)
            lo = (torch.round(-c / s) + z).clamp(0, max_int)
            hi = (torch.round(c / s) + z).clamp(0, max_int)
        self.current, self.params = gi, (s, z, z * s, lo, hi)


def _column_loop(W, U, inv_d, i1: int, i2: int, grid: _GroupGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's columns i1..i2 one at a time in torch: the block's codes and scaled errors."""
    W1 = W[:, i1:i2].clone()  # [out, b], kept up to date inside the block
    E1 = torch.zeros_like(W1)  # scaled errors err / U[j, j], for the lazy update
    Q1 = torch.empty_like(W1)  # the block's codes
    U1 = U[i1:i2, i1:i2]
    for i in range(i2 - i1):
        col = i1 + i
        s, z, zs, lo, hi = grid.for_column(col, W, W1, E1, U, i1, i2, i)
        x = W1[:, i]
        q = torch.round(x / s).add_(z)
        q = torch.maximum(torch.minimum(q, hi, out=q), lo, out=q)
        Q1[:, i] = q
        err = torch.addcmul(x + zs, s, q, value=-1).mul_(inv_d[col])  # (x - deq) / d
        E1[:, i] = err
        W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
    return Q1, E1


def _block_kernel_ok(W: torch.Tensor, block: int, g: int) -> bool:
    """The Triton block kernel runs fp32 blocks of at most 256 columns that hold whole groups
    (block a multiple of g; any block when the grids are given, g = 1), on a GPU or in
    Triton's CPU interpreter (tests)."""
    if W.dtype != torch.float32 or block % g or block > 256:
        return False
    if not (W.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return importlib.util.find_spec("triton") is not None


def _current_group(W, W1, E1, U, i1: int, i2: int, i: int, col: int, g: int) -> torch.Tensor:
    """The group's columns as they are now: inside the block W1 is current; columns past the
    block still lack the block's pending update from its first i columns."""
    end = col + g
    inside = W1[:, i : min(end, i2) - i1]
    if end <= i2:
        return inside
    beyond = W[:, i2:end] - E1[:, :i] @ U[i1 : i1 + i, i2:end]
    return torch.cat([inside, beyond], dim=1)

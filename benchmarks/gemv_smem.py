"""A W3 batch-1 GEMV that streams its weights through shared memory (Gluon, cp.async ring), timed
against the tuner's register-walk tile (GPU machine).

Nsight Compute found the half2 GEMV latency-bound with 2-4 warps a scheduler: each thread loads
its words straight into registers, so registers bound the bytes in flight (BENCHMARKS.md,
Kernels, after version 15). Here every program copies its next STAGES-1 steps of words, scales,
zero points and activations into shared memory with cp.async, which holds no register while in
flight, and decodes a step from shared memory with 16-byte reads (a thread holds all four lanes
of a block). The decode is the half2 one of `_gemv_h2_kernel` (same asm).

Prototype: 3 bits, group size 128 (one block a group), fp16, K a multiple of 128*U, no split-K,
no PDL, no gated epilogue.

    PYTHONPATH=src python3 benchmarks/gemv_smem.py --check
    PYTHONPATH=src python3 benchmarks/gemv_smem.py --sweep --out smem.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth, graph_time, per_copy_time  # noqa: E402
from gemv_sweep import FUSED_SHAPES, random_layout  # noqa: E402

from quantlrm.kernels import reference_matmul, tune  # noqa: E402
from quantlrm.kernels import triton_kernels as tk  # noqa: E402

_PAIR = gl.constexpr(tk._PAIR_ASM.value)
_WIDEN = gl.constexpr(tk._WIDEN_ASM.value)


@gluon.jit
def _pair(acc, src, mask, mult, nz, x):
    return gl.inline_asm_elementwise(_PAIR, "=r,r,r,r,r,r,r", [acc, src, mask, mult, nz, x], dtype=gl.uint32,
                                     is_pure=True, pack=1)


@gluon.jit
def _widen(h):
    return gl.inline_asm_elementwise(_WIDEN, "=r,r", [h], dtype=gl.uint32, is_pure=True,
                                     pack=1).to(gl.float32, bitcast=True)


@gluon.jit
def _gdc(ASM: gl.constexpr):
    gl.inline_asm_elementwise(ASM, "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _issue_x(i, buf, x_ptr, x_smem, xu, xj, U: gl.constexpr):
    """cp.async step i's activation pairs into buffer buf."""
    # .ca: the activations stay in L1 for the SM's other programs (every program reads all of them)
    cp.async_copy_global_to_shared(x_smem.index(buf), x_ptr + (i * U + xu) * 64 + xj, cache_modifier=".ca")


@gluon.jit
def _issue(i, buf, p_ptr, x_ptr, s_ptr, z_ptr, w0_smem, w1_smem, w2_smem, x_smem, s_smem, z_smem, rows3, u3, j3, rmask3,
           rows2, u2, rmask2, xu, xj, RW, stride_s, U: gl.constexpr, WITH_X: gl.constexpr = True):
    """cp.async step i's words (three word rows), scales, zero points and (WITH_X) activations into buffer buf."""
    blk0 = i * U
    pw = p_ptr + rows3 * RW + (blk0 + u3) * 12 + j3
    cp.async_copy_global_to_shared(w0_smem.index(buf), pw, mask=rmask3)
    cp.async_copy_global_to_shared(w1_smem.index(buf), pw + 4, mask=rmask3)
    cp.async_copy_global_to_shared(w2_smem.index(buf), pw + 8, mask=rmask3)
    if WITH_X:
        _issue_x(i, buf, x_ptr, x_smem, xu, xj, U)
    cp.async_copy_global_to_shared(s_smem.index(buf), s_ptr + rows2 * stride_s + blk0 + u2, mask=rmask2)
    cp.async_copy_global_to_shared(z_smem.index(buf), z_ptr + rows2 * stride_s + blk0 + u2, mask=rmask2)


@gluon.jit
def _gemv_smem_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, N, n_blocks, RW, stride_s,
                      U: gl.constexpr, RPT: gl.constexpr, WARPS: gl.constexpr, STAGES: gl.constexpr,
                      JT: gl.constexpr = 1, PDL: gl.constexpr = 0):
    TR: gl.constexpr = 32 // (U * JT)  # threads a warp along rows (JT: along a block's four lanes)
    R: gl.constexpr = RPT * TR * WARPS
    VS: gl.constexpr = 8 if U >= 8 else U  # fp16 scales per 16-byte (or smaller) copy
    L3: gl.constexpr = gl.BlockedLayout([RPT, 1, 4 // JT], [TR, U, JT], [WARPS, 1, 1], [2, 1, 0])
    LX: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [WARPS, 1], [1, 0])  # a step's pairs [U, 64]
    LS: gl.constexpr = gl.BlockedLayout([1, VS], [32 // (U // VS), U // VS], [WARPS, 1], [1, 0])
    # (a buffered allocation's layout describes one buffer: the leading STAGES dim is not in it)
    SH3: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[2, 1, 0])
    SH2: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    w0_smem = gl.allocate_shared_memory(gl.int32, [STAGES, R, U, 4], SH3)  # the three word rows
    w1_smem = gl.allocate_shared_memory(gl.int32, [STAGES, R, U, 4], SH3)
    w2_smem = gl.allocate_shared_memory(gl.int32, [STAGES, R, U, 4], SH3)
    x_smem = gl.allocate_shared_memory(gl.int32, [STAGES, U, 64], SH2)
    s_smem = gl.allocate_shared_memory(gl.float16, [STAGES, R, U], SH2)
    z_smem = gl.allocate_shared_memory(gl.float16, [STAGES, R, U], SH2)

    r0 = gl.program_id(0) * R
    rows3 = r0 + gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))[:, None, None]
    u3 = gl.arange(0, U, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))[None, :, None]
    j3 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))[None, None, :]
    rmask3 = rows3 < N  # broadcast by the copy: constant along the 16-byte vectors
    rows2 = r0 + gl.arange(0, R, layout=gl.SliceLayout(1, LS))[:, None]
    u2 = gl.arange(0, U, layout=gl.SliceLayout(0, LS))[None, :]
    rmask2 = rows2 < N
    xu = gl.arange(0, U, layout=gl.SliceLayout(1, LX))[:, None]
    xj = gl.arange(0, 64, layout=gl.SliceLayout(0, LX))[None, :]

    n_steps = n_blocks // U
    # The first steps' weights, then (PDL: once the kernel before has written them) their
    # activations; a group a step, the weights all in the first.
    for i in gl.static_range(STAGES - 1):
        if i < n_steps:
            _issue(i, i, p_ptr, x_ptr, s_ptr, z_ptr, w0_smem, w1_smem, w2_smem, x_smem, s_smem, z_smem, rows3, u3, j3,
                   rmask3, rows2, u2, rmask2, xu, xj, RW, stride_s, U, PDL == 0)
    if PDL:
        _gdc("griddepcontrol.wait; // $0")
        if PDL == 1:
            _gdc("griddepcontrol.launch_dependents; // $0")
    for i in gl.static_range(STAGES - 1):
        if PDL:
            if i < n_steps:
                _issue_x(i, i, x_ptr, x_smem, xu, xj, U)
        cp.commit_group()

    zero3 = gl.zeros([R, U, 4], gl.uint32, L3)
    acc = gl.zeros([R, U, 4], gl.float32, L3)
    for it in range(n_steps):
        cp.wait_group(STAGES - 2)
        gl.thread_barrier()  # step it visible to every thread; every thread done with step it-1's buffer
        nxt = it + STAGES - 1
        if nxt < n_steps:
            _issue(nxt, nxt % STAGES, p_ptr, x_ptr, s_ptr, z_ptr, w0_smem, w1_smem, w2_smem, x_smem, s_smem, z_smem, rows3, u3, j3,
                   rmask3, rows2, u2, rmask2, xu, xj, RW, stride_s, U)
        cp.commit_group()
        st = it % STAGES
        w0 = w0_smem.index(st).load(L3).to(gl.uint32, bitcast=True)
        w1 = w1_smem.index(st).load(L3).to(gl.uint32, bitcast=True)
        w2 = w2_smem.index(st).load(L3).to(gl.uint32, bitcast=True)
        s = gl.expand_dims(s_smem.index(st).load(gl.SliceLayout(2, L3)).to(gl.float32) * 16.0, 2)
        z = z_smem.index(st).load(gl.SliceLayout(2, L3))
        h = zero3
        for sl in gl.static_range(16):
            if sl < 15:
                p = sl % 5
                R_ = 3 * (p % 3)
                word = w2
                if sl // 5 == 0:
                    word = w0
                if sl // 5 == 1:
                    word = w1
                if p >= 3:
                    word = word >> 9
            else:  # the spare slot, gathered from bits 15 and 31 of the three words, at offset 6
                R_ = 6
                word = (((w0 >> 9) & (0x10001 << 6)) | ((w1 >> 8) & (0x20002 << 6))
                        | ((w2 >> 7) & (0x40004 << 6)))
            mult = zero3 + ((11 - R_) << 10) * 0x10001
            mask = zero3 + ((7 << R_) * 0x10001)
            nz16 = (z.to(gl.float16) * -0.0625 - 64.0 / (1 << R_)).to(gl.float16).to(gl.uint16, bitcast=True)
            nz16 = nz16.to(gl.uint32)
            nz = zero3 + gl.expand_dims(nz16 | (nz16 << 16), 2)
            xv = x_smem.index(st).slice(sl * 4, 4, dim=1).load(gl.SliceLayout(0, L3)).to(gl.uint32, bitcast=True)
            xp = zero3 + gl.expand_dims(xv, 0)
            h = _pair(h, word, mask, mult, nz, xp)
            if sl == 4 or sl == 9 or sl == 15:  # a word row done (the last with the spare slot)
                acc += _widen(h) * s
                h = zero3
    if PDL == 2:
        _gdc("griddepcontrol.launch_dependents; // $0")
    out = gl.sum(gl.sum(acc, axis=2), axis=1)
    rows = r0 + gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    gl.store(y_ptr + rows, out.to(gl.float16), mask=rows < N)


def gemv_smem(x: torch.Tensor, kw, u: int = 8, rpt: int = 2, warps: int = 2, stages: int = 4, jt: int = 1,
              pdl: int = 0) -> torch.Tensor:
    if kw.bits != 3 or kw.block != 128 or kw.group_size != 128 or x.dtype != torch.float16:
        raise ValueError("the prototype takes W3, group size 128, fp16 activations")
    if kw.n_blocks % u:
        raise ValueError(f"{kw.n_blocks} blocks are not a multiple of {u} a step")
    n = kw.out_features
    rows = rpt * (32 // (u * jt)) * warps
    y = torch.empty(1, n, dtype=torch.float16, device=x.device)
    _gemv_smem_kernel[(triton.cdiv(n, rows),)](x.view(torch.int32), kw.packed, kw.scale, kw.zero, y, n,
                                               kw.n_blocks, kw.n_blocks * 12, kw.scale.stride(0),
                                               U=u, RPT=rpt, WARPS=warps, STAGES=stages, JT=jt,
                                               PDL=pdl, num_warps=warps, launch_pdl=pdl > 0)
    return y


def tiles(grid: str = "small", pdls: tuple[int, ...] = (0,)):
    """The tiles swept: "full" is run 4's grid, "small" the region where its fastest lay."""
    if grid == "full":
        space = itertools.product((4, 8, 16, 32), (2, 4, 8), (1, 2, 4, 8), (2, 4), (1, 2, 4))
    else:
        space = itertools.product((8, 16), (4, 8), (1, 2, 4), (2, 4), (2, 4))
    for (u, rpt, warps, stages, jt), pdl in itertools.product(space, pdls):
        if u * jt <= 32 and not (jt == 1 and rpt == 8):
            yield dict(u=u, rpt=rpt, warps=warps, stages=stages, jt=jt, pdl=pdl)


def check(args) -> int:
    bad = 0
    for n, k in ((4096, 14336), (1000, 4096)):
        kw = random_layout(n, k, 3, 128, 1, min_bytes=0)[0]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ref = reference_matmul(x, kw).float()
        for t in tiles(args.grid, tuple(args.pdl)):
            if kw.n_blocks % t["u"]:
                continue
            try:
                y = gemv_smem(x, kw, **t).float()
            except Exception as e:  # noqa: BLE001 -- report the tiles that do not compile
                print("ERROR", n, k, t, repr(e)[:300], flush=True)
                bad += 1
                continue
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            if not err < 1e-2:
                print("MISMATCH", n, k, t, err, flush=True)
                bad += 1
        print(f"checked {n}x{k}", flush=True)
    print("bad", bad)
    return bad


def sweep(args) -> None:
    peak = copy_bandwidth()
    res = dict(device=torch.cuda.get_device_name(), copy_bandwidth_GBps=peak / 1e9, rows=[], tuner={})
    t0 = time.time()
    for short in args.shapes:
        n, k = FUSED_SHAPES[short]
        kws = random_layout(n, k, 3, 128, 8)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        nbytes = kws[0].nbytes() + 2 * (n + k)
        chosen, _, _ = tune(x, kws[0])
        base = {}
        for pdl in ("1", "0"):
            os.environ["QUANTLRM_PDL"] = pdl
            base[pdl] = per_copy_time(x, kws, chosen) * 1e6
        os.environ.pop("QUANTLRM_PDL")
        res["tuner"][short] = dict(config=repr(chosen), us_pdl=base["1"], us_no_pdl=base["0"])
        best = {}
        for t in tiles(args.grid, tuple(args.pdl)):
            if kws[0].n_blocks % t["u"]:
                continue
            try:
                us = graph_time(lambda t=t, x=x, kws=kws: [gemv_smem(x, kw, **t) for kw in kws]) / len(kws) * 1e6
            except Exception as e:  # noqa: BLE001
                res["rows"].append(dict(linear=short, tile=t, error=repr(e)[:200]))
                continue
            row = dict(linear=short, tile=t, us=us, frac=nbytes / (us * 1e-6) / peak)
            res["rows"].append(row)
            if t["pdl"] not in best or us < best[t["pdl"]]["us"]:
                best[t["pdl"]] = row
        print(f"W3 {short}: tuner {base['1']:.1f} us ({nbytes / base['1'] / 1e-6 / peak:.0%}) with PDL, "
              f"{base['0']:.1f} without [{time.time() - t0:.0f}s]", flush=True)
        for pdl, b in sorted(best.items()):
            print(f"  smem best, PDL {pdl}: {b['tile']} {b['us']:.1f} us ({b['frac']:.0%})", flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        del kws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=["down_proj", "gate_up_proj", "qkv_proj", "o_proj"])
    ap.add_argument("--out", default="smem.json")
    ap.add_argument("--grid", choices=("small", "full"), default="small")
    ap.add_argument("--pdl", type=int, nargs="+", default=[0], help="0: none, 1: early trigger, 2: late trigger")
    args = ap.parse_args()
    if args.check:
        check(args)
    if args.sweep:
        sweep(args)


if __name__ == "__main__":
    main()

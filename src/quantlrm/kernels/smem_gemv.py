"""Batch-1 W3 GEMV that streams its weights through shared memory (Gluon, a cp.async ring).

Why a second GEMV: the register walk (`triton_kernels._gemv_h2_kernel`) loads each word
straight into a register, so registers bound the bytes in flight. Nsight Compute found it
latency-bound, with 1.9-3.8 warps a scheduler and no unit saturated (BENCHMARKS.md, Kernels, after
version 15). Here a program copies its next steps' words, scales and zero points into shared
memory with cp.async, and no register is held while a copy is in flight. It then decodes a step
from shared memory. Under PDL the first steps' weights are copied before the wait for the
kernel before, so they stream in while that kernel finishes, each step in a copy group of its
own. The activations are read after the wait, into registers a step ahead, and stored to shared
memory (XREG, the default; without it they are copied with cp.async too, which puts every early
step's weights in the first group: BENCHMARKS.md, Kernels, version 17).

The decode is the half2 one of `_gemv_h2_kernel` (same PTX pair). A thread holds `rows` rows
of one block, and 4 / lane_threads of its four lanes. Scope: 3 bits, group size 128 (one scale
a block), fp16 activations, a whole number of steps a row; Hopper or later (PDL).
"""

from __future__ import annotations

import os

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

    from quantlrm.kernels import triton_kernels as tk
except ImportError:  # no Triton, or one without Gluon: the register walk (or torch) serves every shape
    gluon = None

BITS, GROUP = 3, 128


def eligible(bits: int, group_size: int, block: int, dtype: torch.dtype, n_blocks: int, blocks_per_step: int) -> bool:
    """Whether a weight and activation dtype fit this kernel's scope (no device needed)."""
    return (bits == BITS and group_size == GROUP and block == GROUP and dtype == torch.float16
            and n_blocks % blocks_per_step == 0)


def available(device: torch.device) -> bool:
    """Gluon importable and a Hopper-or-later CUDA device (not the CPU interpreter)."""
    from quantlrm.kernels import _device_index, _hopper_or_later

    if gluon is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or torch.version.hip:
        return False
    return _hopper_or_later(_device_index(device))


if gluon is not None:
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
    def _copy_x(i, buf, x_ptr, x_smem, xu, xj, U: gl.constexpr):
        # .ca asked, so the SM's other programs would find the activations in L1; Triton 3.6 emits
        # 16-byte copies as cp.async.cg (L2 only) all the same (BENCHMARKS.md, Kernels, version 16)
        cp.async_copy_global_to_shared(x_smem.index(buf), x_ptr + (i * U + xu) * 64 + xj, cache_modifier=".ca")

    @gluon.jit
    def _copy_weights(i, buf, p_ptr, s_ptr, z_ptr, w0_smem, w1_smem, w2_smem, s_smem, z_smem, rows3, u3, j3,
                      rows2, u2, N, RW, stride_s, U: gl.constexpr):
        """Step i's three word rows, scales and zero points into buffer buf (rows past N: zeros)."""
        blk0 = i * U
        pw = p_ptr + rows3 * RW + (blk0 + u3) * 12 + j3
        m3 = rows3 < N  # broadcast by the copy: constant along each 16-byte vector
        cp.async_copy_global_to_shared(w0_smem.index(buf), pw, mask=m3)
        cp.async_copy_global_to_shared(w1_smem.index(buf), pw + 4, mask=m3)
        cp.async_copy_global_to_shared(w2_smem.index(buf), pw + 8, mask=m3)
        cp.async_copy_global_to_shared(s_smem.index(buf), s_ptr + rows2 * stride_s + blk0 + u2, mask=rows2 < N)
        cp.async_copy_global_to_shared(z_smem.index(buf), z_ptr + rows2 * stride_s + blk0 + u2, mask=rows2 < N)

    @gluon.jit
    def _gemv_smem_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, N, n_blocks, RW, stride_s,
                          U: gl.constexpr, RPT: gl.constexpr, WARPS: gl.constexpr, STAGES: gl.constexpr,
                          JT: gl.constexpr, ACT: gl.constexpr, PDL: gl.constexpr = 0, XREG: gl.constexpr = True):
        # x_ptr: fp16 activation pairs as int32. A program owns R rows and walks their blocks U a
        # step; STAGES buffers a kind, STAGES - 1 steps copied ahead (all of them, when that covers
        # the row: few large programs then read their whole share before the wait).
        TR: gl.constexpr = 32 // (U * JT)  # threads a warp along the rows
        R: gl.constexpr = RPT * TR * WARPS
        VS: gl.constexpr = 8 if U >= 8 else U  # fp16 scales a copy (16 bytes)
        L3: gl.constexpr = gl.BlockedLayout([RPT, 1, 4 // JT], [TR, U, JT], [WARPS, 1, 1], [2, 1, 0])
        LX: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [WARPS, 1], [1, 0])  # a step's pairs [U, 64]
        LS: gl.constexpr = gl.BlockedLayout([1, VS], [32 // (U // VS), U // VS], [WARPS, 1], [1, 0])
        # (a buffered allocation's layout is one buffer's: the leading STAGES dim is not in it)
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
        rows2 = r0 + gl.arange(0, R, layout=gl.SliceLayout(1, LS))[:, None]
        u2 = gl.arange(0, U, layout=gl.SliceLayout(0, LS))[None, :]
        xu = gl.arange(0, U, layout=gl.SliceLayout(1, LX))[:, None]
        xj = gl.arange(0, 64, layout=gl.SliceLayout(0, LX))[None, :]

        n_steps = n_blocks // U
        # The first steps' weights, then (PDL: once the kernel before has finished) their
        # activations. XREG: one copy group a step's weights, and the activations loaded into
        # registers a step ahead and stored to shared memory, so step 0 waits for its own copies
        # only. Otherwise the activations are copied too: one group a step, the first also holding
        # every early step's weights (all of them land before step 0 starts).
        for i in gl.static_range(STAGES - 1):
            if i < n_steps:
                _copy_weights(i, i, p_ptr, s_ptr, z_ptr, w0_smem, w1_smem, w2_smem, s_smem, z_smem, rows3, u3, j3,
                              rows2, u2, N, RW, stride_s, U)
            if XREG:
                cp.commit_group()
        if PDL:
            _gdc("griddepcontrol.wait; // $0")
            if PDL == 1:
                _gdc("griddepcontrol.launch_dependents; // $0")
        if XREG:
            xr = gl.load(x_ptr + xu * 64 + xj)
        else:
            for i in gl.static_range(STAGES - 1):
                if i < n_steps:
                    _copy_x(i, i, x_ptr, x_smem, xu, xj, U)
                cp.commit_group()

        zero3 = gl.zeros([R, U, 4], gl.uint32, L3)
        acc = gl.zeros([R, U, 4], gl.float32, L3)
        for it in range(n_steps):
            if XREG:  # this step's activations in, the next step's asked for (the last step's again at the end)
                x_smem.index(it % STAGES).store(xr)
                xr = gl.load(x_ptr + (gl.minimum(it + 1, n_steps - 1) * U + xu) * 64 + xj)
            cp.wait_group(STAGES - 2)
            gl.thread_barrier()  # step it visible to every thread; every thread done with step it-1's buffer
            nxt = it + STAGES - 1
            if nxt < n_steps:
                _copy_weights(nxt, nxt % STAGES, p_ptr, s_ptr, z_ptr, w0_smem, w1_smem, w2_smem, s_smem, z_smem,
                              rows3, u3, j3, rows2, u2, N, RW, stride_s, U)
                if not XREG:
                    _copy_x(nxt, nxt % STAGES, x_ptr, x_smem, xu, xj, U)
            cp.commit_group()
            st = it % STAGES
            w0 = w0_smem.index(st).load(L3).to(gl.uint32, bitcast=True)
            w1 = w1_smem.index(st).load(L3).to(gl.uint32, bitcast=True)
            w2 = w2_smem.index(st).load(L3).to(gl.uint32, bitcast=True)
            s = gl.expand_dims(s_smem.index(st).load(gl.SliceLayout(2, L3)).to(gl.float32) * 16.0, 2)
            z = z_smem.index(st).load(gl.SliceLayout(2, L3))
            h = zero3
            for sl in gl.static_range(16):  # slot sl: pair sl % 5 of word row sl // 5; 15 the spare slot
                if sl < 15:
                    p = sl % 5
                    R_ = 3 * (p % 3)  # the pair's bit offset once the word is shifted by 9 for pairs 3, 4
                    word = w2
                    if sl // 5 == 0:
                        word = w0
                    if sl // 5 == 1:
                        word = w1
                    if p >= 3:
                        word = word >> 9
                else:  # gathered from bits 15 and 31 of the three words, at offset 6
                    R_ = 6
                    word = (((w0 >> 9) & (0x10001 << 6)) | ((w1 >> 8) & (0x20002 << 6))
                            | ((w2 >> 7) & (0x40004 << 6)))
                mult = zero3 + ((11 - R_) << 10) * 0x10001  # half2 of 2^-(R+4)
                mask = zero3 + ((7 << R_) * 0x10001)
                nz16 = (z * -0.0625 - 64.0 / (1 << R_)).to(gl.float16).to(gl.uint16, bitcast=True).to(gl.uint32)
                nz = zero3 + gl.expand_dims(nz16 | (nz16 << 16), 2)
                xv = x_smem.index(st).slice(sl * 4, 4, dim=1).load(gl.SliceLayout(0, L3)).to(gl.uint32, bitcast=True)
                h = _pair(h, word, mask, mult, nz, zero3 + gl.expand_dims(xv, 0))
                if sl == 4 or sl == 9 or sl == 15:  # a word row done (the last with the spare slot)
                    acc += _widen(h) * s
                    h = zero3
        if PDL == 2:
            _gdc("griddepcontrol.launch_dependents; // $0")
        out = gl.sum(gl.sum(acc, axis=2), axis=1)
        if ACT:  # rows are interleaved (gate, up) pairs: store silu(gate) * up at half the width
            LA: gl.constexpr = gl.BlockedLayout([1, 2], [32, 1], [WARPS, 1], [1, 0])
            g, up = gl.split(gl.convert_layout(gl.reshape(out, [R // 2, 2]), LA))
            half = gl.program_id(0) * (R // 2) + gl.arange(0, R // 2, layout=g.type.layout)
            gl.store(y_ptr + half, (g / (1.0 + gl.exp(-g)) * up).to(gl.float16), mask=half < N // 2)
        else:
            rows = r0 + gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
            gl.store(y_ptr + rows, out.to(gl.float16), mask=rows < N)


def rows_per_program(rows_per_thread: int, blocks_per_step: int, lane_threads: int, warps: int) -> int:
    return rows_per_thread * (32 // (blocks_per_step * lane_threads)) * warps


SMEM_LIMIT = 227 * 1024  # a Hopper block's most dynamic shared memory


def smem_bytes(rows_per_thread: int, blocks_per_step: int, lane_threads: int, warps: int, stages: int) -> int:
    """Shared memory a tile asks for: a stage holds a step's three word rows, activations, scales and zeros."""
    r, u = rows_per_program(rows_per_thread, blocks_per_step, lane_threads, warps), blocks_per_step
    return stages * (3 * r * u * 16 + u * 64 * 4 + 2 * r * u * 2)


def run(x2: torch.Tensor, kw, rows_per_thread: int, blocks_per_step: int, lane_threads: int, warps: int,
        stages: int, act: bool, launch: dict) -> torch.Tensor:
    """y [1, N] (act: silu(gate) * up, [1, N/2]) for one activation row; launch: `pdl_launch`'s."""
    if gluon is None:
        raise ValueError("the shared-memory GEMV needs Triton's Gluon (triton >= 3.5)")
    if x2.shape[0] != 1 or not eligible(kw.bits, kw.group_size, kw.block, x2.dtype, kw.n_blocks, blocks_per_step):
        raise ValueError(f"the shared-memory GEMV takes one fp16 row and W3 weights of group size 128 with a whole "
                         f"number of {blocks_per_step}-block steps a row; got {tuple(x2.shape)} {x2.dtype}, "
                         f"W{kw.bits} g{kw.group_size}, {kw.n_blocks} blocks")
    if kw.packed.stride() != (kw.n_blocks * kw.words_per_block, 1):
        raise ValueError(f"packed weight of strides {kw.packed.stride()} is not contiguous rows of n_blocks * W words")
    if blocks_per_step * lane_threads > 32 or not 2 <= stages <= 8:
        raise ValueError("blocks_per_step * lane_threads must be at most 32 and stages 2 to 8")
    need = smem_bytes(rows_per_thread, blocks_per_step, lane_threads, warps, stages)
    if need > SMEM_LIMIT:
        raise ValueError(f"this tile needs {need} bytes of shared memory, more than the {SMEM_LIMIT} a Hopper block "
                         f"may have: fewer stages or rows")
    if not available(x2.device):
        raise ValueError("the shared-memory GEMV runs on a Hopper-or-later CUDA GPU only")
    n = kw.out_features
    r = rows_per_program(rows_per_thread, blocks_per_step, lane_threads, warps)
    if act and (n % 2 or r % 2):
        raise ValueError("a gated product needs interleaved (gate, up) rows and an even row tile")
    y = torch.empty(1, n // 2 if act else n, dtype=x2.dtype, device=x2.device)
    _gemv_smem_kernel[(-(-n // r),)](x2.contiguous().view(torch.int32), kw.packed, kw.scale, kw.zero, y, n, kw.n_blocks,
                                        kw.n_blocks * kw.words_per_block, kw.scale.stride(0),
                                        U=blocks_per_step, RPT=rows_per_thread, WARPS=warps, STAGES=stages,
                                        JT=lane_threads, ACT=act, num_warps=warps, **launch)
    return y

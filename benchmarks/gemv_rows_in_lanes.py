"""Prototype, not in the product: a batch-1 GEMV with rows in lanes (`_gemv_t_kernel`, words
stored column-major or per row tile) against the product's tuned GEMV (words row-major), on the
fused linears of an 8B Llama (GPU machine).

Why it was tried: the product's W3 GEMV runs 4.57 sm_90 SASS instructions per code (13-word
blocks padded to 16 lanes, 4-byte loads), so W3 was slower than W4 although it reads 18% fewer
bytes. With rows in lanes a thread owns neighbouring rows, loads their word j in one wide load,
and reuses one uniform activation load per code pair for all of them; no lane is padding.
2.45 instructions per code for W3, 2.55 for W4 (product 2.91). On the H100 it was no faster
(runs 21 and 22, BENCHMARKS.md, Kernels, version 7): 0.68-1.01x the product, best only with the
most split-K, i.e. bound by each program's serial latency, not by instructions.
Its W3 walk reads that first W3 layout; since the product's W3 moved to three-word lanes
(version 9) it refuses 3-bit weights and runs W2, W4 and W8.

Same method as gemv_sweep.py: every configuration runs over enough copies of the weight to
overflow L2, in one CUDA graph; bytes moved / time against the measured copy bandwidth. Random
words (speed does not depend on values); correctness against dequantize-then-matmul on a real
quantized weight of each shape, with the real PTX.

    PYTHONPATH=src python3 benchmarks/gemv_rows_in_lanes.py --out rows_in_lanes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from quantlrm.kernels.triton_kernels import (
    _WIDEN_ASM,
    _f16,
    _h2_pair,
    _h2_pair_emulated,
    _store_rows,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth, graph_time  # noqa: E402
from gemv_sweep import random_layout  # noqa: E402


@triton.jit
def _gemv_t_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
                   N, K, n_blocks, blocks_per_split, stride_pn, stride_pk, stride_s,
                   BITS: tl.constexpr, P: tl.constexpr, B: tl.constexpr, W: tl.constexpr,
                   GB: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                   MODE: tl.constexpr, ACT: tl.constexpr, EMULATE: tl.constexpr, TILED: tl.constexpr = False):
    # TILED: the words are stored per row tile ([N / BLOCK_N, n_blocks * W, BLOCK_N]), so a
    # program's words for one block are one contiguous run (stride_pk is then BLOCK_N).
    # Rows in lanes: a thread owns BLOCK_N / (32 * num_warps) neighbouring rows and walks the
    # words of a block one word index at a time. With the words stored column-major
    # (stride_pn == 1: word j of neighbouring rows is contiguous) a thread's rows arrive in one
    # wide load, the activation pair of a code pair is the same for all rows (one uniform
    # scalar load, reused by every row of the thread), and no lane is padding: W3's 13-word
    # blocks are walked as 13 unrolled steps instead of a 16-lane tile with 3 lanes masked off.
    # A pair costs its one and-or and two half2 fmas (`_PAIR_ASM`), widened to fp32 per word.
    H: tl.constexpr = P // 2
    FIT: tl.constexpr = (10 - BITS) // BITS + 1  # pairs decodable in place (r + BITS <= 10)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < N
    b_begin = tl.program_id(1) * blocks_per_split
    b_end = tl.minimum(b_begin + blocks_per_split, n_blocks)
    zero = tl.zeros([BLOCK_N], dtype=tl.uint32)
    if TILED:
        prow = p_ptr + tl.program_id(0).to(tl.int64) * (n_blocks * W * BLOCK_N) + tl.arange(0, BLOCK_N)
    else:
        prow = p_ptr + rows * stride_pn
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for blk in range(b_begin, b_end):
        grp = blk // GB if GB > 0 else 0
        s = tl.load(s_ptr + rows * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * stride_s + grp, mask=mask_n, other=0.0).to(tl.float16)
        tot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(W):
            pw = prow + (blk * W + j) * stride_pk
            if EVEN_N:
                words = tl.load(pw)
            else:
                words = tl.load(pw, mask=mask_n, other=0)
            words = words.to(tl.uint32, bitcast=True)
            shifted = words >> (BITS * FIT)
            h = zero
            for p in tl.static_range(H):
                if 2 * (p * W + j) < B:  # (the last word's last pairs are the block's padding)
                    R = BITS * (p % FIT)
                    src = words if p < FIT else shifted
                    nz16 = (z * -0.0625 - 64.0 / (1 << R)).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
                    nz = nz16 | (nz16 << 16)
                    mult = zero + ((11 - R) << 10) * 0x10001
                    mask = zero + (((1 << BITS) - 1) << R) * 0x10001
                    kp = blk * (B // 2) + p * W + j
                    if EVEN_K:
                        xp = tl.load(x_ptr + kp)
                    else:
                        xp = tl.load(x_ptr + kp, mask=2 * kp < K, other=0)
                    xv = zero + xp.to(tl.uint32, bitcast=True)
                    if EMULATE:
                        h = _h2_pair_emulated(h, src, mask, mult, nz, xv)
                    else:
                        h = _h2_pair(h, src, mask, mult, nz, xv)
            if EMULATE:
                part = (_f16(h) + _f16(h >> 16)).to(tl.float16).to(tl.float32)
            else:
                part = tl.inline_asm_elementwise(_WIDEN_ASM, "=r,r", [h], dtype=tl.uint32, is_pure=True,
                                                 pack=1).to(tl.float32, bitcast=True)
            tot += part
        acc += tot * (s * 16.0)
    _store_rows(acc[None, :], y_ptr, ws_ptr, cnt_ptr, rows, mask_n, tl.arange(0, 1), 1, N, tl.num_programs(1),
                MODE, BLOCK_N, ACT)


def run_rows_in_lanes(x2: torch.Tensor, kw, cfg) -> torch.Tensor:
    """y [1, N] = x2 [1, K] @ W^T with `_gemv_t_kernel` (cfg: Config block_n, num_warps, split_k);
    kw.packed column-major [N, words] (any strides work) or row-tiled [N / block_n, words, block_n]."""
    import os

    from quantlrm.kernels import _workspace

    n, k, nb = kw.out_features, kw.in_features, kw.n_blocks
    if kw.word_rows != 1:
        raise ValueError("the rows-in-lanes prototype reads the first W3 layout (13 one-row words a block), "
                         "not the product's current three-word lanes; it runs W2, W4 and W8 only")
    if x2.shape[0] != 1:
        raise ValueError("the rows-in-lanes GEMV takes one activation row")
    tiled = kw.packed.dim() == 3
    if tiled and kw.packed.shape[2] != cfg.block_n:
        raise ValueError("a row-tiled weight runs only with its own tile height")
    per = triton.cdiv(nb, cfg.split_k)
    split = triton.cdiv(nb, per)
    ws = _workspace(x2.device, n, split, triton.cdiv(n, cfg.block_n))
    atomic = split > 1 and ws is None
    # as run_config does (and as runs 21-22 ran): a zero fill only where splits add atomically
    y = torch.zeros(1, n, dtype=torch.float32, device=x2.device) if atomic else x2.new_empty(1, n)
    wsp, cnt = ws if ws is not None else (y, y)
    xin = torch.nn.functional.pad(x2, (0, 1)) if k % 2 else x2
    _gemv_t_kernel[(triton.cdiv(n, cfg.block_n), split)](
        xin.view(torch.int32), kw.packed, kw.scale, kw.zero, y, wsp, cnt, n, k, nb, per,
        0 if tiled else kw.packed.stride(0), cfg.block_n if tiled else kw.packed.stride(1), kw.scale.stride(0),
        BITS=kw.bits, P=kw.per_word, B=kw.block, W=kw.words_per_block,
        GB=0 if kw.group_size == k else kw.group_size // kw.block, BLOCK_N=cfg.block_n,
        EVEN_N=n % cfg.block_n == 0, EVEN_K=k % kw.block == 0, MODE=0 if split == 1 else (1 if atomic else 2),
        ACT=False, EMULATE=os.environ.get("TRITON_INTERPRET") == "1", TILED=tiled, num_warps=cfg.num_warps)
    return y.to(x2.dtype)


# the linears as load_quantized runs them: q/k/v fused, gate/up fused (interleaved rows)
SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336)}
TILES = ((256, 2), (512, 4), (512, 2), (1024, 4), (1024, 8), (128, 1))


def col_major(kw):
    """The same weight with its words stored column-major (word j of neighbouring rows adjacent)."""
    from quantlrm.kernels import KernelWeight

    return KernelWeight(kw.packed.t().contiguous().t(), kw.scale, kw.zero, kw.bits, kw.group_size,
                        kw.in_features, kw.out_features)


def row_tiled(kw, bn: int):
    """The words stored per tile of bn rows: [N / bn, words, bn] (each block of a tile contiguous)."""
    from quantlrm.kernels import KernelWeight

    n, words = kw.packed.shape
    t = kw.packed.view(n // bn, bn, words).transpose(1, 2).contiguous()
    return KernelWeight(t, kw.scale, kw.zero, kw.bits, kw.group_size, kw.in_features, kw.out_features)


def splits(n: int, bn: int, nb: int) -> list[int]:
    """Split-K values that give about one to four waves of programs on 132 SMs."""
    tiles = -(-n // bn)
    out = [s for s in (1, 2, 4, 8, 16, 32) if s <= nb and 100 <= tiles * s <= 1100]
    return out or [min(nb, max(1, 264 // tiles))]


def per_call(run_config, cfg, weights, x) -> float:
    """Seconds per product, over all the copies in one graph."""
    return graph_time(lambda: [run_config(x, w, cfg) for w in weights]) / len(weights)


def trial(res: dict, row: dict, kind: str, cfg, x, ref, real_w, weights) -> tuple[float, float]:
    """Error on the real weight and seconds per call over the copies; recorded in res["rows"]."""
    err = ((run_rows_in_lanes(x, real_w, cfg).float() - ref).abs().max() / ref.abs().max()).item()
    t = per_call(run_rows_in_lanes, cfg, weights, x)
    res["rows"].append(dict(bits=row["bits"], linear=row["linear"], kind=kind, config=repr(cfg), us=t * 1e6,
                            GBps=row["nbytes"] / t / 1e9, relerr=err))
    return t, err


def main() -> None:
    from quantlrm.kernels import Config, choose, reference_matmul, run_config
    from quantlrm.kernels.layout import from_codes
    from quantlrm.quantizer import quantize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="rows_in_lanes.json")
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    t0 = time.time()
    bw = copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bw / 1e9, "rows": []}
    print(f"{res['device']}: copy bandwidth {bw / 1e9:.0f} GB/s")
    torch.manual_seed(0)
    for bits in args.bits:
        for name, (n, k) in SHAPES.items():
            q = quantize(torch.randn(n, k, device="cuda"), bits, args.group_size)
            real = from_codes(q.codes, q.scale, q.zero.float(), bits, args.group_size, torch.float16)
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            ref = reference_matmul(x, real).float()
            copies = random_layout(n, k, bits, args.group_size, 4)
            nbytes = copies[0].nbytes()
            prod_cfg = choose(x, copies[0])
            t_prod = per_call(run_config, prod_cfg, copies, x)
            res["rows"].append(dict(bits=bits, linear=name, kind="product", config=repr(prod_cfg),
                                    us=t_prod * 1e6, GBps=nbytes / t_prod / 1e9))
            print(f"W{bits} {name}: product {prod_cfg}: {t_prod * 1e6:.1f} us = {nbytes / t_prod / 1e9:.0f} GB/s",
                  flush=True)
            row = dict(bits=bits, linear=name, nbytes=nbytes)
            cm, real_cm = [col_major(w) for w in copies], col_major(real)
            best = None
            for bn, warps in TILES:
                for sk in splits(n, bn, real.n_blocks):
                    cfg = Config("gemv_t", block_n=bn, num_warps=warps, split_k=sk)
                    t, err = trial(res, row, "rows_in_lanes", cfg, x, ref, real_cm, cm)
                    if best is None or t < best[0]:
                        best = (t, cfg, err)
            del cm
            t, cfg, err = best
            tiled = {(cfg.block_n, cfg.num_warps, cfg.split_k)} | {
                (bn, w, s) for bn, w in ((512, 4), (1024, 8), (256, 2)) for s in splits(n, bn, real.n_blocks)}
            for bn, warps, sk in sorted(tiled):
                c = Config("gemv_t", block_n=bn, num_warps=warps, split_k=sk)
                t2, err2 = trial(res, row, "rows_in_lanes_tiled", c, x, ref, row_tiled(real, bn),
                                 [row_tiled(w, bn) for w in copies])
                print(f"W{bits} {name}: tiled {bn}/{warps}/{sk}: {t2 * 1e6:.1f} us = {nbytes / t2 / 1e9:.0f} GB/s "
                      f"({t_prod / t2:.2f}x the product), rel. error {err2:.1e}", flush=True)
            print(f"W{bits} {name}: rows in lanes best {cfg}: {t * 1e6:.1f} us = {nbytes / t / 1e9:.0f} GB/s "
                  f"({t_prod / t:.2f}x the product), rel. error {err:.1e}", flush=True)
            del copies
            torch.cuda.empty_cache()
            res["wall_s"] = time.time() - t0
            Path(args.out).write_text(json.dumps(res, indent=1))  # (each shape: a cut-off run keeps its rows)
    print(f"wrote {args.out} ({res['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()

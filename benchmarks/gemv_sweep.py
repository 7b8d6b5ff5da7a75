"""Sweep the batch-1 GEMV's tile configurations on the 8B linear shapes (GPU machine).

Each configuration runs over L copies of the weight (so the copies overflow L2 and every byte
comes from HBM) inside one CUDA graph; the result is bytes moved / time against the card's
measured copy bandwidth, next to fp16 cuBLAS on the same shapes in the same run. The weights
are random words in the kernel layout: speed does not depend on their values.

    PYTHONPATH=src python3 benchmarks/gemv_sweep.py --out sweep.json
    PYTHONPATH=src python3 benchmarks/gemv_sweep.py --half2 --bits 3 --out sweep_h2.json   # the half2 tiles
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth, graph_time, per_copy_time  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}


def random_layout(n: int, k: int, bits: int, group: int, min_copies: int, min_bytes: float = 150e6):
    """Enough copies that together they are 3x the H100's 50 MB L2."""
    from quantlrm.kernels import KernelWeight
    from quantlrm.kernels import layout as L

    _, _, w, nb = L.geometry(bits, group, k)
    words = nb * w
    copies = max(min_copies, math.ceil(min_bytes / (n * words * 4)))
    out = []
    for _ in range(copies):
        packed = torch.randint(-2**31, 2**31 - 1, (n, words), dtype=torch.int32, device="cuda")
        scale = torch.rand(n, k // group, device="cuda", dtype=torch.float16) * 0.01
        zero = torch.randint(0, 2**bits, (n, k // group), device="cuda").half()
        out.append(KernelWeight(packed, scale, zero, bits, group, k, n))
    return out


def grid():
    from quantlrm.kernels import Config

    for bn, w, x32 in itertools.product((4, 8, 16, 32, 64, 128), (1, 2, 4, 8), (False, True)):
        per_thread = bn * 16 / (32 * w)  # words held per thread per step (16 words per block)
        if 1 <= per_thread <= 32:
            yield Config("gemv", block_n=bn, num_warps=w, x32=x32)


# the fused linears of `load_quantized` (q/k/v and gate/up in one launch each)
FUSED_SHAPES = {"gate_up_proj": (28672, 4096), "down_proj": (4096, 14336), "qkv_proj": (6144, 4096),
                "o_proj": (4096, 4096)}


def half2_grid(lanes: int):
    """The half2 GEMV's tiles: rows, warps, split-K, blocks per step, prefetch, row pairs; 1-16 lane
    tiles a thread (a row pair holds two)."""
    from quantlrm.kernels import Config

    for bn, w, sk, u, pf, rg in itertools.product((8, 16, 32, 64, 128), (2, 4, 8), (1, 2, 4, 8, 16), (1, 2, 4),
                                                  (False, True), (1, 2)):
        if 1 <= bn * u * lanes / (32 * w) and bn * u * lanes * rg / (32 * w) <= 16 and (bn > 8 or rg == 2):
            yield Config("gemv", block_n=bn, num_warps=w, split_k=sk, blocks_per_step=u, prefetch=pf, half2=True,
                         row_groups=rg)


def x_once_grid(lanes: int, n_blocks: int, row_groups: tuple[int, ...] = (1,)):
    """Tiles for the activations loaded once per thread (`Config.x_once`): few rows, many blocks a
    step, so that Triton's layout puts several rows of a (block, lane) in one thread; 4-32 lane
    tiles a thread (16 with prefetch). Splits that give the same blocks per program as a smaller
    one are skipped; row_groups: also row pairs or quads (counted as two or four lane tiles; quads
    also with one row group a program, and 4 blocks a step)."""
    from quantlrm.kernels import Config

    seen = set()
    for rg, bn, w, sk, u, pf in itertools.product(row_groups, (1, 2, 4, 8, 16), (1, 2, 4), (1, 2, 4, 8),
                                                  (4, 8, 16, 32), (False, True)):
        per = math.ceil(math.ceil(n_blocks / sk) / u) * u
        if ((bn == 1 or u == 4) and rg < 4) or not 4 <= bn * u * lanes * rg / (32 * w) <= (16 if pf else 32) or (rg, bn, w, per, u, pf) in seen:
            continue
        seen.add((rg, bn, w, per, u, pf))
        yield Config("gemv", block_n=bn, num_warps=w, split_k=sk, blocks_per_step=u, prefetch=pf, half2=True,
                     x_once=True, row_groups=rg)


def sweep_half2(args, peak: float, res: dict, t0: float, dump) -> None:
    """Every half2 tile on the fused shapes, against the tuner's own choice from its candidates."""
    from quantlrm.kernels import GEMV_H2_CONFIGS, tune

    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    for bi, bits in enumerate(args.bits):
        stop = t0 + args.budget * (bi + 1) / len(args.bits)
        for si, short in enumerate(args.shapes):
            n, k = FUSED_SHAPES[short]
            shape_stop = time.time() + max(0.0, stop - time.time()) / (len(args.shapes) - si)  # a fair share
            kws = random_layout(n, k, bits, args.group_size, args.copies)
            for kw in kws:
                kw.scale, kw.zero = kw.scale.to(dt), kw.zero.to(dt)
            x = torch.randn(1, k, device="cuda", dtype=dt)
            nbytes = kws[0].nbytes() + 2 * (n + k)
            act = args.act and short == "gate_up_proj"  # the fused MLP's SiLU * up store, as decode runs it
            chosen, _, _ = tune(x, kws[0], act=act)
            t = per_copy_time(x, kws, chosen, act)
            tuned = dict(config=repr(chosen), us=t * 1e6, frac=nbytes / t / peak)
            best = None
            rgs = (args.row_groups,) if args.row_groups else (1,)
            if args.candidates:
                tiles = [replace(c, half2=True) for c in GEMV_H2_CONFIGS]
            else:
                tiles = (x_once_grid(kws[0].lanes, kws[0].n_blocks, rgs) if args.x_once else half2_grid(kws[0].lanes))
            for c in tiles:
                if ((args.row_groups and c.row_groups != args.row_groups) or (args.split_k and c.split_k != args.split_k)
                        or (args.max_block_n and c.block_n > args.max_block_n)):
                    continue
                if time.time() > shape_stop:
                    res.setdefault("skipped", []).append(f"W{bits} {short} from {c}")
                    break
                try:
                    t = per_copy_time(x, kws, c, act)
                except Exception as e:  # noqa: BLE001 -- a config that does not compile is reported
                    res["rows"].append(dict(bits=bits, linear=short, config=repr(c), error=repr(e)[:200]))
                    continue
                row = dict(bits=bits, linear=short, config=repr(c), us=t * 1e6, frac=nbytes / t / peak)
                res["rows"].append(row)
                if best is None or row["us"] < best["us"]:
                    best = row
            res["best"][f"W{bits} {short}"] = dict(grid=best, tuner=tuned)
            if best:
                print(f"W{bits} {short}: tuner {tuned['config']} {tuned['us']:.1f} us ({tuned['frac']:.0%}); "
                      f"grid best {best['config']} {best['us']:.1f} us ({best['frac']:.0%}) [{time.time() - t0:.0f}s]",
                      flush=True)
            dump()
            del kws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sweep.json")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--row-groups", type=int, default=0, help="--half2: only tiles of this many row groups (0: all)")
    ap.add_argument("--split-k", type=int, default=0, help="--half2: only tiles of this split-K (0: all)")
    ap.add_argument("--max-block-n", type=int, default=0, help="--half2: only tiles of at most this block_n (0: all)")
    ap.add_argument("--shapes", nargs="+", default=list(FUSED_SHAPES), choices=list(FUSED_SHAPES),
                    help="--half2: the fused shapes to sweep")
    ap.add_argument("--x-once", action="store_true",
                    help="--half2: only the tiles that load the activations once for a thread's rows")
    ap.add_argument("--act", action="store_true",
                    help="--half2: time gate_up_proj (and tune it) with the gated-MLP epilogue, as the fused MLP runs")
    ap.add_argument("--candidates", action="store_true",
                    help="--half2: time the tuner's batch-1 half2 candidates instead of a grid")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--budget", type=float, default=330, help="seconds; stops sweeping after this")
    ap.add_argument("--half2", action="store_true",
                    help="sweep the half2 GEMV's tiles on the fused shapes instead of the fp32-math GEMV's")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="activations of --half2 (bf16: bf16x2)")
    args = ap.parse_args()
    if args.x_once and not args.half2:
        ap.error("--x-once sweeps half2 tiles: pass --half2 too")

    from quantlrm.kernels import GEMV_CONFIGS, Config

    t0 = time.time()
    peak = copy_bandwidth()
    res: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bandwidth_GBps=peak / 1e9,
                     args=vars(args), rows=[], fp16={}, best={})

    def dump():
        res["wall_s"] = time.time() - t0
        Path(args.out).write_text(json.dumps(res, indent=1))

    if args.half2:
        sweep_half2(args, peak, res, t0, dump)
        dump()
        return
    for short, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(args.copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        t = graph_time(lambda ws=ws, x=x: [x @ w.t() for w in ws]) / len(ws)
        nbytes = n * k * 2 + 2 * (n + k)
        res["fp16"][short] = dict(us=t * 1e6, gbps=nbytes / t / 1e9, frac=nbytes / t / peak)
        print(f"fp16 {short}: {t * 1e6:.1f} us {nbytes / t / 1e9:.0f} GB/s", flush=True)
        del ws
    configs = list(GEMV_CONFIGS) + [c for c in grid() if c not in GEMV_CONFIGS]
    for bi, bits in enumerate(args.bits):
        stop = t0 + args.budget * (bi + 1) / len(args.bits)
        for short, (n, k) in SHAPES.items():
            kws = random_layout(n, k, bits, args.group_size, args.copies)
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            nbytes = kws[0].nbytes() + 2 * (n + k)
            best = None
            for cfg in configs:
                if time.time() > stop:
                    res.setdefault("skipped", []).append(f"W{bits} {short} from {cfg}")
                    break
                for split in (1, 2, 4, 8) if n / cfg.block_n < 1024 else (1,):  # few programs: try split-K
                    c = Config("gemv", block_n=cfg.block_n, num_warps=cfg.num_warps, x32=cfg.x32, split_k=split)
                    try:
                        t = per_copy_time(x, kws, c)
                    except Exception as e:  # noqa: BLE001 -- a config that does not compile is reported
                        res["rows"].append(dict(bits=bits, linear=short, config=c.__dict__, error=repr(e)[:200]))
                        continue
                    row = dict(bits=bits, linear=short, config=c.__dict__, us=t * 1e6, gbps=nbytes / t / 1e9,
                               frac=nbytes / t / peak)
                    res["rows"].append(row)
                    if best is None or t * 1e6 < best["us"]:
                        best = row
            res["best"][f"W{bits} {short}"] = best
            if best:
                print(f"W{bits} {short}: best {best['config']} {best['us']:.1f} us {best['gbps']:.0f} GB/s "
                      f"({best['frac']:.0%}) [{time.time() - t0:.0f}s]", flush=True)
            dump()
            del kws
    dump()


if __name__ == "__main__":
    main()

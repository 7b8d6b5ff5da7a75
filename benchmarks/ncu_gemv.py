"""The batch-1 GEMVs of the fused 8B shapes with fixed tiles, for Nsight Compute (GPU machine).

Runs each shape's tile (the tuner's choices of BENCHMARKS.md, Kernels, version 9; with --v14,
version 14's) a few times, nothing else, so a profiler can pick the launches out:

    ncu -k regex:_gemv_h2 --launch-skip 4 --launch-count 4 --set full \\
        python3 benchmarks/ncu_gemv.py --bits 3
    ncu -k regex:_gemv_h2 --launch-skip 3 --launch-count 3 --set full -o v14 \\
        python3 benchmarks/ncu_gemv.py --v14
    ncu -k regex:_gemv_smem --launch-skip 3 --launch-count 3 --set full \\
        python3 benchmarks/ncu_gemv.py --smem
    ncu -k regex:_gemv_smem --launch-skip 3 --launch-count 3 --set full \\
        python3 benchmarks/ncu_gemv.py --smem --shapes down_proj --smem-tiles 8,16,2,2,2 4,16,2,2,2 4,16,2,4,2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sweep import FUSED_SHAPES, random_layout  # noqa: E402

from quantlrm.kernels import Config  # noqa: E402

# (rows, warps, split-K, blocks per step) of the tuner's version-9 choices on the H100
TILES = {"gate_up_proj": (16, 2, 1, 4), "down_proj": (32, 4, 8, 1), "qkv_proj": (32, 8, 4, 2), "o_proj": (64, 8, 8, 1)}

# (shape, bits, tile): version 14's choices (BENCHMARKS.md, Kernels; pdl_chain.py's row-pair tiles)
V14 = [(s, b, Config("gemv", block_n=bn, num_warps=w, blocks_per_step=u, prefetch=pf, x_once=True, row_groups=rg,
                     half2=True))
       for s, b, bn, w, u, pf, rg in (("gate_up_proj", 3, 4, 4, 16, True, 2), ("down_proj", 3, 2, 2, 16, True, 2),
                                      ("gate_up_proj", 4, 2, 1, 8, False, 1))]

# version 15's choices (BENCHMARKS.md, Kernels): W3 quads on gate/up and down_proj, one-row x_once tiles on
# qkv and o_proj (fp16)
V15 = [(s, 3, Config("gemv", block_n=bn, num_warps=w, blocks_per_step=u, prefetch=pf, x_once=True, row_groups=rg,
                     half2=True))
       for s, bn, w, u, pf, rg in (("gate_up_proj", 4, 2, 8, False, 4), ("down_proj", 2, 4, 16, False, 4),
                                   ("qkv_proj", 8, 2, 16, True, 1), ("o_proj", 8, 2, 32, True, 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--v14", action="store_true",
                    help="instead: version 14's row-pair x_once tiles of W3 gate/up and down_proj, then W4 gate/up's "
                         "one-row x_once tile (the tuner's choices on H100s; --bits is ignored)")
    ap.add_argument("--v15", action="store_true",
                    help="instead: version 15's W3 tiles of all four shapes (the tuner's choices in fp16 on H100s)")
    ap.add_argument("--smem", action="store_true",
                    help="instead: the shared-memory W3 GEMV's first tile (SMEM_GEMV_CONFIGS[0], the tuner's usual "
                         "choice) on qkv, o_proj and down_proj, without PDL (ncu times one launch alone)")
    ap.add_argument("--smem-tiles", nargs="+", default=None, metavar="RPT,U,JT,W,ST",
                    help="with --smem: these tiles (rows a thread, blocks a step, lane threads, warps, stages)")
    ap.add_argument("--shapes", nargs="+", default=["qkv_proj", "o_proj", "down_proj"], help="with --smem")
    args = ap.parse_args()
    from quantlrm.kernels import SMEM_GEMV_CONFIGS, run_config
    if args.smem:
        c = SMEM_GEMV_CONFIGS[0]
        tiles = [tuple(int(v) for v in t.split(",")) for t in args.smem_tiles] if args.smem_tiles else \
            [(c.block_n, c.blocks_per_step, c.lane_threads, c.num_warps, c.num_stages)]
        return smem(args.reps, tiles, args.shapes)

    cases = []  # one weight per shape, made once (the launches are what the profiler picks out)
    tiles = V15 if args.v15 else V14 if args.v14 else [(short, args.bits, Config("gemv", block_n=bn, num_warps=w, split_k=sk,
                                                             blocks_per_step=u, half2=True))
                                  for short, (bn, w, sk, u) in TILES.items()]
    for short, bits, cfg in tiles:
        cases.append((short, *weight_and_x(short, bits), cfg))
    for rep in range(args.reps):
        for short, kw, x, cfg in cases:
            run_config(x, kw, cfg, short == "gate_up_proj")
            torch.cuda.synchronize()
            print(rep, short, cfg, flush=True)


def weight_and_x(short: str, bits: int):
    """One random packed weight of a fused shape (group size 128) and an fp16 activation row."""
    n, k = FUSED_SHAPES[short]
    return random_layout(n, k, bits, 128, 1, min_bytes=0)[0], torch.randn(1, k, device="cuda", dtype=torch.float16)


def smem(reps: int, tiles: list[tuple[int, ...]], shapes: list[str]) -> None:
    from quantlrm.kernels import smem_gemv

    cases = [(short, *weight_and_x(short, 3)) for short in shapes]
    for rep in range(reps):
        for short, kw, x in cases:
            for rpt, u, jt, w, st in tiles:
                smem_gemv.run(x, kw, rpt, u, jt, w, st, False, {})
                torch.cuda.synchronize()
                print(rep, short, dict(rpt=rpt, u=u, jt=jt, warps=w, stages=st), flush=True)


if __name__ == "__main__":
    main()

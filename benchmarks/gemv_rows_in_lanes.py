"""Batch-1 GEMV with rows in lanes (`_gemv_t_kernel`, words stored column-major) against the
product's tuned GEMV (words row-major), on the fused linears of an 8B Llama (GPU machine).

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth, graph_time  # noqa: E402
from gemv_sweep import random_layout  # noqa: E402

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


def main() -> None:
    from quantlrm.kernels import Config, choose, reference_matmul, run_config
    from quantlrm.kernels.layout import from_codes
    from quantlrm.quantizer import quantize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="rows_in_lanes.json")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
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
            cm = [col_major(w) for w in copies]
            real_cm = col_major(real)
            best = None
            for bn, warps in TILES:
                for sk in splits(n, bn, real.n_blocks):
                    cfg = Config("gemv_t", block_n=bn, num_warps=warps, split_k=sk)
                    y = run_config(x, real_cm, cfg).float()
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    t = per_call(run_config, cfg, cm, x)
                    res["rows"].append(dict(bits=bits, linear=name, kind="rows_in_lanes", config=repr(cfg),
                                            us=t * 1e6, GBps=nbytes / t / 1e9, relerr=err))
                    if best is None or t < best[0]:
                        best = (t, cfg, err)
            t, cfg, err = best
            for tcfg in sorted({(c.block_n, c.num_warps, c.split_k) for c in [cfg]} |
                               {(bn, w, s) for bn, w in ((512, 4), (1024, 8), (256, 2)) for s in splits(n, bn, real.n_blocks)}):
                bn, warps, sk = tcfg
                c = Config("gemv_t", block_n=bn, num_warps=warps, split_k=sk)
                tl_ = [row_tiled(w, bn) for w in copies]
                y = run_config(x, row_tiled(real, bn), c).float()
                err2 = ((y - ref).abs().max() / ref.abs().max()).item()
                t2 = per_call(run_config, c, tl_, x)
                res["rows"].append(dict(bits=bits, linear=name, kind="rows_in_lanes_tiled", config=repr(c),
                                        us=t2 * 1e6, GBps=nbytes / t2 / 1e9, relerr=err2))
                print(f"W{bits} {name}: tiled {bn}/{warps}/{sk}: {t2 * 1e6:.1f} us = {nbytes / t2 / 1e9:.0f} GB/s "
                      f"({t_prod / t2:.2f}x the product), rel. error {err2:.1e}", flush=True)
                del tl_
            print(f"W{bits} {name}: rows in lanes best {cfg}: {t * 1e6:.1f} us = {nbytes / t / 1e9:.0f} GB/s "
                  f"({t_prod / t:.2f}x the product), rel. error {err:.1e}", flush=True)
            del copies, cm
            torch.cuda.empty_cache()
            res["wall_s"] = time.time() - t0
            Path(args.out).write_text(json.dumps(res, indent=1))  # (each shape: a cut-off run keeps its rows)
    print(f"wrote {args.out} ({res['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()

"""Does an L2 prefetch during a latency-bound kernel speed up the next GEMV? (GPU machine)

A decode step leaves HBM idle for several microseconds per layer (attention over a short
cache, norms, launch gaps) while every GEMV then streams its weights cold. This measures, per
fused 8B shape at 3 bits, the batch-1 GEMV (the tuner's tile) after a spin kernel standing in
for the attention, in three settings inside CUDA graphs over enough weight copies to overflow
L2:
- cold: spin, then the GEMV;
- prefetched: a bulk L2 prefetch of the GEMV's packed words, scales and zero points
  (`l2_prefetch` below, Hopper's `cp.async.bulk.prefetch.L2`), the spin, then the GEMV;
- hot: the same copy again and again (all of it in L2): the floor.
The GEMV's time is the graph's time less that of the same graph without the GEMVs.

    PYTHONPATH=src python3 benchmarks/l2_prefetch.py --out l2_prefetch.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth, graph_time  # noqa: E402
from gemv_sweep import FUSED_SHAPES, random_layout  # noqa: E402

# Hopper's bulk L2 prefetch: one instruction asks the copy engine to bring up to `size` bytes
# (a multiple of 16) into L2 and returns at once; nothing waits on it, so a latency-bound kernel
# can keep HBM busy for the next kernel's weights.
_BULK_PREFETCH = tl.constexpr("{\n.reg .pred p;\nsetp.gt.s32 p, $2, 0;\n"
                              "@p cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;\n}")


@triton.jit
def l2_prefetch(base, nbytes, chunks, CHUNK: tl.constexpr):
    """Prefetch bytes [c*CHUNK, (c+1)*CHUNK) of `base` into L2 for every chunk index c in `chunks`
    (clipped to nbytes, rounded down to 16 bytes; CHUNK a multiple of 16). A hint: no result."""
    off = chunks.to(tl.int64) * CHUNK
    size = (tl.minimum(tl.maximum(nbytes - off, 0), CHUNK) // 16 * 16).to(tl.int32)
    ptr = base.to(tl.pointer_type(tl.int8)) + off
    tl.inline_asm_elementwise(_BULK_PREFETCH, "=r,l,r", [ptr, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _l2_prefetch_kernel(base, nbytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    l2_prefetch(base, nbytes, tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), CHUNK)


def prefetch(kw, chunk: int = 16384) -> None:
    """Bulk-prefetch a weight's packed words, scales and zero points into L2 (one launch each)."""
    for t in (kw.packed, kw.scale, kw.zero):
        n = t.numel() * t.element_size()
        block = 128
        _l2_prefetch_kernel[(triton_cdiv(n, chunk * block),)](t, n, CHUNK=chunk, BLOCK=block, num_warps=4)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--spin-us", type=float, default=7.0, help="the stand-in attention's length")
    ap.add_argument("--out", default="l2_prefetch.json")
    args = ap.parse_args()
    from quantlrm.kernels import choose, qmatmul

    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, args=vars(args),
               l2_bytes=getattr(props, "L2_cache_size", None), copy_bandwidth_GBps=copy_bandwidth() / 1e9, rows=[])
    # torch.cuda._sleep counts cycles: calibrate to microseconds on this card
    cycles = 100000
    ms = graph_time(lambda: torch.cuda._sleep(cycles)) * 1e3
    spin_cycles = int(cycles * args.spin_us / (ms * 1e3))
    res["spin_cycles"] = spin_cycles
    for short, (n, k) in FUSED_SHAPES.items():
        kws = random_layout(n, k, args.bits, args.group_size, 8)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        act = short == "gate_up_proj"
        cfg = choose(x, kws[0])
        c = len(kws)

        def spins(pf: bool, gemv: bool, hot: bool = False, kws=kws, x=x, cfg=cfg, act=act):
            def fn():
                for kw in kws:
                    w = kws[0] if hot else kw
                    if pf:
                        prefetch(w)
                    torch.cuda._sleep(spin_cycles)
                    if gemv:
                        qmatmul(x, w, cfg, act)
            return fn

        t = {name: graph_time(spins(pf, g, hot)) for name, pf, g, hot in (
            ("spin", False, False, False), ("cold", False, True, False), ("prefetch_spin", True, False, False),
            ("prefetched", True, True, False), ("hot", False, True, True))}
        wbytes = sum(tt.numel() * tt.element_size() for tt in (kws[0].packed, kws[0].scale, kws[0].zero))
        row = dict(linear=short, out=n, inp=k, bits=args.bits, copies=c, weight_bytes=wbytes,
                   config=str(cfg), graph_s=t,
                   us_cold=(t["cold"] - t["spin"]) / c * 1e6,
                   us_prefetched=(t["prefetched"] - t["prefetch_spin"]) / c * 1e6,
                   us_hot=(t["hot"] - t["spin"]) / c * 1e6,
                   spin_us=t["spin"] / c * 1e6, prefetch_spin_us=t["prefetch_spin"] / c * 1e6)
        res["rows"].append(row)
        print(f"{short:13s} W{args.bits} {n}x{k}: cold {row['us_cold']:6.1f} us  prefetched {row['us_prefetched']:6.1f} us"
              f"  hot {row['us_hot']:6.1f} us  (spin {row['spin_us']:.1f} us, with prefetch {row['prefetch_spin_us']:.1f})",
              flush=True)
        del kws
    res["wall_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

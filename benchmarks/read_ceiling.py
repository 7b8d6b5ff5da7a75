"""How much of the copy bandwidth a plain streaming read reaches at each GEMV's byte count (GPU
machine), next to the tuned GEMV on the same bytes in the same run.

The issue's goal measures the GEMV against the card's copy bandwidth (a 2 GiB copy). A W3
o_proj is 6.8 MB: a kernel that reads it starts with nothing in flight and ends with a tail,
and at ~3 TB/s that ramp is a large part of ~2.3 us. This asks what a kernel that does nothing
but read those bytes reaches, timed the way `gemv_sweep.py` times the GEMV: one launch per copy
of the bytes, enough copies to overflow L2, all in one CUDA graph. The read kernel is the best
of a small grid of tiles (vector loads, several loads in flight per thread), without PDL, with
a PDL launch that waits for the kernel before it and then reads, with one that reads first
and then waits (as a GEMV may for its weights, which no kernel writes), and with one that then
also reads the activations, as a GEMV must once the kernel that wrote them has finished (the
ceiling of any GEMV so launched); `torch.Tensor.copy_` of the same bytes is a second reference
(read and write counted).

    PYTHONPATH=src python3 benchmarks/read_ceiling.py --out read_ceiling.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth, describe, graph_time, per_copy_time, set_pdl_env  # noqa: E402
from gemv_sweep import FUSED_SHAPES, random_layout  # noqa: E402


@triton.jit
def _read_kernel(p_ptr, out_ptr, n_words, x_ptr, x_words, BLOCK: tl.constexpr, STEPS: tl.constexpr,
                 PDL: tl.constexpr, X_BLOCK: tl.constexpr = 16):
    """Each program reads STEPS * BLOCK int32 words (all loads issued before any is used) and
    stores their sum, so nothing is optimised away. PDL 1: wait for the kernel before, then
    read; PDL 2: read, then wait (weights do not depend on the kernel before, so a GEMV may
    stream them in while it finishes), each then letting the next kernel launch. PDL 3: as 2,
    and then every program reads the x_words of the activations too, as a GEMV must once the
    kernel that wrote them has finished."""
    if PDL == 1:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    base = tl.program_id(0).to(tl.int64) * (BLOCK * STEPS)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for s in tl.static_range(STEPS):
        offs = base + s * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(p_ptr + offs, mask=offs < n_words, other=0)
    if PDL >= 2:  # the loads still in flight (summed after the wait: summing before it cost 60% against 72%
        # of the copy bandwidth on o_proj, BENCHMARKS.md, Kernels, version 18)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    total = tl.sum(acc)
    if PDL == 3:
        xo = tl.arange(0, X_BLOCK)
        total += tl.sum(tl.load(x_ptr + xo, mask=xo < x_words, other=0))
    tl.store(out_ptr + tl.program_id(0), total)


READ_TILES = [dict(BLOCK=b, STEPS=s, num_warps=w)
              for b, s, w in itertools.product((1024, 2048, 4096), (1, 2, 4, 8), (4, 8))
              if b // (32 * w) >= 4]  # at least one 16-byte load per thread per step


def read_time(bufs: list[torch.Tensor], tile: dict, pdl: int, x: torch.Tensor) -> float:
    """x: the activations as int32 words (read by PDL 3 only)."""
    n = bufs[0].numel()
    grid = (triton.cdiv(n, tile["BLOCK"] * tile["STEPS"]),)
    out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
    extra = dict(launch_pdl=True) if pdl else {}
    xb = triton.next_power_of_2(x.numel())
    return graph_time(lambda: [_read_kernel[grid](b, out, n, x, x.numel(), PDL=pdl, X_BLOCK=xb, **tile, **extra)
                               for b in bufs]) / len(bufs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--shapes", default=",".join(FUSED_SHAPES))
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--out", default="read_ceiling.json")
    args = ap.parse_args()

    from quantlrm.kernels import pdl_enabled, tune

    dev = torch.device("cuda")
    peak = copy_bandwidth()
    pdl_ok = pdl_enabled(dev)
    res = dict(device=torch.cuda.get_device_name(), copy_bandwidth_GBps=peak / 1e9, args=vars(args),
               pdl_available=pdl_ok, rows=[])
    print(f"{res['device']}: copy bandwidth {peak / 1e9:.0f} GB/s; PDL {'on' if pdl_ok else 'unavailable'}", flush=True)
    for bits in (int(b) for b in args.bits.split(",")):
        for short in args.shapes.split(","):
            n, k = FUSED_SHAPES[short]
            kws = random_layout(n, k, bits, args.group_size, args.copies)
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            nbytes = kws[0].nbytes() + 2 * (n + k)  # as gemv_sweep.py counts: weights, scales, zeros, x, y
            act = short == "gate_up_proj"  # the fused MLP's SiLU * up store, as decode runs it
            set_pdl_env({})
            chosen, _, _ = tune(x, kws[0], act=act)
            t_gemv = per_copy_time(x, kws, chosen, act)
            # a whole number of 16-word vectors, so Triton specialises n_words and loads 16 bytes at a time
            bufs = [torch.randint(-2**31, 2**31 - 1, (-(-nbytes // 64) * 16,), dtype=torch.int32, device=dev)
                    for _ in kws]
            reads = {}
            xw = x.view(torch.int32).reshape(-1)
            modes = ("nopdl", "pdl", "pdl_read_first", "pdl_read_first_then_x")
            for pdl in (0, 1, 2, 3) if pdl_ok else (0,):
                best = min(((read_time(bufs, t, pdl, xw), t) for t in READ_TILES), key=lambda r: r[0])
                reads[modes[pdl]] = dict(us=best[0] * 1e6, frac=nbytes / best[0] / peak, tile=best[1])
            dst = [torch.empty_like(b) for b in bufs]
            t_copy = graph_time(lambda dst=dst, bufs=bufs: [d.copy_(b) for d, b in zip(dst, bufs, strict=True)]) / len(bufs)
            row = dict(bits=bits, linear=short, bytes=nbytes, copies=len(kws),
                       gemv=dict(us=t_gemv * 1e6, frac=nbytes / t_gemv / peak, tile=describe(chosen)),
                       read=reads, copy=dict(us=t_copy * 1e6, frac=2 * nbytes / t_copy / peak))
            best_read = min(r["us"] for r in reads.values())
            row["gemv_over_best_read"] = best_read / row["gemv"]["us"]
            res["rows"].append(row)
            print(f"W{bits} {short} ({nbytes / 1e6:.1f} MB): GEMV {row['gemv']['us']:.1f} us "
                  f"({row['gemv']['frac']:.0%}); read " + ", ".join(
                      f"{m} {r['us']:.1f} us ({r['frac']:.0%})" for m, r in reads.items())
                  + f"; copy_ {row['copy']['us']:.1f} us ({row['copy']['frac']:.0%}); "
                  f"GEMV at {row['gemv_over_best_read']:.0%} of the best read's speed", flush=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
            del kws, bufs, dst
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

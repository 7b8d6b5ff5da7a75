"""Sweep the shared-memory W3 GEMV's tiles (`quantlrm.kernels.smem_gemv`) against the tuner's
choice on the fused 8B shapes, with and without PDL (GPU machine); --check compares every tile
with dequantize-then-matmul.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth, graph_time, per_copy_time, set_carveout, track_loads  # noqa: E402
from gemv_sweep import FUSED_SHAPES, random_layout  # noqa: E402

from quantlrm.kernels import SMEM_GEMV_CONFIGS, reference_matmul, smem_gemv, tune  # noqa: E402


def gemv_smem(x: torch.Tensor, kw, u: int = 8, rpt: int = 2, warps: int = 2, stages: int = 4, jt: int = 1,
              pdl: int = 0, act: bool = False, xreg: int = 1) -> torch.Tensor:
    """One tile of `quantlrm.kernels.smem_gemv` (pdl: 0 none, 1 early trigger, 2 late; xreg: the
    activations through registers, a copy group a step's weights)."""
    launch = dict(PDL=pdl, launch_pdl=True) if pdl else {}
    return smem_gemv.run(x, kw, rpt, u, jt, warps, stages, act, dict(launch, XREG=bool(xreg)))


def tiles(grid: str = "small", pdls: tuple[int, ...] = (0,), xregs: tuple[int, ...] = (1,)):
    """The tiles swept: "full" is run 4's grid, "small" the region where its fastest lay, "deep"
    larger programs with rings deep enough to hold a small shape's whole row (read before the
    PDL wait)."""
    if grid == "full":
        space = itertools.product((4, 8, 16, 32), (2, 4, 8), (1, 2, 4, 8), (2, 4), (1, 2, 4))
    elif grid == "cand":  # the candidates, and each with 3 and 4 stages
        space = [(c.blocks_per_step, c.block_n, c.num_warps, st, c.lane_threads)
                 for c in SMEM_GEMV_CONFIGS for st in (c.num_stages, 3, 4)]
    elif grid == "mid":
        space = [t for t in itertools.product((8, 16), (4, 8), (2, 4), (2, 3, 4), (2, 4)) if t[0] * t[4] <= 32]
    elif grid == "deep":
        space = [(u, rpt, w, st, jt) for u, rpt, w, st, jt in
                 itertools.product((8, 16), (4, 8), (2, 4, 8), (2, 3, 4, 6, 8), (2, 4))
                 if smem_gemv.smem_bytes(rpt, u, jt, w, st) <= smem_gemv.SMEM_LIMIT]
    else:
        space = itertools.product((8, 16), (4, 8, 16), (1, 2, 4), (2, 4), (2, 4))
    for (u, rpt, warps, stages, jt), pdl, xreg in itertools.product(space, pdls, xregs):
        if u * jt <= 32 and not (jt == 1 and rpt >= 8) and not (rpt == 16 and (jt < 2 or stages > 2)):
            yield dict(u=u, rpt=rpt, warps=warps, stages=stages, jt=jt, pdl=pdl, xreg=xreg)


def strip_decode() -> None:
    """Swap the kernel's half2 pair for one xor of the word and the activations, before anything
    compiles: the copies, shared-memory reads and accumulation stay, the decode arithmetic goes
    (and the mask, scale and zero-point terms that only fed it). Timing that says how much of the
    GEMV's time is the memory path alone. Its outputs are meaningless."""
    from triton.experimental import gluon

    @gluon.jit
    def _xor_pair(acc, src, mask, mult, nz, x):
        return acc ^ src ^ x

    smem_gemv._pair = _xor_pair


def check(args) -> int:
    bad = 0
    for n, k in ((4096, 14336), (1000, 4096)):
        kw = random_layout(n, k, 3, 128, 1, min_bytes=0)[0]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ref = reference_matmul(x, kw).float()
        for t in tiles(args.grid, tuple(args.pdl), tuple(args.xreg)):
            if kw.n_blocks % t["u"]:
                continue
            try:
                y = gemv_smem(x, kw, **t).float()
            except Exception as e:  # noqa: BLE001 -- report the tiles that do not compile
                print("ERROR", n, k, t, repr(e)[:300], flush=True)
                bad += 1
                continue
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            ya = gemv_smem(x, kw, **t, act=True).float()
            gref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2]
            erra = ((ya - gref).abs().max() / gref.abs().max()).item()
            if not (err < 1e-2 and erra < 1e-2):
                print("MISMATCH", n, k, t, err, erra, flush=True)
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
        act = args.act and short == "gate_up_proj"  # the fused MLP's SiLU * up store, as decode runs it
        chosen, _, _ = tune(x, kws[0], act=act)
        base = {}
        for pdl in ("1", "0"):
            os.environ["QUANTLRM_PDL"] = pdl
            base[pdl] = per_copy_time(x, kws, chosen, act) * 1e6
        os.environ.pop("QUANTLRM_PDL")
        res["tuner"][short] = dict(config=repr(chosen), us_pdl=base["1"], us_no_pdl=base["0"], act=act)
        best = {}
        for t in tiles(args.grid, tuple(args.pdl), tuple(args.xreg)):
            if kws[0].n_blocks % t["u"] or t["stages"] > kws[0].n_blocks // t["u"] + 1:  # a deeper ring holds nothing more
                continue
            for carve in args.carveout:
                tc = dict(t, carveout=carve) if carve is not None else t
                try:
                    if carve is not None:
                        gemv_smem(x, kws[0], **t, act=act)  # compiled and loaded before its carveout is set
                        set_carveout(carve)
                    us = graph_time(lambda t=t, x=x, kws=kws, act=act: [gemv_smem(x, kw, **t, act=act) for kw in kws]) \
                        / len(kws) * 1e6
                except Exception as e:  # noqa: BLE001
                    res["rows"].append(dict(linear=short, tile=tc, error=repr(e)[:200]))
                    continue
                row = dict(linear=short, tile=tc, us=us, frac=nbytes / (us * 1e-6) / peak)
                res["rows"].append(row)
                key = (t["pdl"], t["xreg"], carve)
                if key not in best or us < best[key]["us"]:
                    best[key] = row
        print(f"W3 {short}: tuner {base['1']:.1f} us ({nbytes / base['1'] / 1e-6 / peak:.0%}) with PDL, "
              f"{base['0']:.1f} without [{time.time() - t0:.0f}s]", flush=True)
        for (pdl, xreg, carve), b in sorted(best.items(), key=str):
            print(f"  smem best, PDL {pdl}, xreg {xreg}, carveout {carve}: {b['tile']} {b['us']:.2f} us "
                  f"({b['frac']:.0%})", flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        del kws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=["down_proj", "gate_up_proj", "qkv_proj", "o_proj"])
    ap.add_argument("--out", default="smem.json")
    ap.add_argument("--grid", choices=("small", "full", "deep", "cand", "mid"), default="small")
    ap.add_argument("--xreg", type=int, nargs="+", default=[1],
                    help="1 (the kernel's default): activations through registers, a copy group a step; 0: activations "
                         "copied with the weights (runs before 6); both: A/B")
    ap.add_argument("--carveout", type=int, nargs="+", default=[None],
                    help="time each tile with these preferred shared-memory carveouts (percent; -1 the driver's "
                         "choice), set on every loaded kernel; default: leave them alone (BENCHMARKS.md, Kernels, "
                         "version 18)")
    ap.add_argument("--act", action="store_true", help="gate_up_proj with the gated-MLP epilogue (both kernels)")
    ap.add_argument("--pdl", type=int, nargs="+", default=[0], help="0: none, 1: early trigger, 2: late trigger")
    ap.add_argument("--no-decode", action="store_true", help="time the memory path alone (strip_decode); not with --check")
    args = ap.parse_args()
    if args.no_decode:
        if args.check:
            ap.error("--no-decode computes nothing to check")
        strip_decode()
    if args.carveout != [None]:
        track_loads()
    if args.check:
        check(args)
    if args.sweep:
        sweep(args)


if __name__ == "__main__":
    main()

"""Which tile property tracks the measured half2 GEMV times? A CPU-only analysis of recorded sweeps.

For every W3 tile timed by `gemv_sweep.py --half2` (results/kernels_v11/run5_sweep.json, one-row
tiles, and run6_sweep_rg2.json, row pairs; both H100, version 10 kernels), this compiles the
current kernel for sm_90 (no GPU needed), reads its thread layout from the TTGIR and its loop
length from the SASS, and derives, for the whole launch:
- issue: loop instructions x warp-steps, as microseconds of all 4 schedulers of 132 SMs at 1.755 GHz;
- L1 lines: distinct 128-byte lines per warp-wide load (words, activations, scales), summed over
  the loop, as microseconds at one line per SM per cycle (a model of the L1 tag stage);
- steps: loop steps each program runs one after another.
It prints each one's correlation with the measured time, per fused shape. A model, not a
measurement: it says where to look, the GPU says what is true.

    python benchmarks/gemv_model.py
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
import gemv_sass  # noqa: E402

SWEEPS = [HERE / "results/kernels_v11/run5_sweep.json", HERE / "results/kernels_v11/run6_sweep_rg2.json"]
SHAPES = {"gate_up_proj": (28672, 4096), "down_proj": (4096, 14336), "qkv_proj": (6144, 4096), "o_proj": (4096, 4096)}
SMS, CLOCK = 132, 1.755e9


def word_layout(ttgir: str, bn: int, u: int, lanes: int) -> list[list[int]]:
    """sizePerThread, threadsPerWarp, warpsPerCTA, order of the words' load."""
    name = re.search(rf"%w0\S* = tt.load [^:]*: tensor<{bn}x{u}x{lanes}x!tt.ptr<i32>, #(\w+)>", ttgir).group(1)
    m = re.search(rf"#{name} = #ttg.blocked<\{{sizePerThread = \[([^\]]*)\], threadsPerWarp = \[([^\]]*)\], "
                  r"warpsPerCTA = \[([^\]]*)\], order = \[([^\]]*)\]", ttgir)
    return [list(map(int, x.split(","))) for x in m.groups()]


def thread_coords(layout, shape, lane: int, warp: int = 0) -> list[list[list[int]]]:
    """Per dim, per repetition, the indices a thread holds (blocked layout; a tile wider than the
    tensor wraps, i.e. threads hold copies)."""
    spt, tpw, wpc, order = layout
    tc, wc, lane_left, warp_left = [0] * 3, [0] * 3, lane, warp
    for d in order:
        tc[d], lane_left = lane_left % tpw[d], lane_left // tpw[d]
        wc[d], warp_left = warp_left % wpc[d], warp_left // wpc[d]
    out = []
    for d in range(3):
        tile = spt[d] * tpw[d] * wpc[d]
        out.append([[(r * tile + wc[d] * spt[d] * tpw[d] + tc[d] * spt[d] + e) % shape[d] for e in range(spt[d])]
                    for r in range(max(1, math.ceil(shape[d] / tile)))])
    return out


def lines_per_warp(layout, shape, addr) -> int:
    """Distinct 128-byte lines, summed over a warp's load instructions (a vector = a thread's
    contiguous elements along dim 2)."""
    instrs: dict[tuple, set] = {}
    for lane in range(32):
        per = thread_coords(layout, shape, lane)
        for (r0, e0), (r1, e1), (r2, e2) in itertools.product(enumerate(per[0]), enumerate(per[1]), enumerate(per[2])):
            for i0, a in enumerate(e0):
                for i1, b in enumerate(e1):
                    instrs.setdefault((r0, r1, r2, i0, i1), set()).update(addr(a, b, c) // 128 for c in e2)
    return sum(len(v) for v in instrs.values())


def tile_features(r: dict, cache: dict) -> dict | None:
    c = r["config"]
    val = lambda k: re.search(k + r"=(\w+)", c).group(1)  # noqa: E731
    bn, w, sk, u = int(val("block_n")), int(val("num_warps")), int(val("split_k")), int(val("blocks_per_step"))
    pf, rg = val("prefetch") == "True", int(val("row_groups")) if "row_groups" in c else 1
    n, k = SHAPES[r["linear"]]
    nb = k // 128
    per = math.ceil(math.ceil(nb / sk) / u) * u
    split = math.ceil(nb / per)
    key = (bn, w, u, pf, rg, split > 1)
    if key not in cache:
        kern = gemv_sass.compile_h2_kernel(3, False, bn, w, u, pf, rg, mode=2 if split > 1 else 0)
        cache[key] = (word_layout(kern.asm["ttgir"], bn, u, 4), len(gemv_sass.loop_body(kern.asm["cubin"], "model")))
    lay, loop = cache[key]
    shape, row = [bn, u, 4], nb * 48  # W3: 48-byte blocks of 4 lanes x 3 words
    words = sum(lines_per_warp(lay, shape, lambda a, b, c, o=odd, t=t: (a * rg + o) * row + b * 48 + t * 16 + c * 4)
                for odd in range(rg) for t in range(3))
    acts = sum(lines_per_warp(lay, shape, lambda a, b, c, s=s: b * 256 + (s * 4 + c) * 4) for s in range(16))
    slay = [lay[0][:2] + [1], *lay[1:]]
    scales = 2 * rg * lines_per_warp(slay, [bn, u, 1], lambda a, b, c: a * rg * nb * 2 + b * 2)
    warp_steps = math.ceil(n / (bn * rg)) * split * w * (per // u)
    return dict(us=r["us"], steps=per // u, issue=loop * warp_steps / (SMS * 4 * CLOCK) * 1e6,
                l1_lines=(words + acts + scales) * warp_steps / (SMS * CLOCK) * 1e6)


def corr(a: list[float], b: list[float]) -> float:
    ma, mb = statistics.mean(a), statistics.mean(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return num / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def main() -> None:
    rows = [r for f in SWEEPS for r in json.loads(f.read_text())["rows"] if "us" in r and r["bits"] == 3]
    cache: dict = {}
    feats = [dict(f, linear=r["linear"]) for r in rows if (f := tile_features(r, cache))]
    print(f"{len(feats)} timed W3 tiles, {len(cache)} compiles")
    print("correlation with the measured time: over all tiles, then over the 60 fastest of the shape")
    print("| fused shape | tiles | measured us (min / median) | issue | L1 lines | steps | 60 fastest: issue | L1 lines "
          "| steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lin in SHAPES:
        fs = sorted((f for f in feats if f["linear"] == lin), key=lambda f: f["us"])
        us = [f["us"] for f in fs]
        cs = [corr([f[k] for f in sub], [f["us"] for f in sub]) for sub in (fs, fs[:60])
              for k in ("issue", "l1_lines", "steps")]
        print(f"| {lin} | {len(fs)} | {min(us):.1f} / {statistics.median(us):.1f} | " + " | ".join(f"{c:.2f}" for c in cs) + " |")


if __name__ == "__main__":
    main()

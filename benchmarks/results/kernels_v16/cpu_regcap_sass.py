"""CPU compile (sm_90) of the half2 GEMV under Triton's `maxnreg`, as run 8's register cap did
(the cap's Config field was reverted; Triton's option is used directly here). MODE 0, no gated
epilogue, PDL 1, x_once. Prints: tile (bits, block_n, warps, blocks a step, prefetch, row groups),
cap (0: none), registers, stack bytes, loop instructions, local loads/stores in the loop.

    cd benchmarks && python results/kernels_v16/cpu_regcap_sass.py > results/kernels_v16/cpu_regcap_sass.txt
"""

import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import gemv_sass as g  # noqa: E402


def compile_capped(bits, bn, w, u, pf, rg, maxnreg):
    dt = "*fp16"
    sig = {"x_ptr": "*i32", "p_ptr": "*i32", "s_ptr": dt, "z_ptr": dt, "y_ptr": dt, "ws_ptr": "*fp32",
           "cnt_ptr": "*i32", "N": "i32", "K": "i32", "n_blocks": "i32", "blocks_per_split": "i32", "stride_s": "i32"}
    const = dict(GB=1, BLOCK_N=bn, EVEN_N=True, EVEN_K=True, MODE=0, PREFETCH=pf, U=u, FULL=True,
                 ACT=False, EMULATE=False, BF16=False, RG=rg, XONCE=True, PDL=1, **g.layout_consts(bits))
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(12) if i not in (9, 10)}
    src = ASTSource(fn=g.tk._gemv_h2_kernel, signature=sig, constexprs=const, attrs=attrs)
    opts = {"num_warps": w, **({"maxnreg": maxnreg} if maxnreg else {})}
    cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["cubin"]
    res = g.cuobjdump(cubin, "-res-usage", "regcap")
    body = g.loop_body(cubin, "regcap")
    return (re.search(r"REG:(\d+)", res).group(1), re.search(r"STACK:(\d+)", res).group(1), len(body),
            sum("STL" in ln or "LDL" in ln for ln in body))


for tile in [(3, 4, 4, 16, True, 2), (3, 2, 2, 16, True, 2)]:
    for cap in (0, 64, 56):
        print(tile, cap, *compile_capped(*tile, cap))

"""Registers and loop length of the W3 row-quad tile against the row-pair tile of the same shape,
compiled for sm_90 on the CPU (no gated epilogue, MODE 0, late PDL trigger).

    python benchmarks/results/kernels_v17/cpu_quad_sass.py > benchmarks/results/kernels_v17/cpu_quad_sass.txt
"""

import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import gemv_sass as g  # noqa: E402

print("| bits | rows a program (block_n x row groups) | warps | blocks a step | prefetch | registers "
      "| loop instructions | per code | global loads in the loop |")
print("|---|---|---|---|---|---|---|---|---|")
for bits, bn, w, u, pf, rg in ((3, 4, 2, 8, False, 4), (3, 4, 2, 8, True, 2), (3, 2, 4, 16, False, 4),
                               (3, 2, 2, 16, True, 2)):
    k = g.compile_h2_kernel(bits, False, bn, w, u, pf, rg, mode=0, x_once=True, pdl=2)
    body = g.loop_body(k.asm["cubin"], "quad")
    ops = collections.Counter(re.search(r"\*/\s+(?:@!?P\d\s+)?([A-Z0-9_]+)", ln).group(1) for ln in body)
    codes = bn * rg * g.codes_per_block(bits) * u / (w * 32)
    print(f"| W{bits} | {bn} x {rg} | {w} | {u} | {pf} | {g.registers(k.asm['cubin'])} | {len(body)} "
          f"| {len(body) / codes:.2f} | {ops['LDG']}: {g.loads(body)} |")

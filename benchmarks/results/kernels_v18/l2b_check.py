"""The bulk L2 prefetch changes no output: each tile with and without it, bit for bit (GPU)."""
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gemv_sweep import random_layout  # noqa: E402

from quantlrm.kernels import GEMV_H2_CONFIGS, run_config, reference_matmul  # noqa: E402

bad = 0
for bits in (3, 4):
    for n, k in ((4096, 14336), (1000, 4096 + 128)):
        kw = random_layout(n, k, bits, 128, 1, min_bytes=0)[0]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ref = reference_matmul(x, kw).float()
        for c in GEMV_H2_CONFIGS:
            c = replace(c, half2=True)
            a = run_config(x, kw, c)
            b = run_config(x, kw, replace(c, l2_bulk=True))
            same = torch.equal(a, b)
            err = (b.float() - ref).abs().max().item() / ref.abs().max().item()
            if not same or err > 2e-2:
                bad += 1
                print("MISMATCH", bits, n, k, c, same, err)
print("bad", bad)

"""Where the prefill-path time goes: the dequant kernel (paired vs single 16-bit stores, two
tiles) and the fused GEMM at batch 2, on the 8B gate_proj shape (14336 x 4096, group 128).

Random codes, 4 weight copies (> L2) timed inside one CUDA graph (`decode.graph_time`).

    PYTHONPATH=src python benchmarks/prefill_paths.py      # on the GPU machine
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from decode import graph_time, per_copy_time  # noqa: E402

from quantlrm.kernels import Config, _layout_args, _pow2, candidates  # noqa: E402
from quantlrm.kernels import layout as L  # noqa: E402
from quantlrm.kernels import triton_kernels as tk  # noqa: E402


def dequant(kw: L.KernelWeight, pairs: int, block_n: int) -> torch.Tensor:
    n, k = kw.out_features, kw.in_features
    w = torch.empty(n, k, dtype=torch.float16, device="cuda")
    tk._dequant_kernel[(tk.cdiv(n, block_n), kw.n_blocks)](
        kw.packed, kw.scale, kw.zero, w.view(torch.int32) if pairs else w, n, k, kw.packed.stride(0),
        kw.scale.stride(0), kw.group_size, L_PAD=_pow2(kw.lanes), BLOCK_N=block_n,
        PAIRS=pairs, **_layout_args(kw))
    return w


def main() -> None:
    torch.manual_seed(0)
    n, k = 14336, 4096
    for bits in (4, 3):
        kws = []
        for _ in range(4):
            codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device="cuda")
            s = torch.rand(n, k // 128, device="cuda") * 0.01
            z = torch.randint(0, 2**bits, (n, k // 128), device="cuda").float()
            kws.append(L.from_codes(codes, s, z, bits, 128, torch.float16))
        for pairs in (0, 1):
            for bn in (16, 64):
                t = graph_time(lambda kws=kws, pairs=pairs, bn=bn: [dequant(kw, pairs, bn) for kw in kws]) / 4
                print(f"W{bits} dequant pairs={pairs} block_n={bn}: {t * 1e6:.1f} us", flush=True)
        x = torch.randn(2, k, device="cuda", dtype=torch.float16)
        for bm, bn, sk in ((16, 64, 1), (16, 32, 4), (16, 128, 2)):
            # the stages `candidates` gives this tile (W3's spare-code gathers need fewer)
            stages = next(c.num_stages for c in candidates(kws[0], 16)
                          if (c.kind, c.block_m, c.block_n, c.split_k) == ("gemm", bm, bn, sk))
            cfg = Config("gemm", block_m=bm, block_n=bn, split_k=sk, num_warps=4, num_stages=stages)
            t = per_copy_time(x, kws, cfg)
            print(f"W{bits} M=2 gemm m{bm} n{bn} sk{sk}: {t * 1e6:.1f} us", flush=True)


if __name__ == "__main__":
    main()

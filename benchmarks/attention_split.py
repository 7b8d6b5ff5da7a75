"""Decode attention: microseconds per call of the fused kernel (RoPE, cache write, attention)
against how the cache is cut up: programs per KV head (split) and positions per loop step
(block), at several cache lengths. Calls are replayed 32 at a time in a CUDA graph (a
model's layers), so launch cost is counted as in decoding.

    PYTHONPATH=src python benchmarks/attention_split.py --out attention_split.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import graph_time  # noqa: E402

from quantlrm.kernels import attention as ka  # noqa: E402


def time_calls(fn, calls: int = 32) -> float:
    """Median microseconds per call, `calls` calls captured in one graph."""
    return graph_time(lambda: [fn() for _ in range(calls)]) * 1e6 / calls


def sweep(cur: int, rows: list[dict], default_only: bool = False) -> None:
    """Every (block, split) at `cur` cached positions, Llama-3-8B's attention shape (or only
    the kernel's own choice)."""
    b, hq, hkv, d = 1, 32, 8, 128
    dt = torch.float16
    cap = -(-(cur + 64) // 256) * 256  # the static cache, rounded up as quantlrm.generate does
    k = torch.randn(b, hkv, cap, d, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    q = torch.randn(b, hq, d, device="cuda", dtype=dt)
    nk, nv = torch.randn(b, hkv, d, device="cuda", dtype=dt), torch.randn(b, hkv, d, device="cuda", dtype=dt)
    cos, sin = torch.randn(1, 1, d, device="cuda", dtype=dt), torch.randn(1, 1, d, device="cuda", dtype=dt)
    pos = torch.tensor(cur, device="cuda")
    mask = torch.zeros(1, 1, 1, cap, dtype=torch.bool, device="cuda")
    mask[..., :cur + 40] = True
    fused = dict(new_k=nk, new_v=nv, cos=cos, sin=sin, q_norm=None, k_norm=None, eps=1e-6, pos=pos)
    fill = time_calls(lambda: pos.fill_(cur))  # one fill a call: every call sees the same cache
    for block in (None,) if default_only else (16, 32, 64):
        n_blocks = -(-cap // (block or ka.BLOCK_L))
        for split in [None] + ([] if default_only else [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= n_blocks]):
            def call(split=split, block=block):
                pos.fill_(cur)
                return ka._launch(q, k, v, mask, d ** -0.5, split=split, fused=fused, block_l=block)
            us = time_calls(call) - fill
            rows.append(dict(cached=cur, cache_len=cap, block=block or "default", split=split or "default", us=us))
            print(f"cached {cur:5d} (cache {cap:5d}) block {block or 'default':>7} split {split or 'default':>7}: {us:6.2f} us",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="320,1024,4096", help="positions already in the cache")
    ap.add_argument("--default-only", action="store_true", help="only the kernel's own split and block")
    ap.add_argument("--out", default="attention_split.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: list[dict] = []
    for cur in (int(x) for x in args.lengths.split(",")):
        sweep(cur, rows, args.default_only)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""How stable is the kernel tuner's choice, tuning one shape several times?

For each fused decode shape of an 8B-shaped Llama (qkv, o, gate_up, down) and each precision,
run `quantlrm.kernels.tune` several times on fresh weights and record, per trial: the
first-pass winner (the tuner before the re-timing of finalists), the final winner, and every
finalist's median time. A winner that changes from trial to trial while the finalists'
medians are close would make decode speed vary between runs of one build.

    PYTHONPATH=src python3 benchmarks/tuner_spread.py --out tuner_spread.json   # GPU machine
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from decode import describe  # the decode benchmark's one-line tile description

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def random_weight(n: int, k: int, bits: int, dtype: torch.dtype):
    from quantlrm.kernels.layout import from_codes

    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda")
    scale = torch.rand(n, k // 128, device="cuda") * 0.01 + 0.001
    zero = torch.randint(0, 1 << bits, (n, k // 128), device="cuda").float()
    return from_codes(codes, scale, zero, bits, 128, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    ap.add_argument("--out", default="tuner_spread.json")
    args = ap.parse_args()
    from quantlrm.kernels import tune

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    res: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, args=vars(args), rows=[])
    t0 = time.time()
    for bits in (int(b) for b in args.bits.split(",")):
        for name, (n, k) in SHAPES.items():
            x = torch.randn(1, k, device="cuda", dtype=dt)
            for trial in range(args.trials):
                kw = random_weight(n, k, bits, dt)
                ts = time.time()
                best, first, final = tune(x, kw)
                top = sorted(first, key=first.__getitem__)
                row = dict(bits=bits, linear=name, n=n, k=k, trial=trial, tune_s=time.time() - ts,
                           final=describe(best), final_us=final.get(best, first[best]) * 1e3,
                           first_pass_would_pick=describe(top[0]),
                           first_pass_us={describe(c): first[c] * 1e3 for c in top[:6]},
                           finalists_median_us={describe(c): v * 1e3 for c, v in final.items()})
                res["rows"].append(row)
                print(f"W{bits} {name:7s} trial {trial}: {row['final']} {row['final_us']:.1f} us "
                      f"(tuned in {row['tune_s']:.1f}s)", flush=True)
                del kw
            res["wall_s"] = time.time() - t0
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

"""Time of GPTQ rounding for one decoder layer's linears: each linear alone, and linears that
read the same input (q/k/v, gate/up) stacked into one pass (`gptq_quantize_shared`).

GPTQ's column loop is sequential, so on a GPU its cost is mostly the number of small kernel
launches per column; stacking rows cuts the columns walked per layer (7B shapes: 35584 -> 23296).

    PYTHONPATH=src python benchmarks/gptq_speed.py                 # 7B layer shapes (GPU)
    PYTHONPATH=src python benchmarks/gptq_speed.py --hidden 1024 --mlp 2816   # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quantlrm import gptq as G


def _hessian(k: int, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(4 * k, k, generator=gen).to(device)
    return 2 / x.shape[0] * x.T @ x


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=11008)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    d, f = a.hidden, a.mlp
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (f, d), "up": (f, d), "down": (d, f)}
    groups = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
    gen = torch.Generator().manual_seed(0)
    ws = {n: (torch.randn(*s, generator=gen) * 0.02).to(a.device) for n, s in shapes.items()}
    hs = {g[0]: _hessian(shapes[g[0]][1], a.device, i) for i, g in enumerate(groups)}
    G.gptq_quantize(ws["o"], hs["o"], a.bits, a.group_size)  # warm-up (kernels, solver)
    _sync(a.device)
    t0 = time.perf_counter()
    alone = {n: G.gptq_quantize(ws[n], hs[g[0]], a.bits, a.group_size)[0] for g in groups for n in g}
    _sync(a.device)
    t1 = time.perf_counter()
    stacked = {}
    for g in groups:
        for n, (res, _) in zip(g, G.gptq_quantize_shared([ws[n] for n in g], hs[g[0]], a.bits, a.group_size),
                               strict=True):
            stacked[n] = res
    _sync(a.device)
    t2 = time.perf_counter()
    same = sum(int((alone[n].codes == stacked[n].codes).sum()) for n in shapes)
    total = sum(r.codes.numel() for r in alone.values())
    out = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "hidden": d, "mlp": f, "bits": a.bits, "group_size": a.group_size,
           "alone_s": t1 - t0, "shared_s": t2 - t1, "ratio": (t2 - t1) / (t1 - t0), "same_codes": same / total}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

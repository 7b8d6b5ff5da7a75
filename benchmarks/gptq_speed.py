"""Time of GPTQ rounding for one decoder layer's linears: the torch column loop or the Triton
block kernel (GPU), each linear alone or the linears that read one input (q/k/v, gate/up)
stacked into one pass (`gptq_quantize_shared`); the codes are compared with the first variant.

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
    kernel_ok = G._block_kernel_ok

    def run(fused: bool, shared: bool) -> tuple[float, dict]:
        G._block_kernel_ok = kernel_ok if fused else (lambda *_: False)
        try:
            G.gptq_quantize(ws["o"], hs["o"], a.bits, a.group_size)  # warm-up (kernels, solver)
            _sync(a.device)
            t = time.perf_counter()
            res = {}
            for g in groups:
                parts = [[n] for n in g] if not shared else [g]
                for p in parts:
                    done = G.gptq_quantize_shared([ws[n] for n in p], hs[g[0]], a.bits, a.group_size)
                    res.update({n: r for n, (r, _) in zip(p, done, strict=True)})
            _sync(a.device)
            return time.perf_counter() - t, res
        finally:
            G._block_kernel_ok = kernel_ok

    variants = {"torch loop, each linear alone": (False, False), "torch loop, shared inputs": (False, True)}
    if kernel_ok(ws["o"].float(), 128, a.group_size):
        variants |= {"block kernel, each linear alone": (True, False), "block kernel, shared inputs": (True, True)}
    times, results = {}, {}
    for name, (fused, shared) in variants.items():
        times[name], results[name] = run(fused, shared)
        print(f"{name}: {times[name]:.2f} s", flush=True)
    base = results["torch loop, each linear alone"]
    total = sum(r.codes.numel() for r in base.values())
    out = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "hidden": d, "mlp": f, "bits": a.bits, "group_size": a.group_size, "seconds": times,
           "same_codes_as_torch_alone": {k: sum(int((base[n].codes == v[n].codes).sum()) for n in shapes) / total
                                         for k, v in results.items()}}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

"""Gate/up (with its SiLU * up store) feeding down_proj, the one GEMV-to-GEMV edge of a decode
step, timed under each PDL trigger (GPU machine, Hopper).

Version 13 found that the row-pair x_once tiles decode W3 slower under PDL when each GEMV lets
the next kernel launch as its programs start (the early trigger), and faster when it does so
after its main loop (BENCHMARKS.md, Kernels). This isolates that edge: C copies of the two
weights (together past the 50 MB L2) in one CUDA graph, modes interleaved over repeats, median
per mode. It also launches a probe grid after gate/up that records the SM each of its programs
started on, to test our reading of the cause: launched early, the next kernel's programs pile
onto the SMs that free up first.

    PYTHONPATH=src python3 benchmarks/pdl_chain.py --bits 3 --out pdl_chain.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth, describe, graph_time, set_pdl_env  # noqa: E402
from gemv_sweep import random_layout  # noqa: E402

MODES = {"nopdl": {"QUANTLRM_PDL": "0"}, "early": {"QUANTLRM_PDL_TRIGGER": "early"},
         "late": {"QUANTLRM_PDL_TRIGGER": "late"}}


@triton.jit
def _probe_kernel(sm_ptr):
    """Each program records the SM it started on, then waits for the kernel before (PDL)."""
    pid = tl.program_id(0)
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(sm_ptr + pid, sm)
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tiles", choices=("rowpair", "tuned"), default="rowpair",
                    help="rowpair: the row-pair x_once tiles the tuner took for W3 gate/up and down_proj in "
                         "version 13 (run 10); tuned: the tuner's choice from its default candidates")
    ap.add_argument("--probe-programs", type=int, default=1024, help="programs of the probe grid (down_proj's tile: 1024)")
    ap.add_argument("--out", default="pdl_chain.json")
    args = ap.parse_args()

    from quantlrm.kernels import Config, run_config, tune

    dev = torch.device("cuda")
    peak = copy_bandwidth()
    gu = random_layout(28672, 4096, args.bits, args.group_size, args.copies, min_bytes=0)
    dn = random_layout(4096, 14336, args.bits, args.group_size, args.copies, min_bytes=0)
    x = torch.randn(1, 4096, device=dev, dtype=torch.float16)
    if args.tiles == "rowpair":
        c_gu = Config("gemv", block_n=4, num_warps=4, blocks_per_step=16, prefetch=True, x_once=True, row_groups=2,
                      half2=True)
        c_dn = Config("gemv", block_n=2, num_warps=2, blocks_per_step=16, prefetch=True, x_once=True, row_groups=2,
                      half2=True)
    else:
        c_gu, _, _ = tune(x, gu[0], act=True)
        c_dn, _, _ = tune(torch.randn(1, 14336, device=dev, dtype=torch.float16), dn[0])
    nbytes = gu[0].nbytes() + dn[0].nbytes()

    def chain():
        for a, b in zip(gu, dn, strict=True):
            run_config(run_config(x, a, c_gu, True), b, c_dn)

    times = {m: [] for m in MODES}
    for r in range(args.repeats):
        for m in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
            set_pdl_env(MODES[m])
            times[m].append(graph_time(chain) / len(gu))
    res = dict(device=torch.cuda.get_device_name(), copy_bandwidth_GBps=peak / 1e9, args=vars(args),
               tiles={"gate_up": describe(c_gu), "down": describe(c_dn)}, bytes_per_chain=nbytes, modes={})
    print(f"{res['device']}: copy bandwidth {peak / 1e9:.0f} GB/s; gate/up {describe(c_gu)}; down {describe(c_dn)}")
    for m, ts in times.items():
        t = statistics.median(ts)
        res["modes"][m] = dict(us=[v * 1e6 for v in ts], median_us=t * 1e6, frac=nbytes / t / peak)
        print(f"  {m:6s} gate/up + down_proj: median {t * 1e6:.1f} us ({nbytes / t / peak:.0%} of copy bandwidth), "
              f"over {len(ts)}: {min(ts) * 1e6:.1f}-{max(ts) * 1e6:.1f}", flush=True)

    # the probe: where the next kernel's programs start, after gate/up triggering early or late
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    sm = torch.full((args.probe_programs,), -1, device=dev, dtype=torch.int32)
    for m in ("early", "late"):
        set_pdl_env(MODES[m])
        def step():
            run_config(x, gu[0], c_gu, True)
            _probe_kernel[(args.probe_programs,)](sm, num_warps=c_dn.num_warps, launch_pdl=True)

        step()  # compiles outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        counts = []
        for _ in range(args.repeats):
            g.replay()
            torch.cuda.synchronize()
            per_sm = torch.bincount(sm.long(), minlength=n_sm)
            counts.append(dict(sms_used=int((per_sm > 0).sum()), max_per_sm=int(per_sm.max())))
        res.setdefault("probe", {})[m] = counts
        print(f"  probe after gate/up, {m} trigger: SMs used {[c['sms_used'] for c in counts]} of {n_sm}; "
              f"most programs on one SM {[c['max_per_sm'] for c in counts]}", flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

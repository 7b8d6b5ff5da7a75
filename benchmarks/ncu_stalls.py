"""Sum Nsight Compute's per-instruction SASS counters over each profiled kernel: executed
instructions by opcode and warp-stall samples by reason (runs anywhere, on a CSV exported by

    ncu -i REPORT.ncu-rep --page source --print-source sass --csv > sass.csv
    python3 benchmarks/ncu_stalls.py sass.csv --names qkv o_proj down_proj

(a gzipped export reads as well).
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip


def kernels(path: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, instruction rows) for each kernel in the export, in the report's order."""
    out = []
    with (gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")) as f:
        for r in csv.reader(f):
            if not r:
                continue
            if r[0] == "Kernel Name":
                out.append((None, []))
            elif r[0] == "Address":
                out[-1] = (r, out[-1][1])
            elif out:
                out[-1][1].append(r)
    return out


def summary(header: list[str], rows: list[list[str]], top: int = 10) -> dict:
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    ops, stalls, total = collections.Counter(), collections.Counter(), 0
    for r in rows:
        n = int(r[col["Instructions Executed"]] or 0)
        total += n
        words = r[col["Source"]].split()
        op = words[1] if words[0].startswith("@") else words[0]
        ops[op.split(".")[0]] += n
        for s in reasons:
            stalls[s[len("stall_"):]] += int(r[col[s]] or 0)
    samples = sum(stalls.values())
    return dict(instructions=total, samples=samples,
                stalls={k: v / samples for k, v in stalls.most_common(top)},
                ops={k: v / total for k, v in ops.most_common(top)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--names", nargs="*", default=[], help="a label for each kernel, in the report's order")
    args = ap.parse_args()
    for i, (header, rows) in enumerate(kernels(args.csv)):
        s = summary(header, rows)
        name = args.names[i] if i < len(args.names) else f"kernel {i}"
        print(f"{name}: {s['instructions']:,} warp instructions, {s['samples']:,} stall samples")
        print("  stalls: " + ", ".join(f"{k} {v:.0%}" for k, v in s["stalls"].items()))
        print("  opcodes: " + ", ".join(f"{k} {v:.1%}" for k, v in s["ops"].items()))


if __name__ == "__main__":
    main()

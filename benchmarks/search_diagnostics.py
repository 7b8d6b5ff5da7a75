"""What the scale search did in finished quantizations: per output directory (one with a
quantlrm.json), the share of scale groups left unscaled (alpha = 0), the mean alpha, the mean
relative change of the group output loss, and for QuantLRM the mean Spearman correlation of
its channel importance with AWQ's mean |x| (`zoo.search_diagnostics`).

    python benchmarks/search_diagnostics.py quantlrm-demo/models/*
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from zoo import search_diagnostics  # noqa: E402


def main(argv: list[str]) -> None:
    print("| run | groups | alpha = 0 | mean alpha | group loss change | rank corr |")
    print("|---|---|---|---|---|---|")
    for d in map(Path, argv):
        s = search_diagnostics(d)
        if s is None:
            continue
        lc = "" if s["loss_change"] is None else f"{100 * s['loss_change']:+.1f}%"
        rc = "" if s["rank_corr_act"] is None else f"{s['rank_corr_act']:.2f}"
        print(f"| {d.name} | {s['groups']} | {100 * s['alpha_zero']:.0f}% | {s['alpha_mean']:.3f} | {lc} | {rc} |")


if __name__ == "__main__":
    main(sys.argv[1:])

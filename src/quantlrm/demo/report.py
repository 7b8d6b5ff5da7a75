"""The demo's report: paper-style table (Markdown, JSON, stdout), accuracy chart, |dW| picture."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantlrm.checkpoint import Checkpoint

METHOD_LABEL = {"rtn": "RTN", "awq": "AWQ", "quantlrm": "QuantLRM"}


def _label(row: dict) -> tuple[str, str]:
    if row["bits"] == 16:
        return ("16-bit" if row["key"] == "16-bit" else "base (before SFT)"), "W16"
    return METHOD_LABEL.get(row["method"], row["method"]), f"W{row['bits']}"


def table_rows(summary: dict) -> list[list[str]]:
    """Header + one row per variant: bits, method, task accuracies, avg, % of 16-bit avg."""
    tasks = summary["tasks"]
    ref = next(r for r in summary["rows"] if r["key"] == "16-bit")["avg"]
    out = [["Bits", "Method", *[t["display"] for t in tasks], "Avg", "% of 16-bit"]]
    for r in summary["rows"]:
        name, bits = _label(r)
        kept = f"{100 * r['avg'] / ref:.1f}" if ref else "-"
        out.append([bits, name, *[f"{100 * r['acc'][t['name']]:.1f}" for t in tasks],
                    f"{100 * r['avg']:.1f}", kept])
    return out


def markdown(summary: dict) -> str:
    rows = table_rows(summary)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    n = ", ".join(f"{t['display']} n={t['n']} (chance {100 * t['chance']:.0f}%)" for t in summary["tasks"])
    z = summary["zero"]
    notes = [
        "",
        f"Accuracy % on held-out problems, greedy decoding; {n}.",
        f"Quantization: group size {summary['quantize']['group_size']}, calibration "
        f"{summary['quantize']['calib']}.",
        f"Pair: {summary['pair']['n_params']:,} parameters, bf16; SFT left "
        f"{100 * z['zero_fraction']:.2f}% of linear weights exactly unchanged "
        f"({z['n_zero']:,} of {z['n_updates']:,}).",
    ]
    paired = paired_lines(summary)
    if paired:
        notes += ["", paired[0], ""] + [f"- {ln.strip()}" for ln in paired[1:]]
    return "\n".join(lines + notes + search_lines(summary)) + "\n"


def paired_lines(summary: dict) -> list[str]:
    """QuantLRM against each baseline on the same questions (exact McNemar p)."""
    rows = summary.get("paired") or []
    if not rows:
        return []
    out = ["paired on the same questions (exact McNemar p; p > 0.05 means the gap may be chance):"]
    for b in sorted({r["bits"] for r in rows}):
        parts = [f"{METHOD_LABEL.get(r['baseline'], r['baseline'])} {r['diff_points']:+.1f} (p {r['p']:.2g})"
                 for r in rows if r["bits"] == b]
        out.append(f"  W{b} QuantLRM vs " + ", ".join(parts))
    return out


def search_lines(summary: dict) -> list[str]:
    """What each scale search did (`quantlrm.pipeline.search_summary`): how far the scaling
    moved from plain rounding, and how QuantLRM's channel order relates to AWQ's."""
    rows = [r for r in summary["rows"] if r.get("search")]
    if not rows:
        return []
    out = ["", "Scale search (all layers and scale groups; alpha = 0 means no scaling; the last column is "
           "the Spearman correlation of QuantLRM's channel importance with AWQ's mean |x|):", "",
           "| Bits | Method | groups with alpha = 0 | mean alpha | group output loss | importance vs mean abs(x) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        name, bits = _label(r)
        d = r["search"]
        loss = "" if d.get("loss_change") is None else f"{100 * d['loss_change']:+.1f}%"
        corr = "" if d.get("rank_corr_act") is None else f"{d['rank_corr_act']:.2f}"
        out.append(f"| {bits} | {name} | {100 * d['alpha_zero']:.0f}% | {d['alpha_mean']:.2f} | {loss} | {corr} |")
    return out


def print_table(summary: dict) -> None:
    rows = table_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, r in enumerate(rows):
        print("  ".join(c.rjust(w) if j >= 2 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    z = summary["zero"]
    print(f"\nzero fraction of the pair: {100 * z['zero_fraction']:.2f}%   "
          f"(accuracy %, n={summary['tasks'][0]['n']} held-out problems per task)")
    for line in paired_lines(summary):
        print(line)
    print("time per step (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["times"].items()))


def plot_accuracy(summary: dict, path: Path) -> None:
    """Grouped bars: average accuracy of each method at each bit width, 16-bit as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["bits"] != 16]
    ref = next(r for r in summary["rows"] if r["key"] == "16-bit")["avg"]
    bits = sorted({r["bits"] for r in rows})
    methods = [m for m in METHOD_LABEL if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    w = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        ys = [100 * next((r["avg"] for r in rows if r["method"] == m and r["bits"] == b), 0) for b in bits]
        xs = [k + (i - (len(methods) - 1) / 2) * w for k in range(len(bits))]
        bars = ax.bar(xs, ys, w, label=METHOD_LABEL[m])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(100 * ref, color="k", ls="--", lw=1, label="16-bit")
    ax.set_xticks(range(len(bits)), [f"W{b}" for b in bits])
    ax.set_ylabel("average accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_title("Demo: held-out accuracy after quantization")
    ax.legend(fontsize=8, loc="upper center", ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_magnitudes(base_dir: Path, ft_dir: Path) -> torch.Tensor:
    """All |W' - W| of the pair's linear layers, computed in fp32 (a few million values)."""
    a, b = Checkpoint(base_dir), Checkpoint(ft_dir)
    parts = [
        (b.get(n).float() - a.get(n).float()).abs().flatten()
        for n in a.keys() if n.endswith("proj.weight")
    ]
    return torch.cat(parts)


def plot_updates(dw: torch.Tensor, stats: dict, path: Path) -> None:
    """Histogram of |dW| (log x) with the restricted quadratic mapping f over it.

    The picture of "protect both ends": f is high for the smallest and the largest
    updates, lowest at the median; exact zeros are counted separately and annotated.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quantlrm.signals import map_updates

    pos = dw[dw > 0]
    n_zero = int((dw == 0).sum())
    lo, hi = float(pos.min()), float(pos.max())
    edges = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), 80)
    hist = torch.histogram(pos.double(), bins=edges.double()).hist
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.stairs(hist.numpy(), edges.numpy(), fill=True, alpha=0.5, label="|dW| > 0 (count)")
    ax.set_xscale("log")
    ax.set_xlabel("|dW| = |W_sft - W_base| (linear layers)")
    ax.set_ylabel("count")
    ax2 = ax.twinx()
    grid = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), 400)
    f = map_updates(grid, stats, stats.get("variant", "both-ends"), stats.get("y_min", 1.0),
                    stats.get("y_max", 10.0))
    ax2.plot(grid.numpy(), f.numpy(), color="C3", lw=2, label="f(|dW|) quadratic mapping")
    ax2.axvline(stats["dw_mid"], color="C3", ls=":", lw=1)
    ax2.set_ylabel("importance weight f")
    ax2.set_ylim(0, stats.get("y_max", 10.0) * 1.08)
    ax.set_title(
        f"Protect both ends: {100 * n_zero / dw.numel():.2f}% exact zeros "
        f"({n_zero:,}, counted per channel)", fontsize=10,
    )
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(summary: dict, out: Path, base_dir: Path, ft_dir: Path, sig) -> dict[str, Path]:
    """table.md, table.json, accuracy.png, dw_hist.png under `out`."""
    out = Path(out)
    files = {
        "table_md": out / "table.md",
        "table_json": out / "table.json",
        "accuracy_png": out / "accuracy.png",
        "dw_hist_png": out / "dw_hist.png",
    }
    files["table_md"].write_text(markdown(summary))
    rows = table_rows(summary)
    files["table_json"].write_text(json.dumps(
        {"columns": rows[0], "rows": [dict(zip(rows[0], r, strict=True)) for r in rows[1:]],
         "raw": summary["rows"], "tasks": summary["tasks"], "zero": summary["zero"]},
        indent=1))
    plot_accuracy(summary, files["accuracy_png"])
    plot_updates(update_magnitudes(base_dir, ft_dir), sig.stats, files["dw_hist_png"])
    return files

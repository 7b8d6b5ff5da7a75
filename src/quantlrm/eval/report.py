"""Reports across models: summary JSON, a Markdown table laid out like the paper's Table 2
(Model | Precision | AIME-120 | FOLIO | Temporal | GPQA-Diamond | Avg | % of the first
model's Avg), and a grouped bar chart (PNG)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["describe_precision", "markdown_table", "paired_section", "plot_bars", "write_reports"]


def describe_precision(model_dir: str | Path | None) -> str:
    """ "3-bit QuantLRM", "4-bit awq", "16-bit"...: from quantlrm.json or config.json."""
    if model_dir is None:
        return ""
    d = Path(model_dir)
    try:
        meta = json.loads((d / "quantlrm.json").read_text())
        opts = meta.get("options", meta)
        method = (
            str(opts.get("method", ""))
            .replace("quantlrm", "QuantLRM")
            .replace("awq", "AWQ")
            .replace("rtn", "RTN")
        )
        return f"{opts.get('bits', '?')}-bit {method}".strip()
    except (OSError, ValueError, AttributeError):
        pass
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    q = cfg.get("quantization_config")
    if isinstance(q, dict):
        bits = q.get("bits")
        if bits is None:  # compressed-tensors keeps bits per config group
            groups = q.get("config_groups") or {}
            bits = next(
                (
                    g.get("weights", {}).get("num_bits")
                    for g in groups.values()
                    if isinstance(g, dict)
                ),
                "?",
            )
        return f"{bits}-bit {q.get('quant_method', '')}".strip()
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    return {"bfloat16": "16-bit", "float16": "16-bit", "float32": "32-bit"}.get(dtype, dtype)


def _columns(summaries: list[dict]) -> list[tuple[str, str]]:
    """(task key, display name) in first-seen order; accuracy tasks first, ppl last."""
    cols: dict[str, str] = {}
    for s in summaries:
        for k, r in s["tasks"].items():
            if "accuracy" in r:
                cols.setdefault(k, r.get("display", k))
    return list(cols.items())


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def markdown_table(summaries: list[dict]) -> str:
    """Accuracy in %, Avg over the accuracy tasks, % of the first model's Avg retained."""
    cols = _columns(summaries)
    has_ppl = any("ppl" in s["tasks"] for s in summaries)
    base = summaries[0].get("avg") if summaries else None
    head = [
        "Model",
        "Precision",
        *[name for _, name in cols],
        "Avg",
        f"% of {summaries[0]['model']}" if summaries else "%",
    ]
    if has_ppl:
        head.append("PPL")
    # Bold the best score per column among the models after the first (the paper bolds the
    # best quantized result, excluding the 16-bit reference).
    best: dict[str, float] = {}
    if len(summaries) > 2:
        for k, _ in cols:
            vals = [
                s["tasks"][k]["accuracy"]
                for s in summaries[1:]
                if s["tasks"].get(k, {}).get("accuracy") is not None
            ]
            best[k] = max(vals) if vals else math.inf
        best["avg"] = max(
            (s["avg"] for s in summaries[1:] if s.get("avg") is not None), default=math.inf
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, s in enumerate(summaries):
        row = [s["model"], s.get("precision") or describe_precision(s.get("model_path"))]
        for k, _ in cols:
            r = s["tasks"].get(k)
            cell = _pct(r["accuracy"]) if r else "-"
            if r and i > 0 and r["accuracy"] == best.get(k):
                cell = f"**{cell}**"
            row.append(cell)
        avg = s.get("avg")
        cell = _pct(avg, 2)
        if i > 0 and avg is not None and avg == best.get("avg"):
            cell = f"**{cell}**"
        row.append(cell)
        row.append(f"{100 * avg / base:.1f}" if avg is not None and base else "-")
        if has_ppl:
            p = s["tasks"].get("ppl")
            row.append(f"{p['ppl']:.3f}" if p else "-")
        lines.append("| " + " | ".join(row) + " |")
    n = {
        k: max((s["tasks"][k]["n"] for s in summaries if k in s["tasks"]), default=0)
        for k, _ in cols
    }
    lines.append("")
    lines.append(
        "Accuracy in %; completions graded per task: "
        + ", ".join(f"{name} {n[k]}" for k, name in cols)
        + "."
    )
    return "\n".join(lines) + "\n"


def plot_bars(summaries: list[dict], path: str | Path) -> None:
    """Grouped bars: one group per task (and Avg), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _columns(summaries)
    labels = [name for _, name in cols] + ["Avg"]
    n_models = max(1, len(summaries))
    width = 0.8 / n_models
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(labels) * max(1, n_models / 2)), 4.0))
    for i, s in enumerate(summaries):
        accs = [s["tasks"].get(k, {}).get("accuracy") for k, _ in cols] + [s.get("avg")]
        vals = [0.0 if a is None else 100 * a for a in accs]
        xs = [j + (i - (n_models - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, vals, width, label=s["model"])
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def paired_section(summaries: list[dict], out: str | Path, questions: dict[str, set[str]] | None = None) -> str:
    """Each model against the first on the same questions (exact McNemar on the first sample of
    each question, from `out/<model>/<task>.jsonl`): two quantized models often differ on only a
    few percent of the questions, so their averages alone cannot tell a real gap from chance."""
    from quantlrm.errors import QuantLRMError
    from quantlrm.eval.paired import compare_dirs

    if len(summaries) < 2:
        return ""
    ref = summaries[0]
    tasks = [k for k, _ in _columns(summaries)]
    lines = []
    for s in summaries[1:]:
        common = [t for t in tasks if t in s["tasks"] and t in ref["tasks"]]
        try:
            d = compare_dirs(Path(out) / s["model"], Path(out) / ref["model"], common, questions)
        except (QuantLRMError, OSError, ValueError, KeyError):
            continue  # no per-question files (e.g. summaries built elsewhere): no test
        lines.append(f"| {s['model']} | {d['diff_points']:+.2f} | {d['b']} | {d['c']} | {d['n']} | {d['p']:.3g} |")
    if not lines:
        return ""
    head = [
        "",
        f"Paired with {ref['model']} on the same questions (first sample of each; exact McNemar p, "
        "p > 0.05: the gap may be chance):",
        "",
        f"| Model | points vs {ref['model']} | only this right | only {ref['model']} right | questions | p |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n"


def write_reports(summaries: list[dict], out: str | Path,
                  questions: dict[str, set[str]] | None = None) -> dict[str, Path]:
    """summary.json, results.md and (when any accuracy task ran) results.png in `out`;
    `questions` (task -> ids graded in this run) limits the paired table to them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for s in summaries:
        s.setdefault("precision", describe_precision(s.get("model_path")))
    paths = {"summary": out / "summary.json", "markdown": out / "results.md"}
    tmp = paths["summary"].with_name("summary.json.tmp")
    tmp.write_text(json.dumps({"models": summaries}, indent=2, default=str) + "\n")
    os.replace(tmp, paths["summary"])
    tmp = paths["markdown"].with_name("results.md.tmp")
    tmp.write_text(markdown_table(summaries) + paired_section(summaries, out, questions))
    os.replace(tmp, paths["markdown"])
    if _columns(summaries):
        paths["plot"] = out / "results.png"
        plot_bars(summaries, paths["plot"])
    return paths

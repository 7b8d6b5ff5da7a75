"""More quantization variants on the demo's model pair (CPU, a couple of minutes): QuantLRM's
options and GPTQ rounding with and without act-order, against RTN and AWQ, each paired with
AWQ on the same questions (exact McNemar). The demo pair is tiny and the test sets are small,
so this is a quick look, not evidence: the zoo on the GPU is where methods are compared.

    python benchmarks/demo_variants.py --out /tmp/demo-variants [--bits 3] [--n-test 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from zoo_stats import joined, paired  # noqa: E402

VARIANTS = {  # name -> QuantizeOptions fields
    "RTN": dict(method="rtn"),
    "AWQ": dict(method="awq"),
    "QuantLRM": dict(method="quantlrm"),
    "QuantLRM (act factor)": dict(method="quantlrm", act_factor=True),
    "AWQ + GPTQ": dict(method="awq", rounding="gptq", gptq_act_order=False),
    "AWQ + GPTQ (act-order)": dict(method="awq", rounding="gptq", gptq_act_order=True),
    "QuantLRM + GPTQ": dict(method="quantlrm", rounding="gptq", gptq_act_order=False),
    "QuantLRM + GPTQ (act-order)": dict(method="quantlrm", rounding="gptq", gptq_act_order=True),
    "GPTQ": dict(method="rtn", rounding="gptq", gptq_act_order=False),
    "GPTQ (act-order)": dict(method="rtn", rounding="gptq", gptq_act_order=True),
}


def main() -> None:
    import torch

    from quantlrm.demo.run import DemoOptions, get_pair, write_calibration
    from quantlrm.demo.tasks import FAMILIES, generate
    from quantlrm.eval import GenerationConfig, grade, load_model
    from quantlrm.eval.backends import TransformersBackend
    from quantlrm.pipeline import QuantizeOptions, quantize_model, search_summary
    from quantlrm.signals import compute_signals, save_signals

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = DemoOptions(out=str(out), progress=False)
    pair, _ = get_pair(opts, print)
    ft = pair / "sft"
    sig_dir = save_signals(compute_signals(pair / "base", ft, progress=False), out / "signals", overwrite=True)
    calib = write_calibration(opts, out / "calib.jsonl", 4 * a.calib_samples)
    fams = opts.recipe.families
    tests = [p for f in fams for p in generate(f, a.n_test, seed=opts.recipe.seed, split="test", level=opts.recipe.level)]
    gen = GenerationConfig(greedy=True, think_suffix="", max_new_tokens=max(len(p.cot) for p in tests) + 24,
                           batch_size=64)

    def evaluate(d: Path) -> dict:
        """Greedy answers graded by the eval harness's graders: '0'/'1' per question per family."""
        model, tok = load_model(d, device="cpu", dtype="float32")
        texts = TransformersBackend(model, tok, progress=False).generate([p.prompt for p in tests], gen)
        marks = {f: "" for f in fams}
        for p, g in zip(tests, texts, strict=True):
            marks[p.family] += "1" if grade(FAMILIES[p.family].grader, g.text, p.answer) else "0"
        acc = {f: m.count("1") / len(m) for f, m in marks.items()}
        return {"acc": acc, "avg": sum(acc.values()) / len(acc), "correct": marks}
    rows = {}
    for name, kw in {"16-bit": None, **VARIANTS}.items():
        t0 = time.perf_counter()
        d, search = ft, None
        if kw is not None:
            d = quantize_model(QuantizeOptions(
                model=str(ft), out=str(out / "models" / name.replace(" ", "_")), bits=a.bits, group_size=128,
                signals=str(sig_dir) if kw["method"] == "quantlrm" else None, calib=str(calib),
                calib_samples=a.calib_samples, calib_seqlen=opts.calib_seqlen, overwrite=True, progress=False, **kw))
            search = search_summary(json.loads((d / "quantlrm.json").read_text()))
        ev = evaluate(d)
        rows[name] = {**ev, "search": search, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:30s} avg {100 * ev['avg']:.1f}  ({rows[name]['seconds']} s)", flush=True)
    order = sorted(rows["AWQ"]["correct"])
    base = joined(rows["AWQ"]["correct"], order)
    lines = [f"W{a.bits} g128 on the demo pair, {a.n_test} questions per task ({', '.join(order)}); "
             "each row against AWQ on the same questions (exact McNemar):", "",
             "| method | avg | vs AWQ | b | c | p |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t = paired(joined(r["correct"], order), base)
        lines.append(f"| {name} | {100 * r['avg']:.1f} | {t['diff_points']:+.1f} | {t['b']} | {t['c']} | {t['p']:.3g} |")
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    (out / "variants.json").write_text(json.dumps({"bits": a.bits, "n_test": a.n_test, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

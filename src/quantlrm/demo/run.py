"""`quantlrm demo`: the whole method end to end, offline, on a CPU, in minutes.

1. A tiny reasoning model pair (base -> SFT on reasoning traces), bf16 like real releases:
   the committed weights in `quantlrm/demo_assets/` (made by scripts/train_demo_models.py),
   or a cached / freshly trained pair (`--retrain`).
2. Fine-tuning signals (quantlrm.signals) of the pair.
3. The fine-tuned model quantized with RTN, AWQ and QuantLRM at W3 and W4 (quantlrm.pipeline),
   calibrated on task text from the training split (the model knows no other text).
4. Every variant evaluated on held-out problems with greedy decoding (quantlrm.eval).
5. A report directory: table (Markdown + JSON), accuracy chart, |dW| histogram with the
   quadratic mapping, the pair's zero fraction, and time per step.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from quantlrm.demo.pair import PairRecipe, pair_is_complete, train_pair
from quantlrm.demo.tasks import FAMILIES, generate
from quantlrm.errors import QuantLRMError

METHODS = ("rtn", "awq", "quantlrm")
METHOD_LABEL = {"rtn": "RTN", "awq": "AWQ", "quantlrm": "QuantLRM"}


@dataclass
class DemoOptions:
    out: Path = Path("quantlrm-demo")
    fast: bool = False  # fewer test problems and calibration tokens (the test suite's mode)
    retrain: bool = False  # train the pair again instead of using committed/cached weights
    cache_dir: Path | None = None  # default: $QUANTLRM_CACHE or ~/.cache/quantlrm/demo
    n_test: int | None = None  # held-out problems per task (default 200, fast 96)
    bits: tuple[int, ...] = (3, 4)
    methods: tuple[str, ...] = METHODS
    group_size: int = 128  # quantize's and the paper's default; divides the widths (128, 256)
    calib_samples: int | None = None  # default 32, fast 8
    calib_seqlen: int = 256
    threads: int | None = None
    progress: bool = True
    recipe: PairRecipe = field(default_factory=PairRecipe)


def default_cache() -> Path:
    root = os.environ.get("QUANTLRM_CACHE")
    return Path(root) / "demo" if root else Path.home() / ".cache" / "quantlrm" / "demo"


def committed_pair() -> Path:
    """Where the committed demo weights live inside the installed package."""
    return Path(str(resources.files("quantlrm") / "demo_assets" / "pair"))


def get_pair(opts: DemoOptions, log) -> tuple[Path, dict]:
    """The (base, sft) pair directory: committed weights, else cache, else train it now."""
    recipe = opts.recipe
    if not opts.retrain:
        shipped = committed_pair()
        if pair_is_complete(shipped, recipe):
            log(f"models: using the committed pair in {shipped} (recipe {recipe.key()})")
            return shipped, json.loads((shipped / "recipe.json").read_text())
    cache = (opts.cache_dir or default_cache()) / recipe.key()
    if not opts.retrain and pair_is_complete(cache, recipe):
        log(f"models: using the cached pair in {cache}")
        return cache, json.loads((cache / "recipe.json").read_text())
    log(f"models: training the pair into {cache} (base stage, then SFT; CPU)")
    if cache.exists():
        shutil.rmtree(cache)
    tmp = cache.with_name(cache.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    info = train_pair(recipe, tmp, progress=opts.progress)
    os.replace(tmp, cache)
    return cache, info


def demo_tasks(opts: DemoOptions, n: int):
    """Held-out problems of the pair's task families, as eval-harness Tasks."""
    from quantlrm.eval import Task

    tasks = []
    for fam in opts.recipe.families:
        f = FAMILIES[fam]
        probs = generate(fam, n, seed=opts.recipe.seed, split="test", level=opts.recipe.level)
        tasks.append(Task.from_pairs(fam, [(p.question, p.answer) for p in probs], grader=f.grader,
                                     display=f.label))
    return tasks


def write_calibration(opts: DemoOptions, path: Path, n_docs: int) -> Path:
    """Calibration text: training-split problems with their reasoning (never test problems)."""
    fams = list(opts.recipe.families)
    per = max(1, n_docs // len(fams))
    # seed + 2: neither the base nor the SFT stage's sample stream.
    docs = [p.text for f in fams for p in generate(f, per, opts.recipe.seed + 2, "train", opts.recipe.level)]
    with open(path, "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    return path


def paired_tests(eval_root: Path, bits: tuple[int, ...], methods: tuple[str, ...], tasks: list[str]) -> list[dict]:
    """QuantLRM against each other method at each bit width, question by question (McNemar):
    on a few hundred questions, gaps of a few points between methods can be chance."""
    from quantlrm.eval.paired import compare_dirs

    if "quantlrm" not in methods:
        return []
    out = []
    for b in bits:
        for m in (m for m in methods if m != "quantlrm"):
            d = compare_dirs(eval_root / f"quantlrm-w{b}", eval_root / f"{m}-w{b}", tasks)
            out.append({"bits": b, "method": "quantlrm", "baseline": m, **d})
    return out


def run_demo(opts: DemoOptions) -> dict:
    """Run every step; returns the summary also written to OUT/results.json."""
    from transformers.utils import logging as hf_logging

    from quantlrm.demo.report import print_table, write_report
    from quantlrm.eval import GenerationConfig, evaluate
    from quantlrm.pipeline import QuantizeOptions, quantize_model, search_summary
    from quantlrm.signals import compute_signals, save_signals

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per variant is noise here
    if opts.threads:
        torch.set_num_threads(opts.threads)
    for b in opts.bits:
        if b not in (2, 3, 4, 8):
            raise QuantLRMError(f"--bits {b} is not supported.", "use 2, 3, 4 or 8.")
    out = Path(opts.out)
    if out.exists() and any(out.iterdir()) and not (out / "results.json").exists() \
            and not (out / ".quantlrm-demo").exists():
        raise QuantLRMError(
            f"{out} exists, is not empty and is not a demo report directory.",
            "choose another --out (the demo overwrites only its own report directories).",
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / ".quantlrm-demo").touch()
    n_test = opts.n_test or (96 if opts.fast else 200)
    calib_samples = opts.calib_samples or (8 if opts.fast else 32)
    log = print
    times: dict[str, float] = {}

    t = time.perf_counter()
    pair, pair_info = get_pair(opts, log)
    base_dir, ft_dir = pair / "base", pair / "sft"
    times["models"] = time.perf_counter() - t

    t = time.perf_counter()
    sig = compute_signals(base_dir, ft_dir, progress=opts.progress)
    sig_dir = save_signals(sig, out / "signals", overwrite=True)
    times["signals"] = time.perf_counter() - t
    zero = {k: sig.stats[k] for k in ("n_updates", "n_zero", "zero_fraction")}
    log(f"signals: {zero['n_zero']} of {zero['n_updates']} linear weights unchanged by SFT "
        f"(zero fraction {100 * zero['zero_fraction']:.2f}%)")

    calib = write_calibration(opts, out / "calib.jsonl", 4 * calib_samples)
    variants: list[dict] = [
        {"key": "16-bit", "method": "16-bit", "bits": 16, "dir": ft_dir},
    ]
    for bits in opts.bits:
        for m in opts.methods:
            key = f"{m}-w{bits}"
            t = time.perf_counter()
            qdir = quantize_model(QuantizeOptions(
                model=str(ft_dir), out=str(out / "models" / key), method=m, bits=bits,
                group_size=opts.group_size, signals=str(sig_dir) if m == "quantlrm" else None,
                calib=str(calib), calib_samples=calib_samples, calib_seqlen=opts.calib_seqlen,
                overwrite=True, progress=opts.progress,
            ))
            times[f"quantize {key}"] = time.perf_counter() - t
            search = search_summary(json.loads((qdir / "quantlrm.json").read_text()))
            variants.append({"key": key, "method": m, "bits": bits, "dir": qdir, "search": search})

    tasks = demo_tasks(opts, n_test)
    max_new = max(len(p.cot) for fam in opts.recipe.families
                  for p in generate(fam, 64, opts.recipe.seed, "test", opts.recipe.level)) + 24
    gen = GenerationConfig(greedy=True, max_new_tokens=max_new, batch_size=64)
    rows = []
    for v in [{"key": "base", "method": "base (before SFT)", "bits": 16, "dir": base_dir}, *variants]:
        t = time.perf_counter()
        eval_dir = out / "eval" / v["key"]  # every completion, for the paired tests below
        shutil.rmtree(eval_dir, ignore_errors=True)  # never resume from an earlier demo's answers
        s = evaluate(str(v["dir"]), tasks, gen=gen, backend="transformers", dtype="float32",
                     name=v["key"], progress=opts.progress, out=str(eval_dir))
        times[f"eval {v['key']}"] = time.perf_counter() - t
        rows.append({
            "key": v["key"], "method": v["method"], "bits": v["bits"],
            "acc": {k: r["accuracy"] for k, r in s["tasks"].items()},
            "no_answer": {k: r.get("no_answer") for k, r in s["tasks"].items()},
            "avg": s["avg"],
            **({"search": v["search"]} if v.get("search") else {}),
        })
    summary = {
        "tasks": [{"name": t.name, "display": t.display, "grader": t.grader, "n": len(t),
                   "chance": FAMILIES[t.name].chance} for t in tasks],
        "rows": rows,
        "zero": zero,
        "signals_stats": {k: v for k, v in sig.stats.items() if k != "modules"},
        "pair": {"dir": str(pair), "n_params": pair_info.get("n_params"),
                 "recipe": pair_info.get("recipe"),
                 "train_seconds": pair_info.get("seconds")},
        "quantize": {"group_size": opts.group_size, "calib": f"{calib_samples} x {opts.calib_seqlen} "
                     "tokens of training-split task text (prompts + reasoning)"},
        "paired": paired_tests(out / "eval", opts.bits, opts.methods, [t.name for t in tasks]),
        "generation": gen.as_dict(),
        "fast": opts.fast,
        "times": times,
    }
    t = time.perf_counter()
    write_report(summary, out, base_dir, ft_dir, sig)
    times["report"] = time.perf_counter() - t
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print_table(summary)
    return summary

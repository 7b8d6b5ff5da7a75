"""`quantlrm eval`: accuracy of one or more models on the paper's reasoning benchmarks."""

from __future__ import annotations

import argparse
import codecs
import logging
from pathlib import Path

from quantlrm.errors import QuantLRMError

EPILOG = """\
tasks: aime (AIME-120: AIME 2022-2025), folio (FOLIO validation, shipped), temporal
(BBH temporal_sequences, shipped), gpqa (GPQA-Diamond), val_aime (AIME 2021) and
val_folio (100 FOLIO train examples, --data-seed): the paper's validation set; groups
"paper" = aime,folio,temporal,gpqa and "validation" = val_aime,val_folio; "ppl" =
perplexity on --ppl-file (default: Python's pydoc topic texts), a quick proxy.

data files (.json list or {"examples": [...]}, .jsonl, .csv, .parquet), or a hub
dataset NAME[:CONFIG][@SPLIT] when the optional `datasets` package is installed:
  --aime / --aime2021: rows with problem|question, answer (integer; "042" fine), and
      optionally year (or an id/url containing it, e.g. "2023-I-4"): aime keeps
      2022-2025, val_aime keeps 2021. Not shipped (MAA copyright).
  --gpqa: columns Question, Correct Answer, Incorrect Answer 1, 2, 3 (the official
      gpqa_diamond.csv, or hub Idavidrein/gpqa:gpqa_diamond@train). Options shuffled
      with --data-seed and lettered (A)-(D). Not shipped (its authors ask so).
  --folio / --folio-train: rows with premises (list or text), conclusion, label
      (True/False/Uncertain). Default: the shipped FOLIO v0.0 files.
  --temporal: rows with input (question with options) and target like "(A)".

grading (quantlrm.eval.grade), on the text after </think> when present: aime = the
integer in the last \\boxed{}; temporal/gpqa = the last option letter given as the
answer ("Answer: B", "answer is (B)", "**B**", \\boxed{B}; else the last "(B)");
folio = the last True/False/Uncertain.

outputs in --out: <model>/<task>.jsonl (prompt, completion, extracted answer, correct,
tokens per completion), <model>/summary.json, and across models summary.json,
results.md (a table like the paper's Table 2 with % of the first model's average, then
each model paired with the first on the same questions: exact McNemar p) and results.png.
Rerunning with the same --out skips completions already written.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy on AIME-120 / FOLIO / Temporal / GPQA-Diamond (+ perplexity)",
        description="Evaluate models the way the QuantLRM paper did: raw question + "
        "'\\n<think>\\n', sampled at temperature 0.6, top-p 0.95, up to 32768 new tokens.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="DIR",
        help="model directory (repeat to compare; the first is the reference)",
    )
    p.add_argument(
        "--name",
        action="append",
        metavar="LABEL",
        help="label per --model (default: directory name)",
    )
    p.add_argument("--tasks", default="paper", help="comma list of tasks (default: paper)")
    p.add_argument("--limit", type=int, help="only the first N questions of each task")
    p.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output directory (resumable)"
    )
    g = p.add_argument_group("data")
    for flag, task in (
        ("--aime", "aime"),
        ("--aime2021", "val_aime"),
        ("--gpqa", "gpqa"),
        ("--folio", "folio"),
        ("--folio-train", "val_folio"),
        ("--temporal", "temporal"),
    ):
        g.add_argument(flag, dest=f"src_{task}", metavar="FILE", help=f"data for {task}")
    g.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="GPQA option order and FOLIO validation subset (default 0)",
    )
    d = p.add_argument_group("generation")
    d.add_argument(
        "--backend",
        choices=("auto", "transformers", "vllm"),
        default="auto",
        help="auto: vLLM when installed with a GPU",
    )
    d.add_argument(
        "--device", default=None, help="transformers device (default: cuda if available)"
    )
    d.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    d.add_argument("--batch-size", type=int, default=8, help="transformers batch size")
    d.add_argument("--tensor-parallel", type=int, default=1, help="vLLM tensor parallel size")
    d.add_argument("--max-new-tokens", type=int, default=32768)
    d.add_argument("--temperature", type=float, default=0.6)
    d.add_argument("--top-p", type=float, default=0.95)
    d.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    d.add_argument(
        "--samples", type=int, default=1, help="completions per question (accuracy averaged)"
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap the question in the tokenizer's chat template",
    )
    d.add_argument(
        "--think-suffix",
        default="\\n<think>\\n",
        help="appended to raw questions (escapes allowed)",
    )
    q = p.add_argument_group("perplexity (--tasks ppl)")
    q.add_argument("--ppl-file", type=Path, help="text file (default: pydoc_data.topics)")
    q.add_argument("--ppl-seqlen", type=int, default=512)
    q.add_argument("--ppl-tokens", type=int, default=65536, help="tokens of the text used at most")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _labels(models: list[str], names: list[str] | None) -> list[str]:
    if names:
        if len(names) != len(models):
            raise QuantLRMError(
                f"{len(names)} --name for {len(models)} --model.",
                "give one --name per --model, or none.",
            )
        labels = names
    else:
        labels = [Path(m).resolve().name for m in models]
        if len(set(labels)) != len(labels):
            labels = [f"{Path(m).resolve().parent.name}-{Path(m).resolve().name}" for m in models]
    if len(set(labels)) != len(labels):
        raise QuantLRMError("Two models have the same label.", "give distinct --name values.")
    return labels


def run(args: argparse.Namespace) -> int:
    import torch

    from quantlrm.eval import GenerationConfig, evaluate, expand_task_names, load_task
    from quantlrm.eval.report import write_reports

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    for flag, v in (
        ("--limit", args.limit),
        ("--samples", args.samples),
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if v is not None and v < 1:
            raise QuantLRMError(f"{flag} must be at least 1 (got {v}).", f"pass a positive {flag}.")
    for m in args.model:
        if not Path(m).is_dir():
            raise QuantLRMError(
                f"Model directory {m} does not exist.",
                "pass a directory with config.json and weights.",
            )
    names = expand_task_names(args.tasks)
    sources = {k[4:]: v for k, v in vars(args).items() if k.startswith("src_") and v}
    tasks = [
        n if n == "ppl" else load_task(n, sources.get(n), seed=args.data_seed, limit=args.limit)
        for n in names
    ]
    ppl_text = None
    if args.ppl_file is not None:
        if not args.ppl_file.is_file():
            raise QuantLRMError(
                f"--ppl-file {args.ppl_file} does not exist.", "pass an existing text file."
            )
        ppl_text = args.ppl_file.read_text(encoding="utf-8", errors="replace")
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        greedy=args.greedy,
        samples=args.samples,
        seed=args.seed,
        chat_template=args.chat_template,
        think_suffix=codecs.decode(args.think_suffix, "unicode_escape"),
        batch_size=args.batch_size,
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # this run's questions: --out may also hold answers from an earlier run (another --limit)
    questions = {t.name: {str(s.id) for s in t.samples} for t in tasks if t != "ppl"}
    summaries = []
    for model, label in zip(args.model, _labels(args.model, args.name), strict=True):
        summaries.append(
            evaluate(
                model,
                tasks,
                gen=gen,
                backend=args.backend,
                device=device,
                dtype=args.dtype,
                out=args.out / label,
                limit=args.limit,
                data_seed=args.data_seed,
                name=label,
                ppl_text=ppl_text,
                ppl_seqlen=args.ppl_seqlen,
                ppl_max_tokens=args.ppl_tokens,
                progress=not args.quiet,
                tensor_parallel=args.tensor_parallel,
            )
        )
        # Reports after every model, so a crash on the next model keeps what is done.
        paths = write_reports(summaries, args.out, questions)
    print(paths["markdown"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0

"""Evaluate one model on a list of tasks: generate, grade, summarise, optionally write outputs.

Output directory of one model (`out=`): ``<task>.jsonl`` (one line per completion:
task, id, k, prompt, reference, completion, extracted, correct, tokens), ``summary.json``
and ``run.json`` (the generation settings). Rerunning with the same ``out`` skips the
completions already in the JSONL files (resume after a crash); different settings in
the same directory are refused rather than mixed.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantlrm.errors import QuantLRMError
from quantlrm.eval.backends import (
    Backend,
    GenerationConfig,
    TransformersBackend,
    load_model,
    make_backend,
    vllm_usable,
)
from quantlrm.eval.graders import extract, normalize_reference
from quantlrm.eval.paired import read_records
from quantlrm.eval.tasks import Task, expand_task_names, load_task

log = logging.getLogger(__name__)

__all__ = ["default_ppl_text", "evaluate", "perplexity"]


def _seed_for(*parts: object) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_done(path: Path) -> dict[tuple[str, int], dict]:
    """Records already written; a torn last line (crash mid-write) is dropped and truncated."""
    if not path.exists():
        return {}
    recs, good = read_records(path)
    if good != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good)
    return {(str(r["id"]), int(r["k"])): r for r in recs}


def _score(task: Task, records: list[dict]) -> dict:
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    return {
        "display": task.display or task.name,
        "accuracy": correct / n if n else None,
        "correct": correct,
        "n": n,
        "questions": len({r["id"] for r in records}),
        "no_answer": sum(r["extracted"] is None for r in records),
        "avg_tokens": sum(r["tokens"] for r in records) / n if n else 0.0,
    }


def _run_task(
    backend: Backend, task: Task, gen: GenerationConfig, out: Path | None, progress: bool
) -> dict:
    path = out / f"{task.name}.jsonl" if out else None
    done = _read_done(path) if path else {}
    wanted = [(s, k) for s in task.samples for k in range(gen.samples)]
    pending = [(s, k) for s, k in wanted if (s.id, k) not in done]
    if done:
        log.info(
            "%s: %d of %d completions already in %s",
            task.name,
            len(wanted) - len(pending),
            len(wanted),
            path,
        )
    refs = {s.id: normalize_reference(task.grader, s.reference) for s in task.samples}
    chunk = max(1, gen.batch_size) if isinstance(backend, TransformersBackend) else 512
    bar = tqdm(
        total=len(wanted),
        initial=len(wanted) - len(pending),
        desc=task.name,
        unit="q",
        disable=not progress,
    )
    f = path.open("a", encoding="utf-8") if path else None
    try:
        for b in range(0, len(pending), chunk):
            part = pending[b : b + chunk]
            seeds = [_seed_for(gen.seed, task.name, s.id, k) for s, k in part]
            gens = backend.generate([s.prompt for s, _ in part], gen, seeds=seeds)
            for (s, k), g in zip(part, gens, strict=True):
                got = extract(task.grader, g.text)
                rec = {
                    "task": task.name,
                    "id": s.id,
                    "k": k,
                    "prompt": s.prompt,
                    "reference": s.reference,
                    "completion": g.text,
                    "extracted": got,
                    "correct": got is not None and got == refs[s.id],
                    "tokens": g.n_tokens,
                }
                done[(s.id, k)] = rec
                if f:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if f:
                f.flush()
            bar.update(len(part))
    finally:
        bar.close()
        if f:
            f.close()
    return _score(task, [done[(s.id, k)] for s, k in wanted])


def default_ppl_text() -> str:
    """Offline English+code text present in every CPython install (pydoc's topic help)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str | None = None,
    seqlen: int = 512,
    max_tokens: int | None = 65536,
    progress: bool = True,
) -> dict:
    """Perplexity over non-overlapping `seqlen` windows of `text` (a quick quality proxy)."""
    text = default_ppl_text() if text is None else text
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_win = ids.numel() // seqlen
    if n_win == 0:
        raise QuantLRMError(
            f"The perplexity text has {ids.numel()} tokens, fewer than one window of {seqlen}.",
            "use a longer --ppl-file or a smaller --ppl-seqlen.",
        )
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for w in tqdm(range(n_win), desc="ppl", unit="win", disable=not progress, leave=False):
        x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=x).logits[0, :-1].float()  # [seqlen-1, vocab]
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += seqlen - 1
    return {"display": "PPL", "ppl": math.exp(nll / count), "n_tokens": count, "seqlen": seqlen}


def evaluate(
    model,
    tasks,
    *,
    tokenizer=None,
    gen: GenerationConfig | None = None,
    backend: str = "auto",
    device: str = "cpu",
    dtype: str = "auto",
    out: str | Path | None = None,
    limit: int | None = None,
    sources: dict[str, str | Path] | None = None,
    data_seed: int = 0,
    name: str | None = None,
    ppl_text: str | None = None,
    ppl_seqlen: int = 512,
    ppl_max_tokens: int | None = 65536,
    progress: bool = True,
    tensor_parallel: int = 1,
) -> dict:
    """Accuracy of a model (directory, or loaded model + `tokenizer`) on `tasks`.

    `tasks`: `Task` objects and/or known names ("aime", "folio", "temporal", "gpqa",
    "val_aime", "val_folio", groups "paper"/"validation", and "ppl"), or a comma string.
    `sources` maps a task name to its data file (needed for aime/gpqa/val_aime).
    Returns {"model", "tasks": {name: {"accuracy" (fraction 0-1), "correct", "n",
    "questions", "no_answer", "avg_tokens", "display"} or for ppl {"ppl", "n_tokens"}},
    "avg" (mean accuracy over the accuracy tasks), "generation", "backend"}.
    """
    gen = gen or GenerationConfig()
    sources = sources or {}
    items: list = []
    for t in [tasks] if isinstance(tasks, (str, Task)) else list(tasks):
        items.extend([t] if isinstance(t, Task) else expand_task_names(t))
    loaded = [
        t.head(limit)
        if isinstance(t, Task)
        else t
        if t == "ppl"
        else load_task(t, sources.get(t), seed=data_seed, limit=limit)
        for t in items
    ]
    names = [t.name if isinstance(t, Task) else t for t in loaded]
    if len(set(names)) != len(names):
        raise QuantLRMError(f"Two tasks share a name in {names}.", "give every task its own name.")
    is_dir = isinstance(model, (str, Path))
    if backend not in ("auto", "transformers", "vllm"):
        raise QuantLRMError(f"Unknown backend {backend!r}.", "use auto, transformers or vllm.")
    if backend == "vllm" and not is_dir:
        raise QuantLRMError(
            "vLLM loads models from a directory, not a loaded model.",
            "pass the model directory, or use backend='transformers'.",
        )
    label = name or (Path(model).name if is_dir else type(model).__name__)

    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Settings that change the answers; batch size does not, so a resume may change it.
        settings = {
            "generation": {k: v for k, v in gen.as_dict().items() if k != "batch_size"},
            "data_seed": data_seed,
        }
        run_file = out_dir / "run.json"
        if run_file.exists():
            old = json.loads(run_file.read_text())
            if {k: old.get(k) for k in settings} != settings:
                raise QuantLRMError(
                    f"{out_dir} holds outputs made with other settings ({old.get('generation')}).",
                    "use another --out directory, or delete it to start over.",
                )
        _write_json(run_file, settings)

    results: dict[str, dict] = {}
    gen_tasks = [t for t in loaded if isinstance(t, Task)]
    want_ppl = "ppl" in loaded
    be: Backend | None = None
    use_vllm = is_dir and (backend == "vllm" or (backend == "auto" and vllm_usable()))
    if not use_vllm and (gen_tasks or want_ppl):
        be = make_backend(
            model, tokenizer, backend="transformers", device=device, dtype=dtype, progress=progress
        )
    if want_ppl:
        m, tok = (
            (be.model, be.tok) if be is not None else load_model(model, device=device, dtype=dtype)
        )
        results["ppl"] = perplexity(m, tok, ppl_text, ppl_seqlen, ppl_max_tokens, progress)
        del m, tok
    if use_vllm and gen_tasks:
        gc.collect()  # free the perplexity model's GPU memory before vLLM claims it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        be = make_backend(model, backend="vllm", dtype=dtype, tensor_parallel=tensor_parallel)
    for t in gen_tasks:
        results[t.name] = _run_task(be, t, gen, out_dir, progress)

    accs = [r["accuracy"] for r in results.values() if r.get("accuracy") is not None]
    summary = {
        "model": label,
        "model_path": str(model) if is_dir else None,
        "backend": be.name if be else None,
        "tasks": results,
        "avg": sum(accs) / len(accs) if accs else None,
        "generation": gen.as_dict(),
        "limit": limit,
    }
    if out_dir is not None:
        _write_json(out_dir / "summary.json", summary)
    return summary

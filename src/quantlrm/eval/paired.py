"""Paired comparison of two models graded on the same questions (exact McNemar test).

Two quantized models usually differ on a few percent of the questions only, so their average
accuracies differ by less than each average's own sampling noise. Comparing them question by
question is far more sensitive: b = questions only the first got right, c = only the second.
Under the null hypothesis each discordant question goes either way with probability 1/2, so
the exact two-sided p-value is a binomial tail on b + c trials.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from quantlrm.errors import QuantLRMError


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: 2 * P(X <= min(b, c)), capped at 1, X ~ Bin(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired(a: str, b: str) -> dict:
    """Two equal-length '0'/'1' outcome strings (a = the method, b = the baseline)."""
    if len(a) != len(b):
        raise ValueError(f"rows graded different question sets ({len(a)} vs {len(b)} outcomes)")
    n = len(a)
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x == "1" and y == "0")
    only_b = sum(1 for x, y in zip(a, b, strict=True) if x == "0" and y == "1")
    return {"n": n, "diff_points": 100.0 * (only_a - only_b) / max(n, 1), "b": only_a, "c": only_b,
            "p": mcnemar_exact(only_a, only_b)}


def read_records(path: Path) -> tuple[list[dict], int]:
    """The records of an evaluation JSONL file up to a torn last line (a crash mid-write), and
    the bytes they span (the runner truncates the rest before it resumes)."""
    recs, good = [], 0
    with path.open("rb") as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
    return recs, good


def outcomes(out_dir: str | Path, tasks: list[str],
             ids: dict[str, set[str]] | None = None) -> dict[tuple[str, str], bool]:
    """{(task, question id): correct} of the first sample of each question, from the
    `<task>.jsonl` files that `evaluate(..., out=out_dir)` writes. `ids` (task -> question ids)
    keeps only this run's questions: a resumed directory may also hold answers to questions an
    earlier run graded (another --limit or data file)."""
    got: dict[tuple[str, str], bool] = {}
    for t in tasks:
        path = Path(out_dir) / f"{t}.jsonl"
        if not path.is_file():
            raise QuantLRMError(f"{path} is missing.", f"evaluate the model on {t} with out={out_dir}.")
        for rec in read_records(path)[0]:
            if rec.get("k", 0) == 0 and (ids is None or str(rec["id"]) in ids.get(t, ())):
                got[(rec["task"], str(rec["id"]))] = bool(rec["correct"])
    return got


def compare_dirs(a: str | Path, b: str | Path, tasks: list[str], ids: dict[str, set[str]] | None = None) -> dict:
    """`paired` on the questions both evaluation directories answered (of `ids`, if given)."""
    oa, ob = outcomes(a, tasks, ids), outcomes(b, tasks, ids)
    keys = sorted(set(oa) & set(ob))
    if not keys:
        raise QuantLRMError(f"{a} and {b} share no graded question.", "evaluate both on the same tasks.")
    return paired("".join("1" if oa[k] else "0" for k in keys), "".join("1" if ob[k] else "0" for k in keys))

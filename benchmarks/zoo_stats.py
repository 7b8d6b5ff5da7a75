"""Paired statistics for the zoo: exact McNemar tests between two graded rows.

Every graded zoo row keeps its per-question correctness (a '0'/'1' string per task, the
same question order for every row of a model), so two methods can be compared on the same
questions: b = questions only the first got right, c = only the second. Under the null
hypothesis (no difference) each discordant question goes either way with probability 1/2,
so the exact two-sided p-value is a binomial tail on b + c trials.
"""

from __future__ import annotations

import math


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: P(X <= min(b, c)) * 2, capped at 1, X ~ Bin(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def joined(correct: dict[str, str], order: tuple[str, ...] | list[str]) -> str:
    """One string of all tasks' outcomes in a fixed task order."""
    return "".join(correct[f] for f in order)


def paired(a: str, b: str) -> dict:
    """Paired comparison of two equal-length '0'/'1' strings (a = the method, b = the baseline)."""
    if len(a) != len(b):
        raise ValueError(f"rows graded different question sets ({len(a)} vs {len(b)} outcomes)")
    n = len(a)
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x == "1" and y == "0")
    only_b = sum(1 for x, y in zip(a, b, strict=True) if x == "0" and y == "1")
    return {"n": n, "diff_points": 100.0 * (only_a - only_b) / max(n, 1), "b": only_a, "c": only_b,
            "p": mcnemar_exact(only_a, only_b)}


def compare_rows(rows: list[dict], order: tuple[str, ...], method: str, baselines: list[str]) -> list[dict]:
    """`method` against each baseline at every setting where both have per-question outcomes."""
    out = []
    settings = list(dict.fromkeys(r.get("setting") for r in rows if r.get("bits", 16) != 16))
    for s in settings:
        at = {r["method"]: r for r in rows if r.get("setting") == s and "correct" in r}
        if method not in at:
            continue
        for base in baselines:
            if base not in at:
                continue
            d = paired(joined(at[method]["correct"], order), joined(at[base]["correct"], order))
            out.append({"setting": s, "method": method, "baseline": base,
                        "method_avg": 100 * at[method]["avg"], "baseline_avg": 100 * at[base]["avg"], **d})
    return out

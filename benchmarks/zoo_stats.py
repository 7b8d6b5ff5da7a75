"""Paired statistics for the zoo: exact McNemar tests between two graded rows.

Every graded zoo row keeps its per-question correctness (a '0'/'1' string per task, the
same question order for every row of a model), so two methods can be compared on the same
questions (`quantlrm.eval.paired`: exact McNemar on the discordant questions).
"""

from __future__ import annotations

from quantlrm.eval.paired import mcnemar_exact, paired  # noqa: F401 -- re-exported for the zoo scripts


def joined(correct: dict[str, str], order: tuple[str, ...] | list[str]) -> str:
    """One string of all tasks' outcomes in a fixed task order."""
    return "".join(correct[f] for f in order)


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

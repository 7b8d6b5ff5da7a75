"""Paired comparison of two evaluation directories (quantlrm.eval.paired)."""

from __future__ import annotations

import json
import math

import pytest

from quantlrm.errors import QuantLRMError
from quantlrm.eval.paired import compare_dirs, mcnemar_exact, outcomes


def _write(d, task, marks, extra_k1=False):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{task}.jsonl", "w") as f:
        for i, m in enumerate(marks):
            f.write(json.dumps({"task": task, "id": i, "k": 0, "correct": m == "1"}) + "\n")
            if extra_k1:  # a second sample of the same question: ignored
                f.write(json.dumps({"task": task, "id": i, "k": 1, "correct": m != "1"}) + "\n")


def test_compare_dirs_counts_discordant_questions(tmp_path):
    _write(tmp_path / "a", "arith", "110101", extra_k1=True)
    _write(tmp_path / "a", "logic", "11")
    _write(tmp_path / "b", "arith", "100111")
    _write(tmp_path / "b", "logic", "01")
    assert outcomes(tmp_path / "a", ["arith"])[("arith", "1")] is True
    with open(tmp_path / "a" / "arith.jsonl", "a") as f:  # a torn last line (a crash mid-write)
        f.write('{"task": "arith", "id": 9, "k"')
    assert len(outcomes(tmp_path / "a", ["arith"])) == 6
    d = compare_dirs(tmp_path / "a", tmp_path / "b", ["arith", "logic"])
    # arith: only a right at id 1, only b right at id 4; logic: only a right at id 0
    assert (d["n"], d["b"], d["c"]) == (8, 2, 1)
    assert d["diff_points"] == pytest.approx(100 / 8)
    assert d["p"] == pytest.approx(mcnemar_exact(2, 1)) == pytest.approx(2 * (1 + 3) / 8)


def test_mcnemar_is_a_binomial_tail():
    for b, c in ((0, 0), (3, 9), (10, 10), (1, 20)):
        n, k = b + c, min(b, c)
        ref = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
        assert mcnemar_exact(b, c) == pytest.approx(ref)


def test_missing_or_disjoint_results_are_named(tmp_path):
    _write(tmp_path / "a", "arith", "1")
    with pytest.raises(QuantLRMError, match="logic.jsonl is missing"):
        compare_dirs(tmp_path / "a", tmp_path / "a", ["logic"])
    _write(tmp_path / "b", "temporal", "1")
    _write(tmp_path / "a", "temporal", "")
    with pytest.raises(QuantLRMError, match="share no graded question"):
        compare_dirs(tmp_path / "a", tmp_path / "b", ["temporal"])


def test_only_this_runs_questions_are_paired(tmp_path):
    """A resumed directory can hold answers an earlier run graded (another --limit): `ids`
    keeps the pairing to the questions of this run."""
    _write(tmp_path / "a", "arith", "1111")
    _write(tmp_path / "b", "arith", "0000")
    everything = compare_dirs(tmp_path / "a", tmp_path / "b", ["arith"])
    assert (everything["n"], everything["b"]) == (4, 4)
    now = compare_dirs(tmp_path / "a", tmp_path / "b", ["arith"], ids={"arith": {"0", "2"}})
    assert (now["n"], now["b"], now["c"]) == (2, 2, 0)

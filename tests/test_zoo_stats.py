"""The zoo's paired statistics (benchmarks/zoo_stats.py) against brute-force enumeration."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import zoo_stats as zs  # noqa: E402


def _brute_force_p(b: int, c: int) -> float:
    """Enumerate every way the b + c discordant questions could have split (each equally
    likely under H0); p = share of splits at least as far from n/2 as the observed one."""
    n = b + c
    obs = abs(b - n / 2)
    hits = sum(1 for w in itertools.product((0, 1), repeat=n) if abs(sum(w) - n / 2) >= obs - 1e-12)
    return hits / 2**n


@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (0, 1), (3, 0), (2, 2), (5, 1), (1, 7), (6, 4), (9, 3), (0, 10)])
def test_mcnemar_matches_enumeration(b, c):
    assert zs.mcnemar_exact(b, c) == pytest.approx(_brute_force_p(b, c), abs=1e-12)


def test_mcnemar_known_values_and_bad_input():
    assert zs.mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # both extreme splits of 5
    assert zs.mcnemar_exact(4, 4) == 1.0
    with pytest.raises(ValueError):
        zs.mcnemar_exact(-1, 2)


def test_paired_counts_and_compare_rows():
    a, base = "1101100", "1011001"
    d = zs.paired(a, base)
    assert (d["b"], d["c"], d["n"]) == (2, 2, 7)
    assert d["diff_points"] == pytest.approx(0.0)
    rows = [
        {"method": "QuantLRM", "bits": 3, "setting": "w3g128", "avg": 0.75, "correct": {"x": "1111", "y": "0111"}},
        {"method": "RTN", "bits": 3, "setting": "w3g128", "avg": 0.5, "correct": {"x": "1000", "y": "0011"}},
        {"method": "RTN", "bits": 4, "setting": "w4g128", "avg": 0.5, "correct": {"x": "1000", "y": "0011"}},
    ]
    out = zs.compare_rows(rows, ("x", "y"), "QuantLRM", ["RTN", "GPTQ"])
    assert len(out) == 1  # no QuantLRM at w4g128, no GPTQ row anywhere
    assert (out[0]["b"], out[0]["c"]) == (4, 0)  # 11110111 vs 10000011
    assert out[0]["diff_points"] == pytest.approx(50.0)
    assert out[0]["p"] == pytest.approx(2 / 16)
    with pytest.raises(ValueError):
        zs.paired("101", "10")

"""The zoo's row plan (benchmarks/zoo.py): settings, priority order, skips and where extras go."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import zoo  # noqa: E402


def _plan(tmp_path, *extra, run_extras=True):
    a = zoo.parse_args(["--out", str(tmp_path), "--work", str(tmp_path / "w"), *extra])
    a.run_extras = run_extras
    return zoo.ModelRun("llama-30m", a, zoo.Clock(time.time() + 60)).plan()


def test_settings_parse():
    assert zoo.parse_setting("w3g128") == (3, 128)
    assert zoo.parse_setting("W2pc") == (2, -1)
    assert zoo.setting_label("w3pc") == "W3 per-channel"
    with pytest.raises(SystemExit):
        zoo.parse_setting("w3x")


def test_default_plan_is_in_priority_order(tmp_path):
    p = _plan(tmp_path)
    # W3 g128 and W2 g128 also run our pipeline with GPTQ rounding, right after QuantLRM
    gptq = ("quantlrm-gptq", "gptq-ours")
    assert p[:7] == [(k, "w3g128") for k in ("rtn", "awq", "quantlrm", *gptq, "gptq-llmc", "awq-llmc")]
    assert p[7:12] == [(k, "w4g128") for k in ("rtn", "awq", "quantlrm", "gptq-llmc", "awq-llmc")]
    assert p[12:16] == [(k, "w3pc") for k in ("rtn", "awq", "quantlrm", "gptq-llmc")]
    assert p[16:22] == [(k, "w2g128") for k in ("rtn", "awq", "quantlrm", *gptq, "gptq-llmc")]
    assert p[22:25] == [("quantlrm-act", "w3g128"), ("quantlrm-mean", "w3g128"), ("quantlrm-prev", "w3g128")]
    assert p[-1] == "extras" and len(p) == 26
    assert not any(isinstance(x, tuple) and x[0] in gptq for x in _plan(tmp_path, "--gptq-settings", ""))
    assert "extras" not in _plan(tmp_path, run_extras=False)


def test_plan_skips_and_places_extras(tmp_path):
    p = _plan(tmp_path, "--extras-after", "w3g128", "--skip", "awq-llmc@w4g128", "--hard-settings", "")
    assert p[7] == "extras"
    assert ("awq-llmc", "w4g128") not in p and ("awq-llmc", "w3g128") in p
    assert not any(isinstance(x, tuple) and x[1] == "w3pc" for x in p)
    with pytest.raises(SystemExit):
        zoo.parse_args(["--out", str(tmp_path), "--main-methods", "rtn,nope"])

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


def test_search_diagnostics_summarise_the_quantize_report(tmp_path):
    """The zoo's 'what the scale search did' table comes from quantlrm.json's per-group records."""
    import json

    layers = [{"groups": {"attn": {"alpha": 0.0, "loss_before": 2.0, "loss_after": 2.0, "rank_corr_act": 0.5},
                          "mlp": {"alpha": 0.5, "loss_before": 4.0, "loss_after": 3.0, "rank_corr_act": -0.1}}},
              {"groups": {"attn": {"alpha": 0.25, "loss_before": 1.0, "loss_after": 0.5, "rank_corr_act": 0.2}}}]
    (tmp_path / "quantlrm.json").write_text(json.dumps({"layers": layers}))
    d = zoo.search_diagnostics(tmp_path)
    assert d["groups"] == 3 and d["alpha_zero"] == pytest.approx(1 / 3)
    assert d["alpha_mean"] == pytest.approx(0.25)
    assert d["loss_change"] == pytest.approx((0 - 0.25 - 0.5) / 3)
    assert d["rank_corr_act"] == pytest.approx(0.2)
    assert zoo.search_diagnostics(tmp_path / "missing") is None
    row = {"method": "QuantLRM", "setting": "w3g128", "search": d}
    md = zoo.markdown([{"model": "m", "spec": {"model_type": "llama"}, "rows": [row]}])
    assert "| QuantLRM | W3 g128 | 3 | 33% | 0.25 | -25.0% | 0.20 |" in md

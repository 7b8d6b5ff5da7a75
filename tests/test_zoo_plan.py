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
    gptq = ("quantlrm-gptq", "gptq-ours", "quantlrm-gptq-ao", "gptq-ours-ao")
    assert p[:9] == [(k, "w3g128") for k in ("rtn", "awq", "quantlrm", *gptq, "gptq-llmc", "awq-llmc")]
    assert p[9:14] == [(k, "w4g128") for k in ("rtn", "awq", "quantlrm", "gptq-llmc", "awq-llmc")]
    assert p[14:18] == [(k, "w3pc") for k in ("rtn", "awq", "quantlrm", "gptq-llmc")]
    assert p[18:26] == [(k, "w2g128") for k in ("rtn", "awq", "quantlrm", *gptq, "gptq-llmc")]
    assert p[26:29] == [("quantlrm-act", "w3g128"), ("quantlrm-mean", "w3g128"), ("quantlrm-prev", "w3g128")]
    assert p[-1] == "extras" and len(p) == 30
    assert not any(isinstance(x, tuple) and x[0] in gptq for x in _plan(tmp_path, "--gptq-settings", ""))
    assert "extras" not in _plan(tmp_path, run_extras=False)


def test_plan_skips_and_places_extras(tmp_path):
    p = _plan(tmp_path, "--extras-after", "w3g128", "--skip", "awq-llmc@w4g128", "--hard-settings", "")
    assert p[9] == "extras"
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


def test_resume_reuses_the_trained_models_and_finished_rows(tmp_path):
    """A toy zoo run cut short by its budget (75 s: enough to finish training on a 2-core machine
    that is also busy with other work; 45 s was not, once, beside a CPU-heavy job), then
    --resume: no retraining (same checkpoint
    files, same stage logs), the finished row kept, the rest run; a changed training setting
    is refused (trained again)."""
    import json
    import subprocess

    script = str(Path(zoo.__file__).resolve())
    common = ["--work", str(tmp_path / "w"), "--toy", "--device", "cpu", "--models", "toy-llama"]
    r = subprocess.run([sys.executable, script, "--out", str(tmp_path / "o1"), "--budget", "75", *common],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    first = json.loads((tmp_path / "o1" / "toy-llama.json").read_text())
    ckpt = tmp_path / "w" / "toy-llama" / first["quantized_model"] / "model.safetensors"
    mtime = ckpt.stat().st_mtime_ns
    r = subprocess.run([sys.executable, script, "--out", str(tmp_path / "o2"), "--budget", "200", "--resume",
                        "--full-settings", "w3g128", "--main-methods", "rtn", "--hard-settings", "",
                        "--option-settings", "", "--gptq-settings", "", "--extras", "none", *common],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    second = json.loads((tmp_path / "o2" / "toy-llama.json").read_text())
    assert ckpt.stat().st_mtime_ns == mtime and second["stages"] == first["stages"] and second["resumed"]
    done = {(x["method"], x["setting"]) for x in second["rows"] if "avg" in x}
    assert {(x["method"], x["setting"]) for x in first["rows"] if "avg" in x} <= done
    assert ("RTN", "w3g128") in done
    # signals saved by one call are reused by the next (a second save into their directory failed)
    quant = ["--hard-settings", "", "--option-settings", "", "--gptq-settings", "", "--extras", "none", *common]
    for i, settings in ((3, "w4g32"), (4, "w4g32,w3g32")):  # settings the first call never runs
        r = subprocess.run([sys.executable, script, "--out", str(tmp_path / f"o{i}"), "--budget", "200", "--resume",
                            "--full-settings", settings, "--main-methods", "quantlrm", *quant],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads((tmp_path / "o4" / "toy-llama.json").read_text())
    assert not last["errors"], last["errors"]
    assert {("QuantLRM", "w4g32"), ("QuantLRM", "w3g32")} <= {(x["method"], x["setting"]) for x in last["rows"]
                                                               if "avg" in x}
    a = zoo.parse_args(["--out", str(tmp_path / "o5"), "--resume", "--level", "3", *common])
    assert not zoo.ModelRun("toy-llama", a, zoo.Clock(time.time() + 60)).resume()  # other data: retrain

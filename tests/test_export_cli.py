"""`quantlrm export`: refusals before any work, and (once the pipeline exists) a real re-export."""

import json

import pytest
import torch
from safetensors.torch import save_file

from quantlrm.cli import main

# transformers warns that the checkpoint already has a quantization_config; that is expected
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


def fake_run(tmp_path, bits=3):
    run = tmp_path / "run"
    run.mkdir()
    (run / "quantlrm.json").write_text(json.dumps({"options": {"model": str(tmp_path / "m"), "bits": bits,
                                                               "group_size": 128, "method": "rtn"}}))
    save_file({"x": torch.zeros(1)}, str(run / "search.safetensors"))
    return run


def test_awq_at_3_bits_is_refused_naming_the_formats_that_can(tmp_path, capsys):
    run = fake_run(tmp_path, bits=3)
    rc = main(["export", "--run", str(run), "--format", "awq", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot hold 3-bit" in err
    for fmt in ("compressed-tensors", "gptq", "fake"):
        assert fmt in err
    assert not (tmp_path / "o").exists()


def test_unknown_format_lists_formats(tmp_path, capsys):
    run = fake_run(tmp_path, bits=4)
    assert main(["export", "--run", str(run), "--format", "exl2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown format 'exl2'" in err and "awq" in err and "compressed-tensors" in err


def test_not_a_run_dir(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--format", "gptq", "--out", str(tmp_path / "o")]) == 2
    assert "quantlrm.json" in capsys.readouterr().err


def test_run_without_search_results(tmp_path, capsys):
    run = fake_run(tmp_path)
    (run / "search.safetensors").unlink()
    assert main(["export", "--run", str(run), "--format", "gptq", "--out", str(tmp_path / "o")]) == 2
    assert "search.safetensors" in capsys.readouterr().err


def test_reexport_of_a_real_run_matches_its_fake_quant_model(tmp_path):
    pipeline = pytest.importorskip("quantlrm.pipeline")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from quantlrm.models import build_model, byte_tokenizer, tiny_config

    src = tmp_path / "m"
    build_model(tiny_config("llama"), seed=0).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    run = tmp_path / "run"
    pipeline.quantize_model(pipeline.QuantizeOptions(model=str(src), out=str(run), method="rtn", bits=4,
                                                     group_size=32, format="fake", calib="builtin",
                                                     calib_samples=4, calib_seqlen=64, progress=False))
    out = tmp_path / "ct"
    assert main(["export", "--run", str(run), "--format", "compressed-tensors", "--out", str(out)]) == 0
    ids = torch.tensor([[257, 72, 105, 33, 10, 40]])
    fake = AutoModelForCausalLM.from_pretrained(run, attn_implementation="eager").eval()
    packed = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, fake(ids).logits)

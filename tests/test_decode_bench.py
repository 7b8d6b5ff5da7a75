"""benchmarks/decode.py switches one model between precisions: each must run only its own
weights (a fused MLP once kept W4 gate/up in the W3 rows)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode as D  # noqa: E402

from quantlrm.models import build_model, tiny_config  # noqa: E402
from quantlrm.nn import GatedMLP, QuantLinear, fuse_projections  # noqa: E402


def _bits_in_use(model) -> set[int]:
    """Bits of the quantized linears the forward pass reaches (fused MLPs and q/k/v included)."""
    return {m.bits for m in model.modules() if isinstance(m, QuantLinear)}


def _setup():
    model = build_model(tiny_config("llama"), 0, torch.float32)
    dense = {n: m for lst in D.linears(model).values() for n, m in lst}
    quant = {b: {n: QuantLinear.from_linear(m, b, 32) for n, m in dense.items()} for b in (4, 3)}
    return model, dense, quant, D.mlp_modules(model)


def test_install_switches_every_linear_between_precisions():
    model, dense, quant, mlps = _setup()
    x = torch.randint(0, 256, (1, 8))
    outs = {}
    for bits in (4, 3, None, 3):
        D.install(model, mlps, dense if bits is None else quant[bits], bits)
        assert _bits_in_use(model) == ({bits} if bits else set())
        if bits:
            assert all(isinstance(model.get_submodule(n), GatedMLP) for n in mlps)
            assert {model.get_submodule(n).gate_up.bits for n in mlps} == {bits}
        with torch.no_grad():
            outs.setdefault(bits, []).append(model(x).logits)
    torch.testing.assert_close(outs[3][0], outs[3][1])  # W3 after dense = W3 after W4
    assert not torch.allclose(outs[3][0], outs[4][0])


def test_plain_set_linears_keeps_the_old_fused_mlp():
    """The bug `install` fixes: setting linears on a fused model leaves W4 gate/up in place."""
    model, _, quant, _ = _setup()
    D.set_linears(model, quant[4])
    fuse_projections(model, gated=True)
    D.set_linears(model, quant[3])
    fuse_projections(model, gated=True)
    assert _bits_in_use(model) == {3, 4}
    with pytest.raises(RuntimeError, match="still holds"):
        D.install(model, {}, quant[3], 3)  # without restoring the MLPs the check catches it


def test_inductor_pdl_audit_tells_kernels_apart(tmp_path):
    """The audit reads inductor's kernel files (the decorator and metadata as inductor writes
    them, `triton_meta` by repr): one file may hold several kernels, each judged on its own."""
    def kernel(name: str, pdl: bool, wait: bool) -> str:
        body = "    tl.extra.cuda.gdc_wait()\n" if wait else ""
        return (f"@triton_heuristics.pointwise(\n    size_hints={{'x': 64}},\n    filename=__file__,\n"
                f"    triton_meta={{'signature': {{}}, 'launch_pdl': {pdl}, 'disable_ftz': False}},\n)\n"
                f"@triton.jit\ndef {name}(in_ptr0, xnumel, XBLOCK : tl.constexpr):\n{body}"
                "    x = tl.load(in_ptr0)\n\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "c1.py").write_text("import triton\n" + kernel("triton_poi_ok_0", True, True)
                                          + kernel("triton_poi_nowait_1", True, False))
    (tmp_path / "c2.py").write_text(kernel("triton_red_off_2", False, False) + kernel("triton_poi_ok_0", True, True))
    audit = D.inductor_pdl_audit(str(tmp_path))
    assert audit == {"pdl_kernels": 2, "without_wait": ["triton_poi_nowait_1"]}, audit


def test_describe_names_every_field_of_a_tile():
    """Each timing is recorded with its tile's description; every field that tells tiles apart is in it."""
    from quantlrm.kernels import GEMV_H2_CONFIGS, Config

    tiles = [*GEMV_H2_CONFIGS, Config("gemm", block_m=32, block_n=64, split_k=2), Config("gemv", x32=True)]
    text = [D.describe(c) for c in tiles]
    assert len(set(text)) == len(tiles)
    assert "m32 n64" in text[-2] and "sk2" in text[-2] and "x32=True" in text[-1]


def test_tiles_ab_sets_differ_by_exactly_the_tiles_they_name():
    """`--tiles-ab` compares tile sets; each must drop exactly its tiles from the default candidates."""
    from quantlrm.kernels import GEMV_H2_CONFIGS, GEMV_H2_ROWPAIR_XONCE, GEMV_H2_ROWQUAD_XONCE

    sets = dict(D.tile_sets("rg2"))
    assert sets[""] == GEMV_H2_CONFIGS
    assert set(GEMV_H2_CONFIGS) - set(sets["-xonce_rg2"]) == set(GEMV_H2_ROWPAIR_XONCE)
    assert len(sets["-xonce_rg2"]) == len(GEMV_H2_CONFIGS) - len(GEMV_H2_ROWPAIR_XONCE)
    assert sets["+no_xonce"] and not any(c.x_once for c in sets["+no_xonce"])
    assert len(sets["+no_xonce"]) < len(sets["-xonce_rg2"])
    assert [t for t, _ in D.tile_sets("rg2only")] == ["", "-xonce_rg2"]
    assert [t for t, _ in D.tile_sets("1")] == ["+no_xonce", ""]
    quads = dict(D.tile_sets("rg4only"))
    assert list(quads) == ["", "-xonce_rg4"] and quads[""] == GEMV_H2_CONFIGS
    assert set(GEMV_H2_CONFIGS) - set(quads["-xonce_rg4"]) == set(GEMV_H2_ROWQUAD_XONCE)
    assert all(c.row_groups == 4 for c in GEMV_H2_ROWQUAD_XONCE)
    assert [t for t, _ in D.tile_sets("smemonly")] == ["", "-smem"]  # the second drops SMEM_GEMV_CONFIGS
    assert [t for t, _ in D.tile_sets("smemall")] == ["", "-smem", "+smem_all"] and dict(D.tile_sets("smemall"))["+smem_all"] == ()

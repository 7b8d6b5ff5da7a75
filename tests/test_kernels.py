"""Low-bit kernels: layout vs compressed-tensors, torch reference, Triton (interpreter on CPU, GPU).

Every check compares against dequantize-then-matmul written here from the quantizer's codes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from quantlrm.errors import QuantLRMError
from quantlrm.kernels import candidates, qmatmul, run_config
from quantlrm.kernels import layout as L
from quantlrm.quantizer import quantize

_no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels); run on the GPU machine")


def cuda(fn):
    """GPU-only test: marked `gpu` and skipped with a reason where no CUDA device is visible."""
    return pytest.mark.gpu(_no_gpu(fn))


def _ref(x: torch.Tensor, q, dtype) -> torch.Tensor:
    """Dequantize (codes - zero) * scale with the scale rounded to `dtype`, matmul in fp32."""
    g = q.group_size
    out, inp = q.codes.shape
    s = q.scale.to(dtype).float()
    w = ((q.codes.float().view(out, -1, g) - q.zero.float().unsqueeze(-1)) * s.unsqueeze(-1)).view(out, inp)
    return x.float() @ w.to(dtype).float().t()


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [7, 32, 100, 256])
def test_pack_matches_compressed_tensors(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 2**bits, (5, cols), dtype=torch.uint8)
    lib = pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(L.pack_rows(codes, bits), lib)
    assert torch.equal(L.unpack_rows(lib, bits, cols), codes)
    assert torch.equal(L.codes_from_planes(L.make_planes(codes, bits), bits, cols), codes)


def test_three_bit_planes_have_no_straddling():
    codes = torch.randint(0, 8, (3, 64), dtype=torch.uint8)
    lo, hi = L.make_planes(codes, 3)
    assert lo.shape == (3, 4) and hi.shape == (3, 2)  # 64 codes: 4 words of 2 bits, 2 of 1 bit
    k = 37
    lo_val = (int(lo[1, k // 16]) >> (2 * (k % 16))) & 3
    hi_val = (int(hi[1, k // 32]) >> (k % 32)) & 1
    assert lo_val | (hi_val << 2) == int(codes[1, k])


@pytest.mark.parametrize("bits,g", [(3, 32), (4, 128), (3, 64)])
def test_from_compressed_tensors_library_packing(bits, g):
    """A linear packed by compressed-tensors' own functions re-lays out to the same weight."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    torch.manual_seed(bits)
    w = torch.randn(40, 256)
    q = quantize(w, bits, g)
    off = 2 ** (bits - 1)
    packed = pack_to_int32((q.codes.to(torch.int16) - off).to(torch.int8), bits)
    zp = pack_to_int32((q.zero.to(torch.int16) - off).to(torch.int8), bits, packed_dim=0)
    kw = L.from_compressed_tensors(packed, q.scale.half(), zp, (40, 256), bits, g, torch.float16)
    ref = q.codes.float().view(40, -1, g).sub(q.zero.float().unsqueeze(-1)).mul(q.scale.half().float().unsqueeze(-1))
    assert torch.equal(L.dequantize(kw, torch.float32), ref.view(40, 256))


def test_reference_matmul_and_quantlinear_cpu():
    from quantlrm.nn import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    ql = QuantLinear.from_linear(lin, 3, 32)
    x = torch.randn(2, 5, 128)
    q = quantize(lin.weight.data, 3, 32)
    want = _ref(x.reshape(-1, 128), q, torch.float32).view(2, 5, 48) + lin.bias.data
    assert _relerr(ql(x), want) < 1e-5


def _export_tiny(tmp_path, bits, g, model_type="qwen2"):
    """A tiny model exported by quantlrm's compressed-tensors writer, plus its dense reference."""
    from quantlrm.arch import linear_names
    from quantlrm.export import get_writer
    from quantlrm.models import build_model, tiny_config

    cfg = tiny_config(model_type)
    model = build_model(cfg, 0, torch.float16)
    ref = build_model(cfg, 0, torch.float32)
    names = {n for _, _, n in linear_names(cfg.to_dict())}
    writer = get_writer("compressed-tensors", tmp_path, bits, g)
    params = dict(ref.named_parameters())
    for k, t in model.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if mod in names and k.endswith(".weight"):
            q = quantize(t.float(), bits, g)
            writer.add_linear(mod, q, t.dtype)
            s = q.scale.half().float()
            params[k].data = ((q.codes.float().view(t.shape[0], -1, g) - q.zero.float().unsqueeze(-1))
                              * s.unsqueeze(-1)).view_as(t)
        else:
            writer.add_tensor(k, t)
            if k in params:
                params[k].data = t.float()
    writer.close(cfg.to_dict())
    return ref


def test_build_quantized_from_export_matches_dense(tmp_path):
    pytest.importorskip("quantlrm.export.compressed_tensors")
    from quantlrm.nn import QuantLinear, build_quantized

    ref = _export_tiny(tmp_path, 3, 32)
    qm = build_quantized(tmp_path, "cpu", torch.float32)
    n_q = sum(isinstance(m, QuantLinear) for m in qm.modules())
    assert n_q == 14  # 2 layers x 7 linears; lm_head stays dense
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert _relerr(qm(ids).logits, ref(ids).logits) < 1e-5


def test_load_quantized_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the CPU error path cannot be seen here")
    from quantlrm.nn import load_quantized

    with pytest.raises(QuantLRMError, match="CUDA GPU"):
        load_quantized(tmp_path)


_INTERP_SCRIPT = textwrap.dedent("""
    import torch
    from quantlrm.quantizer import quantize
    from quantlrm.kernels import layout as L, candidates, run_config, dequant_triton, Config
    torch.manual_seed(0)
    worst = 0.0
    cases = ((3, 40, 96, 32), (4, 33, 256, 128), (3, 17, 256, 64), (4, 9, 100, 100), (3, 9, 100, 100),
             (4, 20, 96, 48))  # odd K per channel; g=48 takes the generic path
    for bits, n, k, g in cases:
        q = quantize(torch.randn(n, k), bits, g)
        kw = L.from_codes(q.codes, q.scale, q.zero, bits, g, torch.float16)
        wd = L.dequantize(kw, torch.float32)
        assert torch.equal(dequant_triton(kw, torch.float32), wd)
        for m in (1, 20):
            x = torch.randn(m, k).half()
            ref = x.float() @ wd.t()
            for c in candidates(kw, m)[:2] + candidates(kw, m)[-1:]:
                if c.kind == "gemv":  # small tiles keep the interpreter fast; same code paths
                    c = Config("gemv", block_n=8, block_k=64 if bits == 3 else 16, split_k=c.split_k)
                y = run_config(x, kw, c).float()
                err = float((y - ref).norm() / ref.norm())
                assert err < 2e-3, (bits, n, k, g, m, c, err)
                worst = max(worst, err)
    print("WORST", worst)
""")



def test_triton_kernels_in_interpreter():
    """The Triton kernels' arithmetic, run by Triton's CPU interpreter (no GPU needed)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WORST" in r.stdout


# ---------------------------------------------------------------- GPU ----------------------------


@cuda
@pytest.mark.parametrize("bits,g,dtype", [(3, 32, torch.float16), (4, 64, torch.float16),
                                          (3, 128, torch.bfloat16), (4, 128, torch.float16),
                                          (3, 128, torch.float16)])
def test_gpu_kernels_match_dequant_matmul(bits, g, dtype):
    """Every candidate configuration and the tuned choice; shapes off the tile grid; batch 1..64."""
    torch.manual_seed(bits * g)
    tol = 3e-3 if dtype == torch.float16 else 2e-2
    for n, k in ((1000, 1536), (333, 384)):
        q = quantize(torch.randn(n, k, device="cuda"), bits, g)
        kw = L.from_codes(q.codes, q.scale, q.zero, bits, g, dtype)
        for m in (1, 5, 33, 64):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = _ref(x, q, dtype)
            for c in candidates(kw, m):
                y = run_config(x, kw, c)
                assert torch.isfinite(y).all(), (n, k, m, c)
                assert _relerr(y, ref) < tol, (n, k, m, c, _relerr(y, ref))
            assert _relerr(qmatmul(x, kw), ref) < tol


@cuda
def test_gpu_quantlinear_in_cuda_graph():
    from quantlrm.nn import QuantLinear

    lin = torch.nn.Linear(512, 768, bias=False, device="cuda", dtype=torch.float16)
    ql = QuantLinear.from_linear(lin, 3, 128)
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    ql(x)  # tunes outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ql(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    ref = x.float() @ ql.dequantized_weight(torch.float16).float().t()
    assert _relerr(y, ref) < 3e-3


@cuda
def test_gpu_load_quantized_matches_dense(tmp_path):
    pytest.importorskip("quantlrm.export.compressed_tensors")
    from quantlrm.nn import load_quantized

    for bits in (3, 4):
        d = tmp_path / f"w{bits}"
        ref = _export_tiny(d, bits, 32).cuda()
        qm = load_quantized(d)
        ids = torch.randint(0, 256, (1, 12), device="cuda")
        with torch.no_grad():
            assert _relerr(qm(ids).logits, ref(ids).logits) < 1e-2
            out = qm.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=256)
        assert out.shape == (1, 17)

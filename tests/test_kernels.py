"""Low-bit kernels: layout vs compressed-tensors, torch reference, Triton (interpreter on CPU, GPU).

Every check compares against dequantize-then-matmul written here from the quantizer's codes.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from quantlrm.errors import QuantLRMError
from quantlrm.kernels import candidates, half2_ok, qmatmul, run_config
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


@pytest.mark.parametrize("bits,g,cols", [(2, 128, 256), (3, 128, 256), (4, 64, 192), (8, 32, 96),
                                         (3, 100, 100), (4, 300, 300), (3, 96, 288), (3, 256, 512),
                                         (3, 160, 320), (3, 32, 64), (3, 48, 96)])
def test_block_layout_round_trips_and_matches_its_definition(bits, g, cols):
    """Channel r of block b is pair m = r // 2, half r % 2, slot s and lane j = divmod(m, L);
    slot s < T*H is pair p of word (t, j), (t, p) = divmod(s, H), at bit bits*p + 16*half; the
    3-bit spare slot 15 has bit k at bit 15 + 16*half of word (k, j) (module docstring),
    checked one code at a time, plus the vectorised unpacking."""
    codes = torch.randint(0, 2**bits, (3, cols), dtype=torch.uint8)
    packed = L.pack_blocks(codes, bits, g)
    B, P = L.block_size(g, cols), L.codes_per_word(bits)
    H, T = P // 2, (3 if bits == 3 else 1)
    lanes = -(-B // (32 if bits == 3 else P))
    W = T * lanes
    assert packed.shape == (3, -(-cols // B) * W)
    for row in range(3):
        words = [int(v) & 0xFFFFFFFF for v in packed[row]]
        for k in range(cols):
            b, r = divmod(k, B)
            half = r % 2
            s, j = divmod(r // 2, lanes)
            if s < T * H:
                t, p = divmod(s, H)
                code = (words[b * W + t * lanes + j] >> (bits * p + 16 * half)) & (2**bits - 1)
            else:
                assert bits == 3 and s == 15
                code = sum(((words[b * W + t * lanes + j] >> (15 + 16 * half)) & 1) << t for t in range(3))
            assert code == int(codes[row, k]), (row, k)
    assert torch.equal(L.unpack_blocks(packed, bits, g, cols), codes)


def test_block_sizes_and_bytes():
    assert L.block_size(128, 4096) == 128 and L.block_size(64, 4096) == 64
    assert L.block_size(4096, 4096) == 128 and L.block_size(100, 100) == 128  # one group per row
    assert L.block_size(384, 4096) == 128 and L.block_size(160, 320) == 80
    with pytest.raises(QuantLRMError, match="group size 262"):
        L.block_size(262, 524)
    with pytest.raises(QuantLRMError, match="5-bit"):
        L.codes_per_word(5)
    q = quantize(torch.randn(8, 256), 3, 128)
    kw = L.from_codes(q.codes, q.scale, q.zero, 3, 128)
    assert kw.packed.shape == (8, 24)  # 12 words (4 lanes of 3) per 128-channel block: 3 bits


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


def test_half2_gemv_is_offered_for_fp16_and_bf16_unless_turned_off(monkeypatch):
    """bf16 models get the bf16x2 GEMV by default (measured faster, BENCHMARKS.md version 8);
    QUANTLRM_BF16X2=0 takes it out of the tuner's candidates; 8-bit codes never get it."""

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("QUANTLRM_BF16X2", raising=False)
    q = quantize(torch.randn(64, 256), 3, 128)
    kw = L.from_codes(q.codes, q.scale, q.zero, 3, 128, torch.bfloat16)
    assert half2_ok(kw, torch.float16) and half2_ok(kw, torch.bfloat16)
    assert any(c.half2 for c in candidates(kw, 1, torch.bfloat16))
    assert not half2_ok(kw, torch.float32)
    monkeypatch.setenv("QUANTLRM_BF16X2", "0")
    assert half2_ok(kw, torch.float16) and not half2_ok(kw, torch.bfloat16)
    assert not any(c.half2 for c in candidates(kw, 1, torch.bfloat16))
    monkeypatch.setenv("QUANTLRM_BF16X2", "False")
    assert not half2_ok(kw, torch.bfloat16)
    monkeypatch.setenv("QUANTLRM_BF16X2", "1")
    assert half2_ok(kw, torch.bfloat16)
    monkeypatch.delenv("QUANTLRM_BF16X2")
    q8 = quantize(torch.randn(64, 256), 8, 128)
    assert not half2_ok(L.from_codes(q8.codes, q8.scale, q8.zero, 8, 128, torch.float16), torch.float16)


def test_pdl_trigger_is_late_for_the_row_group_x_once_tiles_only(monkeypatch):
    """Under PDL the row-pair and row-quad x_once tiles let the next kernel launch after their main
    loop (BENCHMARKS.md, Kernels, versions 13 and 15); QUANTLRM_PDL_TRIGGER forces one trigger for every GEMV
    and is checked; kernels without the choice (late=None) ignore it; no PDL, no arguments."""
    import quantlrm.kernels as qk

    cpu = torch.device("cpu")
    assert qk.pdl_launch(cpu, late=True) == {}
    monkeypatch.setattr(qk, "pdl_enabled", lambda device: True)
    monkeypatch.delenv("QUANTLRM_PDL_TRIGGER", raising=False)
    grouped = qk.GEMV_H2_ROWPAIR_XONCE + qk.GEMV_H2_ROWQUAD_XONCE
    assert all(qk.late_trigger(replace(c, half2=True)) for c in grouped)
    late = [c for c in qk.GEMV_H2_CONFIGS if qk.late_trigger(replace(c, half2=True))]
    assert late == list(grouped)  # candidates; every other tile triggers early
    assert qk.pdl_launch(cpu, late=True) == {"PDL": 2, "launch_pdl": True}
    assert qk.pdl_launch(cpu, late=False) == qk.pdl_launch(cpu) == {"PDL": 1, "launch_pdl": True}
    monkeypatch.setenv("QUANTLRM_PDL_TRIGGER", "early")
    assert qk.pdl_launch(cpu, late=True)["PDL"] == 1
    monkeypatch.setenv("QUANTLRM_PDL_TRIGGER", "Late")
    assert qk.pdl_launch(cpu, late=False)["PDL"] == 2
    assert qk.pdl_launch(cpu)["PDL"] == 1  # the attention kernel has no late trigger
    monkeypatch.setenv("QUANTLRM_PDL_TRIGGER", "1")
    with pytest.raises(QuantLRMError, match="QUANTLRM_PDL_TRIGGER"):
        qk.pdl_launch(cpu, late=False)
    monkeypatch.delenv("QUANTLRM_PDL_TRIGGER")

    # run_config asks for the tile's trigger (a recorder stops it at the launch)
    class Launched(Exception):
        pass

    asked = []

    def record(device, late=None):
        asked.append(late)
        raise Launched

    monkeypatch.setattr(qk, "pdl_launch", record)
    q = quantize(torch.randn(64, 256), 3, 128)
    kw = L.from_codes(q.codes, q.scale, q.zero, 3, 128, torch.float16)
    for c in (qk.GEMV_H2_ROWPAIR_XONCE[0], qk.GEMV_H2_CONFIGS[0]):
        with pytest.raises(Launched):
            run_config(torch.randn(1, 256).half(), kw, replace(c, half2=True))
    assert asked == [True, False]


def test_pdl_trigger_sits_where_its_mode_says_in_the_ptx():
    """PDL 1 lets the next kernel launch right after the wait at the top; PDL 2 only after the
    main loop; without PDL neither instruction is there (sm_90 PTX, compiled on the CPU)."""
    pytest.importorskip("triton")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import gemv_sass

    where = {}
    for pdl in (False, 1, 2):
        k = gemv_sass.compile_h2_kernel(3, False, 4, 2, 4, True, 2, mode=0, x_once=True, pdl=pdl)
        lines = k.asm["ptx"].splitlines()
        loop_end = max(i for i, ln in enumerate(lines) if ln.strip().startswith("@") and " bra" in ln)
        where[pdl] = ([i for i, ln in enumerate(lines) if "griddepcontrol.wait" in ln],
                      [i for i, ln in enumerate(lines) if "griddepcontrol.launch_dependents" in ln], loop_end)
    assert where[False][:2] == ([], [])
    (wait1,), (launch1,), end1 = where[1]
    (wait2,), (launch2,), end2 = where[2]
    assert wait1 < launch1 < wait1 + 10 < end1
    assert wait2 < end2 < launch2


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
             (4, 20, 96, 48), (3, 7, 640, 128), (2, 5, 256, 128), (8, 6, 160, 160), (3, 11, 300, 300),
             (3, 6, 320, 160), (3, 5, 96, 48))
    # odd K per channel (one padded block), g=48 and g=160 (B=80): lanes not a power of two, and
    # W3 blocks whose last lane is part padding
    for bits, n, k, g in cases:
        q = quantize(torch.randn(n, k), bits, g)
        kw = L.from_codes(q.codes, q.scale, q.zero, bits, g, torch.float16)
        wd = L.dequantize(kw, torch.float32)
        assert torch.equal(dequant_triton(kw, torch.float32), wd)
        # the paired 32-bit stores; the interpreter rounds fp32 -> bf16 by truncation, the GPU
        # to nearest, so bf16 is held to one unit in the last place
        assert torch.equal(dequant_triton(kw, torch.float16, 8), wd.half())
        bf = dequant_triton(kw, torch.bfloat16, 8).float()
        assert ((bf - wd).abs() <= wd.abs() * 2.0**-7).all(), (bits, n, k, g)
        for m in (1, 20):
            x = torch.randn(m, k).half()
            ref = x.float() @ wd.t()
            cands = candidates(kw, m)
            if m == 1:  # every code path: plain, several blocks per step, split-K, the GEMM fallback
                cands = [Config("gemv", block_n=4), Config("gemv", block_n=2, x32=True),
                         Config("gemv", block_n=8, split_k=3), cands[-1]]
                if bits <= 4:  # the half2 GEMV, its PTX pair emulated: one block or U per step, prefetch,
                    # row pairs (row_groups=2: odd n leaves the last pair half outside)
                    cands += [Config("gemv", block_n=4, half2=True),
                              Config("gemv", block_n=8, split_k=3, half2=True, blocks_per_step=2, prefetch=True),
                              Config("gemv", block_n=4, half2=True, row_groups=2),
                              Config("gemv", block_n=4, split_k=3, half2=True, blocks_per_step=2, prefetch=True,
                                     row_groups=2),
                              # activations loaded once for a thread's rows: one split and split-K
                              Config("gemv", block_n=4, half2=True, blocks_per_step=4, x_once=True),
                              Config("gemv", block_n=2, split_k=3, half2=True, blocks_per_step=2, prefetch=True,
                                     x_once=True),
                              Config("gemv", block_n=2, half2=True, blocks_per_step=4, prefetch=True, x_once=True,
                                     row_groups=2)]
            else:
                cands = [cands[0], cands[1], cands[-1]]
            for c in cands:
                y = run_config(x, kw, c).float()
                err = float((y - ref).norm() / ref.norm())
                assert err < 2e-3, (bits, n, k, g, m, c, err)
                worst = max(worst, err)
    # skinny batches: the GEMV with several activation rows (padded to a power of two, masked),
    # one split and split-K, fp16 pairs and fp32 (x32), with and without the gated epilogue
    for bits, n, k, g in ((4, 24, 256, 128), (3, 10, 300, 300), (2, 8, 96, 32)):
        q = quantize(torch.randn(n, k), bits, g)
        kw = L.from_codes(q.codes, q.scale, q.zero, bits, g, torch.float16)
        wd = L.dequantize(kw, torch.float32)
        for m in (2, 3, 5, 8):
            x = torch.randn(m, k).half()
            ref = x.float() @ wd.t()
            for c in (Config("gemv", block_n=4), Config("gemv", block_n=8, split_k=2),
                      Config("gemv", block_n=4, split_k=3, x32=True)):
                y = run_config(x, kw, c).float()
                err = float((y - ref).norm() / ref.norm())
                assert y.shape == (m, n) and err < 2e-3, (bits, n, k, g, m, c, err)
                gy = run_config(x, kw, c, act=True).float()
                gref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2]
                assert float((gy - gref).norm() / gref.norm()) < 2e-3, (bits, m, c)
                worst = max(worst, err)
    # the gated-MLP epilogue: rows interleave (gate, up); silu(gate) * up stored at half width,
    # by the only split (MODE 0), by the last split of a row tile (MODE 2), and after the GEMM
    for bits, n, k, g in ((4, 40, 256, 128), (3, 18, 300, 300)):
        q = quantize(torch.randn(n, k), bits, g)
        kw = L.from_codes(q.codes, q.scale, q.zero, bits, g, torch.float16)
        x = torch.randn(1, k).half()
        y = x.float() @ L.dequantize(kw, torch.float32).t()
        ref = torch.nn.functional.silu(y[:, 0::2]) * y[:, 1::2]
        for c in (Config("gemv", block_n=4), Config("gemv", block_n=8, split_k=2), Config("gemm", block_m=16, block_n=16),
                  Config("gemv", block_n=8, split_k=2, half2=True, blocks_per_step=2),
                  Config("gemv", block_n=4, half2=True, row_groups=2),
                  Config("gemv", block_n=2, split_k=2, half2=True, blocks_per_step=2, row_groups=2),
                  Config("gemv", block_n=4, half2=True, blocks_per_step=4, x_once=True),
                  Config("gemv", block_n=2, split_k=2, half2=True, blocks_per_step=4, x_once=True, row_groups=2)):
            got = run_config(x, kw, c, act=True).float()
            assert got.shape == (1, n // 2), (c, got.shape)
            err = float((got - ref).norm() / ref.norm())
            assert err < 2e-3, (bits, n, k, g, c, err)
    # the half2 GEMV's bf16x2 form (bf16 default), its PTX pair emulated: bf16 rounds each product and a
    # word's sum (2-4.6e-3 measured here, against 1-3e-3 for torch's bf16 matmul)
    for bits, n, k, g in ((3, 40, 96, 32), (4, 34, 256, 128), (3, 11, 300, 300), (2, 16, 256, 128), (3, 7, 640, 128),
                        (3, 6, 320, 160)):
        q = quantize(torch.randn(n, k), bits, g)
        kw = L.from_codes(q.codes, q.scale, q.zero, bits, g, torch.bfloat16)
        x = torch.randn(1, k).bfloat16()
        ref = x.float() @ L.dequantize(kw, torch.float32).t()
        for c in (Config("gemv", block_n=4, half2=True),
                  Config("gemv", block_n=8, split_k=3, half2=True, blocks_per_step=2, prefetch=True),
                  Config("gemv", block_n=4, split_k=2, half2=True, blocks_per_step=2, row_groups=2),
                  Config("gemv", block_n=4, split_k=2, half2=True, blocks_per_step=4, x_once=True)):
            y = run_config(x, kw, c)
            err = float((y.float() - ref).norm() / ref.norm())
            assert y.dtype == torch.bfloat16 and err < 8e-3, (bits, n, k, g, c, err)
        if n % 2 == 0:  # the gated-MLP epilogue on the bf16x2 walk (8+ outputs: with 3, one draw in
            # six had a product near cancellation, and its relative error reached 8e-2 before any change)
            gref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2]
            gy = run_config(x, kw, Config("gemv", block_n=8, split_k=2, half2=True, blocks_per_step=2), act=True)
            # silu(gate) * up compounds both rows' errors and rounds to bf16 once more (9e-3 seen)
            assert float((gy.float() - gref).norm() / gref.norm()) < 1.5e-2, (bits, n, k, g)
    print("WORST", worst)
""")



def test_triton_kernels_in_interpreter():
    """The Triton kernels' arithmetic, run by Triton's CPU interpreter (no GPU needed)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    # a guard against a hang, not a timing: the script took 3.5-5.8 min on 2-core CPU machines
    r = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WORST" in r.stdout



_RG4_SCRIPT = textwrap.dedent("""
    import torch
    from quantlrm.quantizer import quantize
    from quantlrm.kernels import layout as L, run_config, Config
    torch.manual_seed(1)
    # row counts that leave 1-3 rows of the last group outside, split-K with and without
    # prefetch, ragged K (one padded block), 2-4 bits, fp16 and the bf16x2 walk, the gated epilogue
    rg4 = (Config("gemv", block_n=2, split_k=3, half2=True, blocks_per_step=2, prefetch=True, x_once=True,
                  row_groups=4),
           Config("gemv", block_n=1, half2=True, blocks_per_step=4, x_once=True, row_groups=4))
    for bits, n, k, g, dt in ((3, 18, 300, 300, torch.float16), (4, 33, 256, 128, torch.float16),
                              (2, 5, 256, 128, torch.float16), (3, 40, 96, 32, torch.bfloat16)):
        q = quantize(torch.randn(n, k), bits, g)
        kw = L.from_codes(q.codes, q.scale, q.zero, bits, g, dt)
        x = torch.randn(1, k).to(dt)
        ref = x.float() @ L.dequantize(kw, torch.float32).t()
        tol = 2e-3 if dt == torch.float16 else 8e-3
        for c in rg4:
            y = run_config(x, kw, c).float()
            assert y.shape == (1, n) and float((y - ref).norm() / ref.norm()) < tol, (bits, n, c)
            if n % 2 == 0:
                gref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2]
                gy = run_config(x, kw, c, act=True).float()
                assert float((gy - gref).norm() / gref.norm()) < 2 * tol, (bits, n, c)
    print("RG4 OK")
""")


def test_four_row_groups_in_interpreter():
    """The half2 GEMV with four rows a thread (row_groups=4), its PTX pair emulated, against
    dequantize-then-matmul (a test of its own: the main interpreter test is already the suite's longest)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _RG4_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RG4 OK" in r.stdout


# ---------------------------------------------------------------- GPU ----------------------------


@cuda
@pytest.mark.parametrize("bits,g,dtype", [(3, 32, torch.float16), (4, 64, torch.float16),
                                          (3, 128, torch.bfloat16), (4, 128, torch.float16),
                                          (3, 128, torch.float16)])
def test_gpu_kernels_match_dequant_matmul(bits, g, dtype):
    """Every candidate configuration (at batch 1 the row-pair x_once tiles among them) and the tuned
    choice; shapes off the tile grid; batch 1..64;
    at batch 1 and group 128 (W3 and W4, fp16 and bf16) also the gated-MLP epilogue of every
    candidate (fewer compiles than at every group size; the epilogue does not see the group)."""
    torch.manual_seed(bits * g)
    tol = 3e-3 if dtype == torch.float16 else 2e-2
    for n, k in ((1000, 1536), (333, 384)):
        q = quantize(torch.randn(n, k, device="cuda"), bits, g)
        kw = L.from_codes(q.codes, q.scale, q.zero, bits, g, dtype)
        for m in (1, 5, 33, 64):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = _ref(x, q, dtype)
            gated = m == 1 and n % 2 == 0 and g == 128  # the gated-MLP epilogue: rows as (gate, up) pairs
            gated_ref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2] if gated else None
            for c in candidates(kw, m, dtype):
                y = run_config(x, kw, c)
                assert torch.isfinite(y).all(), (n, k, m, c)
                assert _relerr(y, ref) < tol, (n, k, m, c, _relerr(y, ref))
                if gated:
                    assert _relerr(run_config(x, kw, c, act=True), gated_ref) < tol, (n, k, c)
            assert _relerr(qmatmul(x, kw), ref) < tol


@cuda
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gpu_bf16x2_gemv_matches_dequant_matmul(bits, monkeypatch):
    """The bf16x2 form of the half2 GEMV (bf16 activations; QUANTLRM_BF16X2=0 turns it off): every half2 tile, shapes
    off the tile grid, plain and with the gated-MLP epilogue, against dequantize-then-matmul."""
    monkeypatch.setenv("QUANTLRM_BF16X2", "1")
    torch.manual_seed(bits)
    for n, k in ((1000, 1536), (334, 384)):
        q = quantize(torch.randn(n, k, device="cuda"), bits, 128)
        kw = L.from_codes(q.codes, q.scale, q.zero, bits, 128, torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = _ref(x, q, torch.bfloat16)
        gated_ref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2]
        cands = [c for c in candidates(kw, 1, torch.bfloat16) if c.half2]
        assert cands
        for c in cands:
            y = run_config(x, kw, c)
            assert y.dtype == torch.bfloat16 and torch.isfinite(y).all(), (n, k, c)
            assert _relerr(y, ref) < 1e-2, (n, k, c, _relerr(y, ref))
            assert _relerr(run_config(x, kw, c, act=True), gated_ref) < 1.5e-2, (n, k, c)


@cuda
def test_gpu_tune_picks_the_fastest_finalist():
    """`tune` re-times the first pass's fastest few and keeps the one with the best median; the
    winner is a candidate that computes the right product."""
    from quantlrm.kernels import tune

    q = quantize(torch.randn(512, 1024, device="cuda"), 3, 128)
    kw = L.from_codes(q.codes, q.scale, q.zero, 3, 128, torch.float16)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    best, first, final = tune(x, kw)
    assert set(first) == set(candidates(kw, 1, torch.float16))
    assert len(final) == 3 and best in final and final[best] == min(final.values())
    assert set(final) <= set(sorted(first, key=first.__getitem__)[:3])
    assert all(0 < v < 10 for v in final.values())  # ms per call of one weight
    assert _relerr(run_config(x, kw, best), _ref(x, q, torch.float16)) < 3e-3


@cuda
def test_gpu_gated_epilogue_is_tuned_apart(monkeypatch):
    """A fused gate/up (act=True) gets its own tuning, timed with the epilogue it runs with, and
    that choice computes silu(gate) * up."""
    import quantlrm.kernels as qk

    seen = []
    real_tune = qk.tune

    def spy(*args, **kwargs):
        seen.append(kwargs.get("act", False))
        return real_tune(*args, **kwargs)

    monkeypatch.setattr(qk, "tune", spy)
    q = quantize(torch.randn(512, 1024, device="cuda"), 3, 128)
    kw = L.from_codes(q.codes, q.scale, q.zero, 3, 128, torch.float16)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    for key in [k for k in qk._TUNED if k[1:4] == (512, 1024, 3)]:
        del qk._TUNED[key]
    qk.choose(x, kw)
    best = qk.choose(x, kw, act=True)
    assert seen == [False, True]  # each timed as it will run
    assert {k[-1] for k in qk._TUNED if k[1:4] == (512, 1024, 3)} == {False, True}
    ref = _ref(x, q, torch.float16)
    gated_ref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2]
    assert _relerr(qmatmul(x, kw, act=True), gated_ref) < 3e-3
    assert _relerr(run_config(x, kw, best, act=True), gated_ref) < 3e-3


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
        # a static cache: transformers compiles the step, and the fused attention runs in it
        gen = {ci: qm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=256, cache_implementation=ci,
                               output_scores=True, return_dict_in_generate=True) for ci in (None, "static")}
        sd, ss = torch.stack(gen[None].scores).float(), torch.stack(gen["static"].scores).float()
        diff = (gen[None].sequences != gen["static"].sequences)[0, ids.shape[1]:].nonzero()
        n = int(diff[0]) if len(diff) else sd.shape[0] - 1
        if len(diff):  # two numeric paths: greedy may part only at a near-tie of the top two tokens
            top2 = sd[n, 0].topk(2).values
            assert float(top2[0] - top2[1]) < 2e-3, (bits, n)
        assert _relerr(ss[:n + 1], sd[:n + 1]) < 1e-2, bits


def test_quantlinear_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) fails on any graph break: the quantized linear must reach
    the compiler as one operator, with the same output as eager."""
    from quantlrm.nn import QuantLinear

    torch.manual_seed(1)
    net = torch.nn.Sequential(QuantLinear.from_linear(torch.nn.Linear(128, 96), 4, 32),
                              torch.nn.GELU(),
                              QuantLinear.from_linear(torch.nn.Linear(96, 40), 3, 32)).float()
    for m in net:
        if isinstance(m, QuantLinear):
            m.scale.data, m.zero.data = m.scale.float(), m.zero.float()
            m.bias.data = m.bias.float()
    x = torch.randn(3, 5, 128)
    want = net(x)
    graphs = []

    def backend(gm, example_inputs):  # records what dynamo hands to the compiler
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(net, fullgraph=True, backend=backend)(x)
    assert got.shape == (3, 5, 40)
    assert _relerr(got, want) < 1e-6
    ops = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.quantlrm.qmatmul.default) == 2, ops
    torch._dynamo.reset()
    assert _relerr(torch.compile(net, fullgraph=True, backend="aot_eager")(x), want) < 1e-6


def test_fused_projections_match_separate_and_compile(tmp_path):
    """q/k/v and gate/up fused into one QuantLinear each: same logits as the separate layers,
    one qmatmul per fused group under torch.compile(fullgraph=True), and a repeated input or
    a different one in between still gives each slice its own columns."""
    pytest.importorskip("quantlrm.export.compressed_tensors")
    from quantlrm.nn import FusedSlice, GatedMLP, build_quantized, fuse_projections

    _export_tiny(tmp_path, 4, 32, model_type="llama")
    qm = build_quantized(tmp_path, "cpu", torch.float32)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        want = qm(ids).logits
        attn = qm.model.layers[0].self_attn
        x = torch.randn(3, qm.config.hidden_size)
        sep = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        assert fuse_projections(qm) == 4  # 2 layers x (qkv, gate/up)
        assert isinstance(attn.k_proj, FusedSlice)
        assert all(isinstance(layer.mlp, GatedMLP) for layer in qm.model.layers)  # silu(gate) * up in the GEMV
        got = qm(ids).logits
        assert _relerr(got, want) < 1e-6
        x2 = torch.randn(3, qm.config.hidden_size)
        q2 = attn.q_proj(x2)
        k1 = attn.k_proj(x)  # another input: recomputed, not the stashed product of x2
        assert torch.equal(k1, sep[1]) and torch.equal(attn.v_proj(x), sep[2])
        assert torch.equal(attn.q_proj(x), sep[0]) and q2.shape == sep[0].shape
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(qm, fullgraph=True, backend=backend)(ids).logits
    torch._dynamo.reset()
    assert _relerr(out, want) < 1e-5
    ops = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.quantlrm.qmatmul.default) == 2 * (1 + 1 + 1 + 1), ops  # qkv, o, gate_up, down


def test_row_groups_other_than_one_two_or_four_are_refused():
    """The half2 GEMV has one, two or four rows a thread (row_groups): any other count would leave
    outputs unwritten, so run_config refuses it before launching."""
    from quantlrm.kernels import Config

    q = quantize(torch.randn(8, 128), 4, 128)
    kw = L.from_codes(q.codes, q.scale, q.zero, 4, 128, torch.float16)
    with pytest.raises(ValueError, match="row_groups"):
        run_config(torch.randn(1, 128).half(), kw, Config("gemv", block_n=4, half2=True, row_groups=3))


def test_smem_gemv_scope_and_clear_refusals():
    """The shared-memory GEMV's scope (W3, group 128, fp16, whole steps) is decided without a device,
    and run_config refuses a call outside it, or off a Hopper GPU, with a message naming why."""
    from quantlrm.kernels import SMEM_GEMV_CONFIGS, Config, smem_gemv

    assert smem_gemv.eligible(3, 128, 128, torch.float16, 112, 16)
    assert not smem_gemv.eligible(3, 128, 128, torch.float16, 86, 16)  # 86 blocks: not whole 16-block steps
    assert not smem_gemv.eligible(4, 128, 128, torch.float16, 32, 8)
    assert not smem_gemv.eligible(3, 64, 64, torch.float16, 32, 8)
    assert not smem_gemv.eligible(3, 128, 128, torch.bfloat16, 32, 8)
    assert all(c.kind == "smem" for c in SMEM_GEMV_CONFIGS)
    q = quantize(torch.randn(64, 2048), 3, 128)
    kw = L.from_codes(q.codes, q.scale, q.zero, 3, 128, torch.float16)
    cfg = Config("smem", block_n=8, blocks_per_step=16, lane_threads=2, num_warps=2, num_stages=2)
    with pytest.raises(ValueError, match="W3 weights of group size 128"):
        run_config(torch.randn(1, 2048), kw, cfg)  # fp32 activations
    if smem_gemv.gluon is not None:  # tile limits are checked before the device
        with pytest.raises(ValueError, match="stages 2 to 8"):
            run_config(torch.randn(1, 2048).half(), kw, replace(cfg, num_stages=9))
        big = replace(cfg, block_n=16, num_warps=8, num_stages=8)  # 8 stages of 128 rows x 16 blocks: 8 x 108 KB
        with pytest.raises(ValueError, match="needs 884736 bytes of shared memory, more than the 232448"):
            run_config(torch.randn(1, 2048).half(), kw, big)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="Hopper-or-later CUDA GPU"):
            run_config(torch.randn(1, 2048).half(), kw, cfg)
        assert all(c.kind != "smem" for c in candidates(kw, 1, torch.float16))


def _compile_smem_gemv(**const):
    """The shared-memory GEMV compiled for sm_90 on the CPU (skips where Triton has no Gluon);
    const: its constexprs, WARPS also the launch's warps."""
    pytest.importorskip("triton")
    from quantlrm.kernels import smem_gemv

    if smem_gemv.gluon is None:
        pytest.skip("this Triton has no Gluon")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {"x_ptr": "*i32", "p_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*fp16",
           "N": "i32", "n_blocks": "i32", "RW": "i32", "stride_s": "i32"}
    src = GluonASTSource(fn=smem_gemv._gemv_smem_kernel, signature=dict(sig, **{k: "constexpr" for k in const}),
                         constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in range(9) if i != 5})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": const["WARPS"]})


def test_smem_gemv_shared_memory_estimate_matches_the_compiler():
    """`smem_bytes`, which refuses tiles past the card's 227 KB before compiling, is what the
    compiler allocates (sm_90, compiled on the CPU), rings of any depth included."""
    from quantlrm.kernels import smem_gemv

    for u, rpt, warps, stages, jt in ((16, 8, 2, 2, 2), (8, 4, 4, 3, 4), (16, 8, 8, 3, 2)):
        shared = _compile_smem_gemv(U=u, RPT=rpt, WARPS=warps, STAGES=stages, JT=jt, ACT=False, PDL=1).metadata.shared
        assert shared == smem_gemv.smem_bytes(rpt, u, jt, warps, stages), (u, rpt, warps, stages, jt)


def test_smem_gemv_reads_activations_only_after_the_pdl_wait():
    """Under PDL the kernel may start while the one before it still writes the activations: in the
    kernel's TTGIR for sm_90 (compiled on the CPU; structured, so text order is program order)
    every activation read comes after the wait and the first steps' weight copies before it;
    without PDL there is no wait. The activations are plain loads by default (XREG), with each
    early step's weights in a copy group of its own, or `.ca` copies in the older form."""
    for pdl, xreg in itertools.product((0, 1), (True, False)):
        kernel = _compile_smem_gemv(U=16, RPT=8, WARPS=2, STAGES=3, JT=2, ACT=True, PDL=pdl, XREG=xreg)
        lines = kernel.asm["ttgir"].splitlines()
        waits = [i for i, ln in enumerate(lines) if "griddepcontrol.wait" in ln]
        copies = [i for i, ln in enumerate(lines) if "async_copy_global_to_local" in ln]
        commits = [i for i, ln in enumerate(lines) if "async_commit_group" in ln]
        if xreg:
            acts = [i for i, ln in enumerate(lines) if "tt.load" in ln]
            assert not [i for i in copies if "cacheModifier = ca" in lines[i]]
        else:
            acts = [i for i, ln in enumerate(lines) if "async_copy_global_to_local" in ln and "cacheModifier = ca" in ln]
        assert acts and len(copies) > len(acts) and len(copies) > 10  # two steps' weights ahead: 5 copies each
        if pdl == 0:
            assert not waits
        else:
            assert len(waits) == 1 and min(acts) > waits[0] and min(copies) < waits[0]
            # XREG: one group a step ahead is closed before the wait; otherwise none is
            assert sum(c < waits[0] for c in commits) == (2 if xreg else 0)


@cuda
def test_gpu_smem_gemv_matches_dequant_matmul(monkeypatch):
    """Every shared-memory GEMV tile (and two deeper rings), plain and with the gated-MLP epilogue, with and without PDL, on
    rows off the tile grid, against dequantize-then-matmul; the tiles are batch-1 candidates for
    such a weight on Hopper. (Group 128 means K is a multiple of the block.)"""
    from quantlrm.kernels import SMEM_GEMV_CONFIGS, smem_gemv, tune

    if not smem_gemv.available(torch.device("cuda")):
        pytest.skip("the shared-memory GEMV needs Gluon and a Hopper-or-later GPU")
    torch.manual_seed(3)
    for n, k in ((1000, 2048), (334, 4096)):
        q = quantize(torch.randn(n, k, device="cuda"), 3, 128)
        kw = L.from_codes(q.codes, q.scale, q.zero, 3, 128, torch.float16)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ref = _ref(x, q, torch.float16)
        gated_ref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2]
        assert [c for c in candidates(kw, 1, torch.float16) if c.kind == "smem"] == list(SMEM_GEMV_CONFIGS)
        # and rings deeper than the tuner's: a whole row ahead (3 stages of 8-block steps on
        # K = 2048), and more buffers than steps
        deep = [replace(SMEM_GEMV_CONFIGS[0], blocks_per_step=8, num_stages=st) for st in (3, 8)]
        for pdl in ("1", "0"):
            monkeypatch.setenv("QUANTLRM_PDL", pdl)
            for c in list(SMEM_GEMV_CONFIGS) + deep:
                y = run_config(x, kw, c)
                assert y.shape == (1, n) and _relerr(y, ref) < 3e-3, (n, k, c, pdl, _relerr(y, ref))
                assert _relerr(run_config(x, kw, c, act=True), gated_ref) < 3e-3, (n, k, c, pdl)
    _, first, _ = tune(x, kw, act=True)  # not a candidate for the fused gate/up (see SMEM_GEMV_CONFIGS)
    assert first and all(c.kind != "smem" for c in first)

"""The rows-in-lanes GEMV prototype (benchmarks/gemv_rows_in_lanes.py) in Triton's CPU
interpreter, its PTX pair emulated: column-major and row-tiled words, split-K, ragged shapes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "benchmarks")
    from gemv_rows_in_lanes import col_major, row_tiled, run_rows_in_lanes
    from quantlrm.kernels import Config, reference_matmul
    from quantlrm.kernels.layout import from_codes
    from quantlrm.quantizer import quantize
    torch.manual_seed(0)
    for bits, n, k, g, bn, sk, tiled in ((4, 64, 256, 128, 32, 1, False), (4, 64, 384, 128, 32, 2, True),
                                         (4, 48, 200, 40, 32, 3, False), (2, 32, 256, 64, 32, 2, True),
                                         (2, 40, 250, 50, 16, 2, False)):
        q = quantize(torch.randn(n, k), bits, g)
        kw = from_codes(q.codes, q.scale, q.zero.float(), bits, g, torch.float16)
        x = torch.randn(1, k, dtype=torch.float16)
        ref = reference_matmul(x, kw).float()
        w = row_tiled(kw, bn) if tiled else col_major(kw)
        y = run_rows_in_lanes(x, w, Config("gemv_t", block_n=bn, split_k=sk)).float()
        err = float((y - ref).norm() / ref.norm())
        assert err < 2e-3, (bits, n, k, g, tiled, err)
    q = quantize(torch.randn(8, 256), 3, 128)
    try:  # the prototype reads the first W3 layout only
        run_rows_in_lanes(torch.randn(1, 256, dtype=torch.float16),
                          col_major(from_codes(q.codes, q.scale, q.zero.float(), 3, 128, torch.float16)),
                          Config("gemv_t", block_n=32))
    except ValueError as e:
        assert "first W3 layout" in str(e)
    else:
        raise AssertionError("W3 ran on the rows-in-lanes prototype")
    print("OK")
""")


def test_rows_in_lanes_prototype_in_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root / "src"))
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]

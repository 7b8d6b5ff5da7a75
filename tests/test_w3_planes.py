"""The 3.0-bit W3 layout prototype (benchmarks/w3_planes.py): its packer round-trips, and its
GEMV (PTX emulated in Triton's interpreter) equals dequantize-then-matmul."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "w3_planes.py"


def test_w3_planes_prototype_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(SCRIPT), "--cpu-check"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "packer round trip ok" in r.stdout
    assert r.stdout.count("rel. error") == 3

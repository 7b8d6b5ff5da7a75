"""Fake-quant output: dequantized weights in the original dtype, loadable by anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantlrm.checkpoint import ShardedWriter
from quantlrm.export import register
from quantlrm.quantizer import QuantResult


@register("fake", bits=(2, 3, 4, 8))
class FakeQuantWriter:
    def __init__(self, out_dir: Path, bits: int, group_size: int, max_shard_bytes: int = 4 << 30):
        self.out_dir = Path(out_dir)
        self.shards = ShardedWriter(self.out_dir, max_shard_bytes)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.add(name, tensor)

    def add_linear(self, name: str, q: QuantResult, dtype: torch.dtype) -> None:
        self.shards.add(f"{name}.weight", q.dequant(dtype))

    def close(self, config: dict) -> None:
        self.shards.close()
        cfg = {k: v for k, v in config.items() if k != "quantization_config"}
        (self.out_dir / "config.json").write_text(json.dumps(cfg, indent=2))

"""compressed-tensors `pack-quantized`: 2-8 bit group-wise asymmetric weights (vLLM, transformers).

Per quantized linear (layout of compressed-tensors 0.20.0, checked in
tests/test_export_packed.py against the library's own ModelCompressor output):
  weight_packed      int32 [out, ceil(in*bits/32)]   codes packed densely along `in`, LSB first
  weight_scale       model dtype [out, in/g]      (group -1: strategy "channel", [out, 1])
  weight_zero_point  int32 [ceil(out*bits/32), in/g] zero points packed densely along `out`
  weight_shape       int64 [2] = (out, in)
The library thinks in signed integers (q - 2^(bits-1)) and adds 2^(bits-1) back before
packing, so the stored bit patterns are our unsigned codes and zero points unchanged.

Loading: `from_pretrained(dir, quantization_config=CompressedTensorsConfig(dequantize=True))`
decompresses with the library's code. Plain `from_pretrained(dir)` (transformers 5.24) fails on
asymmetric group checkpoints, including ones compressed-tensors itself writes: it allocates
`weight_zero_point` unpacked [out, in/g] and refuses the packed tensor. vLLM serves 4 and 8 bits
of this format (its WNA16 scheme); 2 and 3 bits load in transformers only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantlrm.export import register
from quantlrm.export.packing import PackedWriter, pack_dense
from quantlrm.quantizer import QuantResult

# The compressed-tensors release this layout and config were verified against.
VERIFIED_VERSION = "0.20.0"


@register("compressed-tensors", bits=(2, 3, 4, 8))
class CompressedTensorsWriter(PackedWriter):
    format_name = "compressed-tensors"

    def __init__(self, out_dir: Path, bits: int, group_size: int, max_shard_bytes: int = 4 << 30):
        super().__init__(out_dir, bits, group_size, max_shard_bytes)

    def pack(self, name: str, q: QuantResult, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out, inp = q.codes.shape
        scale_dtype = dtype if dtype.is_floating_point else torch.float16
        return {
            "weight_packed": pack_dense(q.codes, self.bits, dim=1),  # [out, ceil(in*b/32)]
            "weight_scale": q.scale.to(scale_dtype),  # [out, in/g]
            "weight_zero_point": pack_dense(q.zero, self.bits, dim=0),  # [ceil(out*b/32), in/g]
            "weight_shape": torch.tensor([out, inp], dtype=torch.int64),
        }

    def quantization_config(self) -> dict:
        per_channel = self.group_size == -1  # same tensors, scale/zero [out, 1]
        weights = {
            "dynamic": False,
            "group_size": None if per_channel else self.effective_group_size(),
            "num_bits": self.bits,
            "strategy": "channel" if per_channel else "group",
            "symmetric": False,
            "type": "int",
        }
        return {
            "config_groups": {
                "group_0": {
                    "format": "pack-quantized",
                    "input_activations": None,
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": weights,
                }
            },
            "format": "pack-quantized",
            "global_compression_ratio": None,
            "ignore": ["lm_head", *self.unquantized_linears()],
            "kv_cache_scheme": None,
            "moe_sparsity_config": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": VERIFIED_VERSION,
        }

"""AWQ GEMM (4-bit only): the layout vLLM's and transformers' `awq` method read.

Per quantized linear (AutoAWQ's GEMM layout):
  qweight  int32 [in, out/8]    8 codes of consecutive output channels per word
  qzeros   int32 [in/g, out/8]  zero points, same packing
  scales   fp16  [in/g, out]
Within a word, nibble i (bits 4i..4i+3) holds output channel 8k + ORDER[i] with
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]; zero points are unsigned 0..15, stored without offset.
The loaded weight is (code - zero) * scale in fp16: `packing.stored_dequant(q, torch.float16)`.
compressed-tensors' AutoAWQConverter (which turns AWQ checkpoints into pack-quantized ones)
reads this layout back; tests/test_export_packed.py checks against it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantlrm.errors import QuantLRMError
from quantlrm.export import register
from quantlrm.export.packing import PackedWriter, check_fp16_scales, pack_dense, require_divisible
from quantlrm.quantizer import QuantResult

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[rows, out] unsigned 4-bit values -> int32 [rows, out/8] in AWQ's interleaved order.

    Word k's nibble i holds column 8k + AWQ_ORDER[i]: dense LSB-first packing of the columns
    permuted within each run of 8.
    """
    rows, cols = values.shape
    v = values.reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]  # [rows, out/8, 8]
    return pack_dense(v.reshape(rows, cols), 4, dim=1)


@register("awq", bits=(4,))
class AWQWriter(PackedWriter):
    format_name = "awq"

    def __init__(self, out_dir: Path, bits: int, group_size: int, max_shard_bytes: int = 4 << 30):
        super().__init__(out_dir, bits, group_size, max_shard_bytes)

    def pack(self, name: str, q: QuantResult, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out, _ = q.codes.shape
        if self.group_size == -1:
            raise QuantLRMError(
                "AWQ GEMM kernels need a group size; per-channel (-1) quantization cannot be stored.",
                "use --group-size 128 (or 64/32), or --format gptq / compressed-tensors for per-channel.",
            )
        require_divisible(name, "output width", out, 8, "AWQ GEMM", self.bits)
        check_fp16_scales(name, q.scale)
        return {
            "qweight": pack_awq(q.codes.t()),  # codes^T [in, out] -> [in, out/8]
            "qzeros": pack_awq(q.zero.t()),  # [in/g, out] -> [in/g, out/8]
            "scales": q.scale.t().to(torch.float16).contiguous(),  # [in/g, out]
        }

    def quantization_config(self) -> dict:
        skip = self.unquantized_linears()
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": self.effective_group_size(),
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": skip or None,
        }

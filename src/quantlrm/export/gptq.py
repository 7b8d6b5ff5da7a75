"""GPTQ (2/3/4/8 bit, asymmetric, no act-order): the layout vLLM's `gptq` method reads.

Per quantized linear:
  qweight  int32 [in*bits/32, out]   codes packed densely along `in`, LSB first; at 3 bits
                                     32 codes fill 3 words and codes 10 and 21 straddle words
  qzeros   int32 [in/g, out*bits/32] zero points packed densely along `out`
  scales   fp16  [in/g, out]
  g_idx    int32 [in]                group of each input channel (i // g: no act-order)

Zero points, "v1" vs "v2": the GPTQ v1 checkpoint format stores zero-1 and every v1 kernel adds
the 1 back, so a zero point of 0 cannot be stored (it wraps to 2^bits-1 and is read as 2^bits).
QuantLRM's asymmetric quantizer gives zero = 0 whenever a group's minimum is above -scale/2,
which happens in groups dominated by one large positive weight. So `--format gptq` writes the
v2 format (zero stored as is, `"checkpoint_format": "gptq_v2"`), which vLLM's gptq kernel reads
since vllm-project/vllm#26092 (merged Oct 2025: `gptq_gemm(..., use_v2_format)` picks the zero
offset from `checkpoint_format`; asymmetric checkpoints never take the Marlin path, which wants
symmetric 4/8 bit). Older vLLM releases read every GPTQ checkpoint as v1 and would be off by
one code: use `--format gptq-v1` for them; it writes zero-1 and refuses a model in which some
group has zero point 0 (naming the layer).

The loaded weight is (code - zero) * scale in fp16: `packing.stored_dequant(q, torch.float16)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantlrm.errors import QuantLRMError
from quantlrm.export import register
from quantlrm.export.packing import PackedWriter, check_fp16_scales, pack_dense, require_divisible
from quantlrm.quantizer import QuantResult


class GPTQWriter(PackedWriter):
    format_name = "gptq"
    checkpoint_format = "gptq_v2"

    def __init__(self, out_dir: Path, bits: int, group_size: int, max_shard_bytes: int = 4 << 30):
        super().__init__(out_dir, bits, group_size, max_shard_bytes)

    def stored_zero(self, name: str, zero: torch.Tensor) -> torch.Tensor:
        return zero

    def pack(self, name: str, q: QuantResult, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out, inp = q.codes.shape
        # Whole int32 words on both packed dims (at 3 bits: 32 values per 3 words).
        per_words = 32 if self.bits == 3 else 32 // self.bits
        require_divisible(name, "input width", inp, per_words, "GPTQ", self.bits)
        require_divisible(name, "output width", out, per_words, "GPTQ", self.bits)
        check_fp16_scales(name, q.scale)
        return {
            "qweight": pack_dense(q.codes.t(), self.bits, dim=0),  # [in, out] -> [in*b/32, out]
            "qzeros": pack_dense(self.stored_zero(name, q.zero).t(), self.bits, dim=1),  # [in/g, out*b/32]
            "scales": q.scale.t().to(torch.float16).contiguous(),  # [in/g, out]
            "g_idx": torch.arange(inp, dtype=torch.int32) // q.group_size,  # [in]
        }

    def quantization_config(self) -> dict:
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.effective_group_size(),
            "desc_act": False,
            "sym": False,
            "lm_head": False,
            "static_groups": False,
            "true_sequential": True,
            "checkpoint_format": self.checkpoint_format,  # read by vLLM
            "format": self.checkpoint_format,  # read by transformers' GPTQConfig
            "modules_in_block_to_quantize": None,
            "modules_to_not_convert": self.unquantized_linears() or None,
        }

    def close(self, config: dict) -> None:
        super().close(config)
        # Older GPTQ loaders (AutoGPTQ, early vLLM) read the same settings from this file.
        (self.out_dir / "quantize_config.json").write_text(
            json.dumps(self.quantization_config(), indent=2, sort_keys=True)
        )


class GPTQv1Writer(GPTQWriter):
    format_name = "gptq-v1"
    checkpoint_format = "gptq"

    def stored_zero(self, name: str, zero: torch.Tensor) -> torch.Tensor:
        n0 = int((zero == 0).sum())
        if n0:
            raise QuantLRMError(
                f"{name}: {n0} group(s) have zero point 0, which the GPTQ v1 format cannot store "
                "(it stores zero-1).",
                "export with --format gptq (v2 zero points; vLLM since Oct 2025) "
                "or --format compressed-tensors.",
            )
        return zero - 1


register("gptq", bits=(2, 3, 4, 8))(GPTQWriter)
register("gptq-v1", bits=(2, 3, 4, 8))(GPTQv1Writer)

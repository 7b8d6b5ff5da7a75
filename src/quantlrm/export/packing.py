"""Bit packing and the streaming writer shared by the packed formats.

Every packed format stores the quantizer's own integer codes and zero points
(`QuantResult.codes/zero`, unsigned 0 .. 2^bits-1), never re-quantized weights, and a
scale rounded to the format's scale dtype. The weight a loader reconstructs is therefore
exactly `stored_dequant(q, scale_dtype)`: (codes - zero) * scale.to(scale_dtype). When the
scale dtype is the model dtype (compressed-tensors), that equals the fake-quant weight
`q.dequant(dtype)` bit for bit for fp32 models; for 16-bit models the fake path multiplies by
the fp32 scale, so the two differ by the rounding of the scale (at most
|codes - zero| * |scale - scale.to(dtype)|, then one rounding of the product).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from quantlrm.checkpoint import INDEX_NAME, ShardedWriter
from quantlrm.errors import QuantLRMError
from quantlrm.quantizer import QuantResult


def pack_dense(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned `bits`-bit integers densely into int32 words along `dim`, LSB first.

    Element j of a row occupies global bits [j*bits, (j+1)*bits) of the row's bit stream,
    word k holds bits [32k, 32k+32); a value may straddle two words (3-bit). This is the
    layout of compressed-tensors' `pack_to_int32` (before its signed offset) and of GPTQ's
    qweight/qzeros for 2, 3, 4 and 8 bits. The packed dim gets ceil(n*bits/32) words.
    """
    v = values.movedim(dim, -1)  # [..., n]
    if int(v.min()) < 0 or int(v.max()) >= 1 << bits:
        raise ValueError(f"values out of range for {bits}-bit packing")
    if v.dim() == 2 and v.numel() > _CHUNK:  # bound the int32/int64 temporaries of huge weights
        step = max(1, _CHUNK // v.shape[1])
        out = torch.cat([_pack_last(v[i : i + step], bits) for i in range(0, v.shape[0], step)])
    else:
        out = _pack_last(v, bits)
    return out.movedim(-1, dim).contiguous()


_CHUNK = 1 << 24  # values packed at a time


def _pack_last(v: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_dense along the last dim (values already checked)."""
    lead, n = v.shape[:-1], v.shape[-1]
    n_words = -(-n * bits // 32)
    n_pad = -(-n // 32) * 32  # 32 values fill exactly `bits` words
    if n_pad > n:
        v = torch.cat([v, v.new_zeros(*lead, n_pad - n)], -1)
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole values per byte, built in uint8 directly
        per = 8 // bits
        byts = v.to(torch.uint8).reshape(*lead, n_pad // per, per) << (torch.arange(per, dtype=torch.uint8) * bits)
        byts = byts.sum(-1, dtype=torch.uint8)  # [..., n_pad/per]
    else:
        # 8 values fill exactly `bits` bytes: build each 8*bits-bit field, then cut it into bytes
        acc = torch.int32 if bits <= 3 else torch.int64
        x = v.reshape(*lead, n_pad // 8, 8).to(acc) << (torch.arange(8, dtype=acc) * bits)
        x = x.sum(-1, dtype=acc)  # [..., n_pad/8]; fields do not overlap, so sum == or
        byts = torch.stack([(x >> (8 * i)) & 0xFF for i in range(bits)], -1).to(torch.uint8)
    byts = byts.reshape(*lead, n_pad * bits // 32, 4)  # [..., words, 4 bytes], LSB byte first
    if sys.byteorder == "big":
        byts = byts.flip(-1)
    return byts.contiguous().view(torch.int32).squeeze(-1)[..., :n_words]  # [..., n_words]


def stored_dequant(q: QuantResult, scale_dtype: torch.dtype) -> torch.Tensor:
    """The weight [out, in] a loader rebuilds from a packed export with scales in `scale_dtype`.

    Returned in fp32. For a 16-bit `scale_dtype` the fp32 product is exact (a <=9-bit integer
    times a <=11-bit mantissa), so casting it to `scale_dtype` gives what a kernel multiplying
    in that dtype gives; for fp32 scales it is the fake-quant weight `q.dequant(float32)`.
    """
    return QuantResult(
        codes=q.codes,
        scale=q.scale.to(scale_dtype).to(torch.float32),
        zero=q.zero,
        bits=q.bits,
        group_size=q.group_size,
    ).dequant(torch.float32)


def check_fp16_scales(name: str, scale: torch.Tensor) -> None:
    """AWQ and GPTQ store fp16 scales; refuse a scale fp16 cannot hold rather than write inf."""
    if bool((scale.abs() > torch.finfo(torch.float16).max).any()):
        raise QuantLRMError(
            f"{name}: a quantization scale exceeds the fp16 range that AWQ/GPTQ scales use.",
            "export this model with --format compressed-tensors (scales in the model dtype).",
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} TiB"


class PackedWriter:
    """Streams tensors into safetensors shards; subclasses turn a QuantResult into tensors.

    Keeps only the current shard in memory (ShardedWriter), counts the bytes written and
    the bytes a 16-bit checkpoint of the same tensors would take, and writes config.json
    with the format's `quantization_config` at `close`.
    """

    format_name = "packed"

    def __init__(self, out_dir: Path, bits: int, group_size: int, max_shard_bytes: int = 4 << 30):
        self.out_dir = Path(out_dir)
        self.bits = bits
        self.group_size = group_size  # as asked; -1 (per channel) resolves per layer
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards = ShardedWriter(self.out_dir, max_shard_bytes)
        self.bytes_16bit = 0
        self.quantized: list[str] = []  # module names, in arrival order
        self._plain_2d: list[str] = []  # 2-D `.weight` tensors kept as they are
        self._resolved_group: int | None = None
        self._names: list[str] = []
        self.summary: str = ""

    # -- Writer protocol -------------------------------------------------------------
    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.add(name, tensor)
        self._names.append(name)
        self.bytes_16bit += tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())
        if tensor.dim() == 2 and name.endswith(".weight"):
            self._plain_2d.append(name[: -len(".weight")])

    def add_linear(self, name: str, q: QuantResult, dtype: torch.dtype) -> None:
        if q.bits != self.bits:
            raise QuantLRMError(
                f"{name} was quantized to {q.bits} bits but this {self.format_name} export is {self.bits}-bit.",
                "quantize and export with the same --bits.",
            )
        if self.group_size == -1:
            pass  # per output channel: each layer's group is its own input width
        elif self._resolved_group is None:
            self._resolved_group = q.group_size
        elif q.group_size != self._resolved_group:
            raise QuantLRMError(
                f"{name} has group size {q.group_size}, other layers {self._resolved_group}; "
                f"{self.format_name} stores one group size per model.",
                "use a group size that divides every layer's input width (e.g. 128) instead of -1, "
                "or export with --format fake.",
            )
        for key, t in self.pack(name, q, dtype).items():
            self.shards.add(f"{name}.{key}", t)
            self._names.append(f"{name}.{key}")
        self.bytes_16bit += q.codes.numel() * 2
        self.quantized.append(name)

    def close(self, config: dict) -> None:
        self.shards.close()
        index = self.out_dir / INDEX_NAME
        if not index.exists():
            # Always ship an index: vLLM loads every *.safetensors in the directory unless an
            # index names the shards, and a run directory also holds search.safetensors.
            weight_map = {n: "model.safetensors" for n in sorted(self._names)}
            index.write_text(
                json.dumps({"metadata": {"total_size": self.shards.total_bytes}, "weight_map": weight_map}, indent=2)
            )
        cfg = {k: v for k, v in config.items() if k != "quantization_config"}
        cfg["quantization_config"] = self.quantization_config()
        (self.out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        packed = self.shards.total_bytes
        ratio = packed / self.bytes_16bit if self.bytes_16bit else float("nan")
        self.summary = (
            f"{self.format_name} W{self.bits} g{self.effective_group_size()}: "
            f"{human_bytes(packed)} written vs {human_bytes(self.bytes_16bit)} at 16 bit "
            f"({ratio:.1%}; {len(self.quantized)} linears packed)"
        )
        print(self.summary)

    # -- for subclasses --------------------------------------------------------------
    def effective_group_size(self) -> int:
        """The group size for the config: -1 for per-channel, else the layers' (resolved) one."""
        return self._resolved_group if self._resolved_group is not None else self.group_size

    def unquantized_linears(self) -> list[str]:
        """2-D weights passed through whose module name looks like a quantized linear's
        (same last component, e.g. an `o_proj` left in 16 bit): loaders must skip them."""
        shorts = {n.rsplit(".", 1)[-1] for n in self.quantized}
        return [m for m in self._plain_2d if m.rsplit(".", 1)[-1] in shorts]

    def pack(self, name: str, q: QuantResult, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quantization_config(self) -> dict:
        raise NotImplementedError


def require_divisible(name: str, what: str, size: int, multiple: int, fmt: str, bits: int) -> None:
    if size % multiple:
        raise QuantLRMError(
            f"{name}: {what} {size} is not a multiple of {multiple}, which {fmt} needs at {bits} bits.",
            "export this model with --format compressed-tensors or --format fake.",
        )

"""`QuantLinear` and `load_quantized`: run a compressed-tensors pack-quantized export on our kernels.

`load_quantized(path)` builds the transformers model from the checkpoint's config on the meta
device, puts a `QuantLinear` wherever the checkpoint holds `<linear>.weight_packed`, and loads
every other tensor as stored. The packed weights are re-laid out once for the kernels
(`quantlrm.kernels.layout`); nothing is ever materialised at 16 bits, so an 8B W3 model needs
about 3.5 GB of weights plus the unquantized embeddings and lm_head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantlrm.errors import QuantLRMError
from quantlrm.kernels import KernelWeight, qmatmul, qmatmul_op
from quantlrm.kernels import layout as L
from quantlrm.quantizer import QuantResult, quantize


class QuantLinear(nn.Module):
    """A linear layer with group-wise asymmetric low-bit weights; y = x @ dequant(W)^T + b.

    On CUDA the product runs on the Triton kernels; on CPU it falls back to the torch
    reference (dequantize, then matmul), which is correct but slow.
    """

    def __init__(self, kw: KernelWeight, bias: torch.Tensor | None = None, act: bool = False):
        super().__init__()
        if act and bias is not None:
            raise QuantLRMError("a gated QuantLinear (act=True) takes no bias.", "fuse only bias-free gate/up.")
        self.act = act  # rows interleave (gate, up): the output is silu(gate) * up, half as wide
        self.in_features = kw.in_features
        self.out_features = kw.out_features
        self.bits = kw.bits
        self.group_size = kw.group_size
        self.register_buffer("packed", kw.packed)
        self.register_buffer("scale", kw.scale)
        self.register_buffer("zero", kw.zero)
        self.bias = nn.Parameter(bias.to(kw.scale.dtype), requires_grad=False) if bias is not None else None

    @property
    def weight_layout(self) -> KernelWeight:
        return KernelWeight(self.packed, self.scale, self.zero, self.bits, self.group_size,
                            self.in_features, self.out_features)

    @classmethod
    def from_quant_result(cls, q: QuantResult, bias: torch.Tensor | None = None,
                          dtype: torch.dtype = torch.float16) -> QuantLinear:
        """From the quantizer's codes; the scale is rounded to `dtype` as the export does."""
        return cls(L.from_codes(q.codes, q.scale, q.zero, q.bits, q.group_size, dtype), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128) -> QuantLinear:
        """Round-to-nearest quantization of a dense linear (benchmarks, tests)."""
        q = quantize(linear.weight.data, bits, group_size)
        return cls.from_quant_result(q, linear.bias.data if linear.bias is not None else None,
                                     linear.weight.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return L.dequantize(self.weight_layout, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype)
        if torch.compiler.is_compiling():  # one opaque op for torch.compile (no graph break)
            y = qmatmul_op(x, self.packed, self.scale, self.zero, self.bits, self.group_size,
                           self.in_features, self.out_features, self.act)
        else:
            y = qmatmul(x, self.weight_layout, act=self.act)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
                + (", act=silu(gate)*up" if self.act else ""))


class FusedSlice(nn.Module):
    """One of several projections of the same input (q/k/v, gate/up) served by one launch.

    The first slice called computes the concatenated product and keeps it until every slice
    has taken its columns from the same input tensor; at batch 1 that turns three latency-
    bound GEMVs into one. A call with another input recomputes, so any call order is correct.
    """

    def __init__(self, fused: QuantLinear, index: int, start: int, stop: int, n: int):
        super().__init__()
        self.in_features, self.out_features = fused.in_features, stop - start
        self.index, self.start, self.stop, self.n = index, start, stop, n
        self.__dict__["fused"] = fused  # shared, not a child: its buffers are owned by the layer
        fused._stash = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fused
        st = f._stash
        if st is None or st[0] is not x or self.index in st[2]:
            st = (x, f(x), set())
        st[2].add(self.index)
        f._stash = None if len(st[2]) == self.n else st  # the last consumer releases it
        return st[1][..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of a fused {self.fused.extra_repr()}"


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up as one QuantLinear whose rows interleave
    (gate_i, up_i): the GEMV applies silu(gate) * up as it stores its outputs, so the gated
    MLP takes two launches instead of three, and the [.., 2I] product is never written."""

    def __init__(self, gate_up: QuantLinear, down: nn.Module):
        super().__init__()
        if not gate_up.act:
            raise QuantLRMError("GatedMLP needs a QuantLinear built with act=True.", "see _fuse_gated_mlp.")
        self.gate_up = gate_up
        self.down_proj = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up(x))


def _fusable(mods: list[nn.Module]) -> bool:
    """QuantLinears that can share one launch: same bits, group size, input size, dtype, bias-ness."""
    if not all(isinstance(m, QuantLinear) for m in mods):
        return False
    return len({(m.bits, m.group_size, m.in_features, m.scale.dtype, m.bias is None) for m in mods}) == 1


def _fuse_gated_mlp(model: nn.Module, arch, layer: int) -> bool:
    """Replace a layer's gated SiLU MLP by a `GatedMLP`; False where it does not apply."""
    gate_s, up_s, down_s = arch.gated_mlp
    gate_n, up_n = arch.linear_path(layer, gate_s), arch.linear_path(layer, up_s)
    mlp_n, _, _ = gate_n.rpartition(".")
    if up_n.rpartition(".")[0] != mlp_n or arch.linear_path(layer, down_s).rpartition(".")[0] != mlp_n:
        return False
    mlp = model.get_submodule(mlp_n)
    gate, up = model.get_submodule(gate_n), model.get_submodule(up_n)
    act = getattr(mlp, "act_fn", None)
    if act is None or type(act).__name__ not in ("SiLU", "SiLUActivation") or not _fusable([gate, up]):
        return False
    if gate.bias is not None or gate.out_features != up.out_features:
        return False

    def weave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # rows g0, u0, g1, u1, ...
        return torch.stack((a, b), dim=1).flatten(0, 1)

    kw = KernelWeight(weave(gate.packed, up.packed), weave(gate.scale, up.scale), weave(gate.zero, up.zero),
                      gate.bits, gate.group_size, gate.in_features, 2 * gate.out_features)
    _set_module(model, mlp_n, GatedMLP(QuantLinear(kw, act=True), model.get_submodule(arch.linear_path(layer, down_s))))
    return True


def fuse_projections(model: nn.Module, gated: bool = True) -> int:
    """Concatenate the packed weights of linears that read the same input (architecture
    table: `Arch.shared_inputs`) into one QuantLinear per layer and group; with `gated`, a
    SiLU-gated MLP's gate and up become a `GatedMLP` instead (`Arch.gated_mlp`). Returns how
    many fused linears were made. Skips groups whose members differ in bits, group size or bias."""
    from quantlrm.arch import get_arch, num_layers

    cfg = model.config.to_dict()
    try:
        arch = get_arch(cfg)
    except QuantLRMError:  # a family outside the table still runs, unfused
        return 0
    made = 0
    for layer in range(num_layers(cfg)):
        for shorts in arch.shared_inputs:
            if gated and arch.gated_mlp and tuple(shorts) == arch.gated_mlp[:2] and _fuse_gated_mlp(model, arch, layer):
                made += 1
                continue
            names = [arch.linear_path(layer, s) for s in shorts]
            mods = [model.get_submodule(n) for n in names]
            if not _fusable(mods):
                continue
            kws = [m.weight_layout for m in mods]
            kw = KernelWeight(torch.cat([k.packed for k in kws]), torch.cat([k.scale for k in kws]),
                              torch.cat([k.zero for k in kws]), kws[0].bits, kws[0].group_size,
                              kws[0].in_features, sum(k.out_features for k in kws))
            bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
            fused = QuantLinear(kw, bias)
            layer_mod = model.get_submodule(arch.layer_prefix(layer).rstrip("."))
            layer_mod.add_module(f"fused_{'_'.join(shorts)}", fused)
            start = 0
            for i, (n, k) in enumerate(zip(names, kws, strict=True)):
                _set_module(model, n, FusedSlice(fused, i, start, start + k.out_features, len(kws)))
                start += k.out_features
            made += 1
    return made


def _quant_args(qcfg: dict) -> tuple[int, int | None]:
    """(bits, group_size) of a pack-quantized config; one weight scheme per model."""
    if qcfg.get("quant_method") != "compressed-tensors":
        raise QuantLRMError(
            f"quantization_config.quant_method is {qcfg.get('quant_method')!r}, not 'compressed-tensors'.",
            "export with --format compressed-tensors to run on QuantLRM's kernels.",
        )
    groups = qcfg.get("config_groups") or {}
    schemes = {json.dumps(g.get("weights"), sort_keys=True) for g in groups.values() if g.get("weights")}
    fmts = {g.get("format", qcfg.get("format")) for g in groups.values()}
    if fmts - {"pack-quantized", None} or qcfg.get("format") not in ("pack-quantized", None):
        raise QuantLRMError(
            f"compressed-tensors format {qcfg.get('format')!r} is not pack-quantized.",
            "export with --format compressed-tensors (pack-quantized) for these kernels.",
        )
    if len(schemes) != 1:
        raise QuantLRMError(
            f"expected one weight scheme in quantization_config.config_groups, found {len(schemes)}.",
            "export the model with one bit width and group size.",
        )
    w = json.loads(schemes.pop())
    if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
        raise QuantLRMError(
            f"weight scheme {w} is not integer group/channel quantization.",
            "use a quantlrm compressed-tensors export.",
        )
    return int(w["num_bits"]), (int(w["group_size"]) if w.get("group_size") else None)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_quantized(path: str | Path, device: str | torch.device = "cuda", dtype: torch.dtype | None = None,
                   attn_implementation: str = "quantlrm", fuse: bool = True) -> nn.Module:
    """Load a quantlrm compressed-tensors export with QuantLinear layers, ready to `generate`.

    `dtype` is the activation dtype (default: the checkpoint's torch_dtype, fp16 if unset).
    `fuse`: one launch for q/k/v and one for gate/up with SiLU applied (`fuse_projections`).
    `attn_implementation`: "quantlrm" (default) decodes single tokens with our one-launch
    attention kernel (with a static cache also RoPE and the cache write) and leaves everything
    else to SDPA (`quantlrm.attention`); any name transformers knows works too.
    Packed models run on a CUDA GPU; on a CPU-only machine this raises QuantLRMError.
    For batch-1 greedy decoding at the kernels' speed use `quantlrm.generate(model, ids)`:
    `model.generate` works too, but adds host work per token (BENCHMARKS.md, Kernels).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise QuantLRMError(
            "running a packed quantized model needs a CUDA GPU"
            + (" and none is visible here." if not torch.cuda.is_available() else f", not {device}."),
            "run on a machine with an NVIDIA GPU, or evaluate the fake-quant export (--format fake) on CPU.",
        )
    model = build_quantized(path, device, dtype, attn_implementation)
    if fuse:
        fuse_projections(model)
    if attn_implementation == "quantlrm":
        from quantlrm.attention import fuse_decode_attention

        fuse_decode_attention(model)
    return model


def build_quantized(path: str | Path, device: str | torch.device, dtype: torch.dtype | None = None,
                    attn_implementation: str = "sdpa") -> nn.Module:
    """`load_quantized` without the GPU check: on CPU the QuantLinears use the slow torch
    reference (tests check the loading logic this way)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantlrm.checkpoint import Checkpoint

    device = torch.device(device)
    ckpt = Checkpoint(path)
    qcfg = ckpt.config.get("quantization_config")
    if not qcfg:
        raise QuantLRMError(f"{path} has no quantization_config in config.json.",
                            "load an unquantized model with transformers' from_pretrained.")
    bits, group_size = _quant_args(qcfg)
    if bits not in L.KERNEL_BITS:
        raise QuantLRMError(f"{bits}-bit weights have no kernel.", f"export with --bits in {L.KERNEL_BITS}.")
    cfg_dict = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg_dict)
    if dtype is None:
        name = cfg_dict.get("torch_dtype") or cfg_dict.get("dtype") or "float16"
        dtype = getattr(torch, name) if name in ("float16", "bfloat16") else torch.float16
    if attn_implementation == "quantlrm":
        from quantlrm.attention import register

        register()
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    keys = set(ckpt.keys())
    packed = sorted(k[: -len(".weight_packed")] for k in keys if k.endswith(".weight_packed"))
    if not packed:
        raise QuantLRMError(f"{path} holds no '*.weight_packed' tensors.", "export with --format compressed-tensors.")
    from tqdm import tqdm

    for name in tqdm(packed, desc="packed linears", disable=len(packed) < 8):
        try:
            lin = model.get_submodule(name)
        except AttributeError as e:
            raise QuantLRMError(f"checkpoint linear {name} is not a module of {config.model_type}.",
                                "check that config.json belongs to these weights.") from e
        zp = ckpt.get(f"{name}.weight_zero_point").to(device) if f"{name}.weight_zero_point" in keys else None
        kw = L.from_compressed_tensors(
            ckpt.get(f"{name}.weight_packed").to(device), ckpt.get(f"{name}.weight_scale").to(device), zp,
            ckpt.get(f"{name}.weight_shape").tolist(), bits, group_size, dtype,
        )
        bias = ckpt.get(f"{name}.bias").to(device) if f"{name}.bias" in keys else None
        if getattr(lin, "bias", None) is not None and bias is None:
            raise QuantLRMError(f"{name}.bias is missing from the checkpoint.", "re-export the model.")
        _set_module(model, name, QuantLinear(kw, bias))
    # Everything else: load as stored (cast floats to the activation dtype).
    for full, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "meta":
            continue
        mod_name, _, attr = full.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if full in keys:
            v = ckpt.get(full).to(device)
            v = v.to(dtype) if v.is_floating_point() else v
            if isinstance(t, nn.Parameter):
                mod._parameters[attr] = nn.Parameter(v, requires_grad=False)
            else:
                mod._buffers[attr] = v
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in keys:
        model.lm_head.weight = model.get_input_embeddings().weight
    # Non-persistent buffers (rotary inv_freq) are computed in __init__: rebuild those modules.
    for mod_name, mod in list(model.named_modules()):
        if any(b.device.type == "meta" for b in mod.buffers(recurse=False)):
            if "Rotary" not in type(mod).__name__:
                break
            with torch.device(device):
                _set_module(model, mod_name, type(mod)(config=mod.config))
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise QuantLRMError(f"{path} lacks tensors the model needs, e.g. {missing[:3]}.",
                            "re-export the checkpoint; it is incomplete.")
    return model.eval()

"""Residual adds and RMSNorms of a one-token decode step folded into the quantized GEMVs.

A Llama-style layer runs, per token, two residual adds and two RMSNorms between its GEMVs:
torch.compile makes each add + norm one small kernel, 64 launches a token for an 8B model,
about 2.4 us each plus a launch gap (BENCHMARKS.md, Kernels, version 10). Here o_proj writes
h = residual + o_proj(attn) and, from the tail of the same launch, the post-attention norm of
h; down_proj does the same with the next layer's input norm. Layers pass (h, normed h) on as
a tuple; the first layer norms its input itself and the last returns a plain tensor for the
model's final norm. Anything else (prefill, CPU, dense linears, shapes the kernels do not
take) runs the layer's own forward, or the same sums in torch.

The roundings are transformers' (a 16-bit residual add, fp32 statistics, the weight applied in
16 bits); only the sum of squares is reduced in another order.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from quantlrm.kernels import qmatmul_add_rmsnorm, qmatmul_add_rmsnorm_op, rms_norm

_NEXT = "_quantlrm_next_norm"  # in a layer's __dict__, not a submodule: the next layer's input norm


def _norm_eps(norm: nn.Module) -> float | None:
    """eps of a Llama-formula RMSNorm (weight * normalised x), None for any other norm."""
    eps = getattr(norm, "variance_epsilon", None)
    w = getattr(norm, "weight", None)
    if eps is None or not isinstance(w, torch.Tensor) or w.dim() != 1 or not type(norm).__name__.endswith("RMSNorm"):
        return None
    return float(eps)


def linear_add_norm(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                    norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm(h)) with h = residual + linear(x): one GEMV launch where the kernels take it."""
    from quantlrm.nn import QuantLinear

    eps = _norm_eps(norm)
    if (isinstance(linear, QuantLinear) and linear.bias is None and not linear.act and eps is not None
            and norm.weight.dtype == residual.dtype == linear.scale.dtype):
        x = x.to(linear.scale.dtype)
        if torch.compiler.is_compiling():
            return qmatmul_add_rmsnorm_op(x, linear.packed, linear.scale, linear.zero, linear.bits, linear.group_size,
                                          linear.in_features, linear.out_features, residual, norm.weight, eps)
        return qmatmul_add_rmsnorm(x, linear.weight_layout, residual, norm.weight, eps)
    h = residual + linear(x)
    return h, (rms_norm(h, norm.weight, eps) if eps is not None else norm(h))


def _mlp_inner(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The MLP's input to down_proj (silu(gate) * up), or None for an MLP of another shape."""
    from quantlrm.nn import GatedMLP

    if isinstance(mlp, GatedMLP):
        return mlp.gate_up(x)
    if all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return None


def _layer_forward(self, hidden_states, *args, **kwargs):
    pair = isinstance(hidden_states, tuple)
    h0 = hidden_states[0] if pair else hidden_states
    mlp = self.mlp
    fast = (not args and not self.training and h0.dim() == 3 and h0.shape[1] == 1
            and (h0.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and getattr(self.self_attn.config, "_attn_implementation", None) == "quantlrm"
            and (hasattr(mlp, "gate_up") or all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "act_fn"))))
    if not fast:
        return super(type(self), self).forward(h0, *args, **kwargs)
    residual, x = hidden_states if pair else (h0, self.input_layernorm(h0))
    (h, x), _ = self.self_attn(hidden_states=x, quantlrm_residual=residual,
                               quantlrm_post_norm=self.post_attention_layernorm, **kwargs)
    a = _mlp_inner(mlp, x)
    down = mlp.down_proj
    nxt = self.__dict__.get(_NEXT)
    if nxt is None:  # the last layer: the model's own final norm follows
        return h + down(a)
    return linear_add_norm(down, a, h, nxt)


_LAYER_CLASSES: dict[type, type] = {}


def fuse_decode_layers(model: nn.Module) -> int:
    """Give every decoder layer whose attention runs `fuse_decode_attention`'s path the folded
    adds and norms (module docstring); returns how many. QUANTLRM_FUSED_NORMS=0 leaves them as
    they are. Parameters and their names are unchanged: only each layer's class is swapped for
    a subclass whose forward tries the fused step first."""
    from quantlrm.attention import _DECODE_CLASSES

    if os.environ.get("QUANTLRM_FUSED_NORMS", "1") == "0":
        return 0
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        return 0
    ok = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
        mlp = getattr(layer, "mlp", None)
        good = (type(attn) in _DECODE_CLASSES.values() and all(n is not None and _norm_eps(n) is not None
                                                                  for n in norms)
                and mlp is not None and hasattr(mlp, "down_proj")
                and (hasattr(mlp, "gate_up") or all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "act_fn"))))
        ok.append(good)
    if not ok or not all(ok):  # the tuple handed between layers needs every layer to take it
        return 0
    for i, layer in enumerate(layers):
        cls = type(layer)
        if cls not in _LAYER_CLASSES.values():
            sub = _LAYER_CLASSES.get(cls)
            if sub is None:
                sub = _LAYER_CLASSES[cls] = type(f"QuantLRMFused{cls.__name__}", (cls,), {"forward": _layer_forward})
            layer.__class__ = sub
        if i + 1 < len(layers):
            layer.__dict__[_NEXT] = layers[i + 1].input_layernorm
        else:
            layer.__dict__.pop(_NEXT, None)
    return len(layers)

"""`attn_implementation="quantlrm"`: transformers attention that decodes with our Triton kernel.

Registered with transformers' `AttentionInterface` (and SDPA's boolean masks with its
`AttentionMaskInterface`), so any model that honours `config._attn_implementation` uses it.
A single query token on CUDA goes to `quantlrm.kernels.attention` (no per-head copies of the
cache, the unused part of a static cache skipped); prefill, CPU tensors, soft-capping, sinks
and other shapes go to transformers' own SDPA function unchanged.

`fuse_decode_attention(model)` goes one step further for decoding with a static cache: the
attention modules take the raw q/k/v projections of a single token and hand them to one
kernel that applies the per-head norms (Qwen3) and RoPE, writes the cache and attends, where
transformers spends three or four more launches per layer. Any other call runs the module's
own forward.
"""

from __future__ import annotations

import os

import torch

from quantlrm.kernels import attention as K

NAME = "quantlrm"


def quantlrm_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: torch.Tensor | None,
                               dropout: float = 0.0, scaling: float | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fast = (
        (query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        and K.triton is not None and K.supported(query, key, value)
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and not (dropout and module.training)
        and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
        and kwargs.get("position_bias") is None and not kwargs.get("output_attentions", False)
    )
    if not fast:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return K.decode_attention_op(query, key, value, attention_mask, float(scale)), None


def _fast_path(attn: torch.nn.Module, hidden: torch.Tensor, pos_emb, mask, cache) -> dict | None:
    """What the fused decode kernel needs, or None where the module's own forward must run."""
    if hidden.dim() != 3 or hidden.shape[1] != 1 or attn.training or pos_emb is None:
        return None
    if not (hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") or K.triton is None:
        return None
    if getattr(attn.config, "_attn_implementation", None) != NAME or getattr(attn, "sliding_window", None):
        return None
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) <= attn.layer_idx:
        return None
    layer = layers[attn.layer_idx]
    # transformers' StaticLayer exactly (5.x): keys/values [B, Hkv, L, D] written at
    # cumulative_length, which update() then advances; sliding or offloaded layers differ.
    if type(layer).__name__ != "StaticLayer" or not getattr(layer, "is_initialized", False):
        return None
    keys = layer.keys
    if keys.device != hidden.device or getattr(cache, "offloading", False):
        return None  # an offloaded static cache keeps its layers elsewhere between steps
    d = attn.head_dim
    if hidden.dtype not in (torch.float16, torch.bfloat16) or not 16 <= d <= 256 or d & (d - 1):
        return None  # the kernel's tiles: a power-of-two head size, 16-bit activations
    cos, sin = pos_emb
    if cos.shape[-1] != d or cos.dim() != 3 or cos.shape[1] != 1 or keys.dtype != hidden.dtype:
        return None
    if mask is not None and mask.dtype != torch.bool:
        return None
    norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
    if (norms[0] is None) != (norms[1] is None):
        return None
    if any(n is not None and getattr(n, "weight", torch.empty(0)).numel() != d for n in norms):
        return None  # e.g. OLMo-2's norm over the whole projection, not per head
    hq, hkv = attn.q_proj.out_features // d, keys.shape[1]
    if keys.shape[-1] != d or hidden.shape[0] != keys.shape[0] or attn.k_proj.out_features != hkv * d:
        return None
    if hq % hkv or hq // hkv > K.MAX_GROUP:
        return None
    return dict(layer=layer, cos=cos, sin=sin, norms=norms)


def _decode_forward(self, *args, **kwargs):
    # The arguments of Llama-style attention, by name or position; a fallback passes them on as given.
    def arg(i: int, name: str):
        return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)

    hidden_states, position_embeddings, attention_mask = (arg(0, "hidden_states"), arg(1, "position_embeddings"),
                                                           arg(2, "attention_mask"))
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    plan = None if len(args) > 3 or hidden_states is None else _fast_path(
        self, hidden_states, position_embeddings, attention_mask, cache)
    if plan is None:
        return super(type(self), self).forward(*args, **kwargs)
    bsz, d = hidden_states.shape[0], self.head_dim
    q = self.q_proj(hidden_states).view(bsz, -1, d)  # with fused q/k/v: one launch, three views
    k = self.k_proj(hidden_states).view(bsz, -1, d)
    v = self.v_proj(hidden_states).view(bsz, -1, d)
    layer, (qn, kn) = plan["layer"], plan["norms"]
    eps = float(getattr(qn, "variance_epsilon", getattr(qn, "eps", 1e-6))) if qn is not None else 0.0
    out = K.fused_decode_attention_op(
        q, k, v, plan["cos"], plan["sin"], None if qn is None else qn.weight, None if kn is None else kn.weight, eps,
        layer.keys, layer.values, layer.cumulative_length, attention_mask, float(self.scaling))  # advances it
    return self.o_proj(out.reshape(bsz, 1, -1)), None


_DECODE_CLASSES: dict[type, type] = {}


def fuse_decode_attention(model: torch.nn.Module) -> int:
    """Give every attention module the fused single-token path (see the module's docstring);
    returns how many (0 for architectures whose attention differs from Llama's: table flag
    `Arch.fused_decode_attention`). Parameters and their names are unchanged: only the class of
    each module is swapped for a subclass whose forward tries the fast path first."""
    from quantlrm.arch import get_arch
    from quantlrm.errors import QuantLRMError

    try:
        if not get_arch(model.config.to_dict()).fused_decode_attention:
            return 0
    except QuantLRMError:  # a family outside the table: its RoPE and norms are unknown
        return 0
    n = 0
    for mod in model.modules():
        cls = type(mod)
        if cls in _DECODE_CLASSES.values():
            n += 1
            continue
        if not all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim",
                                             "scaling", "config")):
            continue
        sub = _DECODE_CLASSES.get(cls)
        if sub is None:
            sub = _DECODE_CLASSES[cls] = type(f"QuantLRMDecode{cls.__name__}", (cls,), {"forward": _decode_forward})
        mod.__class__ = sub
        n += 1
    return n


def register() -> str:
    """Make `attn_implementation="quantlrm"` known to transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, quantlrm_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME

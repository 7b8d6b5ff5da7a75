"""`attn_implementation="quantlrm"`: transformers attention that decodes with our Triton kernel.

Registered with transformers' `AttentionInterface` (and SDPA's boolean masks with its
`AttentionMaskInterface`), so any model that honours `config._attn_implementation` uses it.
A single query token on CUDA goes to `quantlrm.kernels.attention` (no per-head copies of the
cache, the unused part of a static cache skipped); prefill, CPU tensors, soft-capping, sinks
and other shapes go to transformers' own SDPA function unchanged.
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


def register() -> str:
    """Make `attn_implementation="quantlrm"` known to transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, quantlrm_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME

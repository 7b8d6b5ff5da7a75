"""Build small real transformers models from a config (tests, demo, benchmarks: no hub)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

# Shapes small enough for CPU tests, yet with grouped-query attention (4 heads, 2 KV heads)
# and an MLP wider than the hidden size, so every scaling path is exercised.
_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(model_type: str = "llama", **overrides) -> PretrainedConfig:
    kw = dict(_TINY)
    if model_type in ("qwen3", "olmo3"):
        kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def build_model(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM (eager attention, deterministic under `seed`)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves norms at exactly 1; perturb them so folding scales into norms is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()

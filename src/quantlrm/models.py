"""Build small real transformers models from a config (tests, demo, benchmarks: no hub)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

# Shapes small enough for CPU tests, yet with grouped-query attention (4 heads, 2 KV heads)
# and an MLP wider than the hidden size, so every scaling path is exercised.
_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=260,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    pad_token_id=256,
    bos_token_id=257,
    eos_token_id=258,
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


SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: ids 0-255 are bytes, 256-259 the specials.

    Any text encodes without unknown tokens, so calibration and eval run on tiny models;
    it saves with `save_pretrained` and reloads with AutoTokenizer like any HF tokenizer.
    """
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    for i, tok in enumerate(SPECIAL_TOKENS.values()):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.add_special_tokens({"additional_special_tokens": []})
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}

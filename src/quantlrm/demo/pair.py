"""Build a (base, fine-tuned) reasoning model pair the way real releases are made, in miniature.

Stage 1 ("base"): a Llama-architecture model pre-trained with next-token loss on every
token of synthetic task text (questions with reasoning). Stage 2 ("sft"): supervised
fine-tuning on fresh reasoning traces, loss on the completion only, starting from the
*released* base, i.e. the bf16 checkpoint reloaded. Both are saved in bf16 as ordinary
Hugging Face checkpoints (with the tokenizer), like released models, so fine-tuning steps
below half a bf16 ulp leave weights bit-identical: the exact-zero updates the paper uses
(SPEC 8b).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from quantlrm.checkpoint import atomic_output_dir
from quantlrm.demo.tasks import mixture
from quantlrm.demo.train import TrainConfig, train
from quantlrm.errors import QuantLRMError
from quantlrm.models import build_model, byte_tokenizer


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class PairRecipe:
    """Everything that determines the pair; its hash names the cache entry."""

    families: tuple[str, ...] = ("arith", "temporal")
    shape: ModelShape = field(default_factory=ModelShape)
    n_train_per_family: int = 30000
    level: int = 1
    seed: int = 0
    base: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1400, batch_size=48, lr=3e-3, warmup=50,
                                            completion_only=False, seed=0)
    )
    sft: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=500, batch_size=48, lr=1e-3, warmup=20,
                                            completion_only=True, seed=1)
    )

    def key(self) -> str:
        """Stable short hash of the recipe (the device does not change the weights' recipe)."""
        d = asdict(self)
        for stage in ("base", "sft"):
            d[stage].pop("device")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def to_json(self) -> dict:
        return {"key": self.key(), **asdict(self)}


def model_config(shape: ModelShape) -> PretrainedConfig:
    tok = byte_tokenizer()
    return AutoConfig.for_model(
        "llama",
        **asdict(shape),
        vocab_size=len(tok),
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def save_bf16(model, tokenizer, out: Path) -> None:
    """Save like a release: bf16 safetensors + tokenizer + generation config, atomically."""
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def load_fp32(path: Path):
    """Reload a saved bf16 checkpoint upcast to fp32 for further training."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    return model


def train_pair(recipe: PairRecipe, out_dir: Path, progress: bool = True, device: str = "cpu") -> dict:
    """Train base then SFT; writes out_dir/{base,sft,recipe.json}. Returns timings and losses."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = byte_tokenizer()
    fams = list(recipe.families)
    info: dict = {"recipe": recipe.to_json()}

    t0 = time.perf_counter()
    base_data = mixture(fams, recipe.n_train_per_family, recipe.seed, "train", recipe.level)
    model = build_model(model_config(recipe.shape), seed=recipe.seed)
    model.config._attn_implementation = "sdpa"
    info["n_params"] = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(**{**asdict(recipe.base), "device": device})
    r = train(model, tok, [(p.prompt, p.cot) for p in base_data], cfg, progress, desc="base stage")
    save_bf16(model.cpu(), tok, out_dir / "base")
    info["base"] = {"seconds": r.seconds, "losses": r.losses}

    # Fine-tune the released (bf16) base on fresh traces, as a downstream team would.
    sft_data = mixture(fams, recipe.n_train_per_family, recipe.seed + 1, "train", recipe.level)
    model = load_fp32(out_dir / "base")
    cfg = TrainConfig(**{**asdict(recipe.sft), "device": device})
    r = train(model, tok, [(p.prompt, p.cot) for p in sft_data], cfg, progress, desc="SFT stage")
    save_bf16(model.cpu(), tok, out_dir / "sft")
    info["sft"] = {"seconds": r.seconds, "losses": r.losses}
    info["seconds"] = time.perf_counter() - t0
    (out_dir / "recipe.json").write_text(json.dumps(info, indent=1))
    return info


def pair_is_complete(d: Path, recipe: PairRecipe) -> bool:
    """True when d holds both checkpoints trained from exactly this recipe."""
    try:
        info = json.loads((Path(d) / "recipe.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("recipe", {}).get("key") == recipe.key() and all(
        (Path(d) / s / "model.safetensors").is_file() for s in ("base", "sft")
    )


def zero_fraction(base_dir: Path, ft_dir: Path) -> dict:
    """Fraction of exactly unchanged weights in the pair's linear layers (SPEC 8b)."""
    from quantlrm.checkpoint import Checkpoint

    a, b = Checkpoint(base_dir), Checkpoint(ft_dir)
    n = z = 0
    for name in a.keys():
        if not name.endswith("proj.weight"):
            continue
        if name not in b.keys():
            raise QuantLRMError(f"{name} is in {base_dir} but not in {ft_dir}.", "pass a matching pair.")
        same = a.get(name) == b.get(name)
        n += same.numel()
        z += int(same.sum())
    return {"n_linear_weights": n, "n_zero_updates": z, "zero_fraction": z / max(n, 1)}

"""A small, deterministic trainer for causal LMs: enough to build real fine-tuning pairs on CPU.

AdamW with linear warmup and cosine decay, padded batches sampled with a seeded generator,
loss on every token (pre-training stage) or on the completion only (SFT on reasoning
traces). It runs on any device; the demo uses it on CPU, the GPU zoo on CUDA.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from quantlrm.errors import QuantLRMError


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    completion_only: bool = False  # SFT: loss only on completion tokens (prompt masked)
    max_len: int = 256
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss per logged window
    seconds: float = 0.0
    steps: int = 0


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) per (prompt, completion): prompt + completion + eos, no BOS.

    No BOS is added because generation later feeds the bare prompt; the model must see the
    same token stream in training and at evaluation.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise QuantLRMError("The tokenizer has no eos token.", "use quantlrm.models.byte_tokenizer().")
    out = []
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    comps = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    for p, c in zip(prompts, comps, strict=True):
        ids = p + c + [eos]
        if len(ids) > max_len:
            raise QuantLRMError(
                f"A training example has {len(ids)} tokens, more than max_len={max_len}.",
                "raise TrainConfig.max_len or shorten the task.",
            )
        out.append((ids, len(p)))
    return out


def make_batch(examples: list[tuple[list[int], int]], idx: list[int], pad_id: int,
               completion_only: bool) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on padding (and on the prompt for SFT)."""
    seqs = [examples[i] for i in idx]
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(seqs):
        t = torch.tensor(ids)
        input_ids[r, : len(ids)] = t
        mask[r, : len(ids)] = 1
        labels[r, : len(ids)] = t
        if completion_only:
            labels[r, :n_prompt] = -100
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _length_grouped_batches(examples: list[tuple[list[int], int]], batch_size: int,
                            gen: torch.Generator) -> list[list[int]]:
    """One epoch of batches of similar length (less padding, so less wasted CPU time).

    Examples are shuffled, cut into windows of 16 batches, sorted by length inside a window,
    then split into batches whose order is shuffled again.
    """
    order = torch.randperm(len(examples), generator=gen).tolist()
    window = 16 * batch_size
    batches = []
    for w0 in range(0, len(order) - batch_size + 1, window):
        chunk = sorted(order[w0 : w0 + window], key=lambda i: len(examples[i][0]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    if not batches:
        raise QuantLRMError(
            f"Fewer training examples ({len(examples)}) than one batch ({batch_size}).",
            "generate more examples or lower batch_size.",
        )
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine down to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def train(model, tokenizer, pairs: list[tuple[str, str]], cfg: TrainConfig,
          progress: bool = True, desc: str = "train") -> TrainResult:
    """Train `model` in place on (prompt, completion) pairs; returns the loss curve.

    The weights stay in the model's dtype (use fp32 for training; save in bf16 after).
    """
    if not pairs:
        raise QuantLRMError("No training examples.", "pass at least one (prompt, completion) pair.")
    examples = encode_pairs(tokenizer, pairs, cfg.max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.to(cfg.device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult()
    t0 = time.perf_counter()
    window: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    batches = _length_grouped_batches(examples, cfg.batch_size, gen)
    for step in bar:
        if not batches:  # next epoch: fresh permutation
            batches = _length_grouped_batches(examples, cfg.batch_size, gen)
        idx = batches.pop()
        batch = {k: v.to(cfg.device) for k, v in make_batch(examples, idx, pad_id, cfg.completion_only).items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        window.append(loss.item())
        if len(window) == 25 or step == cfg.steps - 1:
            result.losses.append(sum(window) / len(window))
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
            window = []
    result.seconds = time.perf_counter() - t0
    result.steps = cfg.steps
    model.eval()
    return result

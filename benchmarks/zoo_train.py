"""Staged training of the zoo's small reasoning models: pre-training, SFT, DPO, RL (GPU or CPU).

Like a real reasoning-model release, each stage starts from the previous stage's checkpoint
as it was *saved in bf16* and is saved in bf16 again, so that a fine-tuning step smaller
than half a bf16 ulp leaves a weight bit-identical (SPEC 8b): the SFT->DPO pair then has
exact zero updates the way released pairs do.

- pre-training: next-token loss on packed 256-token blocks of general text (Python's
  pydoc topics, the builtin calibration corpus) mixed with task text (problem + reasoning);
- SFT: loss on the reasoning trace + answer only (prompt masked), the demo's task families;
- DPO: chosen = the reference trace, rejected = one of the SFT model's own sampled
  completions that the grader marks wrong (a corrupted final answer where every sample was
  right), reference model = the frozen SFT model, plus a small NLL term on the chosen
  trace (as RPO does) so a tiny model does not unlearn its format;
- RL: GRPO-style with a verifiable reward (the eval graders' 1/0 on k sampled completions
  per prompt, advantage = reward - group mean), as Olmo-3-Think's RLVR stage, giving the
  DPO->RL pair.

Every stage is time-boxed: it trains until its seconds are used (the cosine schedule's
progress is the larger of elapsed/seconds and step/steps), so the GPU command ends inside its
limit whatever the step rate turns out to be.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from quantlrm.calib import builtin_documents
from quantlrm.demo.tasks import END_THINK, FAMILIES, Problem
from quantlrm.demo.train import encode_pairs, make_batch


@dataclass
class Stage:
    """One training stage: at most `steps` optimizer steps and at most `seconds` of wall time."""

    steps: int
    seconds: float
    lr: float
    batch_size: int = 64
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta: float = 0.1  # DPO only
    nll_weight: float = 0.2  # DPO only: weight of the chosen-trace NLL term


@dataclass
class StageLog:
    name: str
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "seconds": round(self.seconds, 1),
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None,
                "losses": [round(x, 4) for x in self.losses], **self.extra}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Schedule:
    """Warm-up, then cosine to lr*min_lr_ratio over the stage's time budget (or its step cap,
    whichever runs out first): progress is max(step/steps, elapsed/seconds), so a slower GPU
    (or one shared with another zoo process) still ends the schedule, not just cuts it."""

    def __init__(self, st: Stage, device: str):
        self.st, self.device = st, device
        self.t0 = time.perf_counter()

    def progress(self, step: int) -> float:
        return max(step / max(self.st.steps, 1), (time.perf_counter() - self.t0) / self.st.seconds)

    def lr(self, step: int) -> float:
        st = self.st
        if step < st.warmup:
            return st.lr * (step + 1) / st.warmup
        frac = min(self.progress(step), 1.0)
        lo = st.lr * st.min_lr_ratio
        return lo + (st.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))

    def done(self, step: int) -> bool:
        """Called after `step` finished."""
        return step + 1 >= self.st.steps or time.perf_counter() - self.t0 >= self.st.seconds


def _optimizer(model, st: Stage, device: str):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    kw = {"fused": True} if device.startswith("cuda") else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": st.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=st.lr, betas=(0.9, 0.98), **kw)


def _autocast(device: str):
    dev = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")


def _step(model, opt, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


# ------------------------------------------------------------------ data


def general_text(max_chars: int | None = None) -> list[str]:
    """Python's pydoc topic texts: general English prose and code, offline."""
    docs, n = [], 0
    for d in builtin_documents():
        docs.append(d)
        n += len(d)
        if max_chars is not None and n >= max_chars:
            break
    return docs


def pack_blocks(tokenizer, docs: list[str], seqlen: int, seed: int) -> torch.Tensor:
    """Shuffle documents, join them with EOS and cut into [n, seqlen] blocks."""
    rng = random.Random(seed)
    docs = docs[:]
    rng.shuffle(docs)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // seqlen
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


# ------------------------------------------------------------------ stages


def _run_stage(model, st: Stage, device: str, seed: int, log: StageLog, batch_loss) -> StageLog:
    """The loop every stage shares: `batch_loss(generator)` draws a batch and returns its loss;
    the learning rate follows the stage's time-based schedule; losses are logged per 25 steps."""
    model.to(device).train()
    opt = _optimizer(model, st, device)
    sch = _Schedule(st, device)
    g = torch.Generator().manual_seed(seed)
    acc, step = [], 0
    while True:
        for grp in opt.param_groups:
            grp["lr"] = sch.lr(step)
        loss = batch_loss(g)
        _step(model, opt, loss)
        acc.append(loss.detach())
        if len(acc) == 25:
            log.losses.append(torch.stack(acc).mean().item())
            acc = []
        if sch.done(step):
            break
        step += 1
    if acc:
        log.losses.append(torch.stack(acc).mean().item())
    _sync(device)
    log.steps, log.seconds = step + 1, time.perf_counter() - sch.t0
    model.eval()
    return log


def pretrain(model, tokenizer, blocks: torch.Tensor, st: Stage, device: str, seed: int) -> StageLog:
    """Next-token loss on packed blocks (every token counts)."""
    log = StageLog("pretrain", extra={"blocks": blocks.shape[0], "seqlen": blocks.shape[1]})

    def batch_loss(g):
        idx = torch.randint(0, blocks.shape[0], (st.batch_size,), generator=g)
        x = blocks[idx].to(device, non_blocking=True)
        with _autocast(device):
            return model(input_ids=x, labels=x).loss

    return _run_stage(model, st, device, seed, log, batch_loss)


def sft(model, tokenizer, problems: list[Problem], st: Stage, device: str, seed: int,
        max_len: int = 320) -> StageLog:
    """Completion-only loss on the reasoning trace and answer."""
    log = StageLog("sft", extra={"examples": len(problems)})
    examples = encode_pairs(tokenizer, [(p.prompt, p.cot) for p in problems], max_len)

    def batch_loss(g):
        idx = torch.randint(0, len(examples), (st.batch_size,), generator=g).tolist()
        b = {k: v.to(device, non_blocking=True) for k, v in
             make_batch(examples, idx, tokenizer.pad_token_id, True).items()}
        with _autocast(device):
            return model(**b).loss

    return _run_stage(model, st, device, seed, log, batch_loss)


def corrupt(problem: Problem, rng: random.Random) -> str:
    """The reference trace with a wrong final answer (a rejected completion of last resort)."""
    head, _, tail = problem.cot.rpartition(END_THINK)
    grader = FAMILIES[problem.family].grader
    if grader == "aime":
        wrong = str(int(problem.answer) + rng.choice((-10, -2, -1, 1, 2, 10)))
        return f"{head}{END_THINK}\\boxed{{{wrong}}}"
    if grader == "folio":
        wrong = rng.choice([x for x in ("True", "False", "Uncertain") if x != problem.answer])
        return f"{head}{END_THINK}Answer: {wrong}"
    letters = sorted(set(re.findall(r"\(([A-H])\)", problem.prompt)))
    wrong = rng.choice([x for x in letters if x != problem.answer] or ["A"])
    return f"{head}{END_THINK}Answer: ({wrong})"


def sample_rejected(model, tokenizer, problems: list[Problem], device: str, seed: int,
                    max_new_tokens: int, batch_size: int = 1024) -> tuple[list[str], dict]:
    """One sampled completion (T=1) per problem from `model`; wrong ones become rejected."""
    from quantlrm.eval import GenerationConfig, grade
    from quantlrm.eval.backends import TransformersBackend

    be = TransformersBackend(model, tokenizer, progress=False)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, greedy=False,
                           think_suffix="", batch_size=batch_size, seed=seed)
    gens = be.generate([p.prompt for p in problems], cfg)
    rng = random.Random(seed)
    out, n_wrong = [], 0
    for p, gen in zip(problems, gens, strict=True):
        if not grade(FAMILIES[p.family].grader, gen.text, p.answer):
            out.append(gen.text)
            n_wrong += 1
        else:
            out.append(corrupt(p, rng))
    return out, {"on_policy_rejected": n_wrong, "corrupted_rejected": len(problems) - n_wrong}


def _seq_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log-probabilities of the completion tokens of each row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1), mask.sum(-1)


def dpo(model, ref_model, tokenizer, problems: list[Problem], rejected: list[str], st: Stage,
        device: str, seed: int, max_len: int = 320) -> StageLog:
    """DPO (sigmoid loss, beta) against the frozen reference, plus nll_weight * chosen NLL."""
    log = StageLog("dpo", extra={"pairs": len(problems), "beta": st.beta, "nll_weight": st.nll_weight})
    ch = encode_pairs(tokenizer, [(p.prompt, p.cot) for p in problems], max_len)
    rj = encode_pairs(tokenizer, [(p.prompt, r[: max_len * 2]) for p, r in zip(problems, rejected, strict=True)],
                      max_len * 4)
    rj = [(ids[:max_len], n) for ids, n in rj]
    pad = tokenizer.pad_token_id
    ref_model.to(device).eval()
    accs = []

    def batch_loss(g):
        idx = torch.randint(0, len(ch), (st.batch_size,), generator=g).tolist()
        both = make_batch(ch + rj, idx + [len(ch) + i for i in idx], pad, True)
        both = {k: v.to(device, non_blocking=True) for k, v in both.items()}
        with torch.no_grad(), _autocast(device):
            ref_lp, _ = _seq_logps(ref_model, both)
        with _autocast(device):
            lp, n_tok = _seq_logps(model, both)
        n = len(idx)
        margin = (lp[:n] - ref_lp[:n]) - (lp[n:] - ref_lp[n:])
        accs.append((margin > 0).float().mean().detach())
        return -F.logsigmoid(st.beta * margin).mean() + st.nll_weight * (-lp[:n] / n_tok[:n]).mean()

    _run_stage(model, st, device, seed, log, batch_loss)
    log.extra["reward_accuracy_last25"] = round(torch.stack(accs[-25:]).mean().item(), 3)
    return log


@dataclass
class RLConfig:
    """GRPO-style RL with a verifiable reward (as Olmo-3-Think's RLVR, at toy scale).

    Each rollout samples `k` completions per prompt at `temperature`; the reward is the eval
    graders' 1/0; the advantage is reward minus the group mean (groups whose rewards are all
    equal carry no signal and are dropped). The rollout is then used for `updates` optimizer
    steps on disjoint minibatches with the PPO-clipped ratio (the first is exactly on-policy),
    the loss averaged over each completion's tokens.
    """

    seconds: float
    lr: float = 5e-6
    prompts_per_rollout: int = 64
    k: int = 8
    updates: int = 4
    clip: float = 0.2
    kl_coef: float = 0.0  # k3 KL to the frozen start model (0: none, like DAPO/Olmo-3 RLVR)
    temperature: float = 1.0
    max_new_tokens: int = 160
    micro_batch: int = 64  # sequences per forward (memory: ~35 GB of activations at 128 x 480 tokens, 120M)
    warmup: int = 5
    max_rollouts: int | None = None  # a cap besides the seconds (tests)


def _completion_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labelled tokens [B, T-1] and their mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = torch.gather(F.log_softmax(logits[:, :-1].float(), -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


@torch.no_grad()
def rollout(model, tokenizer, problems: list[Problem], k: int, temperature: float, max_new_tokens: int,
            device: str, seed: int, reward_fn=None) -> tuple[list[tuple[list[int], int]], list[float], list[str]]:
    """k sampled completions per problem from `model` (HF generate, KV cache, one batch).

    Returns the (ids, n_prompt) examples in the training layout of `encode_pairs` (prompt
    without BOS + completion + EOS when produced), the rewards and the texts. The reward is
    the eval grader's 1/0 unless `reward_fn(problem, text) -> float` is given (tests).
    """
    from quantlrm.eval import grade

    if reward_fn is None:
        def reward_fn(p: Problem, text: str) -> float:
            return float(grade(FAMILIES[p.family].grader, text, p.answer))

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    enc = [ids for ids in prompts for _ in range(k)]
    width = max(len(x) for x in enc)
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in enc], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in enc], device=device)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    with _autocast(device):
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                             pad_token_id=pad, eos_token_id=eos)
    model.train(was_training)
    examples, rewards, texts = [], [], []
    for r, row in enumerate(gen[:, width:].tolist()):
        n = next((i for i, t in enumerate(row) if t == eos), None)
        body = row if n is None else row[:n]
        text = tokenizer.decode(body, skip_special_tokens=False)
        p = problems[r // k]
        rewards.append(float(reward_fn(p, text)))
        texts.append(text)
        examples.append((enc[r] + (body if n is None else body + [eos]), len(enc[r])))
    return examples, rewards, texts


def rl(model, tokenizer, problems: list[Problem], cfg: RLConfig, device: str, seed: int,
       ref_model=None, reward_fn=None) -> StageLog:
    """Time-boxed GRPO-style RL (see RLConfig). Rollouts continue until `cfg.seconds` is used,
    never starting a rollout that the measured time of the last one says cannot finish."""
    log = StageLog("rl", extra={"k": cfg.k, "prompts_per_rollout": cfg.prompts_per_rollout, "lr": cfg.lr,
                                "updates_per_rollout": cfg.updates, "clip": cfg.clip, "kl_coef": cfg.kl_coef,
                                "temperature": cfg.temperature})
    model.to(device).train()
    if cfg.kl_coef > 0:
        if ref_model is None:
            raise ValueError("kl_coef > 0 needs ref_model")
        ref_model.to(device).eval()
    st = Stage(steps=10**9, seconds=cfg.seconds, lr=cfg.lr)
    opt = _optimizer(model, st, device)
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    t0 = time.perf_counter()
    reward_means, kept_groups, gen_s, step, rollouts, last = [], [], 0.0, 0, 0, 0.0
    while True:
        t_roll = time.perf_counter()
        if rollouts and ((t_roll - t0) + last > cfg.seconds or rollouts == cfg.max_rollouts):
            break
        batch_probs = rng.sample(problems, min(cfg.prompts_per_rollout, len(problems)))
        ex, rewards, _ = rollout(model, tokenizer, batch_probs, cfg.k, cfg.temperature, cfg.max_new_tokens,
                                 device, seed * 100003 + rollouts, reward_fn)
        _sync(device)
        gen_s += time.perf_counter() - t_roll
        r = torch.tensor(rewards).view(-1, cfg.k)
        reward_means.append(r.mean().item())
        keep = (r.max(1).values > r.min(1).values)
        kept_groups.append(int(keep.sum()))
        adv_all = (r - r.mean(1, keepdim=True)).flatten()
        rows = [i for i in range(len(ex)) if keep[i // cfg.k]]
        rollouts += 1
        if rows:
            full = make_batch(ex, rows, pad, True)
            full = {key: v.to(device) for key, v in full.items()}
            adv = adv_all[rows].to(device)
            with torch.no_grad(), _autocast(device):
                old = torch.cat([_completion_logps(model, {key: v[i:i + cfg.micro_batch] for key, v in full.items()})[0]
                                 for i in range(0, len(rows), cfg.micro_batch)])
                ref = None
                if cfg.kl_coef > 0:
                    ref = torch.cat([_completion_logps(ref_model, {key: v[i:i + cfg.micro_batch]
                                                                   for key, v in full.items()})[0]
                                     for i in range(0, len(rows), cfg.micro_batch)])
            perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + rollouts)).tolist()
            n_up = max(1, min(cfg.updates, len(rows)))
            for u in range(n_up):
                mb = perm[u::n_up]
                lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
                for grp in opt.param_groups:
                    grp["lr"] = lr
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for i in range(0, len(mb), cfg.micro_batch):
                    sel = torch.tensor(mb[i:i + cfg.micro_batch], device=device)
                    b = {key: v[sel] for key, v in full.items()}
                    with _autocast(device):
                        lp, m = _completion_logps(model, b)
                    ratio = torch.exp(lp - old[sel])
                    a = adv[sel].unsqueeze(1)
                    obj = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a)
                    per_tok = -obj
                    if ref is not None:
                        d = ref[sel] - lp
                        per_tok = per_tok + cfg.kl_coef * (torch.exp(d) - d - 1)
                    ntok = m.sum(1).clamp(min=1)
                    loss = ((per_tok * m).sum(1) / ntok).sum() / len(mb)
                    loss.backward()
                    total += loss.item()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                log.losses.append(total)
                step += 1
        last = time.perf_counter() - t_roll
    _sync(device)
    log.steps, log.seconds = step, time.perf_counter() - t0
    model.eval()
    log.extra.update({"rollouts": rollouts, "generate_s": round(gen_s, 1),
                      "reward_mean_first": reward_means[0] if reward_means else None,
                      "reward_mean_last": reward_means[-1] if reward_means else None,
                      "reward_means": [round(x, 4) for x in reward_means],
                      "groups_kept": kept_groups})
    return log


# ------------------------------------------------------------------ checkpoints


def save_bf16(model, tokenizer, out: str | Path) -> Path:
    """Save as a release would: bf16 safetensors + tokenizer (the model itself is not changed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=sd)
    cfg = out / "config.json"
    c = json.loads(cfg.read_text())
    c["dtype"] = "bfloat16"
    cfg.write_text(json.dumps(c, indent=2))
    tokenizer.save_pretrained(out)
    return out


def load_fp32(path: str | Path, device: str):
    """A saved (bf16) stage as fp32 master weights for the next stage."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return m.to(device)


def zero_update_fraction(base: str | Path, tuned: str | Path) -> dict:
    """Share of exactly unchanged weights of the quantizable linears (and of all tensors)."""
    from quantlrm.checkpoint import Checkpoint

    a, b = Checkpoint(base), Checkpoint(tuned)
    lin_zero = lin_n = all_zero = all_n = 0
    for k in b.keys():
        x, y = a.get(k), b.get(k)
        z = int((x == y).sum())
        all_zero += z
        all_n += y.numel()
        if k.endswith("_proj.weight") and ".layers." in k:
            lin_zero += z
            lin_n += y.numel()
    return {"linear_zero_fraction": lin_zero / max(lin_n, 1), "all_zero_fraction": all_zero / max(all_n, 1)}

"""Pseudo-fine-tuning (paper Section 5.3): when no pre-fine-tuned checkpoint exists, fine-tune
the target model briefly and take the fine-tuning signals from that run.

`finetune(opts)` runs supervised fine-tuning (loss on response tokens only) and, at each
snapshot step K, computes the signals of the CURRENT weights against the ORIGINAL ones,
written to `OUT/step-K/` in the layout of `quantlrm signals`. `quantlrm quantize --signals
OUT/step-K` then quantizes the original model: the fine-tuned weights serve only as signals.

The original weights are never copied: each linear is re-read from the model's own
safetensors shards, one tensor at a time, while the signals are computed. The current
weights are cast to the dtype the original checkpoint stores (bf16 for released models)
before the difference is taken, so a snapshot equals `quantlrm signals` run on the
checkpoint that `--save-model` writes (and, like a released bf16 model, it has exact zero
updates wherever a weight moved by less than half a bf16 ulp; SPEC 8b).

Data: a JSONL file, one example per line, in one of these schemas (detected on line 1;
every line must use the same one):
  - `{"prompt": ..., "response": ...}` (field names set with --prompt-field/--response-field)
  - `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`
    (OpenR1-Math style; the last assistant message is the response, the messages before it
    the prompt; field name set with --messages-field)
  - `{"problem": ..., "solution": ...}` (OpenR1-Math / NuminaMath style without messages)
Loss is taken on the response tokens (plus the EOS token that closes them) only.

Training state (fp32 master weights of the trained parameters, optimizer state, RNG) is
saved under `OUT/state/` at every snapshot; `--resume` continues from the latest one and
gives the same weights as an uninterrupted run (the batch order and the learning rate are
functions of the step number; bit-identical on CPU, where the tests check it; on GPU up to
the non-determinism of its kernels). `--stop-after K` ends a run early with its state
saved, e.g. to fit a time-limited GPU session.

Memory (arithmetic, per trained parameter): fp32 master weights 4 bytes + fp32 gradients
4 + AdamW moments 8 = 16 bytes, so a 1.7B model needs about 27 GB before activations and
an 8B one about 128 GB, more than one 80 GB GPU. `--optimizer adafactor` (factored second
moment, no first moment) brings that to about 8 bytes, `--train linears` leaves the
embeddings and norms frozen (the signals only use the linears), and `--grad-checkpointing`
keeps one layer's activations instead of all.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from quantlrm.arch import linear_names
from quantlrm.checkpoint import Checkpoint, ShardedWriter
from quantlrm.errors import QuantLRMError

log = logging.getLogger(__name__)

TEMPLATES = ("auto", "raw", "chat")
OPTIMIZERS = ("adamw", "adafactor")
TRAIN_SCOPES = ("all", "linears")
# Options that define the training trajectory: a resumed run must use the same values.
_TRAJECTORY_FIELDS = (
    "data", "steps", "lr", "batch_size", "grad_accum", "warmup", "max_len", "seed", "template",
    "prompt_field", "response_field", "messages_field", "weight_decay", "max_grad_norm",
    "optimizer", "train",
)  # fmt: skip

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@dataclass
class FinetuneOptions:
    """Everything `quantlrm finetune` accepts; stored in OUT/run.json."""

    model: str
    data: str
    out: str
    steps: int
    snapshot_steps: list[int] = field(default_factory=list)  # empty = only the last step
    lr: float = 1e-5
    batch_size: int = 1
    grad_accum: int = 8
    warmup: int | None = None  # steps; None = 3% of steps
    max_len: int = 4096
    device: str = "auto"
    bf16: bool | None = None  # None = where the device supports it
    grad_checkpointing: bool = False
    save_model: bool = False
    resume: bool = False
    stop_after: int | None = None  # stop (state saved) after this step; resume later
    save_state: bool = True  # optimizer + weights at snapshots, for --resume (off: saves disk/time)
    state_every: int | None = None  # also save the state every N steps
    template: str = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    variant: str = "both-ends"
    y_min: float = 1.0
    y_max: float = 10.0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train: str = "all"
    seed: int = 0
    progress: bool = True


# ----------------------------------------------------------------------------- data


class SFTData:
    """The examples of a JSONL file, read lazily by byte offset (OpenR1 files are GBs)."""

    def __init__(
        self,
        path: str | os.PathLike,
        prompt_field: str = "prompt",
        response_field: str = "response",
        messages_field: str = "messages",
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise QuantLRMError(
                f"data file {self.path} does not exist.", "pass a JSONL file with --data."
            )
        self.prompt_field, self.response_field, self.messages_field = (
            prompt_field,
            response_field,
            messages_field,
        )
        self.offsets = self._index()
        if not self.offsets:
            raise QuantLRMError(
                f"data file {self.path} has no examples.", "pass a non-empty JSONL file."
            )
        self.schema = self._detect(self._row(0), line=self.offsets[0][1])

    def _index(self) -> list[tuple[int, int]]:
        """(byte offset, line number) of every non-blank line."""
        offsets, pos = [], 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    offsets.append((pos, lineno))
                pos += len(line)
        return offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def _row(self, i: int) -> dict:
        pos, lineno = self.offsets[i]
        with open(self.path, "rb") as f:
            f.seek(pos)
            line = f.readline()
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuantLRMError(
                f"{self.path} line {lineno} is not valid JSON ({e}).",
                "write one JSON object per line.",
            ) from e
        if not isinstance(row, dict):
            raise QuantLRMError(
                f"{self.path} line {lineno} is not a JSON object.",
                "write one JSON object per line.",
            )
        return row

    def _detect(self, row: dict, line: int) -> tuple[str, ...]:
        candidates = [
            ("pair", self.prompt_field, self.response_field),
            ("messages", self.messages_field),
            ("pair", "problem", "solution"),
        ]
        for schema in candidates:
            if all(k in row for k in schema[1:]):
                return schema
        raise QuantLRMError(
            f"{self.path} line {line} has fields {sorted(row)}, none of the accepted schemas "
            f"({self.prompt_field!r}+{self.response_field!r}, {self.messages_field!r}, 'problem'+'solution').",
            "name your fields with --prompt-field/--response-field (or --messages-field).",
        )

    def messages(self, i: int) -> list[dict]:
        """Example i as chat messages; the last one is the assistant response."""
        row = self._row(i)
        lineno = self.offsets[i][1]
        if not all(k in row for k in self.schema[1:]):
            raise QuantLRMError(
                f"{self.path} line {lineno} lacks field(s) {[k for k in self.schema[1:] if k not in row]} "
                "that line 1 has.",
                "use one schema for every line of the file.",
            )
        if self.schema[0] == "pair":
            prompt, response = row[self.schema[1]], row[self.schema[2]]
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        else:
            msgs = _trim_to_last_assistant(row[self.schema[1]])
        bad = [m for m in msgs if not isinstance(m, dict) or not isinstance(m.get("content"), str)]
        if not msgs or bad or msgs[-1].get("role") != "assistant" or not msgs[-1]["content"]:
            raise QuantLRMError(
                f"{self.path} line {lineno}: the example needs string fields and a non-empty response "
                "(an assistant message for the messages schema).",
                "fix or drop that line.",
            )
        return msgs


def _trim_to_last_assistant(msgs) -> list[dict]:
    if not isinstance(msgs, list):
        return []
    last = max(
        (i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"),
        default=-1,
    )
    return msgs[: last + 1]


def encode(tokenizer, msgs: list[dict], template: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of one example and the number of prompt tokens (no loss on those).

    raw: prompt contents joined by a blank line, then "\\n", then the response and EOS
    (the same raw layout the evaluation prompts use). chat: the tokenizer's chat template;
    the response starts where the full conversation departs from the prompt rendered with
    its generation prompt.
    """
    if template == "chat":
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        head = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        n_prompt = 0
        while n_prompt < min(len(ids), len(head_ids)) and ids[n_prompt] == head_ids[n_prompt]:
            n_prompt += 1
    else:
        prompt = "\n\n".join(m["content"] for m in msgs[:-1]) + "\n"
        head_ids = tokenizer(prompt)["input_ids"]
        resp = tokenizer(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids, n_prompt = head_ids + resp + eos, len(head_ids)
    return ids[:max_len], min(n_prompt, max_len)


def resolve_template(tokenizer, template: str) -> str:
    if template not in TEMPLATES:
        raise QuantLRMError(
            f"unknown template {template!r}.", f"use one of {', '.join(TEMPLATES)}."
        )
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise QuantLRMError("the tokenizer has no chat template.", "use --template raw.")
    return template


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask and labels with -100 on prompt and padding."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(examples):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[r, : len(ids)] = t
        mask[r, : len(ids)] = 1
        labels[r, n_prompt : len(ids)] = t[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def step_indices(step: int, per_step: int, n: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step` (0-based): a fresh permutation per epoch,
    so the batches depend on the step number alone (what makes resuming exact)."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(pos, n)
        out.append(_epoch_order(n, seed + epoch)[k])
    return out


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay towards 0 at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- checks


def parse_steps(text: str) -> list[int]:
    """'100,200,300' -> [100, 200, 300]."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise QuantLRMError(
            f"--snapshot-steps {text!r} is not a comma-separated list of integers.",
            "e.g. --snapshot-steps 100,200,400.",
        ) from e


def check_options(opts: FinetuneOptions) -> FinetuneOptions:
    """Validate and fill defaults before any model is loaded."""
    if opts.steps <= 0:
        raise QuantLRMError(f"--steps {opts.steps} must be positive.", "e.g. --steps 2000.")
    snaps = sorted(set(opts.snapshot_steps or [opts.steps]))
    bad = [s for s in snaps if s < 1 or s > opts.steps]
    if bad:
        raise QuantLRMError(
            f"snapshot step(s) {bad} lie outside 1..{opts.steps} (--steps).",
            f"choose snapshot steps between 1 and {opts.steps}, or raise --steps.",
        )
    if opts.stop_after is not None and not 1 <= opts.stop_after <= opts.steps:
        raise QuantLRMError(
            f"--stop-after {opts.stop_after} lies outside 1..{opts.steps}.",
            "choose a step in range.",
        )
    if opts.state_every is not None and opts.state_every <= 0:
        raise QuantLRMError(
            f"--state-every {opts.state_every} must be positive.", "e.g. --state-every 200."
        )
    for name in ("batch_size", "grad_accum", "max_len"):
        if getattr(opts, name) <= 0:
            raise QuantLRMError(
                f"--{name.replace('_', '-')} must be positive.", "pass a positive integer."
            )
    if opts.lr <= 0:
        raise QuantLRMError(f"--lr {opts.lr} must be positive.", "e.g. --lr 1e-5.")
    if opts.optimizer not in OPTIMIZERS:
        raise QuantLRMError(
            f"unknown optimizer {opts.optimizer!r}.", f"use one of {', '.join(OPTIMIZERS)}."
        )
    if opts.train not in TRAIN_SCOPES:
        raise QuantLRMError(
            f"unknown --train {opts.train!r}.", f"use one of {', '.join(TRAIN_SCOPES)}."
        )
    from quantlrm.signals import VARIANTS

    if opts.variant not in VARIANTS:
        raise QuantLRMError(
            f"unknown signal variant {opts.variant!r}.", f"use one of {', '.join(VARIANTS)}."
        )
    warmup = round(0.03 * opts.steps) if opts.warmup is None else opts.warmup
    if not 0 <= warmup <= opts.steps:
        raise QuantLRMError(
            f"--warmup {warmup} lies outside 0..{opts.steps}.", "use fewer warm-up steps."
        )
    return FinetuneOptions(**{**asdict(opts), "snapshot_steps": snaps, "warmup": warmup})


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise QuantLRMError(
            f"device {device} was asked for but CUDA is not available.", "use --device cpu."
        )
    return d


def _use_bf16(opts: FinetuneOptions, device: torch.device) -> bool:
    if opts.bf16 is not None:
        return opts.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


# ----------------------------------------------------------------------------- signals


def weight_pairs(model: torch.nn.Module, base: Checkpoint) -> Callable[[], Iterator[tuple]]:
    """The `pairs` callable of `compute_signals_from_pairs`: (name, W_base, W_current).

    W_base is re-read from the original shards (no copy held); W_current is cast to the
    dtype that checkpoint stores, as a saved fine-tuned model would be.
    """
    names = [n for _, _, n in linear_names(base.config)]

    def pairs():
        for name in names:
            w1 = model.get_parameter(f"{name}.weight").detach()
            w0 = base.get(f"{name}.weight").to(w1.device)
            yield name, w0, w1.to(w0.dtype)

    return pairs


def snapshot_signals(model, base: Checkpoint, opts: FinetuneOptions, device: torch.device):
    from quantlrm.signals import compute_signals_from_pairs

    with torch.no_grad():
        return compute_signals_from_pairs(
            weight_pairs(model, base),
            variant=opts.variant,
            y_min=opts.y_min,
            y_max=opts.y_max,
            device=str(device),
            progress=opts.progress,
        )


def save_model_copy(model, base: Checkpoint, dest: Path) -> None:
    """Write the current weights as an HF checkpoint in the original per-tensor dtypes."""
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardedWriter(tmp)
    state = model.state_dict()
    for name in base.keys():
        if name not in state:  # a buffer the model does not keep: copy it unchanged
            writer.add(name, base.get(name))
            continue
        writer.add(
            name, state[name].detach().to(_DTYPES.get(base.info(name)[1], state[name].dtype))
        )
    writer.close()
    base.copy_aux_files(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


# ----------------------------------------------------------------------------- state


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_state(out: Path, step: int, model, optimizer, history: list[dict]) -> None:
    """Trained parameters (fp32 master), optimizer and RNG state at `step`; keeps the latest only."""
    root = out / "state"
    root.mkdir(exist_ok=True)
    d = root / f"step-{step}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    (d / "params").mkdir()
    writer = ShardedWriter(d / "params", max_shard_bytes=2 << 30)  # bounded host memory
    for n, p in model.named_parameters():
        if p.requires_grad:
            writer.add(n, p)
    writer.close()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, d / "optimizer.pt")
    _write_json(d / "history.json", history)
    _write_json(root / "latest.json", {"step": step, "dir": d.name})
    for old in root.iterdir():
        if old.is_dir() and old.name != d.name:
            shutil.rmtree(old, ignore_errors=True)


def load_state(out: Path, model, optimizer) -> tuple[int, list[dict]]:
    """Restore the latest saved state; (0, []) when the run stopped before its first one."""
    latest = out / "state" / "latest.json"
    if not latest.is_file():
        return 0, []
    info = json.loads(latest.read_text())
    d = out / "state" / info["dir"]
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for shard in sorted((d / "params").glob("*.safetensors")):
            for n, t in load_file(str(shard)).items():
                trained.pop(n).copy_(t)
    if trained:
        raise QuantLRMError(
            f"the state in {d} lacks {len(trained)} trained tensors.", "start the run again."
        )
    extra = torch.load(d / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    return int(info["step"]), json.loads((d / "history.json").read_text())


def _same_path(a: str | None, b: str) -> bool:
    return a is not None and Path(a).resolve() == Path(b).resolve()


def _prepare_out(opts: FinetuneOptions) -> Path:
    out = Path(opts.out)
    run_json = out / "run.json"
    if opts.resume:
        if not run_json.is_file():
            raise QuantLRMError(
                f"{out} is not a finetune run directory (no run.json).", "start without --resume."
            )
        old = json.loads(run_json.read_text())["options"]
        same_file = {k: _same_path(old.get(k), getattr(opts, k)) for k in ("model", "data")}
        changed = [
            k
            for k in ("model", *_TRAJECTORY_FIELDS)
            if not same_file.get(k, old.get(k) == getattr(opts, k))
        ]
        if changed:
            raise QuantLRMError(
                f"--resume with changed option(s) {changed} (run.json has {[old.get(k) for k in changed]}).",
                "resume with the options of the original run, or start a new --out.",
            )
    elif out.exists() and any(out.iterdir()):
        raise QuantLRMError(
            f"output directory {out} already exists and is not empty.",
            "pass --resume to continue that run, or choose another --out.",
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------- training


def _load_model(opts: FinetuneOptions, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(opts.model)
        # fp32 master weights (bf16 only inside autocast), loaded on the host first:
        # device_map would need `accelerate`, which quantlrm does not depend on.
        model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise QuantLRMError(
            f"cannot load model/tokenizer from {opts.model} ({e}).",
            "pass a local HF checkpoint dir.",
        ) from e
    model.to(device)
    model.config.use_cache = False
    if opts.grad_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if opts.train == "linears":
        linear = {f"{n}.weight" for _, _, n in linear_names(model.config.to_dict())}
        for n, p in model.named_parameters():
            p.requires_grad_(n in linear)
    return model, tokenizer


def _make_optimizer(
    opts: FinetuneOptions, params: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    if opts.optimizer == "adafactor":
        # Factored second moments, no first moment: ~4 bytes/param less than AdamW's 8,
        # so an 8B model's fp32 weights + grads + state fit one 80 GB GPU. Its lr is a
        # relative step size (torch.optim.Adafactor), so it wants a larger --lr than AdamW.
        return torch.optim.Adafactor(params, lr=opts.lr, weight_decay=opts.weight_decay)
    return torch.optim.AdamW(
        params, lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.999), eps=1e-8
    )


def _train_step(model, batches, device: torch.device, bf16: bool) -> tuple[float, int]:
    """Forward/backward over the micro-batches of one step, the loss averaged over all
    response tokens of the step (as one big batch would); returns (loss, tokens)."""
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    total = 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),  # [b*(t-1), vocab]
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        if n_tokens:
            (loss / n_tokens).backward()
        total += float(loss.detach())
    return total / max(n_tokens, 1), n_tokens


def finetune(opts: FinetuneOptions) -> Path:
    """Run SFT with signal snapshots; returns the run directory."""
    opts = check_options(opts)
    data = SFTData(opts.data, opts.prompt_field, opts.response_field, opts.messages_field)
    base = Checkpoint(opts.model)
    linear_names(base.config)  # unknown architectures fail here, before training
    out = _prepare_out(opts)
    device = resolve_device(opts.device)
    bf16 = _use_bf16(opts, device)
    torch.manual_seed(opts.seed)
    model, tokenizer = _load_model(opts, device)
    template = resolve_template(tokenizer, opts.template)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(opts, params)
    start, history = load_state(out, model, optimizer) if opts.resume else (0, [])
    if opts.resume:
        log.info("resuming %s at step %d of %d", out, start, opts.steps)
    _write_json(out / "run.json", {"options": asdict(opts), "history": history, "done": False})
    last = opts.stop_after or opts.steps
    per_step = opts.batch_size * opts.grad_accum
    model.train()
    bar = tqdm(
        range(start, last), desc="finetune", disable=not opts.progress, initial=start, total=last
    )
    for step in bar:
        lr = lr_at(step, opts.steps, opts.warmup, opts.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        examples = [
            encode(tokenizer, data.messages(i), template, opts.max_len)
            for i in step_indices(step, per_step, len(data), opts.seed)
        ]
        batches = [
            collate(examples[i : i + opts.batch_size], pad_id)
            for i in range(0, per_step, opts.batch_size)
        ]
        loss, n_tokens = _train_step(model, batches, device, bf16)
        if opts.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        history.append({"step": done, "loss": loss, "lr": lr, "response_tokens": n_tokens})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        periodic = opts.state_every is not None and done % opts.state_every == 0
        if done in opts.snapshot_steps or done == last or periodic:
            _snapshot(model, base, opts, out, done, device, optimizer, history)
    _write_json(
        out / "run.json", {"options": asdict(opts), "history": history, "done": last == opts.steps}
    )
    return out


def _snapshot(model, base, opts, out: Path, step: int, device, optimizer, history) -> None:
    """Signals (and optionally the model) at `step`, then the training state."""
    from quantlrm.signals import save_signals

    model.eval()
    if step in opts.snapshot_steps:
        d = out / f"step-{step}"
        if d.exists():  # left by a run that stopped before saving its state: recompute
            shutil.rmtree(d)
        save_signals(snapshot_signals(model, base, opts, device), d)
        if opts.save_model:
            save_model_copy(model, base, d / "model")
    if opts.save_state:
        save_state(out, step, model, optimizer, history)
    _write_json(out / "run.json", {"options": asdict(opts), "history": history, "done": False})
    model.train()

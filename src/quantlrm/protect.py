"""Mixed-precision hypothesis test (paper Section 3.1 and 5.2, Tables 1 and 3).

Per linear layer, the top `fraction` of INPUT channels by a channel-importance signal are
kept in 16 bits (bit-identical to the original weights) and every other weight is
rounded to nearest on the group grid of `quantlrm.quantizer`. Comparing the accuracy of
such models across signals tells which signal finds the weights that matter.

Signals: the fine-tuning-signal variants of `quantlrm.signals` (from a saved signals
directory, or computed from a base checkpoint), or `activation`: Eq. 3, the mean over all
calibration tokens of the squared input activation of each channel.

How groups treat the protected columns: the group grid (scale and zero point of each
group of `group_size` input channels) is fitted to the UNPROTECTED weights of the group
only, so a protected outlier column does not widen the range the other columns are
rounded on; the protected columns are then written back unchanged. A group whose columns
are all protected stays exact. Channel order and groups are the checkpoint's own (no
reordering), so the output is a plain dequantized checkpoint that any loader reads.

The number of kept channels per layer is round(fraction * in_features), at least 1. Ties
in importance are broken by the lower channel index.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantlrm.arch import linear_names
from quantlrm.checkpoint import Checkpoint, atomic_output_dir
from quantlrm.errors import QuantLRMError
from quantlrm.quantizer import check_config, quantize

log = logging.getLogger(__name__)

SIGNAL_VARIANTS = ("both-ends", "both-ends-no-zero", "zeros-max", "zeros-min", "magnitude", "mid")
SIGNALS = (*SIGNAL_VARIANTS, "activation")

# The paper's names for the signals (Tables 1 and 3).
PAPER_NAMES = {
    "both-ends": "SFT both ends",
    "both-ends-no-zero": "SFT both ends (no zero handling)",
    "zeros-max": "SFT both ends w/ 0s maximized",
    "zeros-min": "SFT both ends w/ 0s minimized",
    "magnitude": "SFT",
    "mid": "SFT mid",
    "activation": "Activation",
}


@dataclass
class ProtectOptions:
    """Everything `quantlrm protect` accepts; stored in OUT/protect.json."""

    model: str
    out: str
    signal: str = "both-ends"
    fraction: float = 0.05
    bits: int = 3
    group_size: int = 128
    signals: str | None = None  # a `quantlrm signals` directory (signal variants)
    base: str | None = None  # or the pre-fine-tuning checkpoint to compute them from
    calib: str | None = None  # activation: calibration text source (quantlrm.calib)
    calib_field: str = "text"
    calib_samples: int = 128
    calib_seqlen: int = 512
    y_min: float = 1.0
    y_max: float = 10.0
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = True


# ----------------------------------------------------------------------------- numerics


def n_keep(in_features: int, fraction: float) -> int:
    """How many input channels a layer keeps: round(fraction * in), at least 1."""
    return min(in_features, max(1, round(fraction * in_features)))


def top_channels(importance: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the most important input channels; ties go to lower indices."""
    order = torch.sort(importance.to(torch.float64), descending=True, stable=True).indices
    return order[: n_keep(importance.numel(), fraction)].sort().values


def protect_weight(w: torch.Tensor, keep: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Columns `keep` unchanged, the rest round-to-nearest on a grid fitted to them alone.

    Returns a tensor of w's dtype and shape.
    """
    out, inp = w.shape
    g = check_config(bits, group_size, inp)
    mask = torch.zeros(inp, dtype=torch.bool, device=w.device)
    mask[keep.to(w.device)] = True
    mask_g = mask.view(1, inp // g, g)  # [1, in/g, g]
    wg = w.detach().to(torch.float32).reshape(out, inp // g, g)  # [out, in/g, g]
    # Stand-in for protected entries: the group's smallest unprotected weight, which leaves
    # the group's min/max (hence its scale and zero point) those of the unprotected weights.
    fill = wg.masked_fill(mask_g, math.inf).amin(dim=-1, keepdim=True)  # [out, in/g, 1]
    fill = torch.where(torch.isinf(fill), torch.zeros_like(fill), fill)
    filled = torch.where(mask_g, fill, wg).reshape(out, inp)
    result = quantize(filled, bits, g).dequant(w.dtype)
    result[:, mask] = w[:, mask]
    return result


def activation_importance(
    model: torch.nn.Module,
    blocks: Iterable[torch.Tensor],
    names: Sequence[str],
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Eq. 3: mean over all tokens of the squared input of each channel, per linear.

    `blocks`: token-id tensors [seq] or [batch, seq] without padding. Sums run in fp64.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # [tokens, in]
            s = x.pow(2).sum(dim=0, dtype=torch.float64)
            sums[name] = sums[name] + s if name in sums else s
            counts[name] += x.shape[0]

        return fn

    device = next(model.parameters()).device
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for ids in tqdm(list(blocks), desc="activations", disable=not progress):
                ids = ids.view(1, -1) if ids.dim() == 1 else ids
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not all(counts.values()):
        raise QuantLRMError(
            "no calibration tokens reached the model.", "pass non-empty calibration text."
        )
    return {n: (sums[n] / counts[n]).to(torch.float32).cpu() for n in names}


# ----------------------------------------------------------------------------- importance


def check_options(opts: ProtectOptions) -> None:
    if opts.signal not in SIGNALS:
        raise QuantLRMError(
            f"unknown signal {opts.signal!r}.", f"use one of: {', '.join(SIGNALS)}."
        )
    if not 0.0 < opts.fraction < 1.0:
        raise QuantLRMError(
            f"--fraction {opts.fraction} lies outside (0, 1).",
            "pass the kept share of channels, e.g. 0.05 for 5%.",
        )
    check_config(opts.bits, opts.group_size)
    if opts.signal == "activation":
        if opts.signals or opts.base:  # scripts loop over all signals with one argument set
            log.info(
                "--signal activation ranks by calibration activations; --signals/--base unused"
            )
    elif not (opts.signals or opts.base):
        raise QuantLRMError(
            f"--signal {opts.signal} needs fine-tuning signals.",
            "pass --signals DIR (from `quantlrm signals` or `quantlrm finetune`) or --base PRE_FINETUNING_MODEL.",
        )
    elif opts.signals and opts.base:
        raise QuantLRMError("both --signals and --base were given.", "pass only one of them.")


def signal_importance(opts: ProtectOptions) -> tuple[dict[str, torch.Tensor], str]:
    """Channel importance of a signal variant, and where it came from."""
    from quantlrm import signals as sg

    if opts.signals:
        sig = sg.load_signals(opts.signals)
        got = sig.stats.get("variant")
        if got != opts.signal:
            raise QuantLRMError(
                f"{opts.signals} holds {got!r} signals, not {opts.signal!r}.",
                f"recompute them with `quantlrm signals --variant {opts.signal}`, or pass --base instead.",
            )
        return sig.importance, f"signals dir {opts.signals}"
    sig = sg.compute_signals(
        opts.base, opts.model, variant=opts.signal, y_min=opts.y_min, y_max=opts.y_max,
        device=opts.device, progress=opts.progress,
    )  # fmt: skip
    return sig.importance, f"computed from base {opts.base}"


def calibration_importance(
    opts: ProtectOptions, names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """Activation importance (Eq. 3) of the model on calibration text, and the text's source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlrm import calib

    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    data = calib.load_calibration(
        tokenizer,
        opts.calib,
        field=opts.calib_field,
        samples=opts.calib_samples,
        seqlen=opts.calib_seqlen,
    )
    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype="auto").to(opts.device).eval()
    imp = activation_importance(model, data.input_ids, names, opts.progress)
    del model
    return imp, data.source


# ----------------------------------------------------------------------------- model


def protect_model(opts: ProtectOptions) -> Path:
    """Write the mixed-precision model to opts.out (HF checkpoint + protect.json)."""
    check_options(opts)
    ckpt = Checkpoint(opts.model)
    names = [n for _, _, n in linear_names(ckpt.config)]
    for n in names:
        check_config(opts.bits, opts.group_size, ckpt.info(f"{n}.weight")[0][1])
    if opts.signal == "activation":
        importance, source = calibration_importance(opts, names)
    else:
        importance, source = signal_importance(opts)
    _check_importance(importance, names, ckpt)

    from quantlrm.export import get_writer

    modules, kept_weights, all_weights = {}, 0, 0
    linear_weights = {f"{n}.weight": n for n in names}
    with atomic_output_dir(opts.out, overwrite=opts.overwrite) as tmp:
        ckpt.copy_aux_files(tmp)
        writer = get_writer("fake", tmp, opts.bits, opts.group_size)
        for key in tqdm(ckpt.keys(), desc="protect", disable=not opts.progress):
            t = ckpt.get(key)
            if key not in linear_weights:
                writer.add_tensor(key, t)
                continue
            name = linear_weights[key]
            keep = top_channels(importance[name], opts.fraction)
            mixed = protect_weight(t.to(opts.device), keep, opts.bits, opts.group_size)
            writer.add_tensor(key, mixed.cpu())
            modules[name] = {"in_features": t.shape[1], "kept": keep.tolist()}
            kept_weights += keep.numel() * t.shape[0]
            all_weights += t.numel()
        writer.close(ckpt.config)
        report = {
            "signal": opts.signal,
            "label": paper_label(opts.signal, source),
            "importance_source": source,
            "fraction": opts.fraction,
            "bits": opts.bits,
            "group_size": opts.group_size,
            "kept_weight_fraction": kept_weights / max(all_weights, 1),
            "options": asdict(opts),
            "modules": modules,
        }
        (tmp / "protect.json").write_text(json.dumps(report, indent=1))
    return Path(opts.out)


def _check_importance(
    importance: Mapping[str, torch.Tensor], names: Sequence[str], ckpt: Checkpoint
) -> None:
    for n in names:
        width = ckpt.info(f"{n}.weight")[0][1]
        if n not in importance or importance[n].numel() != width:
            raise QuantLRMError(
                f"the signals have no importance vector of length {width} for {n}.",
                "compute the signals for this very model (same architecture and size).",
            )


# ----------------------------------------------------------------------------- tables


def paper_label(signal: str, calib_source: str | None = None) -> str:
    """The paper's row name for a signal, e.g. 'SFT both ends' or 'Activation on AWQ calibration'."""
    if signal == "activation":
        if calib_source is None:
            return "Activation"
        if calib_source == "pileval":
            return "Activation on AWQ calibration"
        if calib_source.startswith("builtin"):
            return "Activation on built-in text"
        return f"Activation on {Path(calib_source).name or calib_source}"
    return PAPER_NAMES.get(signal, signal)


def signals_table(
    rows: Sequence[tuple[str, Mapping]],
    tasks: Sequence[str] | None = None,
    model: str | None = None,
) -> str:
    """A Markdown table like the paper's Tables 1 and 3: one row per protection signal.

    rows: (signal label, eval summary) pairs; a summary is what `quantlrm.eval.evaluate`
    returns ({"tasks": {name: {"accuracy": 0..1, "display": ...}}}) or a plain
    {task: accuracy 0..1} mapping. Accuracies are shown in %, the per-column best in bold.
    """
    if not rows:
        raise QuantLRMError("no rows to tabulate.", "pass at least one (signal, summary) pair.")
    parsed = [(label, _accuracies(summary)) for label, summary in rows]
    names = list(tasks) if tasks else list(dict.fromkeys(t for _, acc in parsed for t in acc))
    displays = _displays(rows, names)
    table = []
    for label, acc in parsed:
        vals = [100.0 * acc[t] if t in acc else None for t in names]
        present = [v for v in vals if v is not None]
        table.append(
            (
                label,
                vals,
                sum(present) / len(present) if len(present) == len(vals) and vals else None,
            )
        )
    cols = list(zip(*[vals + [avg] for _, vals, avg in table], strict=True))
    best = [max((v for v in col if v is not None), default=None) for col in cols]
    head = (["Model"] if model else []) + [
        "Protection signal",
        *[displays[t] for t in names],
        "Avg",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, vals, avg in table:
        cells = [
            _cell(v, b, 1 if i < len(names) else 2)
            for i, (v, b) in enumerate(zip(vals + [avg], best, strict=True))
        ]
        lines.append("| " + " | ".join(([model] if model else []) + [label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _accuracies(summary: Mapping) -> dict[str, float]:
    if "tasks" in summary and isinstance(summary["tasks"], Mapping):
        return {t: float(r["accuracy"]) for t, r in summary["tasks"].items() if "accuracy" in r}
    return {t: float(v) for t, v in summary.items()}


def _displays(rows: Sequence[tuple[str, Mapping]], names: Sequence[str]) -> dict[str, str]:
    out = {t: t for t in names}
    for _, s in rows:
        for t, r in (s.get("tasks") or {}).items() if isinstance(s.get("tasks"), Mapping) else ():
            if t in out and isinstance(r, Mapping) and r.get("display"):
                out[t] = r["display"]
    return out


def _cell(v: float | None, best: float | None, digits: int) -> str:
    if v is None:
        return "-"
    s = f"{v:.{digits}f}"
    return f"**{s}**" if best is not None and round(v, digits) == round(best, digits) else s

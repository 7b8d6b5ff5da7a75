"""The block-by-block quantization loop: capture, search, apply, clip, quantize, write, resume.

One decoder layer is in memory at a time (built on the meta device, filled with only its
own tensors from the safetensors shards), plus the calibration activations, so the peak
is one layer + activations whatever the model size.

Per layer, as AWQ's published algorithm does it:
1. run the calibration inputs through the fp layer, capturing each scale group's input,
   the inspected module's output and a token subsample of every linear's input;
   the layer's fp output becomes the next layer's input (`propagate="fp"`, AWQ's choice:
   each layer is searched against the model's true activations and errors do not
   compound into the targets; `propagate="quant"` uses the quantized layer's output instead);
2. search one scale vector per scale group on the fp layer (`quantlrm.search`);
3. fold 1/s into the op before each group and s into the group's weight columns;
4. search clip values on the scaled weights and scaled inputs (not for q/k);
5. quantize every linear (`quantlrm.quantizer.quantize`, round-to-nearest; or with
   `rounding="gptq"`, `quantlrm.gptq`: GPTQ's error compensation on the same grid, with the
   Hessian of the scaled inputs x/s, accumulated over all calibration tokens in step 1),
   measure the layer's output error against the fp layer, write the layer's state into the
   work dir `OUT.partial/`.
At the end the work dir is streamed into the chosen format's writer inside an atomic
output directory. `resume=True` continues after the last finished layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from quantlrm import gptq as G
from quantlrm import search as S
from quantlrm.arch import Arch, ScaleGroup, attention_shape, get_arch, num_layers
from quantlrm.checkpoint import Checkpoint, atomic_output_dir
from quantlrm.errors import QuantLRMError
from quantlrm.export import check_format, get_writer
from quantlrm.quantizer import QuantResult, check_config, quantize

log = logging.getLogger(__name__)

METHODS = ("rtn", "awq", "quantlrm")
GROUP_IMPORTANCE = ("authors", "mean")
PROPAGATE = ("fp", "quant")
ROUNDINGS = ("rtn", "gptq")
CLIP_SKIP = ("q", "k")  # AWQ does not clip q/k: attention scores amplify their error
SEARCH_FILE = "search.safetensors"
REPORT_FILE = "quantlrm.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class QuantizeOptions:
    """Everything a quantization run depends on; recorded in quantlrm.json under "options"."""

    model: str | Path
    out: str | Path
    method: str = "quantlrm"  # "rtn" | "awq" | "quantlrm"
    bits: int = 3
    group_size: int = 128  # -1 = per output channel
    signals: str | Path | None = None  # dir written by `quantlrm signals`
    base: str | Path | None = None  # pre-fine-tuning checkpoint: compute signals on the fly
    calib: str | Path | None = None  # file, datasets name, "builtin"; None = pile-val or builtin
    calib_field: str = "text"
    calib_samples: int = 128
    calib_seqlen: int = 512
    device: str = "cpu"
    format: str = "fake"
    resume: bool = False
    apply: str | Path | None = None  # a run's search.safetensors: re-apply, no search
    # method options
    group_importance: str = "authors"  # "authors": q's for q/k/v, gate's for gate/up; "mean"
    act_factor: bool = False  # s = (I * mean|x|)^alpha, the paper's 70B adaptation
    variant: str = "both-ends"  # signal variant when computing on the fly from `base`
    clip: bool | None = None  # None: off for rtn, on for awq/quantlrm
    duo_scaling: bool = False  # awq only: s = mean|x|^a / wmean^(1-a) (AutoAWQ, llm-compressor)
    n_grid: int = 20
    propagate: str = "fp"  # next layer's inputs from the "fp" or the "quant" layer
    batch_tokens: int = 16384  # calibration tokens per forward chunk
    rounding: str = "rtn"  # "rtn": round to nearest; "gptq": GPTQ error compensation after the scales
    gptq_damp: float = 0.01  # GPTQ: damping added to H's diagonal, relative to its mean
    gptq_block: int = 128  # GPTQ: columns per lazy-batch block (speed only; the result is the same)
    gptq_act_order: bool | None = None  # GPTQ: columns by decreasing H diagonal, group grids fixed
    # beforehand; None = on with GPTQ rounding (it never hurt significantly and often helped: BENCHMARKS)
    overwrite: bool = False
    progress: bool = True
    importance: dict | None = field(default=None, repr=False)  # in-memory signals (library use)

    @property
    def use_clip(self) -> bool:
        return self.method != "rtn" if self.clip is None else bool(self.clip)

    @property
    def use_act_order(self) -> bool:
        return self.rounding == "gptq" if self.gptq_act_order is None else bool(self.gptq_act_order)


# ----------------------------------------------------------------------------- validation


def _validate(opts: QuantizeOptions) -> None:
    check_config(opts.bits, opts.group_size)
    check_format(opts.format, opts.bits)
    if opts.method not in METHODS:
        raise QuantLRMError(f"unknown method {opts.method!r}.", f"use --method {' | '.join(METHODS)}.")
    if opts.group_importance not in GROUP_IMPORTANCE:
        raise QuantLRMError(
            f"unknown group importance rule {opts.group_importance!r}.",
            f"use --group-importance {' | '.join(GROUP_IMPORTANCE)}.",
        )
    if opts.propagate not in PROPAGATE:
        raise QuantLRMError(f"unknown propagation {opts.propagate!r}.", "use fp or quant.")
    if opts.n_grid < 1 or opts.batch_tokens < 1:
        raise QuantLRMError("n_grid and batch_tokens must be positive.", "use the defaults (20, 16384).")
    _validate_rounding(opts)
    if opts.importance is not None and not isinstance(opts.importance, dict):
        raise QuantLRMError("importance must be a dict of module name -> tensor.", "pass signals=DIR instead.")
    has_signals = opts.signals is not None or opts.base is not None or opts.importance is not None
    if opts.method == "quantlrm" and opts.apply is None and not has_signals:
        raise QuantLRMError(
            "--method quantlrm needs fine-tuning signals.",
            "pass --signals DIR (from `quantlrm signals`) or --base BASE_MODEL to compute them.",
        )
    if opts.duo_scaling and opts.method != "awq":
        raise QuantLRMError("duo scaling is an AWQ variant.", "use it with --method awq only.")
    if opts.method != "quantlrm" and has_signals:
        raise QuantLRMError(
            f"--signals/--base are only used by --method quantlrm, not {opts.method}.",
            "drop them, or use --method quantlrm.",
        )
    if str(opts.device).startswith("cuda") and not torch.cuda.is_available():
        raise QuantLRMError("--device cuda was asked for, but torch sees no CUDA GPU.", "use --device cpu.")
    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not opts.overwrite:
        raise QuantLRMError(
            f"output directory {out} already exists and is not empty.",
            "choose another --out or remove the old one.",
        )
    if Path(opts.out).resolve() == Path(opts.model).resolve():
        raise QuantLRMError("--out is the input model directory.", "write to a new directory.")


def _validate_rounding(opts: QuantizeOptions) -> None:
    if opts.rounding not in ROUNDINGS:
        raise QuantLRMError(f"unknown rounding {opts.rounding!r}.", f"use --rounding {' | '.join(ROUNDINGS)}.")
    damp, block = opts.gptq_damp, opts.gptq_block
    damp0, block0 = QuantizeOptions.gptq_damp, QuantizeOptions.gptq_block  # the dataclass defaults
    if not isinstance(damp, (int, float)) or not (damp > 0 and math.isfinite(damp)):
        raise QuantLRMError(f"GPTQ damping must be a positive number, got {damp!r}.", f"use --gptq-damp {damp0}.")
    if not isinstance(block, int) or block < 1:
        raise QuantLRMError(f"GPTQ block must be a positive integer, got {block!r}.", f"use --gptq-block {block0}.")
    if opts.rounding != "gptq" and (damp != damp0 or block != block0 or opts.gptq_act_order):  # an explicit True
        raise QuantLRMError(
            "--gptq-damp/--gptq-block/--gptq-act-order were given but rounding is rtn.",
            "add --rounding gptq, or drop them.",
        )


def _check_shapes(ckpt: Checkpoint, arch: Arch, bits: int, group_size: int) -> None:
    for short in arch.linears:
        name = arch.linear_path(0, short) + ".weight"
        if name not in ckpt:
            raise QuantLRMError(
                f"{ckpt.path} has no tensor {name}, expected for model_type {ckpt.config.get('model_type')!r}.",
                "check that the checkpoint is complete and unmodified.",
            )
        shape, _ = ckpt.info(name)
        check_config(bits, group_size, shape[1])


def _model_dtype(ckpt: Checkpoint, arch: Arch) -> torch.dtype:
    _, dt = ckpt.info(arch.linear_path(0, next(iter(arch.linears))) + ".weight")
    if dt not in _DTYPES:
        raise QuantLRMError(f"weights are stored as {dt}.", "quantize an fp32, fp16 or bf16 checkpoint.")
    return _DTYPES[dt]


# ----------------------------------------------------------------------------- signals


def _load_importance(opts: QuantizeOptions) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """Importance vectors and a description (source, variant, hash) for quantlrm.json."""
    if opts.method != "quantlrm" or opts.apply is not None:
        return None, {}
    if opts.importance is not None:
        imp, info = dict(opts.importance), {"source": "in-memory"}
    else:
        from quantlrm import signals as sig_mod  # written by the signals engineer

        if opts.signals is not None:
            sig = sig_mod.load_signals(opts.signals)
            info = {"source": str(opts.signals)}
        else:
            sig = sig_mod.compute_signals(
                opts.base, opts.model, variant=opts.variant, device=opts.device, progress=opts.progress
            )
            info = {"source": f"computed from base {opts.base}"}
        imp = sig.importance
        info["variant"] = sig.stats.get("variant") if isinstance(sig.stats, dict) else None
    info["hash"] = _hash_tensors(imp)
    return imp, info


def _hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _check_importance(imp: dict[str, torch.Tensor], ckpt: Checkpoint, arch: Arch, opts) -> None:
    """Signals must name this model's modules with its input widths."""
    n = num_layers(ckpt.config)
    needed = []
    for layer in range(n):
        for g in arch.scale_groups:
            shorts = (g.importance_from,) if opts.group_importance == "authors" else g.linears
            needed += [arch.linear_path(layer, s) for s in shorts]
    missing = [m for m in needed if m not in imp]
    if missing:
        example = next(iter(imp), "none")
        raise QuantLRMError(
            f"the signals have no importance for {missing[0]} ({len(missing)} modules missing; "
            f"they name e.g. {example}): they come from another model.",
            "compute signals for this model with `quantlrm signals --base BASE --model THIS_MODEL`.",
        )
    for m in needed:
        in_f = ckpt.info(m + ".weight")[0][1]
        if tuple(imp[m].shape) != (in_f,):
            raise QuantLRMError(
                f"importance of {m} has shape {tuple(imp[m].shape)}, the model's input width is {in_f}: "
                "the signals come from another model.",
                "compute signals for this model with `quantlrm signals`.",
            )
        if not torch.isfinite(imp[m]).all() or (imp[m] < 0).any():
            raise QuantLRMError(f"importance of {m} has negative or non-finite values.", "recompute the signals.")


# ----------------------------------------------------------------------------- model skeleton


class _Stop(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for a decoder layer: records its inputs, passes hidden states through."""

    def __init__(self, idx: int, store: dict, stop_at: int):
        super().__init__()
        self.idx, self.store, self.stop_at = idx, store, stop_at

    def forward(self, hidden_states, *args, **kwargs):
        self.store["kwargs"][self.idx] = (args, kwargs)
        if self.idx == 0:
            self.store["inputs"].append(hidden_states)
        if self.idx == self.stop_at:
            raise _Stop
        return hidden_states


class Skeleton:
    """The model's modules on the meta device; embeddings and one layer at a time made real."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt, self.device, self.dtype = ckpt, device, dtype
        self.config = AutoConfig.from_pretrained(ckpt.path)
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.requires_grad_(False)
        self.base = self.model.base_model
        self.prefix = self.model.base_model_prefix
        self.layers = self.base.layers
        self.n_layers = len(self.layers)

    def materialize_outer(self) -> None:
        """Load embeddings (and other non-layer weights of the base model); rebuild rotary buffers."""
        for mod_name, mod in self.base.named_modules():
            if mod_name == "layers" or mod_name.startswith("layers."):
                continue
            for pname, _ in list(mod.named_parameters(recurse=False)):
                key = f"{self.prefix}.{mod_name}.{pname}" if mod_name else f"{self.prefix}.{pname}"
                t = self.ckpt.get(key).to(self.device, self.dtype)
                mod._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
            bufs = list(mod.named_buffers(recurse=False))
            if bufs:
                mod.to_empty(device=self.device, recurse=False)
                for _, b in bufs:
                    b.fill_(float("nan"))
                self.model._init_weights(mod)  # how transformers itself fills non-persistent buffers
                bad = [n for n, b in mod.named_buffers(recurse=False) if b.is_floating_point() and b.isnan().any()]
                if bad:
                    raise QuantLRMError(
                        f"could not initialise buffer {mod_name}.{bad[0]} for this model type.",
                        "report this model type; it needs an entry in quantlrm/arch.py.",
                    )

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, chunk: int) -> tuple[list[torch.Tensor], list]:
        """Layer 0's input hidden states (in chunks) and every layer's call arguments.

        The arguments (rotary embeddings, masks, position ids, as this transformers
        version passes them) are captured once with batch 1; they broadcast over chunks,
        since all calibration blocks are full length.
        """
        store: dict = {"kwargs": [None] * self.n_layers, "inputs": []}
        orig = list(self.layers)
        try:
            for i in range(self.n_layers):
                self.layers[i] = _Catcher(i, store, self.n_layers - 1)
            self._run(input_ids[:1].to(self.device))
            store["inputs"].clear()
            for i in range(self.n_layers):
                self.layers[i].stop_at = 0
            for ids in input_ids.split(chunk):
                self._run(ids.to(self.device))
        finally:
            for i, layer in enumerate(orig):
                self.layers[i] = layer
        return store["inputs"], store["kwargs"]

    def _run(self, ids: torch.Tensor) -> None:
        try:
            self.base(input_ids=ids, use_cache=False)
        except _Stop:
            return
        raise RuntimeError("the decoder layers were never called")  # pragma: no cover

    def layer_names(self, i: int) -> list[str]:
        return list(self.layers[i].state_dict().keys())

    def load_layer(self, i: int, tensors: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """Layer i with the checkpoint's tensors (or the given ones) on the device."""
        layer = self.layers[i]
        lp = f"{self.prefix}.layers.{i}."
        names = self.layer_names(i)
        sd = {}
        for n in names:
            t = tensors[n] if tensors is not None else self.ckpt.get(lp + n)
            sd[n] = t.to(self.device, self.dtype)
        layer.load_state_dict(sd, strict=True, assign=True)
        layer.requires_grad_(False)
        return layer

    def unload_layer(self, i: int) -> None:
        self.layers[i].to("meta")


def _call(module: torch.nn.Module, x: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs, key = call
    out = module(*args, **{key: x}, **kwargs) if key else module(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _layer_call(kwargs_entry) -> tuple:
    args, kwargs = kwargs_entry
    return (args, kwargs, None)


# ----------------------------------------------------------------------------- one layer


@dataclass
class Captured:
    """What one fp forward of a layer leaves for the searches (all chunked like the inputs)."""

    outputs: list[torch.Tensor]  # the layer's fp output
    group_inputs: dict[str, list[torch.Tensor]]
    group_refs: dict[str, list[torch.Tensor]]
    group_calls: dict[str, tuple]
    clip_inputs: dict[str, torch.Tensor]  # short -> [~512, in] token subsample
    # short -> sum of x^T x over ALL tokens (GPTQ); linears reading one input share one object
    hessians: dict[str, G.HessianAccumulator] = field(default_factory=dict)


@torch.no_grad()
def capture_layer(
    layer: torch.nn.Module,
    arch: Arch,
    xs: list[torch.Tensor],
    call: tuple,
    clip_linears: list[str],
    hessians: bool = False,
    groups: bool = True,
) -> Captured:
    """Run the fp layer over all chunks with hooks on the scale groups and clipped linears
    (and, for GPTQ, on every linear to accumulate x^T x; `groups=False` skips the search's
    captures when re-applying a search file)."""
    total = sum(x.shape[0] * x.shape[1] for x in xs)
    stride = max(1, total // 512)
    offset = [0]
    cap = Captured([], {}, {}, {}, {})
    sub: dict[str, list[torch.Tensor]] = {s: [] for s in clip_linears}
    handles = []

    def pre_group(name):
        def hook(mod, args):
            cap.group_inputs.setdefault(name, []).append(args[0])

        return hook

    def inspect_pre(name):
        def hook(mod, args, kwargs):
            if name not in cap.group_calls:
                if args:
                    cap.group_calls[name] = (args[1:], dict(kwargs), None)
                else:
                    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                    cap.group_calls[name] = ((), rest, "hidden_states")

        return hook

    def inspect_post(name):
        def hook(mod, args, out):
            cap.group_refs.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out)

        return hook

    def pre_clip(short):
        def hook(mod, args):
            x2 = args[0].reshape(-1, args[0].shape[-1])
            start = (-offset[0]) % stride
            sub[short].append(x2[start::stride])

        return hook

    seen: list[tuple[torch.Tensor, G.HessianAccumulator]] = []  # this chunk's distinct linear inputs

    def pre_hessian(short):
        def hook(mod, args):
            x = args[0]
            acc = next((a for t, a in seen if t is x), None)  # q/k/v (gate/up) get the same tensor
            if acc is None:
                acc = cap.hessians.get(short) or G.HessianAccumulator(x.shape[-1], x.device)
                acc.add(x)
                seen.append((x, acc))
            if cap.hessians.setdefault(short, acc) is not acc:
                raise RuntimeError(f"linear {short} changed which input it shares between chunks")

        return hook

    try:
        for g in arch.scale_groups if groups else ():
            first = layer.get_submodule(arch.linears[g.linears[0]])
            handles.append(first.register_forward_pre_hook(pre_group(g.name)))
            mod = layer.get_submodule(g.inspect)
            handles.append(mod.register_forward_pre_hook(inspect_pre(g.name), with_kwargs=True))
            handles.append(mod.register_forward_hook(inspect_post(g.name)))
        for short in clip_linears:
            handles.append(layer.get_submodule(arch.linears[short]).register_forward_pre_hook(pre_clip(short)))
        if hessians:
            for short, path in arch.linears.items():
                handles.append(layer.get_submodule(path).register_forward_pre_hook(pre_hessian(short)))
        for x in xs:
            cap.outputs.append(_call(layer, x, call))
            offset[0] += x.shape[0] * x.shape[1]
            seen.clear()
    finally:
        for h in handles:
            h.remove()
    cap.clip_inputs = {s: torch.cat(v) for s, v in sub.items()}
    return cap


def group_loss_fn(
    layer: torch.nn.Module, arch: Arch, group: ScaleGroup, cap: Captured
) -> Callable[[list[torch.Tensor]], float]:
    """MSE of the inspected module's output with the group's weights replaced."""
    module = layer.get_submodule(group.inspect)
    lins = [layer.get_submodule(arch.linears[s]) for s in group.linears]
    inputs, refs, call = cap.group_inputs[group.name], cap.group_refs[group.name], cap.group_calls[group.name]
    numel = sum(r.numel() for r in refs)

    @torch.no_grad()
    def loss(ws: list[torch.Tensor]) -> float:
        saved = [lin.weight.data for lin in lins]
        try:
            for lin, w in zip(lins, ws, strict=True):
                lin.weight.data = w
            tot = torch.zeros((), dtype=torch.float64, device=refs[0].device)
            for x, r in zip(inputs, refs, strict=True):
                tot += (_call(module, x, call).float() - r.float()).pow(2).sum()
        finally:
            for lin, w in zip(lins, saved, strict=True):
                lin.weight.data = w
        return float(tot) / numel

    return loss


@dataclass
class LayerPlan:
    """Searched (or re-applied) transforms of one layer: scales per group, clip per linear."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> s [in of its linears]
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # short -> clip_max [out, in/g]
    record: dict = field(default_factory=dict)


def tied_heads(config: dict, group_in: int, prev_out: int) -> tuple[int, int, int] | None:
    """(n_heads, n_kv, head_dim) when a group's input is wider than its prev linear's output (GQA)."""
    if group_in == prev_out:
        return None
    nh, nkv, hd = attention_shape(config)
    if group_in != nh * hd or prev_out != nkv * hd:
        raise QuantLRMError(
            f"cannot fold scales of width {group_in} into a linear with {prev_out} outputs.",
            "this architecture needs a fix in quantlrm/arch.py.",
        )
    return nh, nkv, hd


def search_layer(
    layer: torch.nn.Module,
    arch: Arch,
    config: dict,
    idx: int,
    cap: Captured,
    opts: QuantizeOptions,
    importance: dict[str, torch.Tensor] | None,
) -> LayerPlan:
    """Scale search for each group of layer `idx` on the fp layer (groups searched independently)."""
    plan = LayerPlan(record={"groups": {}})
    if opts.method == "rtn":
        return plan
    for g in arch.scale_groups:
        weights = [layer.get_submodule(arch.linears[s]).weight.data for s in g.linears]
        in_f = weights[0].shape[1]
        prev_out = layer.get_submodule(g.prev).weight.shape[0] if g.prev_kind == "linear" else in_f
        heads = tied_heads(config, in_f, prev_out)
        act = S.mean_abs_chunks(cap.group_inputs[g.name])  # AWQ's statistic; QuantLRM's diagnostics
        rank_corr = None
        if opts.method == "awq":
            stat = act
        else:
            shorts = (g.importance_from,) if opts.group_importance == "authors" else g.linears
            stat = torch.stack([importance[arch.linear_path(idx, s)].float() for s in shorts]).mean(0)
            stat = stat.to(weights[0].device)
            rank_corr = S.rank_correlation(stat, act)  # how far the signals' channel order is AWQ's
            if opts.act_factor:
                stat = stat * act
        w_mean = S.weight_mean(weights, opts.group_size) if opts.duo_scaling else None
        expand = None
        if heads is not None:
            stat = S.tie_heads(stat, *heads)
            w_mean = S.tie_heads(w_mean, *heads) if w_mean is not None else None
            expand = lambda s, h=heads: S.expand_heads(s, *h)  # noqa: E731
        res = S.search_scales(
            weights,
            stat,
            group_loss_fn(layer, arch, g, cap),
            opts.bits,
            opts.group_size,
            normalise=opts.method == "awq",
            n_grid=opts.n_grid,
            expand=expand,
            w_mean=w_mean,
        )
        plan.scales[g.name] = res.scales
        plan.record["groups"][g.name] = {
            "alpha": res.alpha,
            "loss_before": res.loss_before,
            "loss_after": res.loss_after,
        }
        if rank_corr is not None:
            plan.record["groups"][g.name]["rank_corr_act"] = rank_corr
    return plan


def search_summary(report: dict) -> dict | None:
    """What the scale search did over all layers and scale groups of one quantization (its
    quantlrm.json): the share of groups left unscaled (alpha = 0), the mean alpha, the mean
    relative change of the group output loss, and for QuantLRM the mean Spearman correlation
    of its channel importance with AWQ's mean |x|. None for a run without a search (RTN)."""
    groups = [g for layer in report.get("layers", []) for g in (layer.get("groups") or {}).values()]
    if not groups:
        return None
    alphas = [g["alpha"] for g in groups]
    change = [g["loss_after"] / g["loss_before"] - 1 for g in groups if g.get("loss_before")]
    corr = [g["rank_corr_act"] for g in groups if "rank_corr_act" in g]
    return {"groups": len(groups), "alpha_zero": sum(a == 0 for a in alphas) / len(alphas),
            "alpha_mean": sum(alphas) / len(alphas),
            "loss_change": sum(change) / len(change) if change else None,
            "rank_corr_act": sum(corr) / len(corr) if corr else None}


def apply_scales(
    sd: dict[str, torch.Tensor], arch: Arch, config: dict, scales: dict[str, torch.Tensor]
) -> None:
    """Fold each group's s into its weights' columns and 1/s into the op before it (fp32, in place).

    `sd` maps layer-local names ("self_attn.q_proj.weight") to fp32 tensors. The fp
    function of the layer is unchanged (up to rounding).
    """
    for g in arch.scale_groups:
        s = scales.get(g.name)
        if s is None:
            continue
        s = s.float()
        for short in g.linears:
            key = arch.linears[short] + ".weight"
            sd[key] = S.scale_columns(sd[key], s.to(sd[key].device))
        pw, pb = g.prev + ".weight", g.prev + ".bias"
        if g.prev_kind == "norm":
            sd[pw], b = S.fold_into_norm(sd[pw], sd.get(pb), s.to(sd[pw].device))
        else:
            heads = tied_heads(config, s.numel(), sd[pw].shape[0])
            s_rows = s
            if heads is not None:
                nh, nkv, hd = heads
                s_heads = s.reshape(nkv, nh // nkv, hd)
                if not torch.equal(s_heads, s_heads[:, :1].expand_as(s_heads)):
                    raise QuantLRMError(
                        f"scales of group {g.name} differ across query heads sharing a KV head; "
                        "they cannot be folded into v_proj.",
                        "re-run the search (these scales were not written by quantlrm).",
                    )
                s_rows = s_heads[:, 0].reshape(-1)
            sd[pw], b = S.fold_into_rows(sd[pw], sd.get(pb), s_rows.to(sd[pw].device))
        if b is not None:
            sd[pb] = b


def scale_of_linear(arch: Arch, scales: dict[str, torch.Tensor], short: str) -> torch.Tensor | None:
    for g in arch.scale_groups:
        if short in g.linears and g.name in scales:
            return scales[g.name]
    return None


def quantize_layer(
    sd: dict[str, torch.Tensor], arch: Arch, plan: LayerPlan, opts: QuantizeOptions, cap: Captured | None
) -> dict[str, QuantResult]:
    """Clip search (when a calibration capture is given and clips are not yet known) + quantize
    (round-to-nearest, or GPTQ with the Hessian of the scaled inputs: needs `cap.hessians`)."""
    results = {}
    clip_ratio = {}
    gptq_rec = {}
    shared: dict[tuple, tuple] = {}  # GPTQ: (scale, linears) per shared input and scale, in order
    if opts.rounding == "gptq" and (cap is None or not cap.hessians):
        raise RuntimeError("GPTQ rounding needs the layer's Hessians (capture_layer(..., hessians=True))")
    for short, path in arch.linears.items():
        w = sd[path + ".weight"]
        s = scale_of_linear(arch, plan.scales, short)
        if opts.use_clip and short not in CLIP_SKIP and short not in plan.clips and cap is not None:
            if short in cap.clip_inputs:
                x = cap.clip_inputs[short].float()
                if s is not None:
                    x = x / s.to(x.device)
                plan.clips[short] = S.search_clip(w, x, opts.bits, opts.group_size)
        if opts.rounding == "gptq":
            shared.setdefault((id(cap.hessians[short]), id(s)), (s, []))[1].append(short)
        else:
            results[short] = quantize(w, opts.bits, opts.group_size, clip_max=plan.clips.get(short))
    for s, shorts in shared.values():  # one GPTQ pass per shared input (its rows are independent)
        ws = [sd[arch.linears[x] + ".weight"] for x in shorts]
        h = G.scale_hessian(cap.hessians[shorts[0]].hessian(), s.to(ws[0].device) if s is not None else None)
        done = G.gptq_quantize_shared(ws, h.to(ws[0].device), opts.bits, opts.group_size,
                                      [plan.clips.get(x) for x in shorts], opts.gptq_damp, opts.gptq_block,
                                      opts.use_act_order)
        for x, (res, st) in zip(shorts, done, strict=True):
            results[x] = res
            gptq_rec[x] = st.as_dict()
    for short, path in arch.linears.items():
        clip = plan.clips.get(short)
        if clip is not None:
            w = sd[path + ".weight"]
            absmax = w.reshape(w.shape[0], -1, results[short].group_size).abs().amax(-1)
            clip_ratio[short] = float((clip.to(absmax) / absmax.clamp(min=1e-12)).clamp(max=1).mean())
    results = {short: results[short] for short in arch.linears}  # the architecture's order
    plan.record["clip"] = clip_ratio
    if gptq_rec:
        plan.record["gptq"] = gptq_rec
    return results


# ----------------------------------------------------------------------------- work dir / resume


class WorkDir:
    """OUT.partial/: one state file per finished layer plus state.json (atomic writes)."""

    def __init__(self, out: Path, fingerprint: dict, resume: bool):
        self.path = out.with_name(out.name + ".partial")
        self.fingerprint = fingerprint
        self.done: list[int] = []
        state = self.path / "state.json"
        if self.path.exists() and resume and state.is_file():
            saved = json.loads(state.read_text())
            if saved.get("fingerprint") != fingerprint:
                diff = sorted(
                    k
                    for k in set(fingerprint) | set(saved.get("fingerprint", {}))
                    if fingerprint.get(k) != saved.get("fingerprint", {}).get(k)
                )
                raise QuantLRMError(
                    f"{self.path} belongs to a run with other settings ({', '.join(diff)} differ).",
                    f"resume with the same options, or delete {self.path} to start over.",
                )
            self.done = [i for i in saved["done"] if (self.path / self.layer_file(i)).is_file()]
            log.info("resuming %s: %d layers already done", self.path, len(self.done))
        else:
            if self.path.exists():
                log.warning("removing the stale partial run %s (pass resume to continue it)", self.path)
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            self._write_state()

    @staticmethod
    def layer_file(i: int) -> str:
        return f"layer-{i:05d}.safetensors"

    def _write_state(self) -> None:
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done}, indent=1))
        os.replace(tmp, self.path / "state.json")

    def save_layer(self, i: int, tensors: dict[str, torch.Tensor], record: dict) -> None:
        tmp = self.path / (self.layer_file(i) + ".tmp")
        flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(flat, str(tmp), metadata={"record": json.dumps(record)})
        os.replace(tmp, self.path / self.layer_file(i))
        self.done.append(i)
        self._write_state()

    def load_layer(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        with safe_open(str(self.path / self.layer_file(i)), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            record = json.loads(f.metadata()["record"])
        return tensors, record


def _pack_layer(
    sd: dict[str, torch.Tensor], arch: Arch, results: dict[str, QuantResult], plan: LayerPlan, dtype
) -> dict[str, torch.Tensor]:
    """State of a finished layer: q.<linear>.{codes,scale,zero}, t.<tensor>, s.<group>, c.<linear>."""
    out: dict[str, torch.Tensor] = {}
    lin_keys = {path + ".weight" for path in arch.linears.values()}
    for short, q in results.items():
        p = arch.linears[short]
        out[f"q.{p}.codes"], out[f"q.{p}.scale"], out[f"q.{p}.zero"] = q.codes, q.scale, q.zero
    for k, v in sd.items():
        if k not in lin_keys:
            out[f"t.{k}"] = v.to(dtype)
    for g, s in plan.scales.items():
        out[f"s.{g}"] = s.float()
    for short, c in plan.clips.items():
        out[f"c.{short}"] = c.float()
    return out


def _unpack_layer(tensors: dict[str, torch.Tensor], arch: Arch, bits: int, group_size: int):
    """Inverse of _pack_layer: (plain tensors, QuantResults by linear path, scales, clips)."""
    plain = {k[2:]: v for k, v in tensors.items() if k.startswith("t.")}
    quant = {}
    for path in arch.linears.values():
        codes = tensors[f"q.{path}.codes"]
        g = codes.shape[1] if group_size == -1 else group_size
        quant[path] = QuantResult(
            codes=codes, scale=tensors[f"q.{path}.scale"], zero=tensors[f"q.{path}.zero"], bits=bits, group_size=g
        )
    scales = {k[2:]: v for k, v in tensors.items() if k.startswith("s.")}
    clips = {k[2:]: v for k, v in tensors.items() if k.startswith("c.")}
    return plain, quant, scales, clips


def _final_weights(plain: dict, quant: dict[str, QuantResult], dtype) -> dict[str, torch.Tensor]:
    out = dict(plain)
    for path, q in quant.items():
        out[path + ".weight"] = q.dequant(dtype)
    return out


# ----------------------------------------------------------------------------- apply= file


def _read_search_file(path: str | Path, arch: Arch, n_layers: int, opts: QuantizeOptions):
    p = Path(path)
    if p.is_dir():
        p = p / SEARCH_FILE
    if not p.is_file():
        raise QuantLRMError(f"search file {p} does not exist.", f"pass a run's {SEARCH_FILE} (or its run dir).")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise QuantLRMError(f"{p} cannot be read ({e}).", "pass an intact search.safetensors.") from e
    if meta.get("quantlrm_search") != "1":
        raise QuantLRMError(f"{p} was not written by quantlrm quantize.", f"pass a run's {SEARCH_FILE}.")
    bits, g = int(meta["bits"]), int(meta["group_size"])
    if (bits, g) != (opts.bits, opts.group_size):
        raise QuantLRMError(
            f"{p} was searched for {bits}-bit, group size {g}; this run asks for {opts.bits}-bit, group size "
            f"{opts.group_size}.",
            f"pass --bits {bits} --group-size {g}.",
        )
    records = json.loads(meta.get("layers", "[]"))
    if int(meta.get("num_layers", -1)) != n_layers:
        raise QuantLRMError(
            f"{p} is for a {meta.get('num_layers')}-layer model; this one has {n_layers} layers.",
            "re-apply a search made on this model.",
        )
    return tensors, meta, records


def _plan_from_file(tensors: dict, arch: Arch, i: int, ckpt: Checkpoint, record: dict) -> LayerPlan:
    plan = LayerPlan(record=dict(record))
    prefix = arch.layer_prefix(i)
    for g in arch.scale_groups:
        key = f"{prefix}scales.{g.name}"
        if key in tensors:
            plan.scales[g.name] = tensors[key]
    for short in arch.linears:
        key = f"{arch.linear_path(i, short)}.clip"
        if key in tensors:
            plan.clips[short] = tensors[key]
    for short in arch.linears:
        out_f, in_f = ckpt.info(arch.linear_path(i, short) + ".weight")[0]
        s = scale_of_linear(arch, plan.scales, short)
        c = plan.clips.get(short)
        if (s is not None and s.numel() != in_f) or (c is not None and c.shape[0] != out_f):
            raise QuantLRMError(
                f"the search file's entries for {arch.linear_path(i, short)} do not fit this model's shapes.",
                "re-apply a search made on this model.",
            )
    return plan


# ----------------------------------------------------------------------------- the run


def _fingerprint(opts: QuantizeOptions, extra: dict) -> dict:
    skip = {"out", "resume", "device", "progress", "overwrite", "importance"}
    fp = {}
    for f in dataclasses.fields(opts):
        if f.name not in skip:
            v = getattr(opts, f.name)
            fp[f.name] = str(v) if isinstance(v, Path) else v
    fp["model"] = str(Path(opts.model).resolve())
    fp.update(extra)
    return fp


def _options_record(opts: QuantizeOptions) -> dict:
    rec = {}
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        if f.name == "importance":
            v = None  # tensors are not options; quantlrm.json's "signals" says "in-memory" and their hash
        rec[f.name] = str(v) if isinstance(v, Path) else v
    rec["gptq_act_order"] = opts.use_act_order  # what ran, not "default"
    return rec


def _check_finite(xs: list[torch.Tensor], where: str) -> None:
    for x in xs:
        if not torch.isfinite(x).all():
            raise QuantLRMError(
                f"{where} produced NaN or infinite activations on the calibration data.",
                "check the checkpoint (corrupted or overflowing weights); an fp16 model may need "
                "conversion to bf16 first.",
            )


def quantize_model(opts: QuantizeOptions) -> Path:
    """Quantize `opts.model` into `opts.out` (format, quantlrm.json, search.safetensors)."""
    t_start = time.time()
    _validate(opts)
    ckpt = Checkpoint(opts.model)
    arch = get_arch(ckpt.config)
    _check_shapes(ckpt, arch, opts.bits, opts.group_size)
    n_layers = num_layers(ckpt.config)
    dtype = _model_dtype(ckpt, arch)
    device = torch.device(opts.device)
    out = Path(opts.out)

    applied = _read_search_file(opts.apply, arch, n_layers, opts) if opts.apply is not None else None
    importance, sig_info = _load_importance(opts)
    if importance is not None:
        _check_importance(importance, ckpt, arch, opts)

    skel = Skeleton(ckpt, device, dtype)
    calib = None
    xs: list[torch.Tensor] = []
    kwargs: list = []
    chunk = max(1, opts.batch_tokens // opts.calib_seqlen)
    if applied is None or opts.rounding == "gptq":  # GPTQ's Hessians need calibration even with --apply
        calib = _calibration(opts, ckpt)
        skel.materialize_outer()
        xs, kwargs = skel.capture(calib.input_ids, chunk)
        _check_finite(xs, "the embedding layer")

    extra = {"signals_hash": sig_info.get("hash"), "dtype": str(dtype)}
    if calib is not None:
        extra["calib_hash"] = hashlib.sha256(calib.input_ids.numpy().tobytes()).hexdigest()[:16]
    work = WorkDir(out, _fingerprint(opts, extra), opts.resume)

    bar = tqdm(total=n_layers, desc=f"quantize {opts.method} W{opts.bits}", unit="layer", disable=not opts.progress)
    search_s = 0.0
    for i in range(n_layers):
        if i in work.done:
            if xs:
                xs = _replay(skel, work, arch, i, xs, kwargs[i], opts, dtype)
            bar.update(1)
            continue
        t0 = time.time()
        if applied is None:
            xs, rec = _process_layer(skel, arch, ckpt, i, xs, kwargs[i], opts, importance, work, dtype)
        else:
            xs, rec = _apply_layer(skel, arch, ckpt, i, applied, opts, work, dtype, xs, kwargs[i] if xs else None)
        search_s += time.time() - t0
        bar.set_postfix_str(_postfix(rec))
        bar.update(1)
    bar.close()
    del xs
    return _assemble(opts, ckpt, arch, skel, work, dtype, calib, sig_info, applied, time.time() - t_start, search_s)


def _calibration(opts: QuantizeOptions, ckpt: Checkpoint):
    from transformers import AutoTokenizer

    from quantlrm.calib import load_calibration

    try:
        tok = AutoTokenizer.from_pretrained(ckpt.path)
    except Exception as e:
        raise QuantLRMError(
            f"no usable tokenizer in {ckpt.path} ({type(e).__name__}).",
            "save the model's tokenizer next to it (tokenizer.save_pretrained(DIR)).",
        ) from e
    return load_calibration(tok, opts.calib, opts.calib_field, opts.calib_samples, opts.calib_seqlen)


@torch.no_grad()
def _process_layer(skel, arch, ckpt, i, xs, kw, opts, importance, work: WorkDir, dtype):
    layer = skel.load_layer(i)
    call = _layer_call(kw)
    clip_linears = [s for s in arch.linears if s not in CLIP_SKIP] if opts.use_clip else []
    # RTN (with or without GPTQ rounding) searches nothing: the scale groups' inputs over all
    # calibration tokens are not held
    cap = capture_layer(layer, arch, xs, call, clip_linears, hessians=opts.rounding == "gptq",
                        groups=opts.method != "rtn")
    _check_finite(cap.outputs, f"layer {i}")
    plan = search_layer(layer, arch, ckpt.config, i, cap, opts, importance)
    sd = {k: v.float() for k, v in layer.state_dict().items()}
    apply_scales(sd, arch, ckpt.config, plan.scales)
    results = quantize_layer(sd, arch, plan, opts, cap)
    packed = _pack_layer(sd, arch, results, plan, dtype)
    del sd
    nxt = _check_layer(skel, arch, i, packed, cap, xs, call, opts, dtype, plan.record)
    work.save_layer(i, packed, plan.record)
    skel.unload_layer(i)
    return nxt, plan.record


def _check_layer(skel, arch, i, packed, cap: Captured, xs, call, opts, dtype, record: dict) -> list[torch.Tensor]:
    """Record the quantized layer's output MSE vs the fp layer; return the next layer's inputs."""
    cap.group_inputs, cap.group_refs, cap.clip_inputs, cap.hessians = {}, {}, {}, {}  # free before the forward
    plain, quant, _, _ = _unpack_layer(packed, arch, opts.bits, opts.group_size)
    layer = skel.load_layer(i, _final_weights(plain, quant, dtype))
    qout = [_call(layer, x, call) for x in xs]
    mse = sum(float((q.float() - y.float()).pow(2).sum()) for q, y in zip(qout, cap.outputs, strict=True))
    record["layer_mse"] = mse / sum(y.numel() for y in cap.outputs)
    record["layer"] = i
    return qout if opts.propagate == "quant" else cap.outputs


@torch.no_grad()
def _replay(skel, work: WorkDir, arch, i, xs, kw, opts, dtype):
    """Recompute layer i's output for a resumed run: no search, one forward."""
    if opts.propagate == "quant":
        tensors, _ = work.load_layer(i)
        plain, quant, _, _ = _unpack_layer(tensors, arch, opts.bits, opts.group_size)
        layer = skel.load_layer(i, _final_weights(plain, quant, dtype))
    else:
        layer = skel.load_layer(i)
    call = _layer_call(kw)
    ys = [_call(layer, x, call) for x in xs]
    skel.unload_layer(i)
    return ys


@torch.no_grad()
def _apply_layer(skel, arch, ckpt, i, applied, opts, work: WorkDir, dtype, xs, kw) -> tuple[list, dict]:
    """Re-apply a search file's scales/clips to layer i. With GPTQ rounding the fp layer is run
    over the calibration inputs first (Hessians only, no search) and its output propagated."""
    tensors, meta, records = applied
    record = dict(next((r for r in records if r.get("layer") == i), {"layer": i}))
    record.pop("gptq", None)  # the searching run's GPTQ losses; recomputed when this run uses GPTQ
    if meta.get("rounding", "rtn") != opts.rounding:
        record.pop("layer_mse", None)  # measured with the other rounding
    plan = _plan_from_file(tensors, arch, i, ckpt, record)
    cap = None
    if opts.rounding == "gptq":
        call = _layer_call(kw)
        layer = skel.load_layer(i)
        cap = capture_layer(layer, arch, xs, call, [], hessians=True, groups=False)
        _check_finite(cap.outputs, f"layer {i}")
        sd = {k: v.float() for k, v in layer.state_dict().items()}
    else:
        lp = arch.layer_prefix(i)
        sd = {n: ckpt.get(lp + n).to(skel.device).float() for n in skel.layer_names(i)}
    apply_scales(sd, arch, ckpt.config, plan.scales)
    clip_known = dict(plan.clips)
    results = quantize_layer(sd, arch, plan, opts, cap=cap)
    plan.clips = clip_known
    plan.record["applied_from"] = str(opts.apply)
    packed = _pack_layer(sd, arch, results, plan, dtype)
    del sd
    if cap is not None:
        xs = _check_layer(skel, arch, i, packed, cap, xs, call, opts, dtype, plan.record)
        skel.unload_layer(i)
    work.save_layer(i, packed, plan.record)
    return xs, plan.record


def _postfix(rec: dict) -> str:
    groups = rec.get("groups", {})
    before = sum(g["loss_before"] for g in groups.values())
    after = sum(g["loss_after"] for g in groups.values())
    parts = []
    if before > 0:
        parts.append(f"search loss {100 * (after / before - 1):+.1f}%")
    gq = rec.get("gptq") or {}
    rtn_loss = sum(v["loss_rtn"] for v in gq.values())
    if rtn_loss > 0:
        parts.append(f"gptq loss {100 * (sum(v['loss'] for v in gq.values()) / rtn_loss - 1):+.1f}% vs rtn")
    if rec.get("layer_mse") is not None:
        parts.append(f"layer mse {rec['layer_mse']:.3g}")
    return ", ".join(parts)


def _assemble(opts, ckpt, arch, skel, work: WorkDir, dtype, calib, sig_info, applied, total_s, search_s) -> Path:
    """Stream the work dir into the format writer inside an atomic output dir, then clean up."""
    out = Path(opts.out)
    layers_prefix = arch.layers_prefix + "."
    records = []
    search_tensors: dict[str, torch.Tensor] = {}
    with atomic_output_dir(out, overwrite=opts.overwrite) as tmp:
        ckpt.copy_aux_files(tmp)
        writer = get_writer(opts.format, tmp, opts.bits, opts.group_size)
        for name in ckpt.keys():
            if not name.startswith(layers_prefix):
                writer.add_tensor(name, ckpt.get(name))
        for i in range(skel.n_layers):
            tensors, record = work.load_layer(i)
            plain, quant, scales, clips = _unpack_layer(tensors, arch, opts.bits, opts.group_size)
            lp = arch.layer_prefix(i)
            for path, q in quant.items():
                writer.add_linear(lp + path, q, dtype)
            for k, v in plain.items():
                writer.add_tensor(lp + k, v)
            for g, s in scales.items():
                search_tensors[f"{lp}scales.{g}"] = s
            for short, c in clips.items():
                search_tensors[f"{arch.linear_path(i, short)}.clip"] = c
            records.append(record)
        writer.close(ckpt.config)
        meta = {
            "quantlrm_search": "1",
            "method": opts.method,
            "rounding": opts.rounding,
            "bits": str(opts.bits),
            "group_size": str(opts.group_size),
            "num_layers": str(skel.n_layers),
            "model_type": str(ckpt.config.get("model_type")),
            "layers": json.dumps(records),
        }
        if not search_tensors:  # safetensors needs at least one tensor
            search_tensors["__empty__"] = torch.zeros(1)
        save_file(search_tensors, str(tmp / SEARCH_FILE), metadata=meta)
        report = {
            "method": opts.method,
            "rounding": opts.rounding,
            "bits": opts.bits,
            "group_size": opts.group_size,
            "format": opts.format,
            "model": str(opts.model),
            "model_type": ckpt.config.get("model_type"),
            "dtype": str(dtype).replace("torch.", ""),
            "calibration": (
                {"source": calib.source, "description": calib.description, "samples": calib.input_ids.shape[0],
                 "seqlen": calib.input_ids.shape[1]}
                if calib is not None
                else {"source": f"none (re-applied {opts.apply})"}
            ),
            "signals": sig_info or None,
            "clip": opts.use_clip,
            "propagate": opts.propagate,
            "seconds": {"total": round(total_s, 2), "layers": round(search_s, 2)},
            "options": _options_record(opts),
            "layers": records,
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
    shutil.rmtree(work.path, ignore_errors=True)
    return out


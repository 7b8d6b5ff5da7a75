"""Fine-tuning signals: per-input-channel importance from the updates W' - W (paper, Section 3).

For every paired linear weight (W from the base checkpoint, W' from the fine-tuned one,
both [out, in]) the update magnitude is dW = |W' - W|, computed in fp32 from the stored
dtype (upcast first, then subtract). Global statistics are taken over ALL updates of all
paired modules of all layers:

- ``dw_max``: the maximum update.
- ``dw_min_pos`` / ``dw_mid_pos``: minimum and median of the strictly positive updates.
- ``dw_min_all`` / ``dw_mid_all``: minimum and median of all updates, zeros included.
- every median is the *lower* median, the ((n - 1) // 2)-th smallest value (0-based),
  which is exactly what ``torch.median`` returns (also for an even count). It is exact,
  found by streamed radix selection over fp32 bit patterns (`quantlrm.stats`).
- ``dw_min`` / ``dw_mid`` are the pair the chosen variant uses (see below).

The mapping f (elementwise, `map_updates`) uses lo, mid, hi and y_min < y_max:

    left(dw)  = y_min + (y_max - y_min) * ((mid - dw) / (mid - lo))^2   for dw <= mid
    right(dw) = y_min + (y_max - y_min) * ((dw - mid) / (hi - mid))^2   for dw >  mid

clamped to [y_min, y_max] (as the authors' code does; it only bites for updates outside
the statistics' range). A zero denominator (mid == lo or hi == mid) means that side holds
only dw == mid, which maps to y_min; updates beyond it saturate at y_max.

Channel importance (`channel_importance`) for input channel c: I[c] = mean over the rows
(output channels) of f(dW[:, c]), times (Z[c] + 1) where the variant counts zeros; Z[c] is
the number of exact-zero updates in column c. Sums are taken in fp32 per block of rows and
accumulated in fp64, so no slicing workaround is needed at any size.

Variants (``VARIANTS``), as compared in the paper's Tables 1 and 3:

- ``both-ends`` (default, Eq. 5 + 6): lo = dw_min_pos, mid = dw_mid_pos; f(0) = y_min;
  I = mean(f) * (Z + 1).
- ``both-ends-no-zero`` (Eq. 4): zeros are not separated: lo = dw_min_all (0 when any
  update is zero), mid = dw_mid_all; every update, zeros included, goes through Eq. 4
  (so a zero update maps to y_max when lo = 0); no zero count.
- ``zeros-max``: as both-ends, but zeros map to y_max and are not counted.
- ``zeros-min``: as both-ends, but zeros map to y_min and are not counted.
- ``magnitude`` ("SFT" in Table 1): f(dw) = dw, I = mean over rows of dW; no mapping.
- ``mid`` ("SFT mid"): the both-ends mapping mirrored so the middle is protected:
  f = y_min + y_max - f_both_ends on positive updates (y_max at dw_mid_pos, y_min at
  dw_min_pos and dw_max), zeros (the far left end) map to y_min, no zero count. The paper
  does not say which statistics its "mid" used; we mirror the final design's statistics so
  that only the shape of the mapping differs.

Streaming: `compute_signals` reads one pair of tensors at a time (a few prefetched by
reader threads) and works on blocks of rows, so memory is bounded whatever the model size.
Pass 1 gathers the statistics; a refinement pass runs only if the median is not yet exact
(see `quantlrm.stats`); the importance pass maps and reduces. On a GPU the fp32 updates of
pass 1 are kept on the device while they fit (``cache_bytes``), so later passes read
nothing from disk.

Compared with the authors' code (SPEC 1b) the arithmetic is fp32/fp64 rather than 16-bit,
which removes their need to slice large MLP matrices when counting zeros.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from quantlrm.arch import get_arch, linear_names, num_layers
from quantlrm.checkpoint import Checkpoint, atomic_output_dir
from quantlrm.errors import QuantLRMError
from quantlrm.stats import PositiveSelect

VARIANTS = ("both-ends", "both-ends-no-zero", "zeros-max", "zeros-min", "magnitude", "mid")
FORMAT = "quantlrm-signals/1"
IMPORTANCE_FILE = "importance.safetensors"
STATS_FILE = "stats.json"

# Variants that take lo/mid from all updates (zeros included) rather than positive ones.
_ALL_STATS = ("both-ends-no-zero",)

Pairs = Callable[[], Iterable[tuple[str, torch.Tensor, torch.Tensor]]]


@dataclass
class Signals:
    """Importance vectors (fp32 [in_features] per module, keyed without `.weight`) + statistics."""

    importance: dict[str, torch.Tensor]
    stats: dict = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return self.stats.get("variant", "")

    def summary(self) -> str:
        return format_summary(self)


# ------------------------------------------------------------------------------------
# the mapping (elementwise) and channel importance (per input channel)
# ------------------------------------------------------------------------------------


def check_variant(variant: str, y_min: float = 1.0, y_max: float = 10.0) -> None:
    if variant not in VARIANTS:
        raise QuantLRMError(
            f"unknown signal variant {variant!r}.", f"choose one of: {', '.join(VARIANTS)}."
        )
    if not (math.isfinite(y_min) and math.isfinite(y_max) and 0 < y_min < y_max):
        raise QuantLRMError(
            f"y_min={y_min}, y_max={y_max}: the mapping needs 0 < y_min < y_max "
            "(importance becomes a scale s = I^alpha, so it must stay positive).",
            "use e.g. --y-min 1 --y-max 10 (the paper's defaults).",
        )


def _bounds(stats: dict, variant: str) -> tuple[float, float, float]:
    """(lo, mid, hi) the variant's mapping uses; falls back to dw_min/dw_mid/dw_max."""
    kind = "all" if variant in _ALL_STATS else "pos"
    lo = stats.get(f"dw_min_{kind}", stats.get("dw_min"))
    mid = stats.get(f"dw_mid_{kind}", stats.get("dw_mid"))
    hi = stats.get("dw_max")
    if lo is None or mid is None or hi is None:
        raise QuantLRMError(
            "the statistics lack dw_min/dw_mid/dw_max.",
            "pass the stats of compute_signals/load_signals.",
        )
    return float(lo), float(mid), float(hi)


def _side(num: torch.Tensor, den: float) -> torch.Tensor:
    """num / den clamped to [0, 1]; a zero denominator gives 0 where num == 0, else 1 (in place)."""
    if den > 0:
        return num.div_(den).clamp_(0.0, 1.0)
    return (num > 0).to(num.dtype)


def map_updates(
    dw: torch.Tensor,
    stats: dict,
    variant: str = "both-ends",
    y_min: float = 1.0,
    y_max: float = 10.0,
) -> torch.Tensor:
    """f(dW) elementwise (fp32, same shape as `dw`) for a variant; see the module docstring."""
    check_variant(variant, y_min, y_max)
    dw = dw.float()
    if variant == "magnitude":
        return dw.clone()
    lo, mid, hi = _bounds(stats, variant)
    span = y_max - y_min
    left = dw <= mid
    t = torch.where(left, _side(mid - dw, mid - lo), _side(dw - mid, hi - mid))
    f = t.square_().mul_(span).add_(y_min).clamp_(y_min, y_max)  # y_min + span * t^2
    if variant == "both-ends-no-zero":
        return f
    if variant == "mid":
        f = f.neg_().add_(y_min + y_max)
    zero_value = y_max if variant == "zeros-max" else y_min
    return f.masked_fill_(dw == 0, zero_value)


def _counts_zeros(variant: str) -> bool:
    return variant == "both-ends"


def channel_importance(
    dw: torch.Tensor,
    stats: dict,
    variant: str = "both-ends",
    y_min: float = 1.0,
    y_max: float = 10.0,
) -> torch.Tensor:
    """I[c] = mean over rows of f(dW[:, c]) (x (Z[c] + 1) for both-ends); fp32 [in_features]."""
    if dw.dim() != 2:
        raise QuantLRMError(
            f"dW must be a 2-D [out, in] matrix, got shape {list(dw.shape)}.",
            "pass one linear weight.",
        )
    fsum = torch.zeros(dw.shape[1], dtype=torch.float64, device=dw.device)
    zeros = torch.zeros(dw.shape[1], dtype=torch.int64, device=dw.device)
    for block in dw.split(_block_rows(dw.shape[1], dw.device)):
        fsum += map_updates(block, stats, variant, y_min, y_max).sum(0).double()
        if _counts_zeros(variant):
            zeros += (block == 0).sum(0)
    return _finish_importance(fsum, zeros, dw.shape[0], variant)


def _finish_importance(
    fsum: torch.Tensor, zeros: torch.Tensor, rows: int, variant: str
) -> torch.Tensor:
    imp = fsum / rows
    if _counts_zeros(variant):
        imp = imp * (zeros.double() + 1.0)
    return imp.float()


BLOCK_ELEMS = {
    "cpu": 1 << 24,
    "cuda": 1 << 28,
}  # fp32 values per block: ~64 MB on CPU, ~1 GB on GPU


def _block_rows(in_features: int, device: torch.device) -> int:
    """Rows per block, so temporaries stay bounded whatever the matrix size."""
    return max(1, BLOCK_ELEMS.get(device.type, 1 << 24) // max(1, in_features))


# ------------------------------------------------------------------------------------
# sources of (name, W, W') pairs
# ------------------------------------------------------------------------------------


class _CallableSource:
    """A user's zero-argument callable returning a fresh iterator of (name, W, W') each pass."""

    def __init__(self, pairs: Pairs):
        if not callable(pairs):
            raise QuantLRMError(
                "pairs must be a zero-argument callable returning an iterator of (name, W_base, W_finetuned).",
                "wrap a list as `lambda: iter(items)` or pass a generator function.",
            )
        self.pairs = pairs
        self.order: list[str] | None = None

    def total(self) -> int | None:
        return len(self.order) if self.order is not None else None

    def stream(
        self, skip: set[str], pin: bool
    ) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
        seen: list[str] = []
        for item in self.pairs():
            try:
                name, w, wf = item
            except (TypeError, ValueError) as e:
                raise QuantLRMError(
                    "pairs() must yield (name, W_base, W_finetuned) tuples.",
                    "fix the pairs generator.",
                ) from e
            seen.append(name)
            if self.order is not None and (
                len(seen) > len(self.order) or self.order[len(seen) - 1] != name
            ):
                raise QuantLRMError(
                    f"pairs() yielded {name!r} out of order on a later pass; the statistics need the same modules every pass.",
                    "make pairs() return a fresh iterator over the same modules in the same order each call.",
                )
            yield name, w, wf
        if self.order is None:
            self.order = seen
        elif len(seen) != len(self.order):
            raise QuantLRMError(
                f"pairs() yielded {len(seen)} modules on a later pass, {len(self.order)} on the first.",
                "make pairs() return a fresh iterator over the same modules each call.",
            )


class _CheckpointSource:
    """Pairs of linear weights from two checkpoint directories, read ahead by a few threads."""

    def __init__(
        self,
        base: str | os.PathLike | Checkpoint,
        finetuned: str | os.PathLike | Checkpoint,
        workers: int,
    ):
        self.base = base if isinstance(base, Checkpoint) else Checkpoint(base)
        self.ft = finetuned if isinstance(finetuned, Checkpoint) else Checkpoint(finetuned)
        self.workers = max(1, workers)
        if self.base.path.resolve() == self.ft.path.resolve():
            raise QuantLRMError(
                f"--base and --finetuned are the same directory ({self.base.path}); every update would be zero.",
                "pass the checkpoint the model was fine-tuned FROM as --base.",
            )
        self.order = self._pair_names()

    def _pair_names(self) -> list[str]:
        cb, cf = self.base.config, self.ft.config
        get_arch(cb), get_arch(cf)  # unsupported model types raise a clear error
        if cb.get("model_type") != cf.get("model_type"):
            raise QuantLRMError(
                f"different architectures: base is {cb.get('model_type')!r}, finetuned is {cf.get('model_type')!r}.",
                "signals need the fine-tuned model and the checkpoint it was fine-tuned from (same architecture).",
            )
        if num_layers(cb) != num_layers(cf):
            raise QuantLRMError(
                f"different depths: base has {num_layers(cb)} layers, finetuned has {num_layers(cf)}.",
                "pair the fine-tuned model with the checkpoint it was fine-tuned from.",
            )
        names = []
        for _layer, _short, path in linear_names(cb):
            key = path + ".weight"
            for ck, role in ((self.base, "base"), (self.ft, "finetuned")):
                if key not in ck:
                    raise QuantLRMError(
                        f"tensor {key} is missing from the {role} checkpoint {ck.path}.",
                        "both sides must be complete, unquantized checkpoints of the same architecture.",
                    )
            (sb, db), (sf, df) = self.base.info(key), self.ft.info(key)
            if sb != sf:
                raise QuantLRMError(
                    f"{key} has shape {sb} in base but {sf} in finetuned: the checkpoints differ in size.",
                    "pair the fine-tuned model with the checkpoint it was fine-tuned from.",
                )
            for dt, role in ((db, "base"), (df, "finetuned")):
                if dt not in ("BF16", "F16", "F32", "F64"):
                    raise QuantLRMError(
                        f"{key} is stored as {dt} in the {role} checkpoint, not as floating point weights.",
                        "signals need unquantized bf16/fp16/fp32 checkpoints on both sides.",
                    )
            if len(sb) != 2:
                raise QuantLRMError(
                    f"{key} has shape {sb}, expected a 2-D linear weight.", "check the checkpoint."
                )
            names.append(path)
        return names

    def total(self) -> int:
        return len(self.order)

    def stream(
        self, skip: set[str], pin: bool
    ) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
        todo = [n for n in self.order if n not in skip]
        futures: dict[str, tuple[Future, Future]] = {}
        depth = self.workers  # pairs in flight: bounds memory to a few tensors
        with ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="quantlrm-read"
        ) as pool:
            submitted = 0

            def submit_more() -> None:
                nonlocal submitted
                while submitted < len(todo) and len(futures) < depth:
                    n = todo[submitted]
                    key = n + ".weight"
                    futures[n] = (
                        pool.submit(self.base.read, key, pin),
                        pool.submit(self.ft.read, key, pin),
                    )
                    submitted += 1

            try:
                for name in self.order:
                    if name in skip:
                        yield name, None, None
                        continue
                    submit_more()
                    fb, ff = futures.pop(name)
                    w, wf = fb.result(), ff.result()
                    submit_more()
                    yield name, w, wf
            finally:
                for fb, ff in futures.values():
                    fb.cancel(), ff.cancel()


# ------------------------------------------------------------------------------------
# the passes
# ------------------------------------------------------------------------------------


@dataclass
class _Module:
    name: str
    shape: tuple[int, int]
    nbytes: int
    zeros: torch.Tensor  # int64 [in]: exact-zero updates per input channel
    colsum: torch.Tensor  # fp64 [in]: sum of dW per input channel
    max: torch.Tensor  # 0-d: max dW (NaN/Inf propagate here)
    cached: list[torch.Tensor] | None = None


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise QuantLRMError(
            f"unknown device {device!r}.", "use --device cpu or --device cuda."
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantLRMError(
            "--device cuda was asked for but this machine has no usable CUDA GPU.",
            "use --device cpu.",
        )
    if dev.type not in ("cpu", "cuda"):
        raise QuantLRMError(
            f"device {device!r} is not supported.", "use --device cpu or --device cuda."
        )
    return dev


def _updates(
    name: str, w: torch.Tensor, wf: torch.Tensor, dev: torch.device
) -> Iterator[torch.Tensor]:
    """dW = |W' - W| in fp32 on `dev`, one block of rows at a time."""
    _check_pair(name, w, wf)
    w, wf = w.detach(), wf.detach()
    nb = dev.type == "cuda"
    rows = _block_rows(w.shape[1], dev)
    for b, bf in zip(w.split(rows), wf.split(rows), strict=True):
        b = b.to(dev, non_blocking=nb)
        bf = bf.to(dev, non_blocking=nb)
        # out of place: .float() of an fp32 tensor is the caller's own tensor
        yield torch.sub(bf.float(), b.float()).abs_()


def _check_pair(name: str, w, wf) -> None:
    if not (isinstance(w, torch.Tensor) and isinstance(wf, torch.Tensor)):
        raise QuantLRMError(
            f"{name}: pairs must hold torch tensors.", "yield (name, W_base, W_finetuned) tensors."
        )
    if w.shape != wf.shape or w.dim() != 2:
        raise QuantLRMError(
            f"{name}: base weight {list(w.shape)} and finetuned weight {list(wf.shape)} must be equal 2-D shapes.",
            "pair each fine-tuned linear with the same linear of the checkpoint it came from.",
        )
    if not (w.is_floating_point() and wf.is_floating_point()):
        raise QuantLRMError(
            f"{name}: weights must be floating point, got {w.dtype} and {wf.dtype}.",
            "pass unquantized weights.",
        )


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Why: blocks of a few MB freed in one thread and reused in another fragment glibc's heap,
    and its adaptive mmap threshold keeps them there; without trimming, the resident memory
    of a streaming pass grows by GBs over a model although at most a few tensors are alive.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _bar(progress: bool, total: int | None, desc: str):
    return tqdm(
        total=total, desc=desc, unit="tensor", disable=not progress, leave=False, dynamic_ncols=True
    )


def _cache_budget(cache_bytes: int | None, dev: torch.device) -> int:
    if cache_bytes is not None:
        return max(0, int(cache_bytes))
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free * 0.6)
    return 0


def _name_bad_side(name: str, w: torch.Tensor, wf: torch.Tensor) -> str:
    for t, role in ((w, "base"), (wf, "finetuned")):
        if not torch.isfinite(t.float()).all():
            return f"the {role} weight {name} contains NaN or Inf values"
    return f"the update of {name} overflows fp32 (|W' - W| is Inf)"


def compute_signals(
    base: str | os.PathLike | Checkpoint,
    finetuned: str | os.PathLike | Checkpoint,
    variant: str = "both-ends",
    y_min: float = 1.0,
    y_max: float = 10.0,
    device: str = "cpu",
    progress: bool = True,
    *,
    cache_bytes: int | None = None,
    workers: int | None = None,
) -> Signals:
    """Signals from two checkpoint directories (base = the one `finetuned` was fine-tuned from).

    Which linears are paired comes from `quantlrm.arch` (q, k, v, o, gate, up, down of every
    decoder layer). `cache_bytes` caps device memory kept for later passes (default: 60%
    of free GPU memory on CUDA, none on CPU); `workers` reader threads prefetch tensors.
    """
    check_variant(variant, y_min, y_max)
    if workers is None:
        workers = min(8, os.cpu_count() or 2)
    src = _CheckpointSource(base, finetuned, workers)
    sig = _compute(src, variant, y_min, y_max, device, progress, cache_bytes)
    sig.stats["base"] = str(src.base.path)
    sig.stats["finetuned"] = str(src.ft.path)
    return sig


def compute_signals_from_pairs(
    pairs: Pairs,
    variant: str = "both-ends",
    y_min: float = 1.0,
    y_max: float = 10.0,
    device: str = "cpu",
    progress: bool = True,
    *,
    cache_bytes: int | None = None,
) -> Signals:
    """Signals from in-memory weights: `pairs()` returns a fresh iterator of (name, W, W') each call.

    It is called once per pass (two or three times), so it must yield the same modules in
    the same order each time; names are module names without `.weight`.
    """
    check_variant(variant, y_min, y_max)
    return _compute(_CallableSource(pairs), variant, y_min, y_max, device, progress, cache_bytes)


def _compute(
    src, variant: str, y_min: float, y_max: float, device, progress: bool, cache_bytes
) -> Signals:
    dev = _resolve_device(device)
    t0 = time.perf_counter()
    budget = _cache_budget(cache_bytes, dev)
    pin = dev.type == "cuda"
    select = PositiveSelect(dev)
    modules: dict[str, _Module] = {}
    cached: set[str] = set()
    n_passes = 1

    # ---- pass 1: counts, extremes, histograms, per-column zero counts and sums ----------
    with _bar(progress, src.total(), "signals: statistics") as bar:
        for name, w, wf in src.stream(set(), pin):
            if name in modules:
                raise QuantLRMError(f"module {name} appears twice.", "pair each linear once.")
            _check_pair(name, w, wf)
            out_f, in_f = (int(s) for s in w.shape)
            keep = budget >= w.numel() * 4
            m = _Module(
                name=name,
                shape=(out_f, in_f),
                nbytes=w.numel() * w.element_size() + wf.numel() * wf.element_size(),
                zeros=torch.zeros(in_f, dtype=torch.int64, device=dev),
                colsum=torch.zeros(in_f, dtype=torch.float64, device=dev),
                max=torch.zeros((), dtype=torch.float32, device=dev),
                cached=[] if keep else None,
            )
            for dw in _updates(name, w, wf, dev):
                if not dw.numel():
                    continue
                mx = dw.amax()  # NaN and Inf propagate to the maximum
                if not math.isfinite(mx.item()):
                    raise QuantLRMError(
                        f"{_name_bad_side(name, w, wf)}; the statistics would be meaningless.",
                        "check that both checkpoints are intact (re-download the broken one).",
                    )
                m.max = torch.maximum(m.max, mx)
                zcol = (dw == 0).sum(0, dtype=torch.int32)
                m.zeros += zcol
                m.colsum += dw.sum(0).double()
                select.add(dw, zcol.sum())
                if keep:
                    m.cached.append(dw)
            if keep:
                budget -= w.numel() * 4
                cached.add(name)
            modules[name] = m
            _trim_heap()
            bar.update(1)
    if not modules:
        raise QuantLRMError(
            "no linear modules to pair.", "check that the checkpoints hold decoder layers."
        )

    maxes = torch.stack([m.max for m in modules.values()]).cpu()
    n_updates = sum(m.shape[0] * m.shape[1] for m in modules.values())
    n_zero = select.n_zero
    n_pos = n_updates - n_zero
    if n_pos == 0:
        raise QuantLRMError(
            f"all {n_updates} updates are exactly zero: the two checkpoints hold identical weights.",
            "pass as --base the checkpoint the model was fine-tuned FROM (not a copy of it).",
        )

    # ---- exact minimum and medians by radix selection (maybe one refinement pass) -------
    k_all = (n_updates - 1) // 2
    ranks = [0, (n_pos - 1) // 2] + ([k_all - n_zero] if k_all >= n_zero else [])
    if select.plan(ranks):
        n_passes += 1
        with _bar(progress, len(modules), "signals: exact median") as bar:
            for name, w, wf in src.stream(cached, pin):
                for dw in modules[name].cached if name in cached else _updates(name, w, wf, dev):
                    select.refine(dw)
                _trim_heap()
                bar.update(1)
    vals = select.values()
    dw_max = float(maxes.max())
    stats: dict = {
        "format": FORMAT,
        "variant": variant,
        "y_min": float(y_min),
        "y_max": float(y_max),
        "n_modules": len(modules),
        "n_updates": n_updates,
        "n_zero": n_zero,
        "zero_fraction": n_zero / n_updates,
        "dw_min_pos": vals[0],
        "dw_mid_pos": vals[1],
        "dw_min_all": 0.0 if n_zero else vals[0],
        "dw_mid_all": vals[2] if k_all >= n_zero else 0.0,
        "dw_max": dw_max,
        "median": "lower middle value, as torch.median: the ((n-1)//2)-th smallest (0-based)",
    }
    lo, mid, _ = _bounds(stats, variant)
    stats["dw_min"], stats["dw_mid"] = lo, mid

    # ---- importance pass -----------------------------------------------------------------
    importance: dict[str, torch.Tensor] = {}
    if variant == "magnitude":
        for name, m in modules.items():
            importance[name] = (m.colsum / max(1, m.shape[0])).float()
    else:
        n_passes += 1
        with _bar(progress, len(modules), "signals: importance") as bar:
            for name, w, wf in src.stream(cached, pin):
                m = modules[name]
                fsum = torch.zeros(m.shape[1], dtype=torch.float64, device=dev)
                for dw in m.cached if name in cached else _updates(name, w, wf, dev):
                    fsum += map_updates(dw, stats, variant, y_min, y_max).sum(0).double()
                importance[name] = _finish_importance(fsum, m.zeros, m.shape[0], variant)
                m.cached = None
                _trim_heap()
                bar.update(1)

    # ---- per-module summaries ------------------------------------------------------------
    per_module = {}
    for name, m in modules.items():
        imp = importance[name]
        n = m.shape[0] * m.shape[1]
        nz = int(m.zeros.sum())
        per_module[name] = {
            "shape": list(m.shape),
            "n_updates": n,
            "n_zero": nz,
            "zero_fraction": nz / n if n else 0.0,
            "dw_max": float(m.max),
            "dw_mean": float(m.colsum.sum()) / n if n else 0.0,
            "importance_min": float(imp.min()) if imp.numel() else 0.0,
            "importance_mean": float(imp.double().mean()) if imp.numel() else 0.0,
            "importance_max": float(imp.max()) if imp.numel() else 0.0,
        }
        importance[name] = imp.cpu().contiguous()
    elapsed = time.perf_counter() - t0
    nbytes = sum(m.nbytes for m in modules.values())
    stats.update(
        {
            "passes": n_passes,
            "cached_modules": len(cached),
            "device": str(dev),
            "bytes": nbytes,
            "time_s": elapsed,
            "gb_per_s": nbytes / elapsed / 1e9 if elapsed > 0 else 0.0,
            "modules": per_module,
        }
    )
    return Signals(importance=importance, stats=stats)


# ------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------


def save_signals(sig: Signals, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `importance.safetensors` + `stats.json` into `out_dir`, atomically."""
    out = Path(out_dir)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in sig.importance.items()}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_file(
            tensors, str(tmp / IMPORTANCE_FILE), metadata={"format": FORMAT, "variant": sig.variant}
        )
        (tmp / STATS_FILE).write_text(json.dumps(sig.stats, indent=1) + "\n")
    return out


def load_signals(path: str | os.PathLike) -> Signals:
    """Read a directory written by `save_signals` (or `quantlrm signals`)."""
    d = Path(path)
    imp, st = d / IMPORTANCE_FILE, d / STATS_FILE
    if not (imp.is_file() and st.is_file()):
        raise QuantLRMError(
            f"{d} is not a signals directory (it needs {IMPORTANCE_FILE} and {STATS_FILE}).",
            "create one with `quantlrm signals --base BASE --finetuned FT --out DIR`.",
        )
    try:
        stats = json.loads(st.read_text())
        importance = load_file(str(imp))
    except Exception as e:
        raise QuantLRMError(
            f"{d} holds unreadable signals ({e}).", "compute them again with `quantlrm signals`."
        ) from e
    missing = [k for k in stats.get("modules", {}) if k not in importance]
    if missing:
        raise QuantLRMError(
            f"{imp} lacks importance for {missing[0]} ({len(missing)} missing).",
            "compute the signals again.",
        )
    return Signals(importance=importance, stats=stats)


def format_summary(sig: Signals) -> str:
    """One line: modules, zero fraction, min/median/max, time, throughput."""
    s = sig.stats
    line = (
        f"signals ({s.get('variant')}): {s.get('n_modules')} modules, {s.get('n_updates', 0):,} updates, "
        f"zero {100 * s.get('zero_fraction', 0.0):.3f}%, dW min {s.get('dw_min', 0.0):.4g} / "
        f"median {s.get('dw_mid', 0.0):.4g} / max {s.get('dw_max', 0.0):.4g}"
    )
    if "time_s" in s:
        line += f", {s['time_s']:.1f} s, {s.get('gb_per_s', 0.0):.2f} GB/s ({s.get('passes')} passes, {s.get('device')})"
    return line

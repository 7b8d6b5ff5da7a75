"""Low-bit matmul y = x @ W^T for `KernelWeight`s: Triton on CUDA, a torch reference anywhere.

`qmatmul` picks, per (shape, bits, group size, batch bucket), the fastest of a few kernel
configurations and dequantize-then-cuBLAS by timing them once on the first call (like
`triton.autotune`, but the candidates include split-K with its fp32 buffer and the cuBLAS
path, so prefill is never slower than dequantize-then-matmul as measured). Calls made while a
CUDA graph is being captured never time anything: warm up before capturing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import statistics
from dataclasses import dataclass, replace

import torch

from quantlrm.errors import QuantLRMError
from quantlrm.kernels.layout import (
    KernelWeight,
    codes_per_lane,
    dequantize,
    kernel_constants,
    reference_matmul,
)

__all__ = ["KernelWeight", "Config", "qmatmul", "qmatmul_op", "candidates", "run_config", "triton_available", "tune", "bf16x2_enabled",
           "dequantize", "reference_matmul", "gated", "pdl_enabled"]


def triton_available() -> bool:
    """True when Triton can run here (a CUDA device, or the CPU interpreter TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_compat() -> None:
    """Triton 3.6's CPU interpreter calls int() on 1-element arrays, which NumPy >= 2.4 refuses;
    patch that one conversion so TRITON_INTERPRET=1 (CPU correctness runs) works."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    if getattr(ti, "_quantlrm_patched", False):
        return
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched
    ti._quantlrm_patched = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_compat()


@dataclass(frozen=True)
class Config:
    """One way to compute the product. kind: 'gemv' | 'gemm' | 'dequant' (then cuBLAS).

    smem (`smem_gemv`, batch 1, W3 g128 fp16): block_n rows a thread, blocks_per_step blocks a step,
    lane_threads threads along a block's four lanes, num_stages shared-memory buffers.
    gemv: block_n rows per program, one layout block per step (half2: blocks_per_step), x32:
    activations converted to fp32 once before the kernel instead of per code inside it, half2:
    16-bit arithmetic on code pairs (fp16 activations in half2, bf16 ones in bf16x2; 2-4 bits;
    `_gemv_h2_kernel`; row_groups 2 or 4: that many rows per thread; x_once: the activations loaded once
    for all of a thread's rows, for tiles that put several rows in a thread); gemm:
    block_m x block_n tiles, one layout block per step; split_k > 1 splits the blocks of a row
    over programs."""

    kind: str
    block_m: int = 16
    block_n: int = 32
    x32: bool = False
    split_k: int = 1
    half2: bool = False
    prefetch: bool = False
    blocks_per_step: int = 1
    row_groups: int = 1
    x_once: bool = False
    lane_threads: int = 1
    num_warps: int = 4
    num_stages: int = 2


# Decode (one row): the best tiles of benchmarks/gemv_sweep.py on an H100 (BENCHMARKS.md, Kernels);
# the tuner times these on first use.
GEMV_CONFIGS = (
    Config("gemv", block_n=64, num_warps=8, split_k=8), Config("gemv", block_n=32, num_warps=8, split_k=8),
    Config("gemv", block_n=16, num_warps=4, split_k=8), Config("gemv", block_n=32, num_warps=4, split_k=16),
    Config("gemv", block_n=128, num_warps=8, split_k=8, x32=True), Config("gemv", block_n=32, num_warps=2, split_k=8, x32=True),
    Config("gemv", block_n=64, num_warps=4, split_k=4), Config("gemv", block_n=32, num_warps=4),
)


def env_off(name: str) -> bool:
    """Whether the switch `name` is turned off: 0, false, off or no (any case); unset is on."""
    return os.environ.get(name, "").strip().lower() in ("0", "false", "off", "no")


def bf16x2_enabled() -> bool:
    """Whether bf16 activations may take the half2 GEMV's bf16x2 form: yes unless
    QUANTLRM_BF16X2 is 0, false, off or no. It made bf16 W4 decode 10-13% faster than the
    fp32-math GEMV on an H100 (BENCHMARKS.md, Kernels version 8)."""
    return not env_off("QUANTLRM_BF16X2")


def _device_index(device: torch.device) -> int:
    """A CUDA device's index ("cuda" alone: the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether the decode kernels (half2 GEMV, decode attention) launch as programmatic
    dependent launches: each starts while the kernel before it finishes (a prefetching GEMV
    walk loads its first weights meanwhile) and waits for that kernel's output before reading
    anything else. Hopper or later, compiled only, unless QUANTLRM_PDL is 0, false, off or no.
    W3 +2.3% and W4 +6.1% tokens/s on an H100 with inductor's kernels launched so too
    (BENCHMARKS.md, Kernels, version 11, run 5)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or torch.version.hip:
        return False
    if env_off("QUANTLRM_PDL"):
        return False
    return _hopper_or_later(_device_index(device))


def pdl_launch(device: torch.device, late: bool | None = None) -> dict:
    """A decode kernel's launch arguments for PDL (its `PDL` constexpr and Triton's
    `launch_pdl`), or none where `pdl_enabled` says no.

    late (the half2 GEMV only; None for kernels without the choice): whether it lets the next
    kernel launch once all its programs have finished their main loop (PDL 2) rather than once
    all have started (PDL 1). `late_trigger` says which tiles do; QUANTLRM_PDL_TRIGGER=early or
    late sets it for every GEMV. Our reading of why it matters (not profiled): launched early,
    the next kernel's programs wait on the SMs that freed up first, and a grid of many small
    programs then runs on part of the card (BENCHMARKS.md, Kernels, version 13).
    """
    if not pdl_enabled(device):
        return {}
    if late is not None:
        force = os.environ.get("QUANTLRM_PDL_TRIGGER", "").strip().lower()
        if force not in ("", "early", "late"):
            raise QuantLRMError(f"QUANTLRM_PDL_TRIGGER is {force!r}, which is neither 'early' nor 'late'.",
                                "set it to early or late, or unset it for the default of each tile.")
        if force:
            late = force == "late"
    return dict(PDL=2 if late else 1, launch_pdl=True)


def late_trigger(cfg: Config) -> bool:
    """Whether a half2 GEMV tile lets the next kernel launch only after its main loop
    (`pdl_launch`): the x_once tiles of row pairs (which decoded W3 8% slower with the early
    trigger than without PDL on an H100) and of row quads (like them, untested early). The other
    tiles decoded 3-5% slower with every GEMV late than with the early trigger forced (H200 and
    H100), about the spread of identical variants (BENCHMARKS.md, Kernels, versions 13-14)."""
    return cfg.half2 and cfg.x_once and cfg.row_groups > 1


def half2_ok(kw: KernelWeight, dtype: torch.dtype) -> bool:
    """The half2 GEMV runs fp16 activations, and bf16 ones in its bf16x2 form (`bf16x2_enabled`),
    with 2-4 bit codes, compiled only (inline PTX)."""
    if kw.bits > 4 or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return dtype == torch.float16 or (dtype == torch.bfloat16 and bf16x2_enabled())


# The half2 GEMV's tiles: more words per thread amortise the per-row work (SASS counts,
# benchmarks/gemv_sweep.py); timed by the tuner alongside the fp32 ones.
GEMV_H2_CONFIGS = tuple(
    Config("gemv", block_n=bn, num_warps=w, split_k=sk, prefetch=pf)
    for bn, w, sk in ((64, 4, 8), (128, 4, 8), (64, 4, 4), (128, 8, 4), (32, 2, 8), (128, 4, 16))
    for pf in (False, True)
) + tuple(  # several blocks per step: all of a step's loads in flight at once (latency-bound shapes)
    Config("gemv", block_n=bn, num_warps=w, split_k=sk, blocks_per_step=u, prefetch=pf)
    for bn, w, sk, u, pf in ((16, 4, 8, 4, False), (32, 4, 8, 4, False), (64, 4, 8, 4, False),
                             (32, 4, 4, 4, True), (64, 8, 4, 4, True), (16, 4, 1, 8, True),
                             (32, 4, 16, 2, False), (64, 4, 8, 2, True))
) + tuple(  # the fastest tiles of the three-word W3 lanes on the fused 8B shapes (gemv_sweep.py --half2,
    # BENCHMARKS.md, Kernels, version 9): small programs, no split on gate/up, split 4-8 on the rest
    Config("gemv", block_n=bn, num_warps=w, split_k=sk, blocks_per_step=u)
    for bn, w, sk, u in ((16, 2, 1, 4), (16, 2, 1, 2), (32, 4, 1, 4), (32, 4, 8, 1), (32, 8, 4, 2), (64, 8, 8, 1),
                         (16, 2, 8, 1))
) + tuple(  # row pairs sharing the activation loads, the fastest of them on the fused 8B shapes
    # (gemv_sweep.py --half2 --row-groups 2, BENCHMARKS.md, Kernels, version 10): gate/up and down_proj
    Config("gemv", block_n=bn, num_warps=w, split_k=sk, blocks_per_step=u, prefetch=pf, row_groups=2)
    for bn, w, sk, u, pf in ((8, 2, 1, 4, False), (16, 4, 1, 4, False), (16, 4, 1, 2, False), (8, 2, 8, 4, True),
                             (8, 4, 4, 4, False), (16, 4, 8, 2, False), (8, 2, 4, 2, False), (8, 4, 4, 4, True))
) + tuple(  # the activations loaded once for a thread's rows: 2-8 rows, 8-32 blocks a step, no split; the
    # fastest of them (and two runners-up) on the fused 8B shapes, W3 and W4 (gemv_sweep.py --half2 --x-once,
    # BENCHMARKS.md, Kernels, version 12; H200): 23-31% less time than the tuner's tile before them on qkv and
    # o_proj, 20% on W4's down_proj, 12% on W4's gate/up
    Config("gemv", block_n=bn, num_warps=w, blocks_per_step=u, prefetch=pf, x_once=True)
    for bn, w, u, pf in ((8, 1, 16, True), (4, 1, 16, True), (8, 2, 16, True), (8, 2, 32, True), (4, 1, 32, True),
                         (4, 1, 8, True), (4, 2, 16, True), (2, 1, 16, True), (2, 1, 8, False))
)
# x_once tiles with row pairs: W3's fastest on every fused 8B shape alone (gemv_sweep.py --half2 --x-once
# --row-groups 2, H100: gate/up 23.5-24.0 us against 28.1 for the tuner's tile before them; 23.9 against 29.6
# with the gated epilogue). Among the candidates since version 14, with the late PDL trigger
# (`late_trigger`): with the early one W3 decoded 8% slower with them than without PDL; with the late one,
# faster than without them in both of two H100 processes (349.4 and 360.2 tok/s against 321.4-344.9 for
# four runs of the set without them) and by 6.5% on an H200, though 2.2% behind forcing them early in one
# H100 run (BENCHMARKS.md, Kernels, versions 13-14).
# `decode.py --tiles-ab rg2only` times the set without them.
GEMV_H2_ROWPAIR_XONCE = tuple(
    Config("gemv", block_n=bn, num_warps=w, blocks_per_step=u, prefetch=pf, x_once=True, row_groups=2)
    for bn, w, u, pf in ((4, 2, 8, True), (4, 4, 16, True), (2, 1, 16, False), (2, 2, 16, True), (4, 2, 16, True),
                         (4, 2, 32, True))
)
GEMV_H2_CONFIGS = GEMV_H2_CONFIGS + GEMV_H2_ROWPAIR_XONCE
# x_once tiles with four rows a thread (row quads): each activation load serves four rows. From
# `gemv_sweep.py --half2 --x-once --row-groups 4 --split-k 1 --max-block-n 4 --act --bits 3` on an
# H100, the three fastest quads on W3 gate/up and three of the five fastest on down_proj: best
# 22.9 us against 24.6 for the tuner's row-pair tile on gate/up, 14.1 against 15.1 on down_proj,
# same run (BENCHMARKS.md, Kernels, version 15). Late PDL trigger, as the pairs.
# `decode.py --tiles-ab rg4only` times the set without them.
GEMV_H2_ROWQUAD_XONCE = tuple(
    Config("gemv", block_n=bn, num_warps=w, blocks_per_step=u, prefetch=pf, x_once=True, row_groups=4)
    for bn, w, u, pf in ((4, 2, 8, False), (4, 4, 16, False), (2, 1, 8, False), (2, 4, 16, False), (2, 2, 16, True),
                         (1, 1, 16, True))
)
GEMV_H2_CONFIGS = GEMV_H2_CONFIGS + GEMV_H2_ROWQUAD_XONCE
# The shared-memory GEMV (`smem_gemv`: weights through a cp.async ring, W3 g128 fp16): the fastest
# tiles of `benchmarks/gemv_smem.py --sweep --pdl 0 1 2` on an H100, early PDL trigger: 8 rows a
# thread, 2 warps, 2 buffers, 2 threads a block's lanes; 16 blocks a step on down_proj, qkv and
# o_proj (12.4, 5.9, 4.1 us against 13.7, 7.3, 5.4 for the tuner's register walk), 8 on gate/up
# (20.8 against 22.9 us, without the gated epilogue) (BENCHMARKS.md, Kernels, version 16).
# Those figures chain one kernel with itself, its early PDL trigger letting the next copy its
# weights meanwhile. In decode the fused gate/up (1,792 programs, several waves) is followed by
# down_proj: with gate/up on this kernel, down_proj took 20.6 us in the step against 13.9 (our
# reading, not profiled: launched early, its programs waited on the SMs), and gate/up was no
# faster (22.8 against 22.7). So `tune` leaves these tiles out of
# the gated-MLP epilogue's candidates. With that, the tuner took them for qkv and o_proj: 7.2 and
# 12.7 us in the step against 8.8 and 13.8, decode +2.7%, -1.7%, +3.6%, +2.0% in four paired
# repeats (version 16, runs 8 and 10). Since version 17 the kernel reads its activations through
# registers (XREG); the first tile then got faster on every small shape and the tuner took it for
# qkv, o_proj and down_proj (run 8). `decode.py --tiles-ab smemonly` times the set without them.
SMEM_GEMV_CONFIGS = tuple(
    Config("smem", block_n=rpt, blocks_per_step=u, lane_threads=jt, num_warps=w, num_stages=st)
    for rpt, u, jt, w, st in ((8, 16, 2, 2, 2), (8, 8, 2, 2, 2), (8, 8, 4, 2, 2), (4, 16, 2, 4, 2))
)


# Skinny batches (2..MAX_GEMV_ROWS rows): the GEMV decodes each code once for all rows; timed
# against the tensor-core GEMM and dequantize-then-cuBLAS.
MAX_GEMV_ROWS = 8
GEMV_ROWS_CONFIGS = (
    Config("gemv", block_n=32, num_warps=4, split_k=8), Config("gemv", block_n=16, num_warps=4, split_k=8),
    Config("gemv", block_n=64, num_warps=8, split_k=4), Config("gemv", block_n=32, num_warps=4, split_k=16),
)


def candidates(kw: KernelWeight, m: int, dtype: torch.dtype = torch.float16) -> list[Config]:
    """The configurations tried for `m` activation rows (the first one never needs timing)."""
    if m == 1:
        h2 = [replace(c, half2=True) for c in GEMV_H2_CONFIGS] if half2_ok(kw, dtype) else []
        return list(GEMV_CONFIGS) + h2 + [Config("gemm", block_m=16, block_n=64, split_k=2)] + smem_candidates(kw, dtype)
    rows = list(GEMV_ROWS_CONFIGS) if m <= MAX_GEMV_ROWS else []
    if m <= 16:
        tiles = ((16, 64, 1, 4, 3), (16, 32, 4, 4, 3), (16, 128, 2, 4, 3))
    elif m <= 64:
        tiles = ((32, 64, 1, 4, 3), (64, 64, 1, 4, 3), (32, 128, 2, 4, 3))
    else:
        tiles = ((64, 128, 1, 4, 2), (128, 128, 1, 8, 2), (128, 64, 1, 4, 2))
    # A padded block of 256 slots (W8 at B=128 has none; the first W3 layout had them) doubles
    # the weight tile in shared memory: fewer stages keep every candidate within the card's
    # 227 KB (3 stages of a 256 x 128 tile needed 328 KB).
    # W3's GEMM also gathers its spare codes from three more word tiles of the same size, which
    # the pipeline buffers too (one candidate asked for 276 KiB of shared memory on an H100).
    b_pad = _pow2(_slots_per_block(kw)) * (4 if kw.bits == 3 else 1)
    out = [Config("gemm", block_m=bm, block_n=bn, split_k=sk, num_warps=w,
                  num_stages=max(1, min(st, 3 * 128 * 128 // (b_pad * bn))))
           for bm, bn, sk, w, st in tiles]
    if m <= 16:  # the GEMM first: it is always valid (the tuner's fallback during graph capture)
        out += rows
    return out + [Config("dequant", block_n=16), Config("dequant", block_n=64)]


def smem_candidates(kw: KernelWeight, dtype: torch.dtype) -> list[Config]:
    """The shared-memory GEMV's tiles that fit this weight (none off a Hopper-or-later GPU)."""
    from quantlrm.kernels import smem_gemv

    if not smem_gemv.available(kw.packed.device):
        return []
    return [c for c in SMEM_GEMV_CONFIGS
            if smem_gemv.eligible(kw.bits, kw.group_size, kw.block, dtype, kw.n_blocks, c.blocks_per_step)]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _layout_args(kw: KernelWeight) -> dict:
    return kernel_constants(kw.bits, kw.group_size, kw.in_features)


def _slots_per_block(kw: KernelWeight) -> int:
    """Code slots the GEMM walks per block: every lane's codes (3 bits: the spare ones too)."""
    return codes_per_lane(kw.bits) * kw.lanes


def dequant_triton(kw: KernelWeight, dtype: torch.dtype, block_n: int = 16) -> torch.Tensor:
    """Dense [out, in] weight written by the Triton decoder."""
    from quantlrm.kernels import triton_kernels as tk

    n, k = kw.out_features, kw.in_features
    w = torch.empty(n, k, dtype=dtype, device=kw.scale.device)
    pairs = {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0) if k % 2 == 0 else 0
    grid = (tk.cdiv(n, block_n), kw.n_blocks)
    tk._dequant_kernel[grid](kw.packed, kw.scale, kw.zero, w.view(torch.int32) if pairs else w, n, k,
                             kw.packed.stride(0), kw.scale.stride(0), kw.group_size,
                             L_PAD=_pow2(kw.lanes), BLOCK_N=block_n, PAIRS=pairs, **_layout_args(kw))
    return w


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: switch to the tensor's where they differ
    (a model split over GPUs)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _outside_graph_pool(device: torch.device, make):
    """`make()` in a helper thread. cudagraph trees (torch.compile mode="reduce-overhead", which
    transformers uses for a static-cache `generate`) send every allocation of the thread that
    warms a graph up to a private pool whose memory later graphs reuse, and refuse to run when
    a tensor of that pool outlives the warm-up untracked; another thread's allocations stay out.
    (A side stream of the same thread did not: since pytorch/pytorch#152472 the pool is chosen
    by thread, not by stream.)"""
    if device.type != "cuda":
        return make()
    index = _device_index(device)  # the caller's current device, not the helper thread's

    def work():
        with torch.cuda.device(index):
            side = _side_stream(index)
            with torch.cuda.stream(side):
                out = make()
            done = side.record_event()
        return out, done

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        out, done = pool.submit(work).result()
    torch.cuda.current_stream(index).wait_event(done)  # initialised before the caller's stream uses it
    return out


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    """One stream per device for the workspaces (a cached block is reused only on its own
    stream, so a stream per workspace would strand most of a segment each time)."""
    return torch.cuda.Stream(index)


# Workspaces of the in-kernel split reductions (split-K GEMV, split decode attention), one per
# (device, size): fp32 partials and self-re-arming counters. Kernels on one stream use them one
# after another. Made outside CUDA-graph capture (a warm-up call) and outside graph pools;
# during a capture with none made yet, the caller runs unsplit or with atomics.
_WS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    key = (str(device), floats, counters)
    ws = _WS.get(key)
    if ws is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        ws = _outside_graph_pool(device, lambda: (torch.empty(floats, dtype=torch.float32, device=device),
                                                  torch.zeros(counters, dtype=torch.int32, device=device)))
        _WS[key] = ws
    return ws


def _workspace(device: torch.device, n: int, split: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The split-K GEMV's: n outputs per split (rows of x times rows of W), a counter per row tile."""
    return workspace(device, split * n, tiles) if split > 1 else None


def gated(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of interleaved (gate, up) columns [..., 2I] -> [..., I], in fp32."""
    g, u = y.float().unflatten(-1, (-1, 2)).unbind(-1)
    return (torch.nn.functional.silu(g) * u).to(y.dtype)


def run_config(x2: torch.Tensor, kw: KernelWeight, cfg: Config, act: bool = False) -> torch.Tensor:
    """y [M, N] = x2 [M, K] @ W^T with one configuration; act: `gated(y)` [M, N/2] instead
    (the GEMVs apply it as they store; the other paths after)."""
    from quantlrm.kernels import triton_kernels as tk

    m, k = x2.shape
    n = kw.out_features
    rg = cfg.row_groups if cfg.half2 else 1
    if rg not in (1, 2, 4):
        raise ValueError(f"row_groups is 1, 2 or 4 (rows per thread sharing activation loads), not {cfg.row_groups}")
    rows = cfg.block_n * rg  # a GEMV program's rows
    if act and (n % 2 or (cfg.kind == "gemv" and rows % 2)):
        raise ValueError("a gated product needs interleaved (gate, up) rows and an even row tile")
    if cfg.kind == "dequant":
        y = x2 @ dequant_triton(kw, x2.dtype, cfg.block_n).t()
        return gated(y) if act else y
    if cfg.kind == "smem":
        from quantlrm.kernels import smem_gemv

        return smem_gemv.run(x2, kw, cfg.block_n, cfg.blocks_per_step, cfg.lane_threads, cfg.num_warps, cfg.num_stages,
                             act, pdl_launch(x2.device, late=False))
    nb = kw.n_blocks
    u = cfg.blocks_per_step if cfg.half2 else 1
    per = tk.cdiv(tk.cdiv(nb, cfg.split_k), u) * u  # a split is whole steps
    split = tk.cdiv(nb, per)
    gemv = cfg.kind == "gemv"
    if gemv and (m > MAX_GEMV_ROWS or (cfg.half2 and m != 1)):
        raise ValueError(f"the GEMV configurations take 1 (half2) or up to {MAX_GEMV_ROWS} activation rows")
    if cfg.half2 and x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the half2 GEMV takes fp16 or bf16 activations, not {x2.dtype}")
    ws = _workspace(x2.device, n * m, split, tk.cdiv(n, rows)) if gemv else None
    atomic = split > 1 and ws is None
    fused_act = act and gemv and not atomic
    y = (torch.zeros(m, n, dtype=torch.float32, device=x2.device) if atomic
         else torch.empty(m, n // 2 if fused_act else n, dtype=x2.dtype, device=x2.device))
    common = dict(num_warps=cfg.num_warps, **_layout_args(kw))
    if cfg.kind == "gemv":
        grid = (tk.cdiv(n, rows), split)
        gb = 0 if kw.group_size == k else kw.group_size // kw.block  # blocks per group (0: one group)
        xin = x2.float() if cfg.x32 and not cfg.half2 else x2
        if k % 2:  # the kernels read activation pairs
            xin = torch.nn.functional.pad(xin, (0, 1))
        pairs = xin.view(torch.int64 if xin.dtype == torch.float32 else torch.int32)
        wsp, cnt = ws if ws is not None else (y, y)  # unused unless MODE 2
        if kw.packed.stride() != (nb * kw.words_per_block, 1):  # the GEMVs assume contiguous rows
            raise ValueError(f"packed weight of shape {tuple(kw.packed.shape)} and strides {kw.packed.stride()} is "
                             "not contiguous rows of n_blocks * W words")
        meta = dict(L_PAD=_pow2(kw.lanes), GB=gb, BLOCK_N=cfg.block_n,
                    EVEN_N=n % rows == 0, EVEN_K=k % kw.block == 0,
                    MODE=0 if split == 1 else (1 if atomic else 2), ACT=fused_act, **common)
        if cfg.half2:
            tk._gemv_h2_kernel[grid](pairs, kw.packed, kw.scale, kw.zero, y, wsp, cnt, n, k, nb, per,
                                     kw.scale.stride(0), PREFETCH=cfg.prefetch, U=u,
                                     FULL=nb % per == 0, EMULATE=os.environ.get("TRITON_INTERPRET") == "1",
                                     BF16=x2.dtype == torch.bfloat16, RG=rg, XONCE=cfg.x_once,
                                     **pdl_launch(x2.device, late=late_trigger(cfg)), **meta)
        else:
            xkind = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}[xin.dtype]
            tk._gemv_kernel[grid](pairs, kw.packed, kw.scale, kw.zero, y, wsp, cnt, m, n, k, nb, per,
                                  kw.scale.stride(0), pairs.stride(0), (1 << kw.bits) - 1,
                                  XKIND=xkind, MR=_pow2(m), **meta)
    else:
        grid = (tk.cdiv(m, cfg.block_m), tk.cdiv(n, cfg.block_n), split)
        tk._gemm_kernel[grid](x2, kw.packed, kw.scale, kw.zero, y, m, n, k, nb, per, x2.stride(0), y.stride(0),
                              kw.packed.stride(0), kw.scale.stride(0), kw.group_size,
                              B_PAD=_pow2(_slots_per_block(kw)),
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=split,
                              num_stages=cfg.num_stages, **common)
    y = y.to(x2.dtype) if y.dtype != x2.dtype else y
    return gated(y) if act and not fused_act else y


def _bucket(m: int) -> int:
    if m == 1:
        return 1
    return min(1 << (m - 1).bit_length(), 1024)


# (bucket, N, K, bits, group, dtype, half2 allowed, act) -> chosen Config
_TUNED: dict[tuple, Config] = {}


def _time(fn, reps: int = 10) -> float:
    """Milliseconds per call of `fn`, timed as replays of a CUDA graph of `reps` calls: that is
    how decode runs, and eager timing would mostly measure Python launch overhead (which would
    also penalise split-K's extra zero-fill and cast). Falls back to eager timing."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        g.replay()
        times = []
        for _ in range(3):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
        return sorted(times)[1]
    except RuntimeError:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def tune(x2: torch.Tensor, kw: KernelWeight, finalists: int = 3, rounds: int = 3,
         act: bool = False) -> tuple[Config, dict, dict]:
    """Time every candidate for this call's shape: (best, first pass {config: ms per call},
    finalists {config: median ms per call}). act: timed with the gated-MLP epilogue, as a fused
    gate/up runs (a tile's epilogue cost differs: BENCHMARKS.md, Kernels, version 12).

    A single timing can mislead (the fp32-math GEMV's tuner picked different down_proj tiles in
    two runs of one build, BENCHMARKS.md version 8), so the `finalists` fastest of a first pass
    are timed `rounds` more times, interleaved, and the best median wins. Needs CUDA and no
    graph capture in progress."""
    if finalists < 1 or rounds < 0:
        raise ValueError("tune needs at least one finalist and a non-negative number of rounds")
    if not x2.is_cuda or torch.cuda.is_current_stream_capturing():
        raise ValueError("tune times kernels on a CUDA device, outside CUDA-graph capture")
    m = x2.shape[0]
    cands = candidates(kw, m, x2.dtype)
    if act:  # see SMEM_GEMV_CONFIGS: not for the fused gate/up
        cands = [c for c in cands if c.kind != "smem"]
    # Time each candidate over enough copies of the weight to overflow L2 (~100 MB), so the
    # choice is made on weights streamed from memory, as in a real model, not on a cached one.
    copies = [kw] + [KernelWeight(kw.packed.clone(), kw.scale.clone(), kw.zero.clone(), kw.bits,
                                  kw.group_size, kw.in_features, kw.out_features)
                     for _ in range(min(63, -(-100_000_000 // kw.nbytes()) - 1))]

    def cost(c: Config) -> float:
        try:
            return _time(lambda: [run_config(x2, w, c, act) for w in copies], reps=2) / len(copies)
        except Exception:  # noqa: BLE001 -- e.g. a tile that needs more shared memory than this card has
            return float("inf")

    first = {c: cost(c) for c in cands}
    top = sorted((c for c in cands if first[c] < float("inf")), key=first.__getitem__)[:finalists]
    times = {c: [first[c]] for c in top}
    for _ in range(rounds if len(top) > 1 else 0):
        for c in top:
            times[c].append(cost(c))
    medians = {c: statistics.median(t) for c, t in times.items()}
    final = {c: v for c, v in medians.items() if v < float("inf")}
    best = min(final, key=final.__getitem__) if final else cands[0]
    return best, first, final


def choose(x2: torch.Tensor, kw: KernelWeight, act: bool = False) -> Config:
    """The tuned configuration for this call's key (tuning on first use); act: for the gated
    epilogue, tuned with it."""
    m = x2.shape[0]
    # (half2_ok in the key: turning QUANTLRM_BF16X2 on or off re-tunes instead of reusing a choice)
    key = (_bucket(m), kw.out_features, kw.in_features, kw.bits, kw.group_size, x2.dtype, half2_ok(kw, x2.dtype),
           act)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if not x2.is_cuda or torch.cuda.is_current_stream_capturing():
        return candidates(kw, m, x2.dtype)[0]  # no timing possible now: the first candidate is always valid
    best, _, _ = tune(x2, kw, act=act)
    _TUNED[key] = best
    return best


def qmatmul(x: torch.Tensor, kw: KernelWeight, config: Config | None = None, act: bool = False) -> torch.Tensor:
    """y = x @ W^T for x [..., in] in fp16/bf16; Triton on CUDA, the torch reference on CPU.
    act: W's rows are interleaved (gate, up) pairs and the result is `gated(y)`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if not x2.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        y = reference_matmul(x2, kw)
        y = gated(y) if act else y
    else:
        with on_device(x2):
            y = run_config(x2, kw, config or choose(x2, kw, act), act)
    return y.view(*shape[:-1], kw.out_features // 2 if act else kw.out_features)


@torch.library.custom_op("quantlrm::qmatmul", mutates_args=())
def qmatmul_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bits: int, group_size: int, in_features: int, out_features: int, act: bool = False) -> torch.Tensor:
    """`qmatmul` as one opaque operator: torch.compile keeps it whole instead of tracing into
    the tuner's Python (which would break the graph at every quantized linear)."""
    kw = KernelWeight(packed, scale, zero, bits, group_size, in_features, out_features)
    return qmatmul(x, kw, act=act)


@qmatmul_op.register_fake
def _qmatmul_fake(x, packed, scale, zero, bits, group_size, in_features, out_features, act=False):
    return x.new_empty((*x.shape[:-1], out_features // 2 if act else out_features))

"""Decode speed of fp16 vs W4 vs W3 (QuantLRM's Triton kernels) on an 8B-shaped Llama.

Random weights are generated on the GPU (no hub); each linear is quantized with
`quantlrm.quantizer.quantize` (round-to-nearest, group 128) and wrapped in `QuantLinear`
directly from the QuantResult. One run measures, on the same card:
  1. copy bandwidth of the card (device-to-device copy, bytes read + written);
  2. a per-layer GEMV microbenchmark (batch 1): each linear kind run over all layers' weights
     (so nothing is served from L2) inside a CUDA graph; bytes moved / time vs bandwidth;
  3. the prefill-path check: our tuned product vs dequantize-then-cuBLAS at larger batch;
  4. end-to-end greedy decode of SPEC.md's seven speed prompts, 200 new tokens each, with one
     loop for all three precisions: static KV cache, eager prefill, then each decode step as a
     replayed CUDA graph (without graphs, Python launch overhead dominates at batch 1);
  5. for reference, HF `generate` (eager, dynamic cache) on one prompt per precision.
The quantized models fuse q/k/v and gate/up into one launch each, gate/up with SiLU * up
applied as it stores, as `load_quantized` does (`--no-gated` keeps the activation a separate
launch, `--no-fuse` keeps every linear apart); the fp16 model is plain transformers.

    python benchmarks/decode.py --out decode.json      # on the GPU machine
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch

PROMPTS = [
    "Deeply analyze; then decide.",
    "Enumerate approaches; pick best.",
    "Solve; stress-test; revise.",
    "Assume nothing; derive everything.",
    "Answer; justify; quantify uncertainty.",
    "Decompose; solve parts; recombine.",
    "List risks; add safeguards; finalize.",
]
SHORTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# the 16-bit dtype of the model and activations (--dtype): fp16 runs the half2 GEMV, bf16 the
# bf16x2 form of the half2 GEMV unless QUANTLRM_BF16X2=0 (then the fp32-math GEMV)
HALF, DT = "fp16", torch.float16


def llama8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                       bos_token_id=257, eos_token_id=258, pad_token_id=256)


def linears(model) -> dict[str, list[tuple[str, torch.nn.Module]]]:
    out: dict[str, list] = {s: [] for s in SHORTS}
    for name, mod in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short in out and ".layers." in name:
            out[short].append((name, mod))
    return out


def set_linears(model, mods: dict[str, torch.nn.Module]) -> None:
    for name, m in mods.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m)


def mlp_modules(model) -> dict[str, torch.nn.Module]:
    """The model's own MLP modules, saved before any fusion (see `install`)."""
    return {n: m for n, m in model.named_modules() if n.endswith(".mlp") and ".layers." in n}


def install(model, mlps: dict[str, torch.nn.Module], mods: dict[str, torch.nn.Module], bits: int | None,
            fuse: bool = True, gated: bool = True) -> None:
    """Put one precision's linears in place (bits None: the dense ones). `fuse_projections`
    swaps each MLP for a GatedMLP that holds its own fused gate/up weight, so setting gate_proj
    and up_proj afterwards would leave the previous precision's weight running (before this
    function, the W3 rows of a `--bits 4,3` run decoded with W4 gate/up: BENCHMARKS.md,
    version 8). So the original MLP modules go back first, and every quantized linear reached
    is checked."""
    from quantlrm.nn import QuantLinear, fuse_projections

    set_linears(model, mlps)
    for mod in list(model.modules()):  # the previous precision's fused q/k/v (fuse_projections' fused_*)
        for child in [n for n, _ in mod.named_children() if n.startswith("fused_")]:
            delattr(mod, child)
    set_linears(model, mods)
    if bits is not None and fuse:
        fuse_projections(model, gated=gated)
    wrong = sorted({m.bits for m in model.modules() if isinstance(m, QuantLinear)} - ({bits} if bits else set()))
    if wrong:
        raise RuntimeError(f"model meant to run {f'W{bits}' if bits else 'dense'} still holds {wrong}-bit linears")


PDL_ENV = ("QUANTLRM_PDL", "QUANTLRM_INDUCTOR_PDL", "QUANTLRM_PDL_TRIGGER")


def set_pdl_env(env: dict[str, str]) -> None:
    """Clear every PDL setting, then apply `env` (one A/B variant's)."""
    for name in PDL_ENV:
        os.environ.pop(name, None)
    os.environ.update(env)


def tile_sets(mode: str) -> list[tuple[str, tuple]]:
    """`--tiles-ab`'s (tag, half2 tiles) variants: '1', the default candidates without the x_once
    tiles and all of them; 'rg2', also all but the row-pair x_once tiles; 'rg2only', only the last
    two; 'rg4only', all of them and all but the row-quad x_once tiles; 'smemonly', all of them with
    and without the shared-memory GEMV's tiles (the '-smem' variant drops `SMEM_GEMV_CONFIGS`);
    'smemall', also a variant with no half2 tile, where the shared-memory GEMV takes every shape it fits."""
    import quantlrm.kernels as qk

    all_h2 = qk.GEMV_H2_CONFIGS
    sets = [("+no_xonce", tuple(c for c in all_h2 if not c.x_once)), ("", all_h2),
            ("-xonce_rg2", tuple(c for c in all_h2 if c not in qk.GEMV_H2_ROWPAIR_XONCE))]
    rg4 = [("", all_h2), ("-xonce_rg4", tuple(c for c in all_h2 if c not in qk.GEMV_H2_ROWQUAD_XONCE))]
    smem = [("", all_h2), ("-smem", all_h2)]
    return {"1": sets[:2], "rg2": sets, "rg2only": sets[1:], "rg4only": rg4, "smemonly": smem,
            "smemall": smem + [("+smem_all", ())]}[mode]


def copy_bandwidth() -> float:
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(10):
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * (2 << 30) / statistics.median(ts)


_LOADED: list[int] = []  # every CUfunction Triton loaded in this process (see `track_loads`)
_CARVEOUT: list[int | None] = [None]  # the carveout `set_carveout` last gave, for kernels loaded later


@functools.cache
def _libcuda():
    import ctypes

    return ctypes.CDLL("libcuda.so.1")


def _carveout_of(function: int, percent: int) -> None:
    import ctypes

    rc = _libcuda().cuFuncSetAttribute(ctypes.c_void_p(function), 9, ctypes.c_int(percent))
    if rc:  # 9: CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
        raise RuntimeError(f"cuFuncSetAttribute(carveout {percent}) returned {rc}")


def _on_load(module, function, *rest) -> None:
    _LOADED.append(function)
    if _CARVEOUT[0] is not None:
        _carveout_of(function, _CARVEOUT[0])


def track_loads() -> None:
    """Record each kernel's CUfunction as Triton loads it (ours and inductor's), so `set_carveout`
    reaches them all."""
    import triton

    triton.knobs.runtime.kernel_load_end_hook.add(_on_load)


def set_carveout(percent: int) -> None:
    """The preferred shared-memory carveout (percent of the unified L1/shared memory; -1: the
    driver's choice) of every kernel loaded so far and loaded from now on. Triton asks for the
    most shared memory only for kernels over 48 KB; below that the driver picks one per kernel."""
    _CARVEOUT[0] = percent
    for f in _LOADED:
        _carveout_of(f, percent)


def graph_time(fn, reps: int = 20) -> float:
    """Median seconds of one replay of a CUDA graph of `fn` (captured after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return statistics.median(ts)


def per_copy_time(x: torch.Tensor, kws: list, cfg, act: bool = False) -> float:
    """Seconds per product of `x` with each weight copy under one configuration, all copies in one
    CUDA graph (enough copies overflow L2, so the weights come from HBM)."""
    from quantlrm.kernels import run_config

    return graph_time(lambda: [run_config(x, kw, cfg, act) for kw in kws]) / len(kws)


def module_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def describe(c) -> str:
    """A tuned `quantlrm.kernels.Config` in one short string (recorded with each timing)."""
    return (f"{c.kind} m{c.block_m} n{c.block_n} w{c.num_warps} sk{c.split_k} x32={c.x32} half2={c.half2} "
            f"prefetch={c.prefetch} u{c.blocks_per_step} rg{c.row_groups}" + (" x_once" if c.x_once else "")
            + (f" jt{c.lane_threads} st{c.num_stages}" if c.kind == "smem" else ""))


def gemv_bench(sets: dict[str, dict[str, list]], peak: float) -> list[dict]:
    """sets: precision -> short -> [(name, module)] over all layers."""
    from quantlrm.kernels import choose

    rows = []
    for short in SHORTS:
        for prec, by_short in sets.items():
            mods = [m for _, m in by_short[short]]
            k = mods[0].in_features
            x = torch.randn(1, k, dtype=DT, device="cuda")

            def run(mods=mods, x=x):
                for m in mods:
                    m(x)

            t = graph_time(run) / len(mods)
            chosen = describe(choose(x, mods[0].weight_layout)) if hasattr(mods[0], "weight_layout") else None
            nbytes = statistics.mean(module_bytes(m) for m in mods) + 2 * (k + mods[0].out_features)
            rows.append(dict(linear=short, precision=prec, out=mods[0].out_features, inp=k, chosen=chosen,
                             us=t * 1e6, bytes=nbytes, gbps=nbytes / t / 1e9, frac_copy_bw=nbytes / t / peak))
    return rows


def prefill_bench(qmods: list, dense: list) -> list[dict]:
    """Tuned qmatmul vs dequantize-then-cuBLAS vs fp16 cuBLAS at larger batch (one weight shape)."""
    from quantlrm.kernels import Config, choose

    rows = []
    for m in (2, 16, 64, 256, 4096):
        x = torch.randn(m, qmods[0].in_features, dtype=DT, device="cuda")
        kws = [q.weight_layout for q in qmods]
        cfg = choose(x, kws[0])
        deq = Config("dequant", block_n=16)
        t_ours = per_copy_time(x, kws, cfg)
        t_deq = per_copy_time(x, kws, deq)
        t_fp16 = graph_time(lambda x=x: [x @ d.weight.t() for d in dense]) / len(dense)
        rows.append(dict(m=m, bits=qmods[0].bits, chosen=describe(cfg),
                         us_ours=t_ours * 1e6, us_dequant_cublas=t_deq * 1e6, us_fp16=t_fp16 * 1e6))
    return rows


def kernel_profile(dec, ids: torch.Tensor, steps: int = 5) -> dict:
    """The GPU kernels of one decode step (torch.profiler over `steps` graph replays, or eager
    steps without a graph): how many launches a token costs and where its time goes, per kind."""
    from torch.profiler import ProfilerActivity, profile

    dec.prefill(ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.graph.replay() if dec.graph is not None else dec.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    def kind(name: str) -> str:
        if name.startswith(("_gemv", "_gemm", "_dequant")):
            return "quantlrm linears"
        if name.startswith("triton_"):
            return "inductor (norms, RoPE, residuals, cache)"
        if name.startswith("_decode_attn"):
            return "attention"
        if any(t in name for t in ("gemv", "gemm", "cutlass", "sm90_xmma", "nvjet", "splitKreduce")):
            return "cuBLAS (fp16 linears, lm_head)"
        if "flash" in name or "fmha" in name or "attention" in name.lower():
            return "attention"
        return "other"

    per_kind: dict[str, list[float]] = {}
    per_name: dict[str, list[float]] = {}
    for e in kernels:
        us = e.time_range.elapsed_us()  # a device event's own duration
        per_kind.setdefault(kind(e.name), [0, 0.0])
        per_kind[kind(e.name)][0] += 1
        per_kind[kind(e.name)][1] += us
        per_name.setdefault(e.name, [0, 0.0])
        per_name[e.name][0] += 1
        per_name[e.name][1] += us
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:25]
    # the quantized linears in launch order: with fused projections a layer runs four, qkv, o_proj,
    # gate/up and down_proj, so position i % 4 tells the shape
    lin = [e for e in sorted(kernels, key=lambda e: e.time_range.start) if kind(e.name) == "quantlrm linears"]
    by_pos = {}
    if lin and len(lin) == 4 * dec.model.config.num_hidden_layers * steps:  # (not with --no-fuse: 7 a layer)
        for i, name in enumerate(("qkv", "o_proj", "gate/up", "down_proj")):
            us = [e.time_range.elapsed_us() for e in lin[i::4]]
            by_pos[name] = {"launches": len(us) / steps, "us_each": statistics.mean(us)}
    return {"steps": steps, "launches_per_token": len(kernels) / steps, "linears_by_position": by_pos,
            "kernel_us_per_token": sum(v[1] for v in per_kind.values()) / steps,
            "by_kind": {k: {"launches": n / steps, "us": t / steps} for k, (n, t) in per_kind.items()},
            "top": [{"name": k[:120], "launches": n / steps, "us": t / steps} for k, (n, t) in top]}


def inductor_pdl_audit(root: str | None = None) -> dict:
    """Inductor's generated kernels (under `root`, default its cache directory) launched with
    PDL, and those among them with no `gdc_wait`, which could let the kernel after them run
    before the one before them ends. Kernels are told apart by their decorators, so a file
    holding several (inductor's output code) counts each once."""
    import re
    from pathlib import Path

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    pdl, no_wait = set(), set()
    for f in Path(root or cache_dir()).rglob("*.py"):
        text = f.read_text(errors="replace")
        for chunk in text.split("@triton_heuristics.")[1:]:  # a kernel: its metadata, then its body
            name = re.search(r"def (triton_\w+)\(", chunk)
            if name is None or "'launch_pdl': True" not in chunk:
                continue
            pdl.add(name.group(1))
            if "gdc_wait" not in chunk:
                no_wait.add(name.group(1))
    return {"pdl_kernels": len(pdl), "without_wait": sorted(no_wait)}


def decode_bench(model, prompts_ids: list[torch.Tensor], new_tokens: int, use_graph: bool,
                 compile_step: bool = False, profile_step: bool = False) -> dict:
    max_len = max(p.shape[1] for p in prompts_ids) + new_tokens + 8
    from quantlrm.decoding import Decoder  # the loop quantlrm.generate runs

    dec = Decoder(model, max_len, compile=compile_step, graph=use_graph)
    graph_ok = False
    if use_graph and dec.use_graph:  # (not for sliding-window layers beyond their window: eager)
        try:
            for ids in prompts_ids:  # warm-up: compiles and tunes every batch bucket first
                dec.prefill(ids)
            dec.capture(prompts_ids[0])
            graph_ok = True
        except Exception as e:  # noqa: BLE001 -- reported in the results, then eager
            print(f"compile or CUDA graph capture failed ({type(e).__name__}: {e}); timing the eager loop", flush=True)
            dec = Decoder(model, max_len, compile=False, graph=False)
    dec.generate(prompts_ids[0], 8)
    lat, first = [], None
    for ids in prompts_ids:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        toks = dec.generate(ids, new_tokens)
        torch.cuda.synchronize()
        lat.append(time.perf_counter() - t0)
        first = toks if first is None else first
    med = statistics.median(lat)
    res = dict(graph=graph_ok, compiled=compile_step and graph_ok, latencies_s=lat, median_latency_s=med,
               tok_per_s=new_tokens / med, first_tokens=first[:16].tolist())
    # the public API on the same decoder (handed over, so nothing compiles again): its wrapper's cost
    import quantlrm

    model._quantlrm_decoder = dec
    api = []
    for ids in prompts_ids:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        quantlrm.generate(model, ids, new_tokens, eos_token_id=[], compile=dec.compiled)
        torch.cuda.synchronize()
        api.append(time.perf_counter() - t0)
    res["quantlrm_generate_tok_per_s"] = new_tokens / statistics.median(api)
    del model._quantlrm_decoder
    if profile_step:
        try:
            res["profile"] = kernel_profile(dec, prompts_ids[0])
        except Exception as e:  # noqa: BLE001 -- the timings above stand without it
            res["profile"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return res


@torch.no_grad()
def hf_generate_bench(model, ids: torch.Tensor, new_tokens: int, cache: str | None = None) -> float:
    """Plain `model.generate`; with cache="static", transformers compiles the step itself, so the
    warm-up call makes the same cache (it compiles) and the second call is timed."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=256,
              cache_implementation=cache)
    if cache:
        model.generate(ids, **kw)
    else:
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=256)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step (all precisions alike) before capturing its graph")
    ap.add_argument("--no-hf-generate", action="store_true")
    ap.add_argument("--hf-static", action="store_true",
                    help="also time model.generate(cache_implementation='static'): transformers' own compiled "
                         "loop, what a user of load_quantized gets")
    ap.add_argument("--no-fuse", action="store_true",
                    help="keep q/k/v and gate/up as separate launches (load_quantized fuses them)")
    ap.add_argument("--no-gated", action="store_true",
                    help="fuse gate/up without the SiLU epilogue (the activation as its own launch)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing each precision, profile its decode step's kernels (launches per token, "
                         "time per kind: quantlrm linears, inductor, cuBLAS, attention)")
    ap.add_argument("--attention", choices=("quantlrm", "sdpa"), default="quantlrm",
                    help="attention of the quantized models: our one-launch decode kernel (what load_quantized "
                         "uses) or transformers' SDPA; the fp16 baselines always use SDPA")
    ap.add_argument("--no-fused-attention", action="store_true",
                    help="with --attention quantlrm: RoPE and the cache write stay transformers' own launches "
                         "(fuse_decode_attention off)")
    ap.add_argument("--fp16-qattn", action="store_true",
                    help="also time fp16 (compiled) with our attention, to separate its share of the speed-up")
    ap.add_argument("--bits", default="4,3", help="quantized precisions to build and time, e.g. '4' or '4,3'")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16",
                    help="the model's 16-bit dtype (bf16: the bf16x2 GEMV, or the fp32-math one with QUANTLRM_BF16X2=0)")
    ap.add_argument("--out", default="decode.json")
    ap.add_argument("--gemv-only", action="store_true",
                    help="batch-1 check and GEMV microbenchmark only (few kernel compiles)")
    ap.add_argument("--no-decode", action="store_true",
                    help="GEMV and prefill microbenchmarks only (no end-to-end decode)")
    ap.add_argument("--pdl-ab", nargs="?", const="2", choices=("2", "3", "trigger"),
                    help="time each quantized precision without programmatic dependent launch "
                         "(QUANTLRM_PDL=0) and with it (the default) in the same run; '3': also with it for "
                         "our kernels only (QUANTLRM_INDUCTOR_PDL=0); 'trigger': instead, the default against every GEMV "
                         "letting the next kernel launch as soon as it starts (QUANTLRM_PDL_TRIGGER=early) "
                         "and only after its main loop (=late)")
    ap.add_argument("--tiles-ab", nargs="?", const="1", choices=("1", "rg2", "rg2only", "rg4only", "smemonly", "smemall"),
                    help="time each quantized precision with the tuner's half2 tiles minus the x_once ones and with "
                         "all of them, in the same run; 'rg2': also with all but the row-pair x_once tiles "
                         "(kernels.GEMV_H2_ROWPAIR_XONCE; version 13's default); 'rg2only': only all of them, and all "
                         "but those; 'rg4only': all of them, and all but the row-quad x_once tiles; 'smemonly': all of them "
                         "with and without the shared-memory GEMV's tiles; 'smemall': also with no half2 tile; with --pdl-ab, each tile set under each PDL mode")
    ap.add_argument("--carveout-ab", type=int, nargs="+", default=None,
                    help="each quantized precision also with these preferred shared-memory carveouts (percent) "
                         "set on every Triton kernel, after the default")
    ap.add_argument("--reverse-order", action="store_true",
                    help="run the A/B variants in reverse order on odd repeats instead of even ones (to split one "
                         "experiment over two calls with balanced order)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each quantized precision this many times, re-tuning its kernels before each repeat")
    ap.add_argument("--no-fp16-compile", action="store_true",
                    help="with --compile, skip the compiled fp16 decode (the uncompiled one is the baseline)")
    ap.add_argument("--decode-only", action="store_true",
                    help="skip the GEMV and prefill microbenchmarks (end-to-end decode only)")
    args = ap.parse_args()
    global HALF, DT
    HALF, DT = args.dtype, {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.carveout_ab:
        track_loads()  # before any kernel loads

    from transformers import AutoModelForCausalLM

    from quantlrm.attention import fuse_decode_attention, register
    from quantlrm.kernels import bf16x2_enabled
    from quantlrm.models import byte_tokenizer
    from quantlrm.nn import QuantLinear

    t_start = time.time()

    def dump() -> None:  # after every section, so a cut-off run still leaves its numbers
        res["wall_s"] = time.time() - t_start
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    res: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, args=vars(args))
    import transformers
    import triton

    res["transformers"], res["triton"] = transformers.__version__, triton.__version__
    res["bf16x2"] = bf16x2_enabled()  # the half2 GEMV's bf16 form (default since version 8)
    peak = copy_bandwidth()
    res["copy_bandwidth_GBps"] = peak / 1e9
    print(f"{res['device']}: copy bandwidth {peak / 1e9:.0f} GB/s", flush=True)

    quant_bits = tuple(int(b) for b in args.bits.split(","))
    cfg = llama8b_config(args.layers)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DT).eval()
    dense = {n: m for lst in linears(model).values() for n, m in lst}
    mlps = mlp_modules(model)
    quant = {}
    for bits in quant_bits:
        quant[bits] = {n: QuantLinear.from_linear(m, bits, args.group_size) for n, m in dense.items()}
        torch.cuda.synchronize()
    # correctness on the real shapes: tuned kernels vs dequantize-then-matmul (fp32 reference)
    res["check_relerr"] = {}
    for bits in quant_bits:
        for short in ("q_proj", "down_proj"):
            qm = quant[bits][f"model.layers.0.mlp.{short}" if short == "down_proj" else f"model.layers.0.self_attn.{short}"]
            for m in (1,) if args.gemv_only else (1, 7, 64):
                x = torch.randn(m, qm.in_features, device="cuda", dtype=DT)
                ref = x.float() @ qm.dequantized_weight(DT).float().t()
                err = float((qm(x).float() - ref).norm() / ref.norm())
                res["check_relerr"][f"W{bits} {short} M={m}"] = err
    print(f"kernel vs dequant-matmul max rel. error: {max(res['check_relerr'].values()):.2e}", flush=True)
    res["weight_bytes"] = {HALF: sum(module_bytes(m) for m in dense.values()),
                           **{f"W{b}": sum(module_bytes(m) for m in q.values()) for b, q in quant.items()}}
    res["model_bytes_fp16_total"] = module_bytes(model)
    print(f"built + quantized in {time.time() - t_start:.0f}s; linear bytes {res['weight_bytes']}", flush=True)

    def by_short(mods):
        return {s: [(n, mods[n]) for n, _ in lst] for s, lst in linears(model).items()}

    with torch.no_grad():
        sets = {HALF: by_short(dense), **{f"W{b}": by_short(quant[b]) for b in quant_bits}}
        res["gemv"] = [] if args.decode_only else gemv_bench(sets, peak)
        dump()
        for r in res["gemv"]:
            print(f"gemv {r['linear']:9s} {r['precision']:4s} {r['out']}x{r['inp']}: {r['us']:7.1f} us "
                  f"{r['gbps']:6.0f} GB/s ({r['frac_copy_bw']:.0%} of copy bw) {r['chosen'] or ''}", flush=True)
        if args.gemv_only:
            return
        dense_gate = [m for _, m in sets[HALF]["gate_proj"]]
        res["prefill"] = [] if args.decode_only else [
            r for b in quant_bits for r in prefill_bench([m for _, m in sets[f"W{b}"]["gate_proj"]], dense_gate)]
        for r in res["prefill"]:
            print(f"prefill W{r['bits']} M={r['m']:5d} {r['chosen']} ours {r['us_ours']:8.1f} us  "
                  f"dequant+cuBLAS {r['us_dequant_cublas']:8.1f} us  fp16 {r['us_fp16']:8.1f} us", flush=True)

    if args.no_decode:
        dump()
        return
    tok = byte_tokenizer()
    prompts_ids = [torch.tensor([[257] + tok(p, add_special_tokens=False)["input_ids"]], device="cuda")
                   for p in PROMPTS]
    res["decode"] = {}
    if args.compile:  # one compiled forward per precision on the same code object
        torch._dynamo.config.recompile_limit = 64
    # With --compile every precision is compiled alike; the uncompiled fp16 loop (what plain
    # transformers gives) is timed too, so both ratios come from the same run.
    qattn = register() if args.attention == "quantlrm" else "sdpa"
    precs = (HALF, *(f"W{b}" for b in quant_bits))
    runs = [(HALF, False, "sdpa")] + [(p, True, "sdpa" if p == HALF else qattn) for p in precs] \
        if args.compile else [(p, False, "sdpa" if p == HALF else qattn) for p in precs]
    if args.fp16_qattn:
        runs.insert(2 if args.compile else 1, (HALF, args.compile, register()))
    if args.compile and args.no_fp16_compile:
        runs = [r for r in runs if not (r[0] == HALF and r[1])]
    pdl_modes = {"": {}}
    if args.pdl_ab:
        pdl_modes = {"+nopdl": {"QUANTLRM_PDL": "0"}, "": {}}
        if args.pdl_ab == "3":
            pdl_modes = {"+nopdl": {"QUANTLRM_PDL": "0"}, "+kpdl": {"QUANTLRM_INDUCTOR_PDL": "0"}, "": {}}
        if args.pdl_ab == "trigger":
            pdl_modes = {"": {}, "+early": {"QUANTLRM_PDL_TRIGGER": "early"}, "+late": {"QUANTLRM_PDL_TRIGGER": "late"}}
    import quantlrm.kernels as qk

    all_h2, all_smem = qk.GEMV_H2_CONFIGS, qk.SMEM_GEMV_CONFIGS
    if args.carveout_ab:
        if args.repeats > 1 or args.reverse_order:
            raise SystemExit("--carveout-ab runs the default first: not with --repeats or --reverse-order")
        pdl_modes = {"": {}, **{f"+carve{p}": {} for p in args.carveout_ab}}
    variants = [(tag, env, all_h2) for tag, env in pdl_modes.items()]  # (tag, env, the tuner's half2 tiles)
    if args.tiles_ab:  # with --pdl-ab too: every tile set under every PDL mode (tiles and PDL interact)
        variants = [(ttag + ptag, env, tiles) for ttag, tiles in tile_sets(args.tiles_ab)
                    for ptag, env in pdl_modes.items()]
    # --repeats: each quantized precision's runs again, the tuner's choices for it forgotten first
    # (they vary between processes), so one call shows the spread a single run hides; --tiles-ab
    # re-tunes before every variant; --tiles-ab and --pdl-ab run their variants in reverse order on
    # even repeats. (With --pdl-ab alone the tuner runs under the first variant's settings of each
    # repeat. Identical W4 variants in one repeat differed by -2.5% to +5%, version 13.)
    # (retune: "all" of the precision's choices at a repeat's start, "m1" between --tiles-ab
    # variants: the candidate sets differ only in batch-1 tiles)
    runs = [(p, c, a, tag + (f"#{rep}" if rep > 1 else ""), env, tiles,
             "all" if rep > 1 and i == 0 else "m1" if args.tiles_ab else None)
            for p, c, a in runs for rep in range(1, (args.repeats if p != HALF else 1) + 1)
            for i, (tag, env, tiles) in enumerate(
                (variants[::-1] if (rep + args.reverse_order) % 2 == 0 else variants) if p != HALF else [("", {}, all_h2)])]
    for prec, comp, attn, tag, env, tiles, retune in runs:
        qk.GEMV_H2_CONFIGS = tiles
        qk.SMEM_GEMV_CONFIGS = () if tag.startswith("-smem") else all_smem
        if retune and prec != HALF:
            for key in [k for k in qk._TUNED if k[3] == int(prec[1]) and (retune == "all" or k[0] == 1)]:
                del qk._TUNED[key]
        if args.pdl_ab:  # (else the caller's settings stand)
            set_pdl_env(env)
        if "+carve" in tag:  # (the default variant runs first, its kernels untouched; no --repeats)
            set_carveout(int(tag.split("+carve")[1].split("#")[0]))
        label = prec + ("+compile" if comp else "") + ("+qattn" if attn != "sdpa" else "") + tag
        model.config._attn_implementation = attn
        if attn != "sdpa" and not args.no_fused_attention:
            fuse_decode_attention(model)  # only takes effect while the attention is ours
        bits = None if prec == HALF else int(prec[1])
        install(model, mlps, dense if bits is None else quant[bits], bits, not args.no_fuse, not args.no_gated)
        t0 = time.time()
        r = decode_bench(model, prompts_ids, args.new_tokens, not args.no_graph, comp, args.profile)
        r["setup_s"] = time.time() - t0 - sum(r["latencies_s"])
        if not args.no_hf_generate:
            r["hf_generate_tok_per_s"] = hf_generate_bench(model, prompts_ids[0], args.new_tokens)
        if args.hf_static and (comp or not args.compile):  # once per precision
            r["hf_static_tok_per_s"] = hf_generate_bench(model, prompts_ids[0], args.new_tokens, "static")
        if prec != HALF:  # the tile each linear shape got from the tuner (it times candidates; noisy)
            r["tuned"] = {f"m{key[0]} {key[1]}x{key[2]} W{key[3]} g{key[4]}" + (" act" if key[-1] else ""): describe(c)
                          for key, c in qk._TUNED.items() if key[3] == int(prec[1])}
        res["decode"][label] = r
        dump()
        print(f"decode {label}: median {r['median_latency_s'] * 1e3:.0f} ms / {args.new_tokens} tokens = "
              f"{r['tok_per_s']:.1f} tok/s (graph={r['graph']}, compiled={r['compiled']}, setup "
              f"{r['setup_s']:.0f}s); HF generate {r.get('hf_generate_tok_per_s', float('nan')):.1f} tok/s",
              flush=True)
        print(f"  quantlrm.generate (same decoder): {r['quantlrm_generate_tok_per_s']:.1f} tok/s" +
              (f"; model.generate(cache_implementation='static'): {r['hf_static_tok_per_s']:.1f} tok/s"
               if "hf_static_tok_per_s" in r else ""), flush=True)
        prof = r.get("profile") or {}
        if prof.get("linears_by_position"):
            print("  quantized linears, us each: " + "; ".join(
                f"{k} {v['us_each']:.1f}" for k, v in prof["linears_by_position"].items()), flush=True)
        if "by_kind" in prof:
            print(f"  kernels per token: {prof['launches_per_token']:.0f} launches, "
                  f"{prof['kernel_us_per_token'] / 1e3:.2f} ms of kernel time; " +
                  "; ".join(f"{k} {v['launches']:.0f} x = {v['us'] / 1e3:.2f} ms" for k, v in prof["by_kind"].items()),
                  flush=True)
    qk.GEMV_H2_CONFIGS, qk.SMEM_GEMV_CONFIGS = all_h2, all_smem
    res["inductor_pdl"] = inductor_pdl_audit()
    print(f"inductor kernels launched with PDL: {res['inductor_pdl']['pdl_kernels']}, without a wait: "
          f"{res['inductor_pdl']['without_wait'] or 'none'}", flush=True)
    for label, r in res["decode"].items():
        if label.startswith(HALF):
            continue
        for base in [b for b in res["decode"] if b.startswith(HALF) and "qattn" not in b]:
            ratio = r["tok_per_s"] / res["decode"][base]["tok_per_s"]
            r[f"speedup_vs_{base}"] = ratio
            print(f"{label} speed-up over {base}: {ratio:.2f}x", flush=True)
    if args.repeats > 1:  # the spread over repeats, per precision and PDL mode
        groups: dict[str, list[float]] = {}
        for label, r in res["decode"].items():
            if not label.startswith(HALF):
                groups.setdefault(label.split("#")[0], []).append(r["tok_per_s"])
        res["repeat_spread"] = {g: dict(tok_per_s=v, median=statistics.median(v)) for g, v in groups.items()}
        for g, v in groups.items():
            print(f"{g} over {len(v)} repeats: {min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f} tok/s "
                  "(min / median / max)", flush=True)
    dump()
    print(f"wrote {args.out} ({res['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()

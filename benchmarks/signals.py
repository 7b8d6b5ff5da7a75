"""Benchmark `quantlrm signals` on a synthetic Llama-shaped bf16 pair written to disk.

The pair is generated tensor by tensor (never the whole model in memory) and written as
save_pretrained-style safetensors shards: W ~ N(0, 0.02) in bf16, W' = bf16(W + N(0, 1e-3)),
so ~3.6% of the updates round to exact zeros, as small fine-tuning steps do in bf16
releases (SPEC 8b). Then, each in a fresh child process:

1. a plain read of the same bytes signals needs (every paired linear weight of both
   sides, once, with the same number of reader threads): the physical limit;
2. `compute_signals` + `save_signals` on the chosen device.

Reported: wall time of each, their ratio, signals' throughput (GB of linear weights read
per second of wall time), passes over the data, and each child's peak RSS (VmHWM).

    python benchmarks/signals.py --shape 1b --dir /work/tmp_sig            # CPU
    python benchmarks/signals.py --shape 7b --dir /tmp/sig --device cuda --gen-device cuda
    python benchmarks/signals.py --shape tiny --dir /tmp/sig --device cuda --compare-cpu

The files are deleted at the end unless --keep. Writing the pair leaves it in the page
cache when it fits in RAM, so the reads are then warm reads (the output says how much of
the pair fits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SHAPES = {
    # Llama-3.2-1B-shaped (tied embeddings) and Llama-2-7B-shaped
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=False,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}
UPDATE_STD = 1e-3
WEIGHT_STD = 0.02


def tensor_plan(cfg: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_paired_linear) in save_pretrained order."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h), False)]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h), True),
            (p + "self_attn.k_proj.weight", (kv, h), True),
            (p + "self_attn.v_proj.weight", (kv, h), True),
            (p + "self_attn.o_proj.weight", (h, h), True),
            (p + "mlp.gate_proj.weight", (i, h), True),
            (p + "mlp.up_proj.weight", (i, h), True),
            (p + "mlp.down_proj.weight", (h, i), True),
            (p + "input_layernorm.weight", (h,), False),
            (p + "post_attention_layernorm.weight", (h,), False),
        ]
    out.append(("model.norm.weight", (h,), False))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], h), False))
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def generate(out: Path, shape: str, shard_gb: float, gen_device: str, seed: int = 0) -> dict:
    """Write base/ and ft/ checkpoints, shard by shard, tensor by tensor."""
    cfg = dict(
        SHAPES[shape],
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        torch_dtype="bfloat16",
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        hidden_act="silu",
    )
    plan = tensor_plan(cfg)
    limit = int(shard_gb * 1e9)
    shards: list[list[tuple[str, tuple[int, ...], bool]]] = [[]]
    size = 0
    for item in plan:
        nb = _numel(item[1]) * 2
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nb
    n = len(shards)
    dev = torch.device(gen_device)
    g = torch.Generator(device=dev)
    total = 0
    t0 = time.perf_counter()
    for side in ("base", "ft"):
        (out / side).mkdir(parents=True, exist_ok=True)
        (out / side / "config.json").write_text(json.dumps(cfg, indent=1))
    weight_map = {}
    handles = {}
    for si, items in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{si:05d}-of-{n:05d}.safetensors"
        header, off = {}, 0
        for name, shp, _ in items:
            nb = _numel(shp) * 2
            header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        header["__metadata__"] = {"format": "pt"}
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        for side in ("base", "ft"):
            f = open(out / side / fname, "wb")  # noqa: SIM115 (closed below)
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            handles[side] = f
        for k, (_name, shp, paired) in enumerate(items):
            g.manual_seed(seed * 1_000_003 + si * 10_007 + k)
            if len(shp) == 1:
                w = torch.ones(shp, device=dev, dtype=torch.bfloat16)
                wf = w
            else:
                w32 = torch.randn(shp, generator=g, device=dev).mul_(WEIGHT_STD)
                w = w32.bfloat16()
                if paired:
                    wf = (
                        w32.copy_(w)
                        .add_(torch.randn(shp, generator=g, device=dev).mul_(UPDATE_STD))
                        .bfloat16()
                    )
                else:
                    wf = w
                del w32
            for side, t in (("base", w), ("ft", wf)):
                handles[side].write(memoryview(t.cpu().contiguous().view(torch.uint8).numpy()))
            total += 2 * w.numel() * 2
        for f in handles.values():
            f.close()
    if n > 1:
        for side in ("base", "ft"):
            index = {"metadata": {"total_size": total // 2}, "weight_map": weight_map}
            (out / side / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return {"gen_s": time.perf_counter() - t0, "pair_bytes": total, "shards_per_side": n}


def _vmhwm_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def child_read(base: str, ft: str, workers: int) -> dict:
    """Plain parallel reads of every paired linear weight of both sides into reused buffers."""
    from quantlrm.arch import linear_names
    from quantlrm.checkpoint import Checkpoint

    jobs = []
    for path in (base, ft):
        ck = Checkpoint(path)
        for _, _, name in linear_names(ck.config):
            shard = ck.shard_of(name + ".weight")
            header, start, _ = ck._header(shard)
            b, e = header[name + ".weight"]["data_offsets"]
            jobs.append((str(ck.path / shard), start + b, e - b))
    import threading

    local = threading.local()

    def read(job) -> int:
        path, off, n = job
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < n:
            buf = local.buf = bytearray(n)
        view = memoryview(buf)[:n]
        with open(path, "rb", buffering=0) as f:
            f.seek(off)
            got = 0
            while got < n:
                got += f.readinto(view[got:])
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        nbytes = sum(pool.map(read, jobs))
    dt = time.perf_counter() - t0
    return {
        "read_s": dt,
        "read_bytes": nbytes,
        "read_gb_s": nbytes / dt / 1e9,
        "read_peak_rss_gb": _vmhwm_gb(),
    }


def child_signals(base: str, ft: str, out: str, device: str, workers: int) -> dict:
    from quantlrm.signals import compute_signals, format_summary, save_signals

    t0 = time.perf_counter()
    sig = compute_signals(base, ft, device=device, workers=workers, progress=sys.stderr.isatty())
    save_signals(sig, out, overwrite=True)
    dt = time.perf_counter() - t0
    s = sig.stats
    print(format_summary(sig), file=sys.stderr)
    return {
        "signals_s": dt,
        "signals_compute_s": s["time_s"],
        "signals_bytes": s["bytes"],
        "signals_gb_s": s["bytes"] / dt / 1e9,
        "passes": s["passes"],
        "cached_modules": s["cached_modules"],
        "n_modules": s["n_modules"],
        "zero_fraction": s["zero_fraction"],
        "dw_min": s["dw_min"],
        "dw_mid": s["dw_mid"],
        "dw_max": s["dw_max"],
        "signals_peak_rss_gb": _vmhwm_gb(),
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    }


def child_compare(base: str, ft: str, device: str) -> dict:
    """Same signals on `device` and on CPU: statistics identical, importance within fp32 sums."""
    from quantlrm.signals import compute_signals

    a = compute_signals(base, ft, device=device, progress=False)
    b = compute_signals(base, ft, device="cpu", progress=False)
    same = all(
        a.stats[k] == b.stats[k] for k in ("dw_min", "dw_mid", "dw_max", "n_zero", "n_updates")
    )
    worst = max(
        ((a.importance[k] - b.importance[k]).abs() / b.importance[k].abs()).max().item()
        for k in b.importance
    )
    return {"stats_identical": same, "importance_max_rel_diff": worst}


def run_child(args: list[str]) -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, text=True
    )
    if p.returncode:
        raise SystemExit(f"child {args[:1]} failed with code {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=SHAPES, default="1b")
    ap.add_argument(
        "--dir", required=True, help="scratch directory for the pair (deleted unless --keep)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--gen-device", default="cpu", help="where random weights are drawn (cuda is faster)"
    )
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse a pair already in --dir")
    ap.add_argument("--compare-cpu", action="store_true", help="also check --device against CPU")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    ap.add_argument("--child", choices=["read", "signals", "compare"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    d = Path(args.dir)
    base, ft = str(d / "base"), str(d / "ft")
    if args.child == "read":
        print(json.dumps(child_read(base, ft, args.workers)))
        return
    if args.child == "signals":
        print(json.dumps(child_signals(base, ft, str(d / "signals"), args.device, args.workers)))
        return
    if args.child == "compare":
        print(json.dumps(child_compare(base, ft, args.device)))
        return

    res: dict = {
        "shape": args.shape,
        "device": args.device,
        "workers": args.workers,
        "host_cpus": os.cpu_count(),
    }
    try:
        if not (args.reuse and (d / "ft" / "config.json").exists()):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            res.update(generate(d, args.shape, args.shard_gb, args.gen_device))
            print(
                f"generated {res['pair_bytes'] / 1e9:.1f} GB pair in {res['gen_s']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        res["host_ram_gb"] = mem / 1e9
        common = [
            "--shape",
            args.shape,
            "--dir",
            args.dir,
            "--device",
            args.device,
            "--workers",
            str(args.workers),
        ]
        res.update(run_child([*common, "--child", "read"]))
        print(
            f"plain read: {res['read_bytes'] / 1e9:.1f} GB in {res['read_s']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        res.update(run_child([*common, "--child", "signals"]))
        res["signals_over_read"] = res["signals_s"] / res["read_s"]
        if args.compare_cpu:
            res.update(run_child([*common, "--child", "compare"]))
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    line = json.dumps(res)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    print(
        f"{args.shape} pair, {res['signals_bytes'] / 1e9:.1f} GB of linear weights, device {res.get('device_name')}: "
        f"signals {res['signals_s']:.1f} s ({res['signals_gb_s']:.2f} GB/s, {res['passes']} passes, "
        f"{res['cached_modules']}/{res['n_modules']} cached), plain read {res['read_s']:.1f} s "
        f"({res['read_gb_s']:.2f} GB/s), ratio {res['signals_over_read']:.2f}x, peak RSS signals "
        f"{res['signals_peak_rss_gb']:.2f} GB / read {res['read_peak_rss_gb']:.2f} GB, zeros {100 * res['zero_fraction']:.2f}%",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

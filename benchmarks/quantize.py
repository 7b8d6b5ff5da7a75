"""Time and peak GPU memory of `quantlrm quantize` (RTN / AWQ / QuantLRM, optionally with GPTQ
rounding) against llm-compressor's AWQ and GPTQ.

One run builds a Llama-2-7B-shaped checkpoint with random bf16 weights (generated on the
GPU, written as safetensors shards), then quantizes it layer-streamed with each of our
methods and, in a child process with llm-compressor's wheels on PYTHONPATH, with
llm-compressor's AWQ or GPTQ (`oneshot`, model fully on the GPU; methods `llmc` and
`llmc-gptq`), on the same 128 x 512 calibration tokens. `quantlrm-gptq` and `gptq` are ours
with `--rounding gptq` (QuantLRM's or RTN's scales, then GPTQ rounding); `quantlrm-gptq-ao`
and `gptq-ao` add `--gptq-act-order`. Quality proxy: MSE of the final hidden state against the
fp model on 8 calibration blocks. Usage (GPU machine, wheels unpacked into .site as
shared/recipes/README.md says):

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/quantize.py --layers 8 --json $OUT/quantize.json
    python benchmarks/quantize.py --tiny --methods rtn,awq,quantlrm   # CPU smoke test

`--layers N` keeps the 7B layer shape but only N of its 32 layers (device-time budget);
time per layer is the comparable number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=1024, max_position_embeddings=1024)
EVAL_SAMPLES = 8


def build_model(d: Path, layers: int, shape: dict, device: str) -> None:
    """Random bf16 Llama weights generated tensor by tensor, written as size-capped shards."""
    from transformers import LlamaConfig

    from quantlrm.checkpoint import ShardedWriter
    from quantlrm.models import byte_tokenizer

    cfg = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, rms_norm_eps=1e-5, **shape)
    cfg.torch_dtype = "bfloat16"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(0)
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]

    def rnd(*s, std=0.02):
        return (torch.randn(*s, generator=g, device=device) * std).to(torch.bfloat16)

    def norm():
        return (1 + 0.1 * torch.randn(h, generator=g, device=device)).to(torch.bfloat16)

    w = ShardedWriter(d, max_shard_bytes=2 << 30)
    w.add("model.embed_tokens.weight", rnd(v, h, std=1.0))
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                  "mlp.down_proj": (h, inter)}
        for name, s in shapes.items():
            x = rnd(*s)
            x[:, torch.randint(0, s[1], (8,), generator=g, device=device)] *= 10  # a few outlier channels
            w.add(p + name + ".weight", x)
        w.add(p + "input_layernorm.weight", norm())
        w.add(p + "post_attention_layernorm.weight", norm())
    w.add("model.norm.weight", norm())
    w.add("lm_head.weight", rnd(v, h))
    w.close()
    cfg.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)


def random_importance(model_dir: Path) -> dict[str, torch.Tensor]:
    """Signals-shaped importance (1..10 times a zero count) for timing QuantLRM's search."""
    from quantlrm.arch import linear_names
    from quantlrm.checkpoint import Checkpoint

    ck = Checkpoint(model_dir)
    g = torch.Generator().manual_seed(1)
    return {
        name: (1 + 9 * torch.rand(ck.info(name + ".weight")[0][1], generator=g))
        * torch.randint(1, 5, (ck.info(name + ".weight")[0][1],), generator=g)
        for _, _, name in linear_names(ck.config)
    }


@torch.no_grad()
def final_hidden(model_dir_or_model, ids: torch.Tensor, device: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to(device).eval()
    outs = [model.model(input_ids=x.to(device)).last_hidden_state.float().cpu() for x in ids.split(2)]
    return torch.cat(outs)


def run_ours(method: str, model_dir: Path, out: Path, args, ref: torch.Tensor, ids: torch.Tensor) -> dict:
    from quantlrm.pipeline import QuantizeOptions, quantize_model

    label = method
    rounding, act_order = "rtn", method.endswith("-ao")
    method = method.removesuffix("-ao")
    if method in ("quantlrm-gptq", "gptq"):  # our scales (QuantLRM's, or none), then GPTQ rounding
        method, rounding = ("quantlrm" if method == "quantlrm-gptq" else "rtn"), "gptq"
    extra = {"importance": random_importance(model_dir)} if method == "quantlrm" else {}
    if rounding == "gptq":
        extra["gptq_act_order"] = act_order  # explicit: the library's default is on
    if method == "awq-duo":  # llm-compressor's default AWQ variant
        method, extra = "awq", {"duo_scaling": True}
    opts = QuantizeOptions(model=str(model_dir), out=str(out), method=method, bits=args.bits,
                           group_size=args.group_size, calib="builtin", calib_samples=args.samples,
                           calib_seqlen=args.seqlen, device=args.device, progress=False, overwrite=True,
                           rounding=rounding, **extra)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    quantize_model(opts)
    wall = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    rep = json.loads((out / "quantlrm.json").read_text())
    hid = final_hidden(out, ids, args.device)
    shutil.rmtree(out, ignore_errors=True)
    groups = [g for r in rep["layers"] for g in r["groups"].values()]
    return {
        "method": f"quantlrm {label}" + (" duo" if extra.get("duo_scaling") else ""),
        "wall_s": round(wall, 1),
        "layers_s": rep["seconds"]["layers"],
        "per_layer_s": round(rep["seconds"]["layers"] / args.layers, 2),
        "peak_gpu_gib": None if peak is None else round(peak, 2),
        "mean_layer_mse": sum(r["layer_mse"] for r in rep["layers"]) / len(rep["layers"]),
        "search_loss_change": (sum(g["loss_after"] for g in groups) / sum(g["loss_before"] for g in groups) - 1)
        if groups
        else None,
        "final_hidden_mse": float((hid - ref).pow(2).mean()),
    }


def run_llmc_child(args) -> None:
    """Inside the child (llm-compressor on PYTHONPATH): oneshot AWQ or GPTQ on the same tokens."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.work)
    ids = torch.load(work / "calib.pt")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(work / "model")
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=False, strategy="group", group_size=args.group_size))
    if args.llmc_method == "gptq":
        recipe = [GPTQModifier(ignore=["lm_head"], config_groups={"group_0": scheme})]
    else:
        recipe = [AWQModifier(), QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": scheme})]
    w_before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0], processor=tok)
    torch.cuda.synchronize()
    dt = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    hid = final_hidden(model, ids[:EVAL_SAMPLES], args.device)
    ref = torch.load(work / "ref_hidden.pt")
    res = {
        "method": f"llm-compressor {args.llmc_method.upper()} (oneshot)",
        "wall_s": round(dt, 1),
        "layers_s": round(dt, 1),
        "per_layer_s": round(dt / args.layers, 2),
        "peak_gpu_gib": round(peak, 2),
        "final_hidden_mse": float((hid - ref).pow(2).mean()),
        "weights_changed_in_place": not torch.equal(w_before, model.model.layers[0].mlp.down_proj.weight),
    }
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", default="llmc,awq-duo,awq,quantlrm,rtn")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", default="/tmp/quantize-bench")
    ap.add_argument("--json", default=None, help="write results here (after every method)")
    ap.add_argument("--llmc-site", default=".site", help="folder with llm-compressor's unpacked wheels")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip methods once this much time has passed")
    ap.add_argument("--tiny", action="store_true", help="small shapes, for a CPU smoke test")
    ap.add_argument("--llmc-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--llmc-method", default="awq", choices=("awq", "gptq"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llmc_child:
        return run_llmc_child(args)
    t_start = time.time()
    if args.tiny:
        args.samples, args.seqlen, args.group_size = min(args.samples, 8), min(args.seqlen, 128), 64
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    model_dir = work / "model"
    t0 = time.time()
    build_model(model_dir, args.layers, TINY if args.tiny else SEVEN_B, args.device)
    from transformers import AutoTokenizer

    from quantlrm.calib import load_calibration

    ids = load_calibration(AutoTokenizer.from_pretrained(model_dir), "builtin", samples=args.samples,
                           seqlen=args.seqlen).input_ids
    torch.save(ids, work / "calib.pt")
    ref = final_hidden(model_dir, ids[:EVAL_SAMPLES], args.device)
    torch.save(ref, work / "ref_hidden.pt")
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {"device": dev_name, "layers": args.layers, "shape": "tiny" if args.tiny else "Llama-2-7B",
               "bits": args.bits, "group_size": args.group_size, "calib": f"{ids.shape[0]} x {ids.shape[1]}",
               "build_s": round(time.time() - t0, 1), "torch": torch.__version__, "runs": []}
    print(json.dumps(results), flush=True)

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    for m in args.methods.split(","):
        if time.time() - t_start > args.deadline_s:
            results["runs"].append({"method": m, "skipped": "deadline"})
            continue
        try:
            if m in ("llmc", "llmc-gptq"):
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.llmc_site, "src"]))
                cmd = [sys.executable, __file__, "--llmc-child", "--work", str(work), "--layers", str(args.layers),
                       "--bits", str(args.bits), "--group-size", str(args.group_size), "--device", args.device,
                       "--llmc-method", "gptq" if m == "llmc-gptq" else "awq"]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    raise RuntimeError(f"llm-compressor child failed (rc {p.returncode}): {p.stderr[-2000:]}")
                res = json.loads(line[-1][7:])
            else:
                res = run_ours(m, model_dir, work / f"out-{m}", args, ref, ids[:EVAL_SAMPLES])
        except Exception as e:  # keep the other methods' numbers
            res = {"method": m, "error": f"{type(e).__name__}: {e}"[-3000:]}
        results["runs"].append(res)
        print(json.dumps(res), flush=True)
        save()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

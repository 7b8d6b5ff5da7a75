"""llm-compressor AWQ and GPTQ as baselines on the zoo's models (W2-W4, asymmetric int, groups
or per output channel with group size -1).

llm-compressor is not a dependency of quantlrm: the zoo carries its pinned wheels to the GPU
machine (llmcompressor==0.14.0.1, compressed-tensors==0.19.0; see shared/recipes/README.md)
and imports this module only there. The quantized model is turned back into a plain
fake-quant checkpoint (dequantized bf16 weights, every other tensor as llm-compressor left
it, e.g. AWQ's smoothed norms) so the same eval harness grades it as our own methods.

    python benchmarks/llmc_baseline.py MODEL_DIR OUT_DIR awq|gptq BITS [GROUP] [--calib FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("awq", "gptq")
_QUANT_PARAMS = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")


def _dequantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the oneshot model, with each quantized Linear's weight fake-quantized
    by its own scale/zero-point (GPTQ already wrote quantized values: re-quantizing is a no-op)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out: dict[str, torch.Tensor] = {}
    for mname, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        for pname, p in module.named_parameters(recurse=False):
            if pname in _QUANT_PARAMS:
                continue
            t = p.detach()
            if pname == "weight" and scheme is not None and scheme.weights is not None:
                if getattr(module, "weight_g_idx", None) is not None:
                    g = module.weight_g_idx
                    if not torch.equal(g, torch.arange(g.numel(), device=g.device) // scheme.weights.group_size):
                        raise RuntimeError(f"{mname}: activation-ordered g_idx is not handled here")
                t = fake_quantize(t.float(), module.weight_scale.float(), module.weight_zero_point,
                                  scheme.weights).to(p.dtype)
            out[f"{mname}.{pname}" if mname else pname] = t
        for bname, b in module.named_buffers(recurse=False):
            if bname not in _QUANT_PARAMS and b is not None:
                out[f"{mname}.{bname}" if mname else bname] = b.detach()
    return out


def llmc_quantize(model_dir: str | Path, out_dir: str | Path, method: str, bits: int,
                  group_size: int, calib_ids: list[list[int]], device: str = "cuda") -> dict:
    """Run llm-compressor `oneshot` (AWQ or GPTQ) on `model_dir`; write a fake-quant checkpoint.

    Returns timing and memory of the oneshot call (the part comparable to our scale search).
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    model.config._name_or_path = str(model_dir)
    model.name_or_path = str(model_dir)
    seqlen = max(len(x) for x in calib_ids)
    cols = {"input_ids": calib_ids, "attention_mask": [[1] * len(x) for x in calib_ids]}
    try:
        ds = Dataset.from_dict(cols)
    except Exception:  # noqa: BLE001  (fingerprint hashing fails with some dill/pyarrow pairs)
        from datasets.table import InMemoryTable

        ds = Dataset(InMemoryTable.from_pydict(cols), fingerprint="zoo-calibration")
    if group_size == -1:  # per output channel, as our --group-size -1
        qargs = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="channel")
    else:
        qargs = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                                 group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=qargs)
    if method == "awq":
        recipe = [AWQModifier(), QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": scheme})]
    else:
        recipe = [GPTQModifier(ignore=["lm_head"], config_groups={"group_0": scheme})]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as logdir:
        oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seqlen,
                num_calibration_samples=len(calib_ids), processor=tok, log_dir=logdir)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    state = _dequantized_state(model)
    del model
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    want = plain.state_dict()  # persistent tensors only (rotary inv_freq buffers are rebuilt)
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want and "rotary_emb" not in k]
    plain.load_state_dict({k: state[k].cpu() for k in want if k in state}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"llm-compressor state does not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    info = dict(method=f"llmc-{method}", bits=bits, group_size=group_size, seconds=round(seconds, 2),
                peak_gpu_gb=None if peak is None else round(peak, 2),
                calib=f"{len(calib_ids)}x{seqlen}")
    (out_dir / "llmc.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("bits", type=int)
    ap.add_argument("group_size", type=int, nargs="?", default=128, help="-1: per output channel")
    ap.add_argument("--calib", help="jsonl with a 'text' field (default: random token ids)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    if a.calib:
        tok = AutoTokenizer.from_pretrained(a.model)
        text = "\n".join(json.loads(line)["text"] for line in Path(a.calib).read_text().splitlines() if line)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = [ids[i * a.seqlen:(i + 1) * a.seqlen] for i in range(min(a.samples, len(ids) // a.seqlen))]
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (a.samples, a.seqlen), generator=g).tolist()
    print(json.dumps(llmc_quantize(a.model, a.out, a.method, a.bits, a.group_size, ids, a.device)))


if __name__ == "__main__":
    main()

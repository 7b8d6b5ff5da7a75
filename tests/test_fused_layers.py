"""Residual adds and RMSNorms folded into the quantized GEMVs (`quantlrm.fused_layers`): the
GEMV's norm tail against torch, and quantized Llama/Qwen3 models decoding through the fused
layers against the same models on transformers' own forward. CPU runs use Triton's
interpreter (fp16); the GPU test adds bf16 and the compiled, captured step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

_no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run on the GPU machine")

_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import quantlrm.kernels as K
    from quantlrm.kernels import Config, layout as L, rms_norm, run_config
    from quantlrm.quantizer import quantize
    dev = sys.argv[1]
    dtypes = [torch.float16] + ([torch.bfloat16] if dev == "cuda" else [])  # (the interpreter's bf16 is broken)
    torch.manual_seed(0)
    # the GEMV's tail: one split (MODE 0) and split-K (MODE 2), row pairs, a ragged last tile
    for dt in dtypes:
        for bits, n, k, g in ((3, 40, 96, 32), (4, 33, 256, 128), (3, 18, 300, 300)):
            q = quantize(torch.randn(n, k), bits, g)
            kw = L.from_codes(q.codes.to(dev), q.scale.to(dev), q.zero.to(dev), bits, g, dt)
            x = torch.randn(1, k, device=dev).to(dt)
            res = (3 * torch.randn(1, n, device=dev)).to(dt)
            w = (1 + 0.2 * torch.randn(n, device=dev)).to(dt)
            y = (x.float() @ L.dequantize(kw, torch.float32).t()).to(dt)
            href = res + y
            nref = rms_norm(href, w, 1e-6)
            for c in (Config("gemv", block_n=4, half2=True),
                      Config("gemv", block_n=4, split_k=3, half2=True, blocks_per_step=2, prefetch=True, row_groups=2),
                      Config("gemv", block_n=8, split_k=2, half2=True)):
                for _ in range(2):  # twice: the grid counter re-arms
                    h, nm = run_config(x, kw, c, norm=(res, w, 1e-6))
                    # h: the GEMV's own rounding (half2 sums) against dequantize-then-matmul's
                    tol = 4 * float(href.abs().max()) * 2.0 ** (-10 if dt == torch.float16 else -7)
                    assert float((h.float() - href.float()).abs().max()) <= tol, (dt, bits, n, c)
                    # normed from the kernel's own h: the norm itself is exact up to the sum's order
                    assert torch.allclose(nm.float(), rms_norm(h, w, 1e-6).float(), atol=2e-3, rtol=1e-2), (dt, bits, n, c)
                    assert float((nm.float() - nref.float()).abs().max()) < 0.05 * float(nref.abs().max())
    # quantized models decoding through the fused layers == transformers' own forward
    from transformers import AutoModelForCausalLM, StaticCache
    from quantlrm.attention import fuse_decode_attention, register
    from quantlrm.models import tiny_config
    from quantlrm.nn import QuantLinear, fuse_projections
    from quantlrm.fused_layers import _LAYER_CLASSES
    tails = []
    run = K.run_config
    def counted(x2, kw, cfg, act=False, norm=None):
        tails.append(norm is not None)
        return run(x2, kw, cfg, act, norm)
    K.run_config = counted
    if dev == "cpu":  # the interpreter cannot time candidates: take a half2 tile for one-row calls
        choose = K.choose
        K.choose = lambda x2, kw: (Config("gemv", block_n=4, split_k=2, half2=True) if x2.shape[0] == 1
                                   else choose(x2, kw))
    import copy
    steps_n = 4 if dev == "cuda" else 2
    for mt in (("llama", "qwen3") if dev == "cuda" else ("llama",)):
        for dt in dtypes:
            cfg = tiny_config(mt)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dt).eval().to(dev)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.add_(0.1 * torch.randn_like(p))
                ref = copy.deepcopy(model)  # dense, with the quantized weights: transformers' forward in torch
                for (name, mod), rmod in zip(list(model.named_modules()), list(ref.modules())):
                    for (cn, child), rchild in zip(list(mod.named_children()), list(rmod.children())):
                        if isinstance(child, torch.nn.Linear) and cn != "lm_head":
                            ql = QuantLinear.from_linear(child, 4, 32).to(dev)
                            setattr(mod, cn, ql)
                            rchild.weight.copy_(ql.dequantized_weight(dt))
            fuse_projections(model)
            ids = torch.randint(0, 256, (1, 7), device=dev)
            logits = {}
            for name, m in (("sdpa", ref), ("quantlrm", model)):
                m.config._attn_implementation = "sdpa" if name == "sdpa" else register()
                if name != "sdpa":
                    assert fuse_decode_attention(m) == cfg.num_hidden_layers
                    assert all(type(la) in _LAYER_CLASSES.values() for la in m.model.layers)
                cache = StaticCache(config=m.config, max_cache_len=32)
                with torch.no_grad():
                    out = m(input_ids=ids, past_key_values=cache, cache_position=torch.arange(7, device=dev),
                            use_cache=True)
                    steps, tok = [out.logits[:, -1]], out.logits[:, -1:].argmax(-1)
                    tails.clear()
                    for t in range(7, 7 + steps_n):
                        out = m(input_ids=tok, past_key_values=cache, use_cache=True,
                                cache_position=torch.tensor([t], device=dev))
                        steps.append(out.logits[:, -1])
                        tok = out.logits[:, -1:].argmax(-1)
                logits[name] = torch.stack(steps).float()
                if name != "sdpa":  # o_proj and down_proj (not the last layer's) of every step, in the kernel
                    assert sum(tails) == steps_n * (2 * cfg.num_hidden_layers - 1), (mt, sum(tails))
            err = float((logits["sdpa"] - logits["quantlrm"]).abs().max())
            assert err < (3e-2 if dt == torch.float16 else 1.5e-1), (mt, dt, err)
            print(mt, dt, "max logit difference", err)
    print("OK")
""")


def test_fused_layers_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.getcwd() + "/src", *sys.path]))
    r = subprocess.run([sys.executable, "-c", _SCRIPT, "cpu"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout


@pytest.mark.gpu
@_no_gpu
def test_gpu_fused_layers():
    r = subprocess.run([sys.executable, "-c", _SCRIPT, "cuda"], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd() + "/src", *sys.path])))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout

"""Decode attention (`attn_implementation="quantlrm"`): the Triton kernel against plain fp32
attention with repeated KV heads, and a transformers model decoding through a static cache
against the same model on SDPA. CPU runs use Triton's interpreter (fp16: its bf16 dot is
broken); the GPU tests add bf16 and CUDA graphs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

_no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run on the GPU machine")

_CASES = [  # batch, query heads, KV heads, cache length, head dim, valid prefix per batch row
    (1, 8, 2, 100, 64, (63,)),
    (2, 4, 4, 70, 32, (70, 9)),
    (1, 12, 3, 130, 128, (1,)),
    (2, 16, 1, 64, 16, (40, 64)),
]


def _inputs(b, hq, hkv, length, d, valid, dtype, device="cpu"):
    g = torch.Generator().manual_seed(hq * length + d)
    q = torch.randn(b, hq, 1, d, generator=g).to(device, dtype)
    k = torch.randn(b, hkv, length, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, length, d, generator=g).to(device, dtype)
    mask = torch.zeros(b, 1, 1, length, dtype=torch.bool, device=device)
    for i, n in enumerate(valid):
        mask[i, ..., :n] = True
    mask[..., 0] = b == 1 or mask[..., 0]  # keep row 0 attending somewhere
    if b > 1:
        mask[1, ..., :3] = False  # a hole (left padding), not only a tail
    return q, k, v, mask


_INTERP = textwrap.dedent("""
    import torch
    from quantlrm.kernels import attention as K
    from tests.test_attention import _CASES, _inputs
    worst = 0.0
    for b, hq, hkv, length, d, valid in _CASES:
        q, k, v, mask = _inputs(b, hq, hkv, length, d, valid, torch.float16)
        for m in (mask, None):
            ref = K.reference(q, k, v, m, d ** -0.5).float()
            for split in (None, 1, 2, 4, 8):  # split over the cache (a power of two), merged in the kernel
                got = K._launch(q, k, v, m, d ** -0.5, split).float()
                assert got.shape == (b, 1, hq, d), got.shape
                err = float((got - ref).abs().max())
                assert err < 2e-3, (b, hq, hkv, length, d, m is None, split, err)
                worst = max(worst, err)
        # the mask matters: attending to the masked positions gives another answer
        assert (K.reference(q, k, v, None, d ** -0.5) - K.reference(q, k, v, mask, d ** -0.5)).abs().max() > 1e-2

    # a transformers model decoding through a static cache: quantlrm attention == SDPA
    from transformers import AutoModelForCausalLM, StaticCache
    from quantlrm.attention import register
    from quantlrm.models import tiny_config
    calls = []
    launch = K._launch
    K._launch = lambda *a: calls.append(1) or launch(*a)
    for mt in ("llama", "qwen3"):
        cfg = tiny_config(mt)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
        ids = torch.randint(0, 256, (1, 7))
        logits = {}
        for impl in ("sdpa", register()):
            model.config._attn_implementation = impl
            cache = StaticCache(config=model.config, max_cache_len=40)
            with torch.no_grad():
                out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(7), use_cache=True)
                steps = [out.logits[:, -1]]
                tok = out.logits[:, -1:].argmax(-1)
                for t in range(7, 12):
                    out = model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([t]), use_cache=True)
                    steps.append(out.logits[:, -1])
                    tok = out.logits[:, -1:].argmax(-1)
            logits[impl] = torch.stack(steps).float()
        n = len(calls)
        assert n == 5 * cfg.num_hidden_layers, n  # the 5 single-token steps, every layer; prefill on SDPA
        calls.clear()
        err = float((logits["sdpa"] - logits["quantlrm"]).abs().max())
        assert err < 2e-2, (mt, err)
        worst = max(worst, err)
    print("WORST", worst)
""")


def test_decode_attention_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    r = subprocess.run([sys.executable, "-c", _INTERP], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WORST" in r.stdout


def test_unsupported_shapes_go_to_sdpa():
    from quantlrm.kernels import attention as K

    q = torch.zeros(1, 8, 2, 64, dtype=torch.float16)  # two query tokens: prefill
    kv = torch.zeros(1, 2, 10, 64, dtype=torch.float16)
    assert not K.supported(q, kv, kv)
    assert not K.supported(q[:, :, :1].float(), kv.float(), kv.float())  # fp32
    assert not K.supported(torch.zeros(1, 40, 1, 64, dtype=torch.float16), kv, kv)  # 20 heads per KV head
    assert not K.supported(torch.zeros(1, 8, 1, 96, dtype=torch.float16), kv[..., :1].expand(1, 2, 10, 96), kv)
    assert K.supported(q[:, :, :1], kv, kv)


@pytest.mark.gpu
@_no_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_attention(dtype):
    from quantlrm.kernels import attention as K

    tol = 2e-3 if dtype == torch.float16 else 2e-2
    for b, hq, hkv, length, d, valid in _CASES + [(1, 32, 8, 1000, 128, (700,)), (3, 28, 4, 333, 128, (1, 200, 333))]:
        q, k, v, mask = _inputs(b, hq, hkv, length, d, valid, dtype, "cuda")
        for m in (mask, None):
            ref = K.reference(q, k, v, m, d ** -0.5).float()
            for split in (None, 1, 4, 16):
                got = K._launch(q, k, v, m, d ** -0.5, split).float()
                assert float((got - ref).abs().max()) < tol, (b, hq, hkv, length, d, m is None, split)
            got = K.decode_attention_op(q, k, v, m, d ** -0.5).float()
            assert float((got - ref).abs().max()) < tol, (b, hq, hkv, length, d, m is None)
    # inside a CUDA graph: the mask moves, the replay follows it
    q, k, v, mask = _inputs(1, 32, 8, 512, 128, (100,), dtype, "cuda")
    K.decode_attention_op(q, k, v, mask, 0.088)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.decode_attention_op(q, k, v, mask, 0.088)
    mask[..., 100:300] = True
    graph.replay()
    assert float((out.float() - K.reference(q, k, v, mask, 0.088).float()).abs().max()) < tol

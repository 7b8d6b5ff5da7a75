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


def _fused_case(b, hq, hkv, length, d, cur, norm, split, dtype, device="cpu", hole=3, poison=False):
    """The fused op (per-head norm, RoPE, cache write, attention) on random inputs, and the same
    steps in torch: (kernel output, reference, cache after the kernel, cache after torch). With
    b > 1, row 1 masks its first `hole` positions (left padding; past a block of 64 positions,
    whole blocks that the position alone would let through); `poison` puts inf in the kernel's
    cached values there (the reference keeps finite ones: a masked value weighs nothing)."""
    from quantlrm.kernels import attention as K

    g = torch.Generator().manual_seed(cur + d)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    q, nk, nv = rnd(b, hq, d), rnd(b, hkv, d), rnd(b, hkv, d)
    kc, vc = rnd(b, hkv, length, d), rnd(b, hkv, length, d)
    ang = torch.rand(1, 1, d // 2, generator=g).to(device) * 3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    qn, kn = (1 + 0.1 * rnd(d), 1 + 0.1 * rnd(d)) if norm else (None, None)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool, device=device)
    mask[..., cur + 1:] = False
    if b > 1:
        mask[1, ..., :hole] = False
    kc2, vc2 = kc.clone(), vc.clone()
    if poison:
        vc[1, :, :hole] = float("inf")
    fused = dict(new_k=nk, new_v=nv, cos=cos, sin=sin, q_norm=qn, k_norm=kn, eps=1e-6,
                 pos=torch.tensor(cur, device=device))
    got = K._launch(q, kc, vc, mask, d ** -0.5, split, fused=fused).float()
    assert int(fused["pos"]) == cur + 1, "the fused op advances the position (StaticLayer.update's increment)"
    kc2[:, :, cur] = K.rope_reference(nk, cos, sin, kn, 1e-6).to(dtype)
    vc2[:, :, cur] = nv
    qr = K.rope_reference(q, cos, sin, qn, 1e-6).to(dtype).unsqueeze(2)
    return got, K.reference(qr, kc2, vc2, mask, d ** -0.5).float(), (kc, vc), (kc2, vc2)


_INTERP = textwrap.dedent("""
    import torch
    from quantlrm.kernels import attention as K
    from tests.test_attention import _CASES, _fused_case, _inputs
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
        # a head that may attend nowhere gives 0 (SDPA since torch 2.5), not NaN
        nowhere = torch.zeros_like(mask)
        for split in (1, 2):
            assert torch.equal(K._launch(q, k, v, nowhere, d ** -0.5, split), torch.zeros(b, 1, hq, d).half()), split
        # the mask matters: attending to the masked positions gives another answer
        assert (K.reference(q, k, v, None, d ** -0.5) - K.reference(q, k, v, mask, d ** -0.5)).abs().max() > 1e-2

    # the fused op (per-head norm, RoPE, cache write, attention) against the same steps in torch
    for b, hq, hkv, length, d, cur, norm, split, hole in [
            (1, 8, 2, 100, 64, 40, False, None, 3), (2, 4, 4, 70, 32, 69, True, 2, 3),
            (1, 12, 3, 130, 128, 0, True, 1, 3), (1, 16, 1, 64, 16, 63, False, 4, 3),
            (2, 4, 2, 200, 32, 150, False, 1, 130), (2, 4, 2, 200, 32, 150, False, 2, 70)]:
        got, ref, (kc, vc), (kc2, vc2) = _fused_case(b, hq, hkv, length, d, cur, norm, split, torch.float16,
                                                     hole=hole)
        assert float((got - ref).abs().max()) < 2e-3, ("fused", b, hq, hkv, d, cur, norm)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2), ("cache write", b, hq, hkv, d, cur)
    for split in (1, 2):  # inf in masked values: 0 * inf would be NaN, in a split and through the merge
        got, ref, _, _ = _fused_case(2, 4, 2, 200, 32, 150, False, split, torch.float16, hole=130, poison=True)
        assert bool(torch.isfinite(got).all()) and float((got - ref).abs().max()) < 2e-3, ("poison", split)

    # a transformers model decoding through a static cache: quantlrm attention == SDPA
    from transformers import AutoModelForCausalLM, StaticCache
    from quantlrm.attention import fuse_decode_attention, register
    from quantlrm.models import tiny_config
    calls = []
    launch = K._launch
    K._launch = lambda *a, **kw: calls.append(kw.get("fused") is not None) or launch(*a, **kw)
    for mt, fuse in (("llama", False), ("qwen3", False), ("llama", True), ("qwen3", True), ("qwen2", True)):
        cfg = tiny_config(mt)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
        with torch.no_grad():  # norms away from 1, so a skipped q/k norm shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        ids = torch.randint(0, 256, (1, 7))
        logits = {}
        for impl in ("sdpa", register()):
            model.config._attn_implementation = impl
            if impl != "sdpa" and fuse:
                assert fuse_decode_attention(model) == cfg.num_hidden_layers
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
        # the 5 single-token steps, every layer, on the fused kernel when asked; prefill on SDPA
        assert calls == [fuse] * 5 * cfg.num_hidden_layers, (mt, fuse, calls)
        calls.clear()
        err = float((logits["sdpa"] - logits["quantlrm"]).abs().max())
        assert err < 2e-3, (mt, fuse, err)
        worst = max(worst, err)

    # only Llama-style attention (architecture table) is swapped; other families keep theirs
    for mt in ("olmo2", "stablelm"):
        assert fuse_decode_attention(AutoModelForCausalLM.from_config(tiny_config(mt))) == 0, mt
    # a swapped module called with positional arguments and no cache runs its own forward
    cfg = tiny_config("llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    attn = model.model.layers[0].self_attn
    h = torch.randn(1, 1, cfg.hidden_size).half()
    pe = model.model.rotary_emb(h, torch.zeros(1, 1, dtype=torch.long))
    with torch.no_grad():
        want = attn(h, pe, None)[0]
        fuse_decode_attention(model)
        assert type(attn).__name__.startswith("QuantLRMDecode")
        assert torch.equal(attn(h, pe, None)[0], want)

    # model.generate, left-padded batch of 2: the dynamic cache takes the plain kernel, the
    # static one the fused kernel, and both give SDPA's tokens
    cfg = tiny_config("llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    ids2 = torch.randint(0, 256, (2, 6))
    am = torch.ones_like(ids2)
    am[1, :2] = 0
    for ci in (None, "static"):
        seqs = {}
        for impl in ("sdpa", register()):
            model.config._attn_implementation = impl
            if impl != "sdpa":
                fuse_decode_attention(model)
            calls.clear()
            seqs[impl] = model.generate(ids2, attention_mask=am, max_new_tokens=6, do_sample=False,
                                        cache_implementation=ci, pad_token_id=256)
        assert torch.equal(seqs["sdpa"], seqs["quantlrm"]), ci
        assert calls == [ci == "static"] * 5 * cfg.num_hidden_layers, (ci, calls)
    calls.clear()
    # an fp32 model has no kernel path: everything stays on SDPA, and generate still works
    model32 = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model32.config._attn_implementation = register()
    fuse_decode_attention(model32)
    assert model32.generate(ids2[:1], max_new_tokens=3, do_sample=False, cache_implementation="static",
                            pad_token_id=256).shape == (1, 9)
    assert calls == [], calls

    # the same decode compiled (AOT autograd functionalises the op's cache mutation)
    cfg = tiny_config("qwen3")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    res = {}
    for impl in ("sdpa", register()):
        model.config._attn_implementation = impl
        if impl != "sdpa":
            fuse_decode_attention(model)
        cache = StaticCache(config=model.config, max_cache_len=40)
        torch._dynamo.reset()
        step = torch.compile(model.forward, backend="aot_eager", dynamic=False)
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(7), use_cache=True)
            tok, steps = out.logits[:, -1:].argmax(-1), []
            for t in range(7, 11):
                out = step(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([t]), use_cache=True)
                steps.append(out.logits[:, -1].float().clone())
                tok = out.logits[:, -1:].argmax(-1)
        res[impl] = torch.stack(steps)
    assert calls == [True] * 4 * cfg.num_hidden_layers, calls
    err = float((res["sdpa"] - res["quantlrm"]).abs().max())
    assert err < 2e-3, ("compiled", err)

    # quantlrm.generate's step with our attention: a ready-made boolean mask and positions, the
    # fused kernel advancing every layer's cache length; same tokens and lengths as SDPA's
    from quantlrm.decoding import Decoder
    calls.clear()
    toks, lens = {}, {}
    for impl in ("sdpa", register()):
        model.config._attn_implementation = impl
        dec = Decoder(model, 32, compile=False, graph=False)
        assert (dec.mask is not None) == (impl != "sdpa")
        dec.fwd = torch.compile(dec._next, backend="aot_eager", dynamic=False)
        toks[impl] = dec.generate(ids, 6, eos_token_id=[])
        lens[impl] = [int(layer.cumulative_length) for layer in dec.cache.layers]
        if dec.mask is not None:  # the prompt and every generated token's key
            assert int(dec.mask.sum()) == 7 + 5 and bool(dec.mask[..., :12].all()), dec.mask
    assert calls == [True] * 5 * cfg.num_hidden_layers, calls
    assert torch.equal(toks["sdpa"], toks["quantlrm"]), toks
    assert lens["sdpa"] == lens["quantlrm"] == [7 + 5] * cfg.num_hidden_layers, lens
    # steps past the cache's end (what graph capture's warm-up does after a prompt that fills the
    # cache): the mask write is clamped and the kernel writes nothing, so no index error
    dec = Decoder(model, 8, compile=False, graph=False)
    dec.prefill(ids)
    for _ in range(3):
        dec.step()
    assert bool(dec.mask.all())
    print("WORST", max(worst, err))
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


@pytest.mark.gpu
@_no_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_fused_decode_attention(dtype):
    """Norm + RoPE + cache write + attention in one launch, against the same steps in torch;
    the splits run concurrently here, so the new token must come from registers, not the cache."""

    tol = 2e-3 if dtype == torch.float16 else 2e-2
    for b, hq, hkv, length, d, cur, norm, hole in [(1, 32, 8, 1000, 128, 700, False, 3),
                                                   (2, 16, 8, 300, 128, 299, True, 3),
                                                   (2, 16, 8, 300, 128, 299, True, 130), (1, 8, 2, 100, 64, 0, True, 3)]:
        for split in (None, 1, 8):
            got, ref, (kc, vc), (kc2, vc2) = _fused_case(b, hq, hkv, length, d, cur, norm, split, dtype, "cuda",
                                                         hole=hole)
            assert float((got - ref).abs().max()) < tol, (b, hq, hkv, d, cur, norm, split)
            # the written key may differ from torch's rounding by an ulp (fused multiply-adds)
            rtol = 2e-3 if dtype == torch.float16 else 1.6e-2
            torch.testing.assert_close(kc, kc2, rtol=rtol, atol=1e-3)
            assert torch.equal(vc, vc2)


@pytest.mark.gpu
@_no_gpu
def test_gpu_workspace_made_during_cudagraph_trees_warmup():
    """A split needs a workspace, made on first use. When that use is cudagraph trees' warm-up
    (torch.compile mode="reduce-overhead", as transformers' static-cache generate), the
    workspace must stay out of the trees' private pool: a live tensor there that no graph
    tracks stops the run ("tensor(s) in the cudagraph pool not tracked as outputs", seen before
    the workspace was made in a helper thread)."""
    from quantlrm.kernels import attention as K

    torch._dynamo.reset()
    # a shape no other test uses, so its workspace is new here: 4 splits of 3 x 3 heads
    q, k, v, mask = _inputs(3, 9, 3, 256, 64, (256, 100, 7), torch.float16, "cuda")
    step = torch.compile(lambda q, k, v, m: K.decode_attention_op(q, k, v, m, 0.125), mode="reduce-overhead")
    ref = K.reference(q, k, v, mask, 0.125).float()
    for _ in range(4):  # warm-up, recording, replays
        got = step(q, k, v, mask).float()
        assert float((got - ref).abs().max()) < 2e-3


@pytest.mark.gpu
@_no_gpu
def test_gpu_compiled_decode_with_fused_attention():
    """A compiled static-cache decode (the custom op mutates the cache under torch.compile)
    gives SDPA's logits, for Llama and Qwen3."""
    from transformers import AutoModelForCausalLM, StaticCache

    from quantlrm.attention import fuse_decode_attention, register
    from quantlrm.models import tiny_config

    for mt in ("llama", "qwen3"):
        cfg = tiny_config(mt, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).cuda().eval()
        ids = torch.randint(0, 256, (1, 9), device="cuda")
        res, toks = {}, []
        for impl in ("sdpa", register()):
            model.config._attn_implementation = impl
            if impl != "sdpa":
                assert fuse_decode_attention(model) == cfg.num_hidden_layers
            cache = StaticCache(config=model.config, max_cache_len=64)
            step = torch.compile(model.forward, dynamic=False)
            with torch.no_grad():
                out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(9, device="cuda"))
                tok, steps = out.logits[:, -1:].argmax(-1), []
                for i, t in enumerate(range(9, 15)):
                    if impl == "sdpa":
                        toks.append(tok)
                    else:  # SDPA's tokens, so a near-tie cannot send the two runs apart
                        tok = toks[i]
                    out = step(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([t], device="cuda"))
                    steps.append(out.logits[:, -1].float().clone())
                    tok = out.logits[:, -1:].argmax(-1)
            res[impl] = torch.stack(steps)
        assert float((res["sdpa"] - res["quantlrm"]).abs().max()) < 5e-3, mt


_EXPORT_INTERP = textwrap.dedent("""
    import tempfile
    import torch
    from quantlrm.attention import fuse_decode_attention, register
    from quantlrm.kernels import attention as K
    from quantlrm.nn import build_quantized, fuse_projections
    from tests.test_kernels import _export_tiny
    calls = []
    launch = K._launch
    K._launch = lambda *a, **kw: calls.append(kw.get("fused") is not None) or launch(*a, **kw)
    for mt in ("qwen2", "qwen3"):
        d = tempfile.mkdtemp()
        _export_tiny(d, 4, 32, mt)
        model = build_quantized(d, "cpu", torch.float16, attn_implementation=register())
        assert fuse_projections(model) == 4 and fuse_decode_attention(model) == 2
        ids = torch.randint(0, 256, (1, 8))
        gen = {}
        for ci in (None, "static"):
            calls.clear()
            gen[ci] = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=256, cache_implementation=ci,
                                     output_scores=True, return_dict_in_generate=True)
            assert calls == [ci == "static"] * 8, (mt, ci, calls)
        assert torch.equal(gen[None].sequences, gen["static"].sequences), mt
        err = float((torch.stack(gen[None].scores) - torch.stack(gen["static"].scores)).abs().max())
        assert err < 2e-3, (mt, err)
    print("OK")
""")


def test_quantized_export_decodes_with_fused_attention_in_interpreter():
    """The product path on CPU: a compressed-tensors export loaded with QuantLinears (Triton
    kernels in the interpreter), q/k/v and gate/up fused, the fused decode attention on a static
    cache: the same tokens and scores as the dynamic cache's plain kernel."""
    pytest.importorskip("triton")
    pytest.importorskip("quantlrm.export.compressed_tensors")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    r = subprocess.run([sys.executable, "-c", _EXPORT_INTERP], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout

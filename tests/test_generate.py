"""quantlrm.generate: the same greedy tokens as transformers' generate, EOS, reuse, bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import quantlrm
from quantlrm.errors import QuantLRMError
from quantlrm.models import build_model, tiny_config


def _hf_greedy(model, ids, n):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=256)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_matches_transformers_greedy_and_reuses_its_cache(model_type):
    model = build_model(tiny_config(model_type), seed=3)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _hf_greedy(model, ids, 20)
    got = quantlrm.generate(model, ids, 20, eos_token_id=[])
    assert torch.equal(got, want)
    dec = model._quantlrm_decoder
    ids2 = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(1))
    got2 = quantlrm.generate(model, ids2, 9, eos_token_id=[])
    assert model._quantlrm_decoder is dec  # fits the cache: no new cache or graph
    with torch.no_grad():
        assert torch.equal(got2, _hf_greedy(model, ids2, 9))
    quantlrm.generate(model, ids2, 300, eos_token_id=[])
    assert model._quantlrm_decoder is not dec and model._quantlrm_decoder.max_len >= 311


@pytest.mark.parametrize("stop_at", [0, 5, 17, 19])
def test_stops_after_the_first_eos(stop_at):
    model = build_model(tiny_config("llama"), seed=4)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    full = quantlrm.generate(model, ids, 20, eos_token_id=[])[0, 5:]
    eos = int(full[stop_at])
    first = int((full == eos).nonzero()[0, 0])  # the token may occur earlier too
    got = quantlrm.generate(model, ids, 20, eos_token_id=[eos, 100000])
    assert torch.equal(got[0, 5:], full[:first + 1])
    model.generation_config.eos_token_id = eos  # the default comes from the model
    assert torch.equal(quantlrm.generate(model, ids, 20), got)


class _Replay:
    """A traced step standing in for a captured CUDA graph: like a graph, the trace keeps tensor
    ops only and freezes any Python state (make_fx), so a frozen position shows up on CPU."""

    def __init__(self, gm):
        self.gm = gm

    def replay(self):
        self.gm()


@pytest.mark.parametrize("model_type", ["olmo3", "mistral", "llama"])
def test_a_frozen_step_gives_transformers_tokens(model_type):
    """Sliding-window cache layers keep their length in a Python int; a graph of the step would
    freeze it. Within the window the decoder uses full-attention layers, so the frozen step is
    still right (OLMo-3 and Mistral have a 4096 window here)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from quantlrm.decoding import Decoder

    model = build_model(tiny_config(model_type), seed=1)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _hf_greedy(model, ids, 30)[0, 6:]
    dec = Decoder(model, 256, compile=False, graph=False)
    assert not any(getattr(layer, "is_sliding", False) for layer in dec.cache.layers)
    dec.prefill(ids)
    with torch.no_grad():
        gm = make_fx(lambda: dec.step())()
    dec.graph, dec.out = _Replay(gm), dec.tok.view(1)
    assert torch.equal(dec.generate(ids, 30), want)


def test_beyond_the_window_the_cache_keeps_sliding_layers():
    from quantlrm.decoding import Decoder

    model = build_model(tiny_config("mistral", sliding_window=16), seed=2)
    dec = Decoder(model, 256)
    assert any(getattr(layer, "is_sliding", False) for layer in dec.cache.layers)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(quantlrm.generate(model, ids, 12, eos_token_id=[]), _hf_greedy(model, ids, 12))


def test_reused_decoder_follows_a_dtype_change():
    model = build_model(tiny_config("llama"), seed=5)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    quantlrm.generate(model, ids, 4, eos_token_id=[])
    model.to(torch.bfloat16)
    with torch.no_grad():
        want = _hf_greedy(model, ids, 4)
    assert torch.equal(quantlrm.generate(model, ids, 4, eos_token_id=[]), want)


def test_bad_input_is_named():
    model = build_model(tiny_config("llama"), seed=0)
    for bad in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 3)):
        with pytest.raises(QuantLRMError, match="non-empty integer prompt"):
            quantlrm.generate(model, bad, 4)
    with pytest.raises(QuantLRMError, match="vocabulary"):
        quantlrm.generate(model, torch.full((1, 3), model.config.vocab_size), 4)
    with pytest.raises(QuantLRMError, match="whole number"):
        quantlrm.generate(model, torch.zeros(1, 3, dtype=torch.long), 4.0)
    with pytest.raises(QuantLRMError, match="one prompt"):
        quantlrm.generate(model, torch.zeros(2, 4, dtype=torch.long), 4)
    with pytest.raises(QuantLRMError, match="at least 1"):
        quantlrm.generate(model, torch.zeros(1, 4, dtype=torch.long), 0)
    limit = model.config.max_position_embeddings
    with pytest.raises(QuantLRMError, match="max_position_embeddings"):
        quantlrm.generate(model, torch.zeros(1, 4, dtype=torch.long), limit)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (captured graph)")
@pytest.mark.parametrize("cfg", [dict(model_type="olmo3"), dict(model_type="mistral", sliding_window=4096)])
def test_gpu_sliding_window_models_match_transformers(cfg):
    model = build_model(tiny_config(**cfg), seed=1).cuda()
    ids = torch.randint(0, 256, (1, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want = _hf_greedy(model, ids, 24)
    assert torch.equal(quantlrm.generate(model, ids, 24, eos_token_id=[]), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled step, CUDA graph)")
def test_gpu_graph_decode_of_a_quantized_export(tmp_path, monkeypatch):
    """load_quantized + quantlrm.generate (compiled, CUDA graph, fused attention): every token is
    the model's own greedy choice, up to near-ties, checked by one teacher-forced forward."""
    from test_kernels import _export_tiny

    from quantlrm.nn import load_quantized

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # this test's kernels only
    for model_type in ("llama", "qwen3"):
        _export_tiny(tmp_path / model_type, 4, 32, model_type=model_type)
        qm = load_quantized(tmp_path / model_type)
        ids = torch.randint(0, 256, (1, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        out = quantlrm.generate(qm, ids, 40, eos_token_id=[])
        assert out.shape == (1, 49) and model_type and qm._quantlrm_decoder.graph is not None
        with torch.no_grad():
            logits = qm(out).logits[0, 8:-1].float()  # the logits that chose each new token
        chosen = logits.gather(1, out[0, 9:, None])[:, 0]
        assert bool((logits.max(1).values - chosen <= 2e-2 * logits.abs().max()).all()), model_type
        assert float((logits.argmax(1) == out[0, 9:]).float().mean()) >= 0.9, model_type
    # with PDL (Hopper), every inductor kernel launched early waits for the kernel before it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch._inductor.config as inductor_config
    from decode import inductor_pdl_audit

    from quantlrm.kernels import pdl_enabled

    audit = inductor_pdl_audit(str(tmp_path / "inductor"))
    assert audit["without_wait"] == [], audit
    if pdl_enabled(torch.device("cuda")) and hasattr(inductor_config.triton, "enable_pdl"):
        assert audit["pdl_kernels"] > 0, audit  # the audit saw the step's kernels


def test_greedy_pick_is_torch_argmax():
    """The chunked argmax of the decode step against torch.argmax: vocabularies that do and do not
    split evenly, ties (the first maximum wins), a maximum in the padding's neighbourhood, NaN."""
    from quantlrm.decoding import greedy

    g = torch.Generator().manual_seed(0)
    for v in (128256, 1000, 257, 100):
        x = torch.randn(3, v, generator=g)
        x[1, 5] = x[1, v - 1] = 50.0  # a tie: index 5 first
        x[2, v - 1] = 60.0  # the last position (next to the padding)
        for dt in (torch.float32, torch.float16):
            got, want = greedy(x.to(dt)), x.to(dt).argmax(-1)
            assert torch.equal(got, want), (v, dt, got, want)
    x = torch.randn(1, 1000, generator=g)
    x[0, 7] = float("nan")  # torch.argmax takes NaN as the maximum
    assert torch.equal(greedy(x), x.argmax(-1))

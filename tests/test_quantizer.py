import pytest
import torch

from quantlrm.errors import QuantLRMError
from quantlrm.quantizer import fake_quantize, quantize


def reference_quantize(w, bits, g):
    """Straightforward per-group loop, as AWQ's pseudo_quantize_tensor defines it."""
    out = torch.empty_like(w)
    max_int = 2**bits - 1
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            x = w[r, c0 : c0 + g]
            s = max((x.max() - x.min()).item(), 1e-5) / max_int
            z = min(max(-round(x.min().item() / s), 0), max_int)
            q = torch.clamp(torch.round(x / s) + z, 0, max_int)
            out[r, c0 : c0 + g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("g", [32, 64, -1])
def test_matches_reference_and_grid(bits, g):
    torch.manual_seed(bits * 100 + g)
    w = torch.randn(6, 128) * 0.05
    r = quantize(w, bits, g)
    gg = 128 if g == -1 else g
    assert r.group_size == gg
    assert r.scale.shape == (6, 128 // gg) and r.zero.shape == (6, 128 // gg)
    assert int(r.codes.max()) <= 2**bits - 1
    torch.testing.assert_close(r.dequant(), reference_quantize(w, bits, gg), atol=1e-6, rtol=0)
    # every group holds at most 2^bits distinct values
    groups = r.dequant().view(6, -1, gg)
    for row in groups:
        for grp in row:
            assert grp.unique().numel() <= 2**bits


def test_clip_clamps_before_quantizing():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 0.25, -0.25, 0.1]])
    clip = torch.tensor([[0.5]])
    r = quantize(w, 4, 8, clip_max=clip)
    assert r.dequant().abs().max() <= 0.5 + 1e-6


def test_fake_quantize_keeps_dtype():
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    assert fake_quantize(w, 3, 32).dtype == torch.bfloat16


@pytest.mark.parametrize("bits,g", [(5, 128), (3, 48), (4, 0)])
def test_bad_config_is_clear(bits, g):
    with pytest.raises(QuantLRMError, match="Fix:"):
        quantize(torch.randn(4, 128), bits, g)

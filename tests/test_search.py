import pytest
import torch

from quantlrm import search as S
from quantlrm.quantizer import fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_clip(w, x, bits, g, n_grid=20, max_shrink=0.5):
    """AWQ's auto_clip written out plainly: broadcast product, loop over shrink steps."""
    co, ci = w.shape
    xf = x.view(1, x.shape[0], ci // g, g)  # [1, n, ng, g]
    wf = w.view(co, 1, ci // g, g)  # [co, 1, ng, g]
    org_max = wf.abs().amax(dim=-1, keepdim=True)  # [co, 1, ng, 1]
    best = org_max.clone()
    min_err = torch.full_like(org_max, 1e9)
    org_out = (xf * wf).sum(-1)  # [co, n, ng]
    for i in range(int(max_shrink * n_grid)):
        mx = org_max * (1 - i / n_grid)
        cur = torch.clamp(wf, -mx, mx)
        # per-group asymmetric quantization, AWQ's pseudo_quantize_tensor
        qmax = 2**bits - 1
        hi, lo = cur.amax(-1, keepdim=True), cur.amin(-1, keepdim=True)
        sc = (hi - lo).clamp(min=1e-5) / qmax
        z = (-torch.round(lo / sc)).clamp(0, qmax)
        q = (torch.clamp(torch.round(cur / sc) + z, 0, qmax) - z) * sc
        err = ((xf * q).sum(-1) - org_out).pow(2).mean(dim=1).view(min_err.shape)
        better = err < min_err
        min_err[better] = err[better]
        best[better] = mx[better]
    return best.view(co, ci // g)


@pytest.mark.parametrize("bits,g", [(3, 16), (4, 32), (2, 64)])
def test_clip_search_matches_awq_reference(bits, g):
    torch.manual_seed(bits + g)
    w = torch.randn(24, 64)
    w[:, 5] *= 8  # outliers make clipping worthwhile
    x = torch.randn(40, 64)
    got = S.search_clip(w, x, bits, g, max_elems=1000)  # small chunks: exercises the row loop
    ref = reference_clip(w, x, bits, g)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    assert (got < w.view(24, -1, g).abs().amax(-1) - 1e-9).any(), "some group should be clipped"


def test_subsample_takes_every_kth_token():
    x = torch.arange(2 * 600 * 3, dtype=torch.float32).view(2, 600, 3)
    sub = S.subsample_tokens(x, 512)
    torch.testing.assert_close(sub, x.view(-1, 3)[::2])


def test_candidate_scales_awq_and_quantlrm():
    stat = torch.tensor([0.5, 2.0, 8.0, 0.0])
    s = S.candidate_scales(stat, 0.5, normalise=False)
    torch.testing.assert_close(s, torch.tensor([0.5**0.5, 2**0.5, 8**0.5, 1e-4]))
    n = S.candidate_scales(stat, 0.5, normalise=True)
    torch.testing.assert_close(n, s / (s.max() * s.min()).sqrt())
    assert torch.equal(S.candidate_scales(stat, 0.0, normalise=False), torch.ones(4))
    assert S.grid_alphas(20) == [i / 20 for i in range(20)]


def test_scaled_fake_quant_definition():
    torch.manual_seed(0)
    w, s = torch.randn(8, 32), torch.rand(32) + 0.5
    ref = fake_quantize(w * s, 3, 16) / s
    torch.testing.assert_close(S.scaled_fake_quant(w, s, 3, 16), ref)


def test_search_scales_picks_min_and_all_ones_is_rtn():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    x = torch.randn(64, 32) * torch.linspace(0.1, 5, 32)
    ref = x @ w.T

    def loss(ws):
        return float(((x @ ws[0].T) - ref).pow(2).mean())

    stat = x.abs().mean(0)
    res = S.search_scales([w], stat, loss, 3, 16, normalise=True, n_grid=10)
    assert len(res.losses) == 10 and res.loss_after == min(res.losses)
    i = res.losses.index(res.loss_after)
    assert res.alpha == i / 10
    torch.testing.assert_close(res.scales, S.candidate_scales(stat, res.alpha, True))
    ones = S.search_scales([w], torch.ones(32), loss, 3, 16, normalise=False, n_grid=10)
    assert ones.alpha == 0.0 and torch.equal(ones.scales, torch.ones(32))
    assert len(set(ones.losses)) == 1


def test_gqa_tie_and_fold_keep_v_to_o_function():
    """Fold 1/s into v's rows and s into o's columns under GQA: o(repeat_kv(v x)) unchanged."""
    torch.manual_seed(2)
    nh, nkv, hd, hidden = 4, 2, 8, 16
    v = torch.randn(nkv * hd, hidden, dtype=torch.float64)
    vb = torch.randn(nkv * hd, dtype=torch.float64)
    o = torch.randn(hidden, nh * hd, dtype=torch.float64)
    x = torch.randn(5, hidden, dtype=torch.float64)

    def f(v, vb, o):
        vo = (x @ v.T + vb).view(5, nkv, 1, hd).expand(5, nkv, nh // nkv, hd).reshape(5, nh * hd)
        return vo @ o.T

    stat = torch.rand(nh * hd, dtype=torch.float64) + 0.1
    tied = S.tie_heads(stat, nh, nkv, hd)
    torch.testing.assert_close(tied, stat.view(nkv, nh // nkv, hd).mean(1).reshape(-1))
    s_kv = tied.pow(0.7)
    s_full = S.expand_heads(s_kv, nh, nkv, hd)
    assert s_full.shape == (nh * hd,)
    torch.testing.assert_close(s_full.view(nkv, nh // nkv, hd)[:, 1], s_kv.view(nkv, hd))
    v2, vb2 = S.fold_into_rows(v, vb, s_kv)
    o2 = S.scale_columns(o, s_full)
    # the fold works in fp32 (as the pipeline does)
    torch.testing.assert_close(f(v2.double(), vb2.double(), o2.double()), f(v, vb, o), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(o2.double(), o)  # the weights did change


def test_fold_into_norm():
    w = torch.tensor([1.0, 2.0, 3.0])
    s = torch.tensor([2.0, 4.0, 0.5])
    nw, nb = S.fold_into_norm(w, None, s)
    torch.testing.assert_close(nw, w / s)
    assert nb is None


def test_mean_abs_chunks():
    xs = [torch.randn(2, 5, 4), torch.randn(3, 5, 4)]
    ref = torch.cat([x.reshape(-1, 4) for x in xs]).abs().mean(0)
    torch.testing.assert_close(S.mean_abs_chunks(xs), ref)


def test_duo_scaling_statistic_and_candidates():
    torch.manual_seed(3)
    ws = [torch.randn(6, 32), torch.randn(4, 32)]
    rows = []
    for w in ws:  # straightforward: each row's groups of 16 normalised by their max |w|
        for r in w:
            rows.append(torch.cat([g.abs() / (g.abs().max() + 1e-6) for g in r.split(16)]))
    ref = torch.stack(rows).mean(0)
    wm = S.weight_mean(ws, 16)
    torch.testing.assert_close(wm, ref)
    x = torch.rand(32) + 0.1
    s = S.candidate_scales(x, 0.3, normalise=True, w_mean=wm)
    raw = (x.pow(0.3) / (wm.pow(0.7) + 1e-4)).clamp(min=1e-4)
    torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())


def test_rank_correlation_against_a_direct_spearman():
    """Spearman with average ranks for ties, against ranks counted pair by pair."""
    from quantlrm.search import rank_correlation

    def ref(a, b):
        def ranks(v):
            return torch.tensor([float((v < x).sum()) + (float((v == x).sum()) - 1) / 2 for x in v], dtype=torch.float64)
        ra, rb = ranks(a), ranks(b)
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=g)
    b = a + 0.8 * torch.randn(50, generator=g)
    assert rank_correlation(a, b) == pytest.approx(ref(a, b), abs=1e-12)
    ties_a, ties_b = torch.randint(0, 5, (60,), generator=g).float(), torch.randint(0, 7, (60,), generator=g).float()
    assert rank_correlation(ties_a, ties_b) == pytest.approx(ref(ties_a, ties_b), abs=1e-12)
    assert rank_correlation(a, a.exp()) == pytest.approx(1.0)  # any increasing map
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(torch.ones(8), a[:8]) == 0.0  # a constant has no order

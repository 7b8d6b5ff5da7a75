"""Scale search and clip search for one scale group / one linear: tensors in, tensors out.

Nothing here knows about files, layers or the CLI. The pipeline hands in weights, a
per-channel statistic and a `loss_fn` that runs the inspected module with substituted
weights; this module decides which scales and clip values to use.

Scale search (AWQ, and QuantLRM's injection of fine-tuning signals, paper Sec. 3.2):
for alpha in {0, 1/n, ..., (n-1)/n}: s = stat^alpha, evaluate
L(s) = || Q(W diag(s)) diag(s)^-1 X - W X ||^2 through the inspected module, keep the best.
AWQ uses stat = mean|x| and normalises s by sqrt(max(s) min(s)); QuantLRM uses the
channel importance I with no normalisation (authors' code, SPEC 1b). Both clamp s >= 1e-4.

Clip search (AWQ's auto_clip): per output row and input group, shrink the max range
over {1, 0.95, ..., 0.55}, keep the value minimising the group's partial-output error on
a token subsample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from quantlrm.quantizer import fake_quantize

MIN_SCALE = 1e-4


@dataclass
class ScaleSearch:
    """Result of one group's search: the winning alpha, its scales and every grid loss."""

    alpha: float
    scales: torch.Tensor  # fp32 [in]
    losses: list[float] = field(default_factory=list)  # one per grid point, alpha ascending

    @property
    def loss_before(self) -> float:
        """Loss with s = 1 (alpha = 0): plain round-to-nearest of this group."""
        return self.losses[0]

    @property
    def loss_after(self) -> float:
        return min(self.losses)


def mean_abs_chunks(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-input-channel mean |x| over all tokens of all chunks, fp32 (AWQ's activation statistic)."""
    acc, n = None, 0
    for x in xs:
        x2 = x.reshape(-1, x.shape[-1])
        if acc is None:
            acc = torch.zeros(x2.shape[-1], dtype=torch.float32, device=x.device)
        for part in x2.split(8192):  # bounded fp32 temporaries
            acc += part.float().abs().sum(0)
        n += x2.shape[0]
    if acc is None or n == 0:
        raise ValueError("no activations")
    return acc / n


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of v's entries, ties sharing their average rank."""
    _, inv, counts = torch.unique(v.flatten().double().cpu(), return_inverse=True, return_counts=True)
    start = counts.cumsum(0) - counts
    return (start + (counts - 1) / 2).double()[inv]


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of two per-channel statistics: 1 when the signals rank the input
    channels exactly as the activations do, 0 when their orders are unrelated."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den > 0 else 0.0


def grid_alphas(n_grid: int = 20) -> list[float]:
    return [i / n_grid for i in range(n_grid)]


def weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per-input-channel mean of |W| / max|W| of its quantization group, over all rows of all
    `weights` (AutoAWQ's and llm-compressor's "duo scaling" statistic). fp32 [in]."""
    parts = []
    for w in weights:
        g = w.shape[1] if group_size == -1 else group_size
        wa = w.float().abs().reshape(w.shape[0], -1, g)  # [out, in/g, g]
        parts.append((wa / (wa.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape[0], -1))
    return torch.cat(parts).mean(0)


def candidate_scales(
    stat: torch.Tensor, alpha: float, normalise: bool, w_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """s = stat^alpha, clamped at 1e-4; AWQ additionally divides by sqrt(max(s) * min(s)).

    With `w_mean` (duo scaling): s = stat^alpha / (w_mean^(1-alpha) + 1e-4).
    """
    s = stat.float().pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.float().pow(1 - alpha) + MIN_SCALE)
    s = s.clamp(min=MIN_SCALE)
    if normalise:
        s = s / (s.max() * s.min()).sqrt()
    return s


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1 in W's dtype: the weight the search evaluates for scales s."""
    ws = w.float() * s.view(1, -1)
    return (fake_quantize(ws, bits, group_size).float() / s.view(1, -1)).to(w.dtype)


def search_scales(
    weights: Sequence[torch.Tensor],
    stat: torch.Tensor,
    loss_fn: Callable[[list[torch.Tensor]], float],
    bits: int,
    group_size: int,
    normalise: bool,
    n_grid: int = 20,
    expand: Callable[[torch.Tensor], torch.Tensor] | None = None,
    w_mean: torch.Tensor | None = None,
) -> ScaleSearch:
    """Grid-search alpha for linears sharing one input.

    `stat` [in] is mean|x| (AWQ) or the importance (QuantLRM); `expand` maps scales of a
    tied statistic onto the weights' input width (GQA v->o); `w_mean` switches on duo
    scaling (see `candidate_scales`). Ties keep the smaller alpha,
    so an all-ones statistic returns s = 1 exactly (plain RTN).
    """
    best: ScaleSearch | None = None
    losses: list[float] = []
    for alpha in grid_alphas(n_grid):
        s = candidate_scales(stat, alpha, normalise, w_mean)
        s_full = expand(s) if expand is not None else s
        loss = loss_fn([scaled_fake_quant(w, s_full, bits, group_size) for w in weights])
        losses.append(loss)
        if best is None or loss < best.loss_after:
            best = ScaleSearch(alpha=alpha, scales=s_full, losses=[loss])
    assert best is not None
    best.losses = losses
    return best


def tie_heads(v: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """[n_heads*hd] -> [n_kv*hd]: average over the query heads that share one KV head.

    Under grouped-query attention o_proj's input channel h*hd+d reads v_proj's output row
    (h // (n_heads/n_kv))*hd+d, so a scale folded into v's rows must be equal across those heads.
    """
    n_rep = n_heads // n_kv
    return v.reshape(n_kv, n_rep, head_dim).mean(dim=1).reshape(-1)  # [n_kv, n_rep, hd] -> [n_kv*hd]


def expand_heads(s: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """[n_kv*hd] -> [n_heads*hd]: repeat each KV head's scales for its query heads."""
    n_rep = n_heads // n_kv
    return s.reshape(n_kv, 1, head_dim).expand(n_kv, n_rep, head_dim).reshape(-1)


def fold_into_norm(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor):
    """Norm output divided by s: weight / s (and bias / s)."""
    w = weight.float() / s
    b = bias.float() / s if bias is not None else None
    return w, b


def fold_into_rows(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor):
    """A linear's output divided by s: its last len(s) rows (and bias) / s."""
    w = weight.float().clone()
    w[-s.numel() :] /= s.view(-1, 1)
    b = None
    if bias is not None:
        b = bias.float().clone()
        b[-s.numel() :] /= s
    return w, b


def scale_columns(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W diag(s): the linear that now reads X / s."""
    return weight.float() * s.view(1, -1)


def subsample_tokens(x: torch.Tensor, n_tokens: int = 512) -> torch.Tensor:
    """Every (N // n_tokens)-th token of x [..., in] -> [<=~n_tokens, in], as AWQ's auto_clip."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2[:: max(1, x2.shape[0] // n_tokens)]


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    max_elems: int = 1 << 26,
) -> torch.Tensor:
    """Best clip value per (output row, input group) for weight w [out, in] on tokens x [n, in].

    Error of a group = mean over tokens of (x_g . q(w_g) - x_g . w_g)^2, the group's share
    of the output, as AWQ computes it; here one batched matmul per output-row chunk and
    shrink step instead of a broadcast product. Returns clip_max fp32 [out, in/g].
    """
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    ng = in_f // g
    xg = x.float().reshape(-1, ng, g).permute(1, 0, 2).contiguous()  # [ng, n, g]
    n = xg.shape[1]
    oc_chunk = max(1, min(out_f, max_elems // max(ng * n, 1)))
    best_all = []
    for o0 in range(0, out_f, oc_chunk):
        wc = w[o0 : o0 + oc_chunk].float().reshape(-1, ng, g)  # [oc, ng, g]
        oc = wc.shape[0]
        wt = wc.permute(1, 2, 0)  # [ng, g, oc]
        org = torch.bmm(xg, wt)  # [ng, n, oc]
        org_max = wc.abs().amax(dim=-1, keepdim=True)  # [oc, ng, 1]
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.maximum(torch.minimum(wc, max_val), -max_val)
            q = fake_quantize(cur.reshape(oc, in_f), bits, g).reshape(oc, ng, g)
            out = torch.bmm(xg, q.permute(1, 2, 0))  # [ng, n, oc]
            err = (out - org).pow(2).mean(dim=1).t().unsqueeze(-1)  # [oc, ng, 1]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, max_val, best)
        best_all.append(best.squeeze(-1))
    return torch.cat(best_all, dim=0)  # [out, ng]

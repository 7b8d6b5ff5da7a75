"""Signals against a plain in-memory reference of the paper's Eq. 4-6, on real tiny checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantlrm.signals as signals_mod
from quantlrm.arch import linear_names
from quantlrm.checkpoint import Checkpoint
from quantlrm.cli import main
from quantlrm.errors import QuantLRMError
from quantlrm.models import build_model, tiny_config
from quantlrm.signals import (
    VARIANTS,
    channel_importance,
    compute_signals,
    compute_signals_from_pairs,
    load_signals,
    map_updates,
    save_signals,
)
from quantlrm.stats import select_positive

# ---------------------------------------------------------------------------------------
# the reference: everything in memory, torch.median, the equations as printed
# ---------------------------------------------------------------------------------------


def reference(base_sd, ft_sd, names, variant, y_min=1.0, y_max=10.0):
    dws = {n: (ft_sd[n + ".weight"].float() - base_sd[n + ".weight"].float()).abs() for n in names}
    every = torch.cat([d.flatten() for d in dws.values()])
    pos = every[every > 0]
    if variant == "both-ends-no-zero":
        lo, mid = every.min(), torch.median(every)
    else:
        lo, mid = pos.min(), torch.median(pos)
    hi = every.max()

    def f(d):
        if variant == "magnitude":
            return d
        left = y_min + (y_max - y_min) * ((mid - d) / (mid - lo)) ** 2
        right = y_min + (y_max - y_min) * ((d - mid) / (hi - mid)) ** 2
        y = torch.where(d <= mid, left, right).clamp(y_min, y_max)
        if variant == "both-ends-no-zero":
            return y
        if variant == "mid":
            y = y_min + y_max - y
        return torch.where(d == 0, torch.tensor(y_max if variant == "zeros-max" else y_min), y)

    imp = {}
    for n, d in dws.items():
        i = f(d).mean(0)
        if variant == "both-ends":
            i = i * ((d == 0).sum(0) + 1)
        imp[n] = i
    stats = dict(
        dw_min=lo.item(),
        dw_mid=mid.item(),
        dw_max=hi.item(),
        n_updates=every.numel(),
        n_zero=int((every == 0).sum()),
    )
    return imp, stats


def names_of(config):
    return [p for _, _, p in linear_names(config)]


# ---------------------------------------------------------------------------------------
# tiny real checkpoints: bf16 like real releases, so small updates round to exact zeros
# ---------------------------------------------------------------------------------------


def make_pair(model_type, seed=0, dtype=torch.bfloat16):
    """(base model, fine-tuned model): a subset of linear weights moved by small steps."""
    base = build_model(tiny_config(model_type), seed=seed, dtype=dtype)
    with torch.no_grad():
        for p in base.parameters():  # keep every value exactly representable in fp16 too
            p.copy_(torch.where(p.abs() < 2e-4, torch.full_like(p, 2e-4) * p.sign(), p))
    ft = build_model(tiny_config(model_type), seed=seed, dtype=dtype)
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ft.parameters():
            touched = torch.rand(p.shape, generator=g) < 0.6
            step = torch.randn(p.shape, generator=g) * 3e-3 * touched
            p.add_(step.to(p.dtype))  # steps under half a bf16 ulp vanish: exact zeros
    return base, ft


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    base, ft = make_pair("llama")
    base.save_pretrained(d / "base", max_shard_size="60KB")
    ft.save_pretrained(d / "ft", max_shard_size="60KB")
    return d, base, ft


def sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_matches_reference(sig, base_sd, ft_sd, names, variant):
    ref_imp, ref_stats = reference(base_sd, ft_sd, names, variant)
    assert sorted(sig.importance) == sorted(names)
    for k in ("n_updates", "n_zero", "dw_max"):
        assert sig.stats[k] == ref_stats[k], k
    if variant != "magnitude":
        assert sig.stats["dw_min"] == ref_stats["dw_min"]  # exact, not approximately
        assert sig.stats["dw_mid"] == ref_stats["dw_mid"]
    for n in names:
        got = sig.importance[n]
        assert got.dtype == torch.float32 and got.shape == (ref_imp[n].shape[0],)
        torch.testing.assert_close(got, ref_imp[n].float(), rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_matches_reference(llama, variant):
    d, base, ft = llama
    assert len(Checkpoint(d / "base").shard_files()) > 1
    sig = compute_signals(d / "base", d / "ft", variant=variant, progress=False)
    assert_matches_reference(sig, sd(base), sd(ft), names_of(base.config.to_dict()), variant)
    assert sig.stats["variant"] == variant
    assert 0.05 < sig.stats["zero_fraction"] < 0.9  # many exact zeros, as in real bf16 pairs


def test_qwen3_and_default_variant(tmp_path):
    base, ft = make_pair("qwen3", seed=3)
    base.save_pretrained(tmp_path / "b", max_shard_size="60KB")
    ft.save_pretrained(tmp_path / "f")
    sig = compute_signals(tmp_path / "b", tmp_path / "f", progress=False)
    assert sig.stats["variant"] == "both-ends"
    names = names_of(base.config.to_dict())
    assert len(names) == 14
    assert_matches_reference(sig, sd(base), sd(ft), names, "both-ends")


def test_sharded_unsharded_and_dtypes_agree(llama, tmp_path):
    d, base, ft = llama
    ref = compute_signals(d / "base", d / "ft", progress=False)
    assert ref.stats["passes"] == 2  # bf16 updates: the median is exact after one histogram pass
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        b, f = tmp_path / f"b{dtype}", tmp_path / f"f{dtype}"
        base.to(dtype).save_pretrained(b)  # one file, no index
        ft.to(dtype).save_pretrained(f)
        sig = compute_signals(b, f, progress=False)
        for k in ("dw_min", "dw_mid", "dw_max", "n_zero", "n_updates"):
            assert sig.stats[k] == ref.stats[k], (dtype, k)
        for n, v in ref.importance.items():
            assert torch.equal(sig.importance[n], v), (dtype, n)
    base.to(torch.bfloat16), ft.to(torch.bfloat16)


def test_refinement_pass_blocks_and_cache_are_exact(monkeypatch):
    """fp32 updates need the second (low-bit) histogram pass; blocks and the cache change nothing."""
    g = torch.Generator().manual_seed(7)
    items = []
    for i, shape in enumerate([(33, 16), (20, 48), (7, 16)]):
        w = torch.randn(shape, generator=g)
        wf = w + torch.randn(shape, generator=g) * 1e-3 * (torch.rand(shape, generator=g) < 0.7)
        items.append((f"m{i}", w, wf))
    base_sd = {n + ".weight": w for n, w, _ in items}
    ft_sd = {n + ".weight": wf for n, _, wf in items}
    names = [n for n, _, _ in items]
    calls = []

    def pairs():
        calls.append(1)
        return iter(items)

    plain = compute_signals_from_pairs(pairs, progress=False)
    assert plain.stats["passes"] == 3 and len(calls) == 3
    assert_matches_reference(plain, base_sd, ft_sd, names, "both-ends")
    monkeypatch.setitem(signals_mod.BLOCK_ELEMS, "cpu", 50)  # blocks of 3 rows or fewer
    blocked = compute_signals_from_pairs(pairs, progress=False)
    cached = compute_signals_from_pairs(pairs, progress=False, cache_bytes=10**9)
    assert cached.stats["cached_modules"] == 3
    for sig in (blocked, cached):
        for k in ("dw_min", "dw_mid", "dw_max", "n_zero"):
            assert sig.stats[k] == plain.stats[k]
        for n in names:
            torch.testing.assert_close(sig.importance[n], plain.importance[n], rtol=1e-6, atol=0)


def test_pairs_source_matches_checkpoints(llama):
    d, base, ft = llama
    names = names_of(base.config.to_dict())
    bsd, fsd = sd(base), sd(ft)
    sig = compute_signals_from_pairs(
        lambda: ((n, bsd[n + ".weight"], fsd[n + ".weight"]) for n in names), progress=False
    )
    ck = compute_signals(d / "base", d / "ft", progress=False)
    assert sig.stats["dw_mid"] == ck.stats["dw_mid"]
    for n in names:
        assert torch.equal(sig.importance[n], ck.importance[n])

    flip = iter([names, names[::-1], names[::-1]])

    def unstable():
        order = next(flip)
        return ((n, bsd[n + ".weight"], fsd[n + ".weight"]) for n in order)

    with pytest.raises(QuantLRMError, match="same order|out of order"):
        compute_signals_from_pairs(unstable, progress=False)
    with pytest.raises(QuantLRMError, match="callable"):
        compute_signals_from_pairs(iter([]), progress=False)


def test_save_load_layout_and_cli(llama, tmp_path, capsys):
    d, base, _ = llama
    out = tmp_path / "sig"
    argv = ["signals", "--base", str(d / "base"), "--finetuned", str(d / "ft"), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["importance.safetensors", "stats.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["sig"]  # no temporary directory left
    line = capsys.readouterr().out
    assert "zero" in line and "median" in line and "GB/s" in line
    stats = json.loads((out / "stats.json").read_text())
    for k in (
        "dw_min",
        "dw_mid",
        "dw_max",
        "n_updates",
        "n_zero",
        "variant",
        "y_min",
        "y_max",
        "modules",
    ):
        assert k in stats
    q = "model.layers.0.self_attn.q_proj"
    assert set(stats["modules"][q]) >= {"shape", "n_zero", "zero_fraction", "dw_max"}
    tensors = load_file(out / "importance.safetensors")
    assert set(tensors) == set(names_of(base.config.to_dict()))
    assert tensors[q].dtype == torch.float32 and tensors[q].shape == (64,)
    loaded = load_signals(out)
    lib = compute_signals(d / "base", d / "ft", progress=False)
    assert loaded.stats["dw_mid"] == lib.stats["dw_mid"]
    for n, v in lib.importance.items():
        assert torch.equal(loaded.importance[n], v)
    # the saved statistics reproduce the importance through the public helpers
    dw = (
        Checkpoint(d / "ft").get(q + ".weight").float()
        - Checkpoint(d / "base").get(q + ".weight").float()
    ).abs()
    torch.testing.assert_close(
        channel_importance(dw, loaded.stats, "both-ends"), loaded.importance[q], rtol=1e-6, atol=0
    )
    # existing output: refused before any work, exit 2
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err
    save_signals(lib, out, overwrite=True)
    with pytest.raises(QuantLRMError, match="not a signals directory"):
        load_signals(tmp_path)


def test_map_updates_edges():
    stats = {
        "dw_min_pos": 1.0,
        "dw_mid_pos": 2.0,
        "dw_max": 6.0,
        "dw_min_all": 0.0,
        "dw_mid_all": 1.0,
    }
    dw = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 4.0, 6.0, 9.0])
    f = map_updates(dw, stats, "both-ends")
    # zeros -> 1; below lo clamps to 10; lo -> 10; mid -> 1; (6-2)/4 -> 10; beyond max clamps
    torch.testing.assert_close(
        f, torch.tensor([1.0, 10.0, 10.0, 1 + 9 * 0.25, 1.0, 1 + 9 * 0.25, 10.0, 10.0])
    )
    assert map_updates(dw, stats, "zeros-max")[0] == 10.0
    torch.testing.assert_close(map_updates(dw, stats, "mid")[1:], 11.0 - f[1:])
    no_zero = map_updates(dw, stats, "both-ends-no-zero")  # lo=0, mid=1 from the *_all stats
    torch.testing.assert_close(no_zero[:3], torch.tensor([10.0, 1 + 9 * 0.25, 1.0]))
    torch.testing.assert_close(map_updates(dw, stats, "magnitude"), dw)
    flat = {"dw_min_pos": 2.0, "dw_mid_pos": 2.0, "dw_max": 2.0}  # every update equal
    torch.testing.assert_close(
        map_updates(torch.tensor([2.0, 3.0]), flat, "both-ends"), torch.tensor([1.0, 10.0])
    )
    imp = channel_importance(torch.tensor([[0.0, 2.0], [0.0, 6.0]]), stats, "both-ends")
    torch.testing.assert_close(imp, torch.tensor([1.0 * 3, (1.0 + 10.0) / 2]))
    with pytest.raises(QuantLRMError, match="variant"):
        map_updates(dw, stats, "sideways")
    with pytest.raises(QuantLRMError, match="y_min"):
        map_updates(dw, stats, "both-ends", y_min=5, y_max=2)


@pytest.mark.parametrize(
    "values",
    [
        [3.5],  # a single value
        [4.0, 1.0, 3.0, 2.0],  # even count: the lower middle
        [1.0, 1.0, 1.0, 2.0, 2.0, 2.0],  # ties straddling the middle
        [0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 8.0],  # mostly zeros (ignored)
        [1e-45, 3e-45, 1e-40, 1.1754942e-38, 1.0],  # denormals
        [1.0, 1.0000001, 1.0000002, 1.0000004, 1.0000005, 1.0000006],  # one high-16-bit bucket
        [2.0**-20, 2.0**-20, 2.0**-20 * (1 + 2**-20), 3.0e38],
    ],
)
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_streaming_selection_equals_torch_median(values, chunk):
    x = torch.tensor(values, dtype=torch.float32)
    pos = x[x > 0]
    n = pos.numel()
    got = select_positive(x, [0, (n - 1) // 2, n - 1], chunk=chunk)
    assert got == [pos.min().item(), torch.median(pos).item(), pos.max().item()]


def test_streaming_selection_random_sets():
    g = torch.Generator().manual_seed(0)
    sets = [
        torch.rand(100_001, generator=g),
        torch.randn(50_000, generator=g).bfloat16().float().abs(),  # heavy ties, like bf16 updates
        (torch.randn(40_000, generator=g) * 1e-30).abs(),  # near the denormal range
        torch.randint(0, 4, (9_999,), generator=g).float(),
    ]
    for x in sets:
        pos = x[x > 0]
        n = pos.numel()
        ks = [0, (n - 1) // 2, n // 3, n - 1]
        got = select_positive(x, ks, chunk=7_001)
        srt = pos.sort().values
        assert got == [srt[k].item() for k in ks]
        assert got[1] == torch.median(pos).item()


# ---------------------------------------------------------------------------------------
# bad input: one-line errors naming problem and fix, exit 2, nothing written
# ---------------------------------------------------------------------------------------


def run_cli(base, ft, out, *extra):
    return main(
        [
            "signals",
            "--base",
            str(base),
            "--finetuned",
            str(ft),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_errors(llama, tmp_path, capsys):
    d, base, ft = llama
    out = tmp_path / "out"

    def fails(b, f, match, *extra):
        capsys.readouterr()  # drop output of the set-up (save_pretrained progress bars)
        assert run_cli(b, f, out, *extra) == 2
        err = capsys.readouterr().err
        assert match in err and "Fix:" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()

    # identical weights (a copy, not the same path) and the same path
    shutil.copytree(d / "base", tmp_path / "copy")
    fails(d / "base", tmp_path / "copy", "identical")
    fails(d / "base", d / "base", "same directory")
    # another architecture, another size
    build_model(tiny_config("qwen3")).to(torch.bfloat16).save_pretrained(tmp_path / "qwen3")
    fails(d / "base", tmp_path / "qwen3", "different architectures")
    build_model(tiny_config("llama", hidden_size=32, intermediate_size=64)).save_pretrained(
        tmp_path / "small"
    )
    fails(d / "base", tmp_path / "small", "shape")
    # a tensor missing on one side
    (tmp_path / "missing").mkdir()
    shutil.copy(d / "ft" / "config.json", tmp_path / "missing")
    full = {
        k: v.contiguous() for k, v in sd(ft).items() if k != "model.layers.1.mlp.up_proj.weight"
    }
    save_file(full, tmp_path / "missing" / "model.safetensors", metadata={"format": "pt"})
    fails(d / "base", tmp_path / "missing", "model.layers.1.mlp.up_proj.weight is missing")
    # NaN in the fine-tuned weights
    bad = sd(ft)
    bad["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    (tmp_path / "nan").mkdir()
    shutil.copy(d / "ft" / "config.json", tmp_path / "nan")
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "nan" / "model.safetensors")
    fails(
        d / "base",
        tmp_path / "nan",
        "finetuned weight model.layers.1.self_attn.v_proj contains NaN",
    )
    # not a checkpoint, empty, pickle-only, truncated shard
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", d / "ft", "config.json")
    fails(tmp_path / "nowhere", d / "ft", "not a directory")
    (tmp_path / "pickle").mkdir()
    shutil.copy(d / "ft" / "config.json", tmp_path / "pickle")
    torch.save({}, tmp_path / "pickle" / "pytorch_model.bin")
    fails(d / "base", tmp_path / "pickle", "pickle")
    shutil.copytree(d / "ft", tmp_path / "trunc")
    shard = max((tmp_path / "trunc").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    fails(d / "base", tmp_path / "trunc", "truncated")
    # bad options
    fails(d / "base", d / "ft", "y_min", "--y-min", "3", "--y-max", "2")
    with pytest.raises(SystemExit):
        run_cli(d / "base", d / "ft", out, "--variant", "sideways")
    capsys.readouterr()


def test_checkpoint_read_equals_get(llama):
    """`Checkpoint.read` (plain reads, no memory map) returns what `get` returns."""
    d, _, _ = llama
    ck = Checkpoint(d / "ft")
    for k in ck.keys():
        t = ck.read(k)
        assert t.dtype == ck.get(k).dtype and torch.equal(t, ck.get(k))


def test_device_errors():
    pairs = [("m", torch.zeros(2, 2), torch.ones(2, 2))]
    with pytest.raises(QuantLRMError, match="device"):
        compute_signals_from_pairs(lambda: iter(pairs), device="tpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(QuantLRMError, match="no usable CUDA"):
            compute_signals_from_pairs(lambda: iter(pairs), device="cuda", progress=False)
    with pytest.raises(QuantLRMError, match="equal 2-D shapes"):
        compute_signals_from_pairs(
            lambda: iter([("m", torch.zeros(2, 2), torch.ones(2, 3))]), progress=False
        )

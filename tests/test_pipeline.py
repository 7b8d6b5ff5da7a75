import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantlrm import pipeline
from quantlrm.arch import get_arch
from quantlrm.calib import load_calibration
from quantlrm.cli import main
from quantlrm.errors import QuantLRMError
from quantlrm.models import build_model, byte_tokenizer, tiny_config
from quantlrm.pipeline import QuantizeOptions, quantize_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3"]
COMMON = dict(bits=3, group_size=32, calib="builtin", calib_samples=4, calib_seqlen=64, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(model_type, seed=0) -> saved checkpoint dir with the byte tokenizer."""
    root = tmp_path_factory.mktemp("models")
    made = {}

    def make(mt: str, seed: int = 0):
        if (mt, seed) not in made:
            d = root / f"{mt}-{seed}"
            build_model(tiny_config(mt), seed=seed).save_pretrained(d)
            byte_tokenizer().save_pretrained(d)
            made[(mt, seed)] = d
        return made[(mt, seed)]

    return make


def importance_for(model_dir, fill=None, seed=0):
    """A plausible importance vector per linear: 1..10 times a zero-count factor."""
    from quantlrm.arch import linear_names
    from quantlrm.checkpoint import Checkpoint

    ck = Checkpoint(model_dir)
    g = torch.Generator().manual_seed(seed)
    imp = {}
    for _, _, name in linear_names(ck.config):
        n = ck.info(name + ".weight")[0][1]
        if fill is not None:
            imp[name] = torch.full((n,), float(fill))
        else:
            imp[name] = (1 + 9 * torch.rand(n, generator=g)) * torch.randint(1, 4, (n,), generator=g)
    return imp


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def report(run_dir):
    return json.loads((run_dir / "quantlrm.json").read_text())


def run(model, out, **kw):
    return quantize_model(QuantizeOptions(model=str(model), out=str(out), **{**COMMON, **kw}))


@pytest.mark.parametrize("mt", ARCHS)
def test_every_architecture_quantizes_loads_and_beats_rtn(mt, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny(mt)
    mse = {}
    for method in ("rtn", "awq", "quantlrm"):
        extra = {"importance": importance_for(src)} if method == "quantlrm" else {}
        out = run(src, tmp_path / method, method=method, **extra)
        rep = report(out)
        assert rep["method"] == method and rep["bits"] == 3 and len(rep["layers"]) == 2
        mse[method] = sum(r["layer_mse"] for r in rep["layers"])
        for r in rep["layers"]:
            for g in r["groups"].values():
                assert g["loss_after"] <= g["loss_before"]
    arch = get_arch(json.loads((src / "config.json").read_text()))
    assert set(report(tmp_path / "awq")["layers"][0]["groups"]) == {g.name for g in arch.scale_groups}
    assert mse["awq"] <= mse["rtn"] and mse["quantlrm"] <= mse["rtn"], mse
    rep = report(tmp_path / "quantlrm")
    assert rep["signals"]["source"] == "in-memory" and len(rep["signals"]["hash"]) == 16
    # every linear: each group of 32 input channels holds at most 2^3 distinct values
    w = weights(tmp_path / "quantlrm")
    src_w = load_file(str(src / "model.safetensors"))
    for name, t in w.items():
        assert t.dtype == src_w[name].dtype and t.shape == src_w[name].shape
        if name.endswith("_proj.weight"):
            groups = t.view(t.shape[0], -1, 32)
            n_levels = max(len(grp.unique()) for row in groups for grp in row)
            assert n_levels <= 8, (name, n_levels)
        elif "layers" not in name:
            assert torch.equal(t, src_w[name])  # embeddings, final norm, lm_head untouched
    # loads in transformers and generates
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "quantlrm").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "quantlrm")
    gen = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)


def test_quantlrm_with_unit_importance_is_rtn_plus_clipping(tiny, tmp_path):
    src = tiny("llama")
    a = run(src, tmp_path / "ones", method="quantlrm", importance=importance_for(src, fill=1.0))
    b = run(src, tmp_path / "rtnclip", method="rtn", clip=True)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(g["alpha"] == 0.0 for r in report(a)["layers"] for g in r["groups"].values())
    sa, sb = load_file(str(a / "search.safetensors")), load_file(str(b / "search.safetensors"))
    clips = [k for k in sb if k.endswith(".clip")]
    assert clips and all(torch.equal(sa[k], sb[k]) for k in clips)
    # and clipping really acts: plain RTN differs
    c = run(src, tmp_path / "rtn", method="rtn")
    assert not all(torch.equal(weights(c)[k], wb[k]) for k in wb)


def _ref_quant(w, bits, g):
    qmax = 2**bits - 1
    wg = w.reshape(w.shape[0], -1, g)
    hi, lo = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    sc = (hi - lo).clamp(min=1e-5) / qmax
    z = (-torch.round(lo / sc)).clamp(0, qmax)
    return ((torch.clamp(torch.round(wg / sc) + z, 0, qmax) - z) * sc).reshape(w.shape)


def test_awq_search_matches_independent_reference(tiny, tmp_path):
    """AWQ's auto_scale for gate/up (inspect mlp) and down (inspect down_proj) of layer 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny("llama")
    out = run(src, tmp_path / "awq", method="awq")
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa").eval()
    ids = load_calibration(AutoTokenizer.from_pretrained(src), "builtin", samples=4, seqlen=64).input_ids
    mlp = model.model.layers[0].mlp
    seen = {}
    hooks = [
        mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("mlp", a[0])),
        mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("down", a[0])),
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    rec = report(out)["layers"][0]["groups"]
    found = load_file(str(out / "search.safetensors"))
    cases = {"gate_up": (mlp, [mlp.gate_proj, mlp.up_proj], seen["mlp"]), "down": (mlp.down_proj, [mlp.down_proj], seen["down"])}
    for name, (module, fcs, x) in cases.items():
        x_max = x.abs().view(-1, x.shape[-1]).mean(0)
        orig = [fc.weight.data.clone() for fc in fcs]
        with torch.no_grad():
            org_out = module(x)
            losses = []
            best = (float("inf"), None, None)
            for r in range(20):
                s = x_max.pow(r / 20).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                for fc, w in zip(fcs, orig, strict=True):
                    fc.weight.data = _ref_quant(w * s, 3, 32) / s
                loss = (org_out - module(x)).float().pow(2).mean().item()
                losses.append(loss)
                if loss < best[0]:
                    best = (loss, r / 20, s)
            for fc, w in zip(fcs, orig, strict=True):
                fc.weight.data = w
        assert rec[name]["alpha"] == best[1]
        assert rec[name]["loss_before"] == pytest.approx(losses[0], rel=1e-4)
        assert rec[name]["loss_after"] == pytest.approx(best[0], rel=1e-4)
        torch.testing.assert_close(found[f"model.layers.0.scales.{name}"], best[2])


@pytest.mark.parametrize("mt", ["llama", "qwen2", "olmo2"])
def test_folding_scales_keeps_the_fp_model(mt, tiny):
    """Scales folded into norms / v / up rows and weight columns leave the logits unchanged."""
    from transformers import AutoModelForCausalLM

    src = tiny(mt)
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    cfg = json.loads((src / "config.json").read_text())
    arch = get_arch(cfg)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    folded = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    nh, nkv, hd = 4, 2, 16
    for layer in folded.model.layers:
        sd = {k: v.float().clone() for k, v in layer.state_dict().items()}
        scales = {}
        for grp in arch.scale_groups:
            n = layer.get_submodule(arch.linears[grp.linears[0]]).in_features
            if grp.name == "o":  # tied across the 2 query heads of each KV head
                s = torch.rand(nkv * hd, generator=g) * 3 + 0.2
                scales[grp.name] = s.view(nkv, 1, hd).expand(nkv, nh // nkv, hd).reshape(-1)
            else:
                scales[grp.name] = torch.rand(n, generator=g) * 3 + 0.2
        pipeline.apply_scales(sd, arch, cfg, scales)
        layer.load_state_dict(sd)
        assert not torch.equal(sd[arch.linears["o"] + ".weight"], layer.state_dict()[arch.linears["o"] + ".weight"] * 0)
    with torch.no_grad():
        got = folded(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(folded.model.layers[0].self_attn.o_proj.weight, model.model.layers[0].self_attn.o_proj.weight)


def test_untied_gqa_scales_are_refused(tiny):
    cfg = json.loads((tiny("llama") / "config.json").read_text())
    arch = get_arch(cfg)
    sd = {k: v.float() for k, v in build_model(tiny_config("llama")).model.layers[0].state_dict().items()}
    with pytest.raises(QuantLRMError, match="query heads"):
        pipeline.apply_scales(sd, arch, cfg, {"o": torch.rand(64) + 0.5})


class _Crash(Exception):
    pass


@pytest.mark.parametrize("propagate", ["fp", "quant"])
def test_resume_after_interruption_gives_identical_output(propagate, tiny, tmp_path, monkeypatch):
    src = tiny("qwen3")
    kw = dict(method="quantlrm", importance=importance_for(src), propagate=propagate)
    full = run(src, tmp_path / "full", **kw)

    real_save = pipeline.WorkDir.save_layer

    def crash_after_first(self, i, tensors, record):
        real_save(self, i, tensors, record)
        raise _Crash

    monkeypatch.setattr(pipeline.WorkDir, "save_layer", crash_after_first)
    with pytest.raises(_Crash):
        run(src, tmp_path / "out", **kw)
    monkeypatch.setattr(pipeline.WorkDir, "save_layer", real_save)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out.partial" / "layer-00000.safetensors").is_file()

    searched = []
    real_search = pipeline.search_layer
    monkeypatch.setattr(pipeline, "search_layer", lambda *a: searched.append(a[3]) or real_search(*a))
    run(src, tmp_path / "out", resume=True, **kw)
    assert searched == [1]  # layer 0 was not searched again
    assert not (tmp_path / "out.partial").exists()
    wa, wb = weights(full), weights(tmp_path / "out")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert report(full)["layers"] == report(tmp_path / "out")["layers"]


def test_resume_refuses_other_settings(tiny, tmp_path, monkeypatch):
    src = tiny("llama")

    def crash(self, i, tensors, record):
        raise _Crash

    monkeypatch.setattr(pipeline.WorkDir, "save_layer", crash)
    with pytest.raises(_Crash):
        run(src, tmp_path / "o", method="rtn")
    monkeypatch.undo()
    with pytest.raises(QuantLRMError, match="bits"):
        run(src, tmp_path / "o", method="rtn", bits=4, resume=True)


def test_apply_reproduces_the_same_weights(tiny, tmp_path):
    src = tiny("mistral")
    a = run(src, tmp_path / "a", method="quantlrm", importance=importance_for(src))
    b = run(src, tmp_path / "b", method="quantlrm", apply=str(a / "search.safetensors"), calib="missing.txt")
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = report(a), report(b)
    assert [r["groups"] for r in ra["layers"]] == [r["groups"] for r in rb["layers"]]
    # QuantLRM records how its channel order relates to AWQ's activation statistic
    assert all(-1 <= g["rank_corr_act"] <= 1 for r in ra["layers"] for g in r["groups"].values())
    assert rb["calibration"]["source"].startswith("none")
    with pytest.raises(QuantLRMError, match="--bits 3 --group-size 32"):
        run(src, tmp_path / "c", method="quantlrm", apply=str(a), bits=4)
    other = tiny("llama")  # same shapes: accepted; a differently shaped model is refused
    with pytest.raises(QuantLRMError, match="layers"):
        big = tmp_path / "deep"
        build_model(tiny_config("mistral", num_hidden_layers=3)).save_pretrained(big)
        run(big, tmp_path / "d", method="awq", apply=str(a))
    assert other.exists()


def test_signals_dir_and_on_the_fly_base(tiny, tmp_path):
    sig_mod = pytest.importorskip("quantlrm.signals")
    base, ft = tiny("llama", 0), tiny("llama", 0)
    # a "fine-tuned" model: the base plus small bf16-visible updates in some layers
    ft = tmp_path / "ft"
    w = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    for k in w:
        if "layers.0" in k and k.endswith("proj.weight"):
            w[k] = w[k] + 0.01 * torch.randn(w[k].shape, generator=g) * (torch.rand(w[k].shape, generator=g) > 0.3)
    ft.mkdir()
    save_file(w, str(ft / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (ft / f.name).write_bytes(f.read_bytes())
    a = run(ft, tmp_path / "a", method="quantlrm", base=str(base))
    assert report(a)["signals"]["source"].startswith("computed from base")
    sig = sig_mod.compute_signals(str(base), str(ft), progress=False)
    sig_mod.save_signals(sig, tmp_path / "sig")
    b = run(ft, tmp_path / "b", method="quantlrm", signals=str(tmp_path / "sig"))
    assert report(a)["signals"]["hash"] == report(b)["signals"]["hash"]
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_group_importance_act_factor_and_duo_scaling(tiny, tmp_path):
    src = tiny("llama")
    imp = {k: v.round() for k, v in importance_for(src).items()}  # integers: the mean of equal ones is exact
    for i in range(2):  # make k/v equal q and up equal gate: "mean" must then equal "authors"
        p = f"model.layers.{i}."
        imp[p + "self_attn.k_proj"] = imp[p + "self_attn.v_proj"] = imp[p + "self_attn.q_proj"]
        imp[p + "mlp.up_proj"] = imp[p + "mlp.gate_proj"]
    a = run(src, tmp_path / "a", method="quantlrm", importance=imp)
    b = run(src, tmp_path / "b", method="quantlrm", importance=imp, group_importance="mean")
    assert all(torch.equal(weights(a)[k], weights(b)[k]) for k in weights(a))
    d = run(src, tmp_path / "d", method="awq", duo_scaling=True)
    rtn = run(src, tmp_path / "rtn", method="rtn")
    assert sum(r["layer_mse"] for r in report(d)["layers"]) <= sum(r["layer_mse"] for r in report(rtn)["layers"])
    with pytest.raises(QuantLRMError, match="AWQ variant"):
        run(src, tmp_path / "e", method="quantlrm", importance=imp, duo_scaling=True)
    c = run(src, tmp_path / "c", method="quantlrm", importance=imp, act_factor=True)
    assert report(c)["options"]["act_factor"] is True
    assert [r["groups"] for r in report(c)["layers"]] != [r["groups"] for r in report(a)["layers"]]


def test_bad_inputs_are_refused_before_writing(tiny, tmp_path):
    src = tiny("llama")
    out = tmp_path / "o"
    cases = [
        (dict(method="rtn", group_size=48), "does not divide"),
        (dict(method="rtn", bits=5), "not supported"),
        (dict(method="rtn", format="nope"), "unknown format"),
        (dict(method="quantlrm"), "needs fine-tuning signals"),
        (dict(method="awq", importance={}), "only used by --method quantlrm"),
        (dict(method="bogus"), "unknown method"),
        (dict(method="quantlrm", importance={"model.layers.0.mlp.foo": torch.ones(3)}), "another model"),
        (dict(method="quantlrm", importance={k: torch.ones(7) for k in importance_for(src)}), "another model"),
        (dict(method="rtn", calib=str(tmp_path / "empty.txt")), "fewer than"),
        (dict(method="rtn", apply=str(tmp_path / "nothing.safetensors")), "does not exist"),
    ]
    (tmp_path / "empty.txt").write_text("")
    for kw, msg in cases:
        with pytest.raises(QuantLRMError, match=msg):
            run(src, out, **kw)
        assert not out.exists()
    # NaN activations: a corrupted embedding
    bad = tmp_path / "nan"
    m = build_model(tiny_config("llama"))
    with torch.no_grad():
        m.model.embed_tokens.weight[100:] = float("nan")
    m.save_pretrained(bad)
    byte_tokenizer().save_pretrained(bad)
    with pytest.raises(QuantLRMError, match="NaN"):
        run(bad, out, method="rtn")
    assert not out.exists()
    # unsupported architecture
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    save_file({"x": torch.zeros(1)}, str(gpt / "model.safetensors"))
    with pytest.raises(QuantLRMError, match="supported model types: llama"):
        run(gpt, out, method="rtn")
    # existing output
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(QuantLRMError, match="already exists"):
        run(src, out, method="rtn")


def test_cli(tiny, tmp_path, capsys):
    src = tiny("olmo2")
    args = ["quantize", "--model", str(src), "--method", "awq", "--bits", "4", "--group-size", "32",
            "--calib", "builtin", "--calib-samples", "2", "--calib-seqlen", "64", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    rep = report(tmp_path / "o")
    assert rep["bits"] == 4 and rep["method"] == "awq" and rep["clip"] is True
    with safe_open(str(tmp_path / "o" / "search.safetensors"), "pt") as f:
        assert f.metadata()["bits"] == "4"
        assert "model.layers.1.scales.down" in f.keys() and "model.layers.1.scales.qkv" not in f.keys()
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "already exists" in capsys.readouterr().err

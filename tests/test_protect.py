import json

import pytest
import torch

from quantlrm.checkpoint import Checkpoint
from quantlrm.cli import main
from quantlrm.errors import QuantLRMError
from quantlrm.models import build_model, byte_tokenizer, tiny_config
from quantlrm.protect import (
    ProtectOptions,
    activation_importance,
    n_keep,
    protect_model,
    protect_weight,
    signals_table,
    top_channels,
)

LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_protect(w, keep, bits, g):
    """Loop version: per row and group, fit the AWQ grid to the unprotected entries only."""
    out = w.to(torch.float32).clone()
    keep = set(keep.tolist())
    max_int = 2**bits - 1
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            cols = [c for c in range(c0, c0 + g) if c not in keep]
            if not cols:
                continue
            x = w[r, cols].to(torch.float32)
            s = max((x.max() - x.min()).item(), 1e-5) / max_int
            z = min(max(-round(x.min().item() / s), 0), max_int)
            q = torch.clamp(torch.round(x / s) + z, 0, max_int)
            # a 16-bit checkpoint stores its scales in that dtype (as packed exports do)
            s_stored = torch.tensor(s).to(w.dtype).item()
            out[r, cols] = (q - z) * s_stored
    return out.to(w.dtype)


@pytest.mark.parametrize("bits,g", [(3, 16), (4, 32), (2, -1)])
def test_protect_weight_keeps_columns_exact_and_rounds_the_rest(bits, g):
    torch.manual_seed(bits)
    w = (torch.randn(6, 64) * 0.05).to(torch.bfloat16)
    w[:, 5] *= 40  # an outlier column that would stretch its group's grid if not excluded
    keep = torch.tensor(
        [0, 1, 2, 3, 5, 9, 10, 11, 12, 13, 14, 15, 33]
    )  # group 0 (g=16) almost all kept
    got = protect_weight(w, keep, bits, g)
    assert got.dtype == w.dtype and got.shape == w.shape
    assert torch.equal(got[:, keep], w[:, keep])  # bit-identical
    torch.testing.assert_close(
        got, reference_protect(w, keep, bits, 64 if g == -1 else g), atol=0, rtol=0
    )
    rest = torch.ones(64, dtype=torch.bool)
    rest[keep] = False
    gg = 64 if g == -1 else g
    for c0 in range(0, 64, gg):
        cols = rest[c0 : c0 + gg]
        for row in got[:, c0 : c0 + gg]:
            assert row[cols].unique().numel() <= 2**bits
    assert not torch.equal(got[:, rest], w[:, rest])


def test_fully_protected_group_stays_exact():
    w = torch.randn(3, 32)
    got = protect_weight(w, torch.arange(16), 3, 16)
    assert torch.equal(got[:, :16], w[:, :16])


def test_top_channels_count_and_ties():
    assert n_keep(64, 0.05) == 3 and n_keep(128, 0.3) == 38 and n_keep(10, 0.01) == 1
    imp = torch.tensor([1.0, 5.0, 5.0, 0.5, 5.0, 2.0])
    assert top_channels(imp, 0.34).tolist() == [1, 2]  # three tied at 5: lowest indices win
    assert top_channels(imp, 0.5).tolist() == [1, 2, 4]


def test_activation_importance_matches_reference():
    model = build_model(tiny_config("llama"), seed=1)
    blocks = torch.randint(0, 256, (3, 12))
    got = activation_importance(model, blocks, LINEARS, progress=False)
    captured = {n: [] for n in LINEARS}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: captured[n].append(a[0].detach())
        )
        for n in LINEARS
    ]
    with torch.no_grad():
        for b in blocks:
            model(input_ids=b[None])
    for h in hooks:
        h.remove()
    for n in LINEARS:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[n]]).double()
        assert x.shape[0] == 36
        torch.testing.assert_close(got[n], (x**2).mean(0).float(), rtol=1e-5, atol=1e-7)
    # q_proj of layer 0 reads input_layernorm(embeddings): an independent check
    with torch.no_grad():
        h0 = model.model.layers[0].input_layernorm(model.model.embed_tokens(blocks))
    torch.testing.assert_close(
        got[LINEARS[0]], h0.reshape(-1, 64).double().pow(2).mean(0).float(), rtol=1e-5, atol=1e-7
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A bf16 base model and a 'fine-tuned' one whose small updates vanish in bf16 (zeros)."""
    root = tmp_path_factory.mktemp("pair")
    base = build_model(tiny_config("llama"), seed=3).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    byte_tokenizer().save_pretrained(root / "base")
    torch.manual_seed(4)
    with torch.no_grad():
        for p in base.parameters():
            step = torch.randn(p.shape) * 0.003 * (torch.rand(p.shape) < 0.7)
            p.copy_((p.float() + step).to(p.dtype))
    base.save_pretrained(root / "ft")
    byte_tokenizer().save_pretrained(root / "ft")
    return root


def _check_output(out, model_dir, importance, fraction, bits, g):
    ck, orig = Checkpoint(out), Checkpoint(model_dir)
    report = json.loads((out / "protect.json").read_text())
    assert set(report["modules"]) == set(LINEARS)
    for key in orig.keys():
        w0, w1 = orig.get(key), ck.get(key)
        assert w1.dtype == w0.dtype
        name = key.removesuffix(".weight")
        if name not in report["modules"]:
            assert torch.equal(w0, w1)
            continue
        keep = torch.tensor(report["modules"][name]["kept"])
        assert keep.tolist() == top_channels(importance[name], fraction).tolist()
        assert keep.numel() == n_keep(w0.shape[1], fraction)
        assert torch.equal(w1[:, keep], w0[:, keep])
        torch.testing.assert_close(w1, reference_protect(w0, keep, bits, g), atol=0, rtol=0)


def test_protect_with_signals_from_base_and_from_dir(pair, tmp_path):
    from quantlrm.signals import compute_signals, save_signals

    sig = compute_signals(pair / "base", pair / "ft", variant="both-ends", progress=False)
    opts = ProtectOptions(model=str(pair / "ft"), out=str(tmp_path / "a"), signal="both-ends",
                          fraction=0.1, bits=3, group_size=32, base=str(pair / "base"), progress=False)  # fmt: skip
    out = protect_model(opts)
    _check_output(out, pair / "ft", sig.importance, 0.1, 3, 32)
    save_signals(sig, tmp_path / "sig")
    rc = main(["protect", "--model", str(pair / "ft"), "--signal", "both-ends", "--fraction", "0.1",
               "--group-size", "32", "--signals", str(tmp_path / "sig"), "--out", str(tmp_path / "b"),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    for key in Checkpoint(out).keys():
        assert torch.equal(Checkpoint(out).get(key), Checkpoint(tmp_path / "b").get(key))
    # signals of another variant are refused, not silently used
    rc = main(["protect", "--model", str(pair / "ft"), "--signal", "mid", "--signals", str(tmp_path / "sig"),
               "--out", str(tmp_path / "c")])  # fmt: skip
    assert rc == 2 and not (tmp_path / "c").exists()


def test_protect_activation_on_calibration_file(pair, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rc = main(["protect", "--model", str(pair / "ft"), "--signal", "activation", "--fraction", "0.3",
               "--bits", "4", "--group-size", "16", "--calib", str(text), "--calib-samples", "4",
               "--calib-seqlen", "32", "--out", str(tmp_path / "act"), "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "act" / "protect.json").read_text())
    assert report["signal"] == "activation" and report["label"].startswith("Activation on")
    model = AutoModelForCausalLM.from_pretrained(pair / "ft")
    ids = torch.tensor(list(("The quick brown fox jumps over the lazy dog. " * 40).encode()))[
        : 4 * 32
    ].view(4, 32)
    imp = activation_importance(model, ids, LINEARS, progress=False)
    _check_output(tmp_path / "act", pair / "ft", imp, 0.3, 4, 16)
    AutoModelForCausalLM.from_pretrained(tmp_path / "act")  # loads as a plain checkpoint


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(signal="both-ends", fraction=0.0, base="x"), "outside"),
        (dict(signal="both-ends", fraction=1.0, base="x"), "outside"),
        (dict(signal="loud", base="x"), "unknown signal"),
        (dict(signal="mid"), "needs fine-tuning signals"),
        (dict(signal="magnitude", bits=5, base="x"), "5-bit"),
    ],
)
def test_bad_input_is_clear(pair, tmp_path, kw, match):
    with pytest.raises(QuantLRMError, match=match):
        protect_model(ProtectOptions(model=str(pair / "ft"), out=str(tmp_path / "o"), **kw))
    assert not (tmp_path / "o").exists()


def test_signals_table_bolds_the_best():
    rows = [
        (
            "SFT",
            {
                "tasks": {
                    "aime": {"accuracy": 0.25, "display": "AIME-120"},
                    "folio": {"accuracy": 0.5},
                }
            },
        ),
        ("SFT both ends", {"aime": 0.5, "folio": 0.4}),
    ]
    md = signals_table(rows, model="tiny")
    lines = md.strip().splitlines()
    assert lines[0] == "| Model | Protection signal | AIME-120 | folio | Avg |"
    assert lines[2] == "| tiny | SFT | 25.0 | **50.0** | 37.50 |"
    assert lines[3] == "| tiny | SFT both ends | **50.0** | 40.0 | **45.00** |"


def test_paper_labels_name_the_calibration_actually_used():
    from quantlrm.protect import paper_label

    assert paper_label("both-ends") == "SFT both ends" and paper_label("magnitude") == "SFT"
    assert paper_label("activation", "pileval") == "Activation on AWQ calibration"
    assert (
        paper_label("activation", "builtin (Python pydoc_data.topics)")
        == "Activation on built-in text"
    )
    assert paper_label("activation", "/data/r1_chains.jsonl") == "Activation on r1_chains.jsonl"

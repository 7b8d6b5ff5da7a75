import json
import math

import numpy as np
import pytest
import torch

from quantlrm.cli import main
from quantlrm.errors import QuantLRMError
from quantlrm.finetune import (
    FinetuneOptions,
    SFTData,
    collate,
    encode,
    finetune,
    lr_at,
    parse_steps,
    resolve_template,
    step_indices,
)
from quantlrm.models import build_model, byte_tokenizer, tiny_config
from quantlrm.plots import plot_snapshot_curve, trend_line

pytestmark = pytest.mark.usefixtures("one_thread")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _examples(n=12):
    return [
        {"prompt": f"What is {i} plus {i}?", "response": f"<think>{i}+{i}</think> {2 * i}"}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    build_model(tiny_config("qwen3"), seed=0).to(torch.bfloat16).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", _examples())


def test_schemas_are_detected(tmp_path):
    pr = SFTData(_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}]))
    assert pr.messages(0) == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"},
    ]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "later"}]  # fmt: skip
    m = SFTData(_jsonl(tmp_path / "b.jsonl", [{"messages": msgs, "problem": "q", "solution": "x"}]))
    assert m.messages(0) == msgs[:3]  # the last assistant turn is the response
    ps = SFTData(_jsonl(tmp_path / "c.jsonl", [{"problem": "q", "solution": "x", "answer": "1"}]))
    assert ps.messages(0)[-1] == {"role": "assistant", "content": "x"}
    custom = SFTData(
        _jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "b"}]), prompt_field="q", response_field="a"
    )
    assert custom.messages(0)[0]["content"] == "a"
    with pytest.raises(QuantLRMError, match="none of the accepted schemas"):
        SFTData(_jsonl(tmp_path / "e.jsonl", [{"question": "q", "answer": "a"}]))
    bad = SFTData(_jsonl(tmp_path / "f.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}]))
    with pytest.raises(QuantLRMError, match="line 2"):
        bad.messages(1)
    (tmp_path / "g.jsonl").write_text("\n")
    with pytest.raises(QuantLRMError, match="no examples"):
        SFTData(tmp_path / "g.jsonl")


def test_loss_mask_covers_response_and_eos_only():
    tok = byte_tokenizer()
    msgs = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "xyz"}]
    ids, n_prompt = encode(tok, msgs, "raw", 100)
    assert ids == [*b"ab\n", *b"xyz", tok.eos_token_id] and n_prompt == 3
    assert encode(tok, msgs, "raw", 5) == (ids[:5], 3)
    batch = collate([(ids, n_prompt), ([1, 2, 3], 1)], pad_id=256)
    assert batch["labels"][0].tolist() == [-100] * 3 + ids[3:]
    assert batch["labels"][1].tolist() == [-100, 2, 3] + [-100] * 4
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch["input_ids"][1, 3:].tolist() == [256] * 4


def test_chat_template_masks_everything_before_the_reply():
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A1"},
    ]
    assert resolve_template(tok, "auto") == "chat"
    ids, n_prompt = encode(tok, msgs, "chat", 100)
    assert bytes(ids).decode() == "[system]S\n[user]Q\n[assistant]A1\n"
    assert bytes(ids[n_prompt:]).decode() == "A1\n"
    with pytest.raises(QuantLRMError, match="no chat template"):
        resolve_template(byte_tokenizer(), "chat")


def test_schedule_and_batch_order():
    lrs = [lr_at(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 7 / 8))
    )
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    seen = step_indices(0, 4, 8, seed=0) + step_indices(1, 4, 8, seed=0)
    assert sorted(seen) == list(range(8))  # one epoch covers every example once
    assert step_indices(3, 4, 8, seed=0) == step_indices(3, 4, 8, seed=0)
    assert parse_steps("2, 4,8") == [2, 4, 8]
    with pytest.raises(QuantLRMError, match="comma-separated"):
        parse_steps("2;4")


def _opts(base, data, out, **kw):
    kw = {"steps": 4, "snapshot_steps": [2, 4], "lr": 2e-3, "batch_size": 2, "grad_accum": 2,
          "warmup": 1, "max_len": 64, "device": "cpu", "progress": False, **kw}  # fmt: skip
    return FinetuneOptions(model=str(base), data=str(data), out=str(out), **kw)


def test_snapshots_equal_signals_of_the_saved_model(base, data, tmp_path):
    from quantlrm.signals import compute_signals, load_signals

    out = finetune(_opts(base, data, tmp_path / "run", save_model=True))
    run = json.loads((out / "run.json").read_text())
    assert run["done"] and [h["step"] for h in run["history"]] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) and h["response_tokens"] > 0 for h in run["history"])
    for k in (2, 4):
        snap = load_signals(out / f"step-{k}")
        ref = compute_signals(
            base, out / f"step-{k}" / "model", variant="both-ends", progress=False
        )
        assert set(snap.importance) == set(ref.importance)
        for name, v in ref.importance.items():
            assert torch.equal(snap.importance[name], v), name
        for key in ("dw_min", "dw_mid", "dw_max", "n_updates", "n_zero"):
            assert snap.stats[key] == ref.stats[key], key
    # the weights really moved, and more after 4 steps than after 2
    s2, s4 = load_signals(out / "step-2").stats, load_signals(out / "step-4").stats
    assert 0 < s2["dw_max"] <= s4["dw_max"] and s2["n_zero"] < s2["n_updates"]


def test_resume_matches_uninterrupted_run(base, data, tmp_path):
    from quantlrm.signals import load_signals

    full = finetune(_opts(base, data, tmp_path / "full"))
    part = finetune(_opts(base, data, tmp_path / "part", stop_after=3))
    assert (
        not (part / "step-4").exists()
        and json.loads((part / "run.json").read_text())["done"] is False
    )
    with pytest.raises(QuantLRMError, match="--resume"):
        finetune(_opts(base, data, tmp_path / "part"))
    with pytest.raises(QuantLRMError, match="changed option"):
        finetune(_opts(base, data, tmp_path / "part", resume=True, lr=1e-3))
    rc = main(["finetune", "--model", str(base), "--data", str(data), "--steps", "4", "--snapshot-steps", "2,4",
               "--lr", "2e-3", "--batch-size", "2", "--grad-accum", "2", "--warmup", "1", "--max-len", "64",
               "--device", "cpu", "--out", str(part), "--resume", "--no-progress"])  # fmt: skip
    assert rc == 0
    a, b = load_signals(full / "step-4"), load_signals(part / "step-4")
    for name, v in a.importance.items():
        assert torch.equal(v, b.importance[name]), name
    hist = [json.loads((d / "run.json").read_text())["history"] for d in (full, part)]
    assert [h["loss"] for h in hist[0]] == [h["loss"] for h in hist[1]]


def test_bf16_checkpointed_adafactor_run_trains_only_linears(base, data, tmp_path):
    from quantlrm.checkpoint import Checkpoint

    opts = _opts(base, data, tmp_path / "lin", steps=2, snapshot_steps=[2], bf16=True, grad_checkpointing=True,
                 optimizer="adafactor", lr=1e-2, train="linears", save_state=False, save_model=True)  # fmt: skip
    out = finetune(opts)
    assert not (out / "state").exists()
    ft, orig = Checkpoint(out / "step-2" / "model"), Checkpoint(base)
    moved = {k for k in orig.keys() if not torch.equal(ft.get(k), orig.get(k))}
    assert moved and all(k.endswith("_proj.weight") for k in moved)
    assert "model.embed_tokens.weight" not in moved


def test_bad_finetune_input_is_clear(base, data, tmp_path, capsys):
    with pytest.raises(QuantLRMError, match="outside 1..4"):
        finetune(_opts(base, data, tmp_path / "o", snapshot_steps=[2, 5]))
    bad = _jsonl(tmp_path / "bad.jsonl", [{"input": "x", "output": "y"}])
    rc = main(
        [
            "finetune",
            "--model",
            str(base),
            "--data",
            str(bad),
            "--steps",
            "2",
            "--out",
            str(tmp_path / "o2"),
        ]
    )
    assert rc == 2 and "--prompt-field" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_snapshot_plot_and_trend(tmp_path):
    steps, acc = [100, 200, 400, 800], [30.0, 31.5, 33.0, 36.5]
    x, y = np.array(steps, float), np.array(acc)
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    got = trend_line(steps, acc)
    assert got[0] == pytest.approx(slope) and got[1] == pytest.approx(y.mean() - slope * x.mean())
    res = plot_snapshot_curve(steps, acc, {"AWQ": 34.0, "RTN": 20.0}, tmp_path / "fig3.png")
    assert (tmp_path / "fig3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["slope"] == pytest.approx(slope)
    with pytest.raises(QuantLRMError, match="two distinct"):
        trend_line([5], [1.0])

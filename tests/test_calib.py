import json

import pytest
import torch

from quantlrm.calib import load_calibration
from quantlrm.errors import QuantLRMError
from quantlrm.models import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_builtin_corpus_fills_blocks(tok):
    c = load_calibration(tok, "builtin", samples=16, seqlen=128)
    assert c.input_ids.shape == (16, 128) and c.input_ids.dtype == torch.long
    assert "pydoc_data" in c.source
    text = tok.decode(c.input_ids[0])
    assert len(set(text.split())) > 10  # real prose, not padding


def test_default_is_offline_builtin_without_datasets(tok):
    try:
        import datasets  # noqa: F401
    except ImportError:
        c = load_calibration(tok, None, samples=2, seqlen=64)
        assert c.source.startswith("builtin")
    else:
        pytest.skip("datasets installed: the default would try the hub")


def test_txt_json_jsonl_and_field(tok, tmp_path):
    docs = [f"document number {i} " + "lorem ipsum " * 10 + "end" for i in range(6)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "b.json").write_text(json.dumps([{"chain": d} for d in docs]))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"chain": d, "x": 1}) for d in docs))
    ids = {}
    for name, field in [("a.txt", "text"), ("b.json", "chain"), ("c.jsonl", "chain")]:
        c = load_calibration(tok, tmp_path / name, field=field, samples=3, seqlen=100)
        assert c.input_ids.shape == (3, 100)
        ids[name] = c.input_ids
    # same documents, same EOS joins -> same blocks whatever the container
    assert torch.equal(ids["a.txt"], ids["b.json"]) and torch.equal(ids["b.json"], ids["c.jsonl"])
    expect = tok(docs[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids["a.txt"].flatten()[: len(expect)].tolist() == expect


def test_fewer_blocks_than_asked_is_allowed(tok, tmp_path):
    (tmp_path / "s.txt").write_text("x" * 250)
    c = load_calibration(tok, tmp_path / "s.txt", samples=10, seqlen=100)
    assert c.input_ids.shape == (2, 100)


def test_bad_inputs_are_clear(tok, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(QuantLRMError, match="fewer than"):
        load_calibration(tok, tmp_path / "empty.txt", samples=4, seqlen=64)
    (tmp_path / "r.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(QuantLRMError, match="no field 'text'.*question"):
        load_calibration(tok, tmp_path / "r.jsonl", samples=1, seqlen=8)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(QuantLRMError, match="line 1"):
        load_calibration(tok, tmp_path / "bad.jsonl", samples=1, seqlen=8)
    with pytest.raises(QuantLRMError, match="does not exist"):
        load_calibration(tok, tmp_path / "missing.txt", samples=1, seqlen=8)
    with pytest.raises(QuantLRMError, match="empty"):
        load_calibration(tok, "builtin", samples=0, seqlen=8)


def test_hub_probe_is_false_offline_and_for_an_unresolvable_host(monkeypatch):
    from quantlrm.calib import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.quantlrm-test.invalid")  # .invalid never resolves
    assert hub_reachable(timeout=2.0) is False

"""Reports (Table-2 layout), precision labels, prompt formatting, and loading quantized exports."""

import json

import pytest
import torch

from quantlrm.cli import build_parser
from quantlrm.errors import QuantLRMError
from quantlrm.eval import GenerationConfig, evaluate, load_model
from quantlrm.eval.backends import format_prompt
from quantlrm.eval.report import describe_precision, markdown_table, write_reports
from quantlrm.models import build_model, byte_tokenizer, tiny_config
from quantlrm.quantizer import quantize


def _summary(model, accs, ppl=None, precision=""):
    tasks = {
        k: {"display": d, "accuracy": a, "n": 10}
        for (k, d), a in zip(
            [
                ("aime", "AIME-120"),
                ("folio", "FOLIO"),
                ("temporal", "Temporal"),
                ("gpqa", "GPQA-Diamond"),
            ],
            accs,
            strict=False,
        )
        if a is not None
    }
    if ppl is not None:
        tasks["ppl"] = {"display": "PPL", "ppl": ppl, "n_tokens": 100}
    vals = [a for a in accs if a is not None]
    return {"model": model, "precision": precision, "tasks": tasks, "avg": sum(vals) / len(vals)}


def _rows(md):
    return [
        [c.strip() for c in ln.strip("|").split("|")]
        for ln in md.splitlines()
        if ln.startswith("| ")
    ]


def test_markdown_table_like_table_2():
    s = [
        _summary("olmo", [0.542, 0.754, 0.996, 0.455], ppl=9.5, precision="16-bit"),
        _summary("awq", [0.283, 0.764, 0.840, 0.359], precision="3-bit AWQ"),
        _summary("ours", [0.383, 0.744, 0.968, None], ppl=11.25, precision="3-bit QuantLRM"),
    ]
    rows = _rows(markdown_table(s))
    assert rows[0] == [
        "Model",
        "Precision",
        "AIME-120",
        "FOLIO",
        "Temporal",
        "GPQA-Diamond",
        "Avg",
        "% of olmo",
        "PPL",
    ]
    base = (0.542 + 0.754 + 0.996 + 0.455) / 4
    assert rows[1] == [
        "olmo",
        "16-bit",
        "54.2",
        "75.4",
        "99.6",
        "45.5",
        f"{100 * base:.2f}",
        "100.0",
        "9.500",
    ]
    awq = (0.283 + 0.764 + 0.840 + 0.359) / 4
    ours = (0.383 + 0.744 + 0.968) / 3
    # best quantized score per column in bold, the 16-bit reference excluded
    assert rows[2] == [
        "awq",
        "3-bit AWQ",
        "28.3",
        "**76.4**",
        "84.0",
        "**35.9**",
        f"{100 * awq:.2f}",
        f"{100 * awq / base:.1f}",
        "-",
    ]
    assert rows[3] == [
        "ours",
        "3-bit QuantLRM",
        "**38.3**",
        "74.4",
        "**96.8**",
        "-",
        f"**{100 * ours:.2f}**",
        f"{100 * ours / base:.1f}",
        "11.250",
    ]


def test_write_reports_and_precision_labels(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert describe_precision(d) == "16-bit"
    (d / "quantlrm.json").write_text(json.dumps({"options": {"method": "quantlrm", "bits": 3}}))
    assert describe_precision(d) == "3-bit QuantLRM"
    s = _summary("m", [0.5, 0.25])
    s["model_path"] = str(d)
    del s["precision"]
    paths = write_reports([s], tmp_path / "rep")
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["summary"].read_text())["models"][0]["precision"] == "3-bit QuantLRM"
    assert "| m | 3-bit QuantLRM | 50.0 | 25.0 | 37.50 | 100.0 |" in paths["markdown"].read_text()


def test_prompt_formats():
    tok = byte_tokenizer()
    assert format_prompt("Q?", tok, GenerationConfig()) == "Q?\n<think>\n"
    with pytest.raises(QuantLRMError, match="chat template"):
        format_prompt("Q?", tok, GenerationConfig(chat_template=True))
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    assert format_prompt("Q?", tok, GenerationConfig(chat_template=True)) == "<u>Q?</u><a>"


def test_cli_help_documents_schemas():
    sub = build_parser()._subparsers._group_actions[0].choices["eval"]
    text = sub.format_help()
    for word in (
        "--aime",
        "--gpqa",
        "Incorrect Answer 1",
        "problem|question",
        "--ppl-file",
        "results.md",
    ):
        assert word in text


def test_compressed_tensors_export_loads_dequantized(tmp_path):
    from quantlrm.export import get_writer

    model = build_model(tiny_config())
    qr = {}
    w = get_writer("compressed-tensors", tmp_path / "ct", 4, 32)
    for name, t in model.state_dict().items():
        mod = name.removesuffix(".weight")
        if name.endswith("proj.weight"):
            qr[mod] = quantize(t.float(), 4, 32)
            w.add_linear(mod, qr[mod], t.dtype)
        else:
            w.add_tensor(name, t)
    w.close(json.loads(model.config.to_json_string()))
    byte_tokenizer().save_pretrained(tmp_path / "ct")
    loaded, _ = load_model(tmp_path / "ct")
    for mod, q in qr.items():
        torch.testing.assert_close(loaded.get_submodule(mod).weight.data, q.dequant(torch.float32))
    assert describe_precision(tmp_path / "ct") == "4-bit compressed-tensors"
    s = evaluate(tmp_path / "ct", "ppl", ppl_text="abc " * 100, ppl_seqlen=64, progress=False)
    assert s["tasks"]["ppl"]["n_tokens"] == 6 * 63 and s["backend"] == "transformers"


def test_reports_pair_each_model_with_the_first(tmp_path):
    """results.md gains a paired table: net points, discordant counts and the exact McNemar p,
    read back from the per-question JSONL files that `evaluate(out=...)` writes."""
    from quantlrm.eval.paired import mcnemar_exact

    outcomes = {"fp": {"aime": "1111100000", "folio": "1111111111"},
                "w3": {"aime": "1111000001", "folio": "1111111000"}}
    for m, tasks in outcomes.items():
        for t, marks in tasks.items():
            (tmp_path / m).mkdir(exist_ok=True)
            with open(tmp_path / m / f"{t}.jsonl", "w") as f:
                for i, c in enumerate(marks):
                    f.write(json.dumps({"task": t, "id": i, "k": 0, "correct": c == "1"}) + "\n")
    sums = [_summary("fp", [0.5, 1.0]), _summary("w3", [0.5, 0.7])]
    paths = write_reports(sums, tmp_path)
    md = paths["markdown"].read_text()
    # w3 vs fp: aime one each way (id 4 / id 9), folio 3 only fp right -> net -3 of 20 questions
    assert "Paired with fp" in md
    assert f"| w3 | -15.00 | 1 | 4 | 20 | {mcnemar_exact(1, 4):.3g} |" in md
    # only this run's questions (an earlier run with a larger --limit left more in the files)
    part = write_reports(sums, tmp_path, questions={"aime": {"4", "9"}, "folio": {"7"}})
    assert f"| w3 | -33.33 | 1 | 2 | 3 | {mcnemar_exact(1, 2):.3g} |" in part["markdown"].read_text()
    # without per-question files there is no paired table (and no error)
    other = write_reports(sums, tmp_path / "elsewhere")
    assert "Paired with" not in other["markdown"].read_text()

"""End to end: a tiny real transformers model evaluated through the library and the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from quantlrm.cli import main
from quantlrm.errors import QuantLRMError
from quantlrm.eval import GenerationConfig, Task, evaluate, grade, perplexity
from quantlrm.eval.backends import TransformersBackend
from quantlrm.models import build_model, byte_tokenizer, tiny_config

FIX = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for seed, name in enumerate(["base", "quant"]):
        d = root / name
        # a context long enough for BBH temporal prompts (bytes as tokens)
        build_model(tiny_config(max_position_embeddings=2048), seed=seed).save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        dirs.append(d)
    return dirs


def _lines(p):
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_cli_writes_reports_and_resumes(models, tmp_path):
    out = tmp_path / "out"
    args = [
        "eval",
        "--model",
        str(models[0]),
        "--model",
        str(models[1]),
        "--tasks",
        "aime,temporal,ppl",
        "--aime",
        str(FIX / "aime.jsonl"),
        "--limit",
        "3",
        "--max-new-tokens",
        "6",
        "--ppl-tokens",
        "300",
        "--ppl-seqlen",
        "128",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    for name in ("base", "quant"):
        for task in ("aime", "temporal"):
            recs = _lines(out / name / f"{task}.jsonl")
            assert len(recs) == 3
            for r in recs:  # the stored verdict is the grader's verdict on the stored text
                assert set(r) >= {"prompt", "completion", "extracted", "correct", "tokens"}
                assert r["correct"] == grade(task, r["completion"], r["reference"])
                assert 1 <= r["tokens"] <= 6
        s = json.loads((out / name / "summary.json").read_text())
        assert s["tasks"]["aime"]["n"] == 3 and s["tasks"]["temporal"]["display"] == "Temporal"
        assert s["tasks"]["ppl"]["n_tokens"] == 2 * 127
    summary = json.loads((out / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["base", "quant"]
    md = (out / "results.md").read_text()
    assert "| Model | Precision | AIME-120 | Temporal | Avg | % of base | PPL |" in md
    table, paired = md.split("Paired with base")
    assert sum(ln.startswith("| ") for ln in table.splitlines()) == 3  # header + 2 models
    # the quantized model against the first, on the 2 x 3 graded questions (ppl has none)
    row = next(ln for ln in paired.splitlines() if ln.startswith("| quant |"))
    assert row.split("|")[5].strip() == "6"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resume: nothing new is generated for finished samples, a removed one is redone,
    # and a torn last line (a crash mid-write) is dropped.
    before = (out / "base" / "aime.jsonl").read_text()
    assert main(args) == 0
    assert (out / "base" / "aime.jsonl").read_text() == before
    lines = before.splitlines(keepends=True)
    (out / "base" / "aime.jsonl").write_text("".join(lines[:2]) + lines[2][:20])
    assert main(args) == 0
    redone = _lines(out / "base" / "aime.jsonl")
    assert len(redone) == 3 and [r["id"] for r in redone[:2]] == [
        r["id"] for r in _lines_text(lines[:2])
    ]
    # Other decoding settings in the same directory are refused, not mixed in.
    assert main([*args[:-3], "--temperature", "1.0", "--out", str(out), "--quiet"]) == 2


def _lines_text(lines):
    return [json.loads(x) for x in lines]


def test_library_evaluate_on_a_loaded_model_and_synthetic_task(models):
    model = build_model(tiny_config(), seed=0)
    tok = byte_tokenizer()
    gen = GenerationConfig(greedy=True, max_new_tokens=5, batch_size=2)
    prompts = ["ab", "hello there", "x", "a longer prompt than the others"]
    # Greedy decoding is deterministic: use the model's own last output line as reference,
    # so grading must pass through on the same completions.
    be = TransformersBackend(model, tok, progress=False)
    outs = be.generate(prompts, gen)
    refs = [next((ln for ln in reversed(o.text.splitlines()) if ln.strip()), None) for o in outs]
    pairs = [(p, r) for p, r in zip(prompts, refs, strict=True) if r and r.strip(" .")]
    assert pairs, "the tiny model produced only blank completions"
    task = Task.from_pairs("echo", pairs, grader="exact")
    s = evaluate(model, [task], tokenizer=tok, gen=gen, progress=False)
    assert s["tasks"]["echo"]["accuracy"] == 1.0 and s["avg"] == 1.0
    assert s["tasks"]["echo"]["n"] == len(pairs)
    # two samples per question, graded separately
    s2 = evaluate(
        model,
        [task.head(1)],
        tokenizer=tok,
        gen=GenerationConfig(max_new_tokens=3, samples=2),
        progress=False,
    )
    assert s2["tasks"]["echo"]["n"] == 2 and s2["tasks"]["echo"]["questions"] == 1
    with pytest.raises(QuantLRMError, match="tokenizer"):
        evaluate(model, [task], progress=False)


def test_left_padded_batches_match_single_prompts():
    model = build_model(tiny_config(), seed=3)
    tok = byte_tokenizer()
    be = TransformersBackend(model, tok, progress=False)
    prompts = ["short", "a much longer prompt with padding", "mid length one"]
    one = [
        be.generate([p], GenerationConfig(greedy=True, max_new_tokens=6, batch_size=1))[0]
        for p in prompts
    ]
    batch = be.generate(prompts, GenerationConfig(greedy=True, max_new_tokens=6, batch_size=3))
    assert [g.text for g in batch] == [g.text for g in one]
    # The prompt sent to the model is the raw question + "\n<think>\n" by default.
    enc = tok("short\n<think>\n")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc])).logits[0, -1]
    assert batch[0].n_tokens == 6 or int(logits.argmax()) == tok.eos_token_id
    assert tok.decode([int(logits.argmax())]) == tok.decode(tok(one[0].text)["input_ids"][:1])


def test_perplexity_matches_a_plain_loop():
    model = build_model(tiny_config(), seed=0)
    tok = byte_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 10
    got = perplexity(model, tok, text, seqlen=64, max_tokens=None, progress=False)
    ids = torch.tensor(list(text.encode()))
    losses = []
    with torch.no_grad():
        for w in range(len(ids) // 64):
            x = ids[w * 64 : (w + 1) * 64][None]
            losses.append(model(input_ids=x, labels=x).loss.item())
    assert got["n_tokens"] == 63 * len(losses)
    assert math.isclose(got["ppl"], math.exp(sum(losses) / len(losses)), rel_tol=1e-5)
    with pytest.raises(QuantLRMError, match="fewer than one window"):
        perplexity(model, tok, "tiny", seqlen=64, progress=False)


def test_special_think_token_survives_decoding():
    # Some tokenizers mark </think> special; completions must keep it for grading.
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["</think>"]})
    think_id = tok.convert_tokens_to_ids("</think>")
    model = build_model(tiny_config(vocab_size=think_id + 1))
    head = torch.nn.Linear(64, think_id + 1, bias=True)
    with torch.no_grad():  # a model that always says </think>, then stops
        head.weight.zero_()
        head.bias.zero_()
        head.bias[think_id] = 1.0
    model.lm_head = head
    gens = TransformersBackend(model, tok, progress=False).generate(
        ["q"], GenerationConfig(greedy=True, max_new_tokens=3)
    )
    assert gens[0].text == "</think>" * 3 and gens[0].n_tokens == 3

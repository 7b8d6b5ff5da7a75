"""Demo: synthetic task generators, the small trainer, and `quantlrm demo --fast` end to end."""

import json
import re
import subprocess
import sys

import pytest
import torch

from quantlrm.demo.tasks import FAMILIES, generate, is_test_prompt, mixture
from quantlrm.demo.train import TrainConfig, lr_at, make_batch, train
from quantlrm.errors import QuantLRMError
from quantlrm.eval import grade
from quantlrm.models import build_model, byte_tokenizer, tiny_config

# ----------------------------------------------------------------- reference solvers
# Each re-derives the answer from the question text alone, independently of the generator.


def solve_arith(q: str) -> str:
    expr = re.fullmatch(r"Compute ([0-9+-]+)\.", q).group(1)
    tokens = re.findall(r"[+-]?\d+", expr)
    return str(sum(int(t) for t in tokens))


def solve_temporal(q: str) -> str:
    lo, hi = map(int, re.search(r"awake (\d+)-(\d+)\.", q).groups())
    facts = q.split("\n")[0].split(". ", 1)[1]  # after "X was awake a-b."
    busy = [tuple(map(int, m)) for m in re.findall(r"[a-z]+ (\d+)-(\d+)\.", facts)]
    hours = set(range(lo, hi)) - {h for a, b in busy for h in range(a, b)}
    options = dict(re.findall(r"\(([A-H])\) (\d+-\d+)", q))
    free = [k for k, v in options.items() if set(range(*map(int, v.split("-")))) == hours]
    assert len(free) == 1, q
    return free[0]


def solve_logic(q: str) -> str:
    alls = re.findall(r"All (\w+)s are (\w+)s\.", q)
    nos = re.findall(r"No (\w+)s are (\w+)s\.", q)
    name, start = re.search(r"(\w+) is a (\w+)\. Claim", q).groups()
    neg, target = re.search(r"Claim: \w+ is (not )?a (\w+)\.", q).groups()
    known = {start}
    changed = True
    while changed:  # forward chaining over "All X are Y"
        changed = False
        for a, b in alls:
            if a in known and b not in known:
                known.add(b)
                changed = True
    excluded = {b for a, b in nos if a in known} | {a for a, b in nos if b in known}
    if target in known:
        return "False" if neg else "True"
    if target in excluded:
        return "True" if neg else "False"
    return "Uncertain"


def solve_science(q: str) -> str:
    options = dict(re.findall(r"\(([A-H])\) ([+-]?\d+)", q))
    if "mass number" in q:
        p, n = map(int, re.search(r"(\d+) protons and (\d+) neutrons", q).groups())
        v = p + n
    elif "charge" in q:
        p, e = map(int, re.search(r"(\d+) protons and (\d+) electrons", q).groups())
        v = p - e
    else:
        m, a = map(int, re.search(r"a (\d+) kg mass at (\d+) m/s2", q).groups())
        v = m * a
    hits = [k for k, o in options.items() if int(o) == v]
    assert len(hits) == 1, q
    return hits[0]


SOLVERS = {"arith": solve_arith, "temporal": solve_temporal, "logic": solve_logic, "science": solve_science}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("level", [1, 2])
def test_answers_are_right_and_graders_accept_the_reference_cot(family, level):
    grader = FAMILIES[family].grader
    for split in ("train", "test"):
        for p in generate(family, 150, seed=3, split=split, level=level):
            assert SOLVERS[family](p.question) == p.answer, p.question
            assert grade(grader, p.cot, p.answer), p.cot
            assert p.prompt == p.question + "\n<think>\n"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_wrong_answers_are_rejected_and_labels_are_balanced(family):
    ps = generate(family, 300, seed=0)
    grader = FAMILIES[family].grader
    for p in ps[:50]:
        wrong = p.cot.replace(p.answer, "999" if family == "arith" else "Zq")
        assert not grade(grader, wrong, p.answer)
    if FAMILIES[family].chance > 0:  # no answer letter/label dominates (a guesser stays at chance)
        counts = {}
        for p in ps:
            counts[p.answer] = counts.get(p.answer, 0) + 1
        assert max(counts.values()) / len(ps) < 2.2 * FAMILIES[family].chance


def test_splits_are_disjoint_deterministic_and_seeded():
    a = generate("arith", 400, seed=0, split="train")
    b = generate("arith", 400, seed=0, split="train")
    c = generate("arith", 400, seed=1, split="train")
    t = generate("arith", 400, seed=0, split="test")
    assert a == b and a != c
    assert not {p.question for p in a} & {p.question for p in t}
    assert all(is_test_prompt(p.question) for p in t)
    assert not any(is_test_prompt(p.question) for p in a + c)
    assert len({p.question for p in a}) == 400
    m = mixture(["arith", "temporal"], 20, seed=0)
    assert sorted(p.family for p in m) == ["arith"] * 20 + ["temporal"] * 20


def test_bad_names_raise():
    with pytest.raises(QuantLRMError, match="family"):
        generate("chess", 3)
    with pytest.raises(QuantLRMError, match="split"):
        generate("arith", 3, split="dev")


# ----------------------------------------------------------------- trainer


def test_sft_batch_masks_prompt_and_padding():
    tok = byte_tokenizer()
    from quantlrm.demo.train import encode_pairs

    ex = encode_pairs(tok, [("ab", "cd"), ("abcd", "e")], max_len=32)
    assert ex[0] == ([97, 98, 99, 100, tok.eos_token_id], 2)
    b = make_batch(ex, [0, 1], tok.pad_token_id, completion_only=True)
    assert b["input_ids"].shape == (2, 6)
    assert b["labels"][0].tolist() == [-100, -100, 99, 100, tok.eos_token_id, -100]
    assert b["labels"][1].tolist() == [-100] * 4 + [101, tok.eos_token_id]
    assert b["attention_mask"][0].tolist() == [1] * 5 + [0]
    full = make_batch(ex, [0], tok.pad_token_id, completion_only=False)
    assert full["labels"][0].tolist() == [97, 98, 99, 100, tok.eos_token_id]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # cosine midpoint: (1 + 0.1) / 2
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_training_lowers_loss_and_is_deterministic():
    tok = byte_tokenizer()
    pairs = [(p.prompt, p.cot) for p in generate("arith", 64, seed=0)]
    cfg = TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup=5, completion_only=True)
    runs = []
    for _ in range(2):
        model = build_model(tiny_config("llama"), seed=0)
        r = train(model, tok, pairs, cfg, progress=False)
        runs.append((r.losses, model.model.layers[0].mlp.up_proj.weight.clone()))
    (l1, w1), (l2, w2) = runs
    assert l1[-1] < 0.75 * l1[0]  # windows of 25 steps: first mean vs last 5 steps
    assert l1 == l2 and torch.equal(w1, w2)


# ----------------------------------------------------------------- the demo itself


def test_demo_fast_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "quantlrm.cli", "demo", "--fast", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("table.md", "table.json", "results.json", "accuracy.png", "dw_hist.png"):
        assert (out / f).stat().st_size > 0, f
    table = json.loads((out / "table.json").read_text())
    rows = [(row["Bits"], row["Method"]) for row in table["rows"]]
    for bits in ("W3", "W4"):
        for m in ("RTN", "AWQ", "QuantLRM"):
            assert (bits, m) in rows
    assert ("W16", "16-bit") in rows
    res = json.loads((out / "results.json").read_text())
    full = next(row for row in res["rows"] if row["key"] == "16-bit")
    for t in res["tasks"]:  # clearly competent: far above guessing on every task
        assert full["acc"][t["name"]] >= t["chance"] + 0.15, (t, full)
    assert full["avg"] >= 0.5
    assert 0 < res["zero"]["zero_fraction"] < 1
    assert "QuantLRM" in (out / "table.md").read_text()
    assert "Spearman correlation of QuantLRM's channel importance" in (out / "table.md").read_text()
    search = {row["key"]: row.get("search") for row in res["rows"]}
    assert search["rtn-w3"] is None and search["awq-w3"]["rank_corr_act"] is None
    assert search["quantlrm-w3"]["groups"] > 0 and -1 <= search["quantlrm-w3"]["rank_corr_act"] <= 1
    assert "16-bit" in r.stdout and "zero fraction" in r.stdout
    # the paired tests read every completion back from OUT/eval: their net difference must be
    # the gap between the two rows' averages (equal question counts per task)
    avg = {row["key"]: row["avg"] for row in res["rows"]}
    assert {(p["bits"], p["baseline"]) for p in res["paired"]} == {(b, m) for b in (3, 4) for m in ("rtn", "awq")}
    for p in res["paired"]:
        assert p["n"] == sum(t["n"] for t in res["tasks"])
        gap = 100 * (avg[f"quantlrm-w{p['bits']}"] - avg[f"{p['baseline']}-w{p['bits']}"])
        assert p["diff_points"] == pytest.approx(gap, abs=1e-6) and 0 < p["p"] <= 1
    assert "W3 QuantLRM vs RTN" in r.stdout and "McNemar" in (out / "table.md").read_text()

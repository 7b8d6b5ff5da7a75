"""Helpers of the GPU benchmark zoo (benchmarks/zoo_train.py), checked on tiny CPU models."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import zoo_train as zt  # noqa: E402

from quantlrm.demo.tasks import FAMILIES, generate  # noqa: E402
from quantlrm.eval import grade  # noqa: E402
from quantlrm.models import build_model, byte_tokenizer, tiny_config  # noqa: E402


def test_corrupted_trace_is_graded_wrong_and_reference_right():
    rng = random.Random(0)
    for fam in FAMILIES:
        for p in generate(fam, 20, seed=3, split="train", level=2):
            grader = FAMILIES[fam].grader
            assert grade(grader, p.cot, p.answer)
            bad = zt.corrupt(p, rng)
            assert not grade(grader, bad, p.answer), (fam, p.cot, bad)
            # Only the final answer changes: the reasoning before </think> is kept.
            assert bad.rpartition("</think>")[0] == p.cot.rpartition("</think>")[0]


def test_zero_update_fraction_matches_direct_count(tmp_path):
    tok = byte_tokenizer()
    model = build_model(tiny_config("llama"), seed=0)
    zt.save_bf16(model, tok, tmp_path / "a")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # updates of mixed sizes: some below half a bf16 ulp
            p.add_(torch.randn(p.shape, generator=g) * 10 ** torch.empty(p.shape).uniform_(-6, -2, generator=g))
    zt.save_bf16(model, tok, tmp_path / "b")
    got = zt.zero_update_fraction(tmp_path / "a", tmp_path / "b")
    a = {k: v.to(torch.bfloat16) for k, v in build_model(tiny_config("llama"), seed=0).state_dict().items()}
    b = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    lin = [k for k in b if k.endswith("_proj.weight") and ".layers." in k]
    want = sum(int((a[k] == b[k]).sum()) for k in lin) / sum(b[k].numel() for k in lin)
    assert abs(got["linear_zero_fraction"] - want) < 1e-12
    assert 0.0 < want < 1.0


def test_sequence_logprobs_against_a_loop():
    tok = byte_tokenizer()
    model = build_model(tiny_config("llama"), seed=0)
    examples = [(list(range(5, 17)), 4), (list(range(40, 49)), 6)]
    batch = zt.make_batch(examples, [0, 1], tok.pad_token_id, True)
    with torch.no_grad():
        got, n_tok = zt._seq_logps(model, batch)
        for r, (ids, n_prompt) in enumerate(examples):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            want = sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))
            assert abs(got[r].item() - want.item()) < 1e-4
            assert n_tok[r].item() == len(ids) - n_prompt


def test_schedule_warms_up_then_decays_over_the_step_budget():
    st = zt.Stage(steps=100, seconds=1e9, lr=1.0, warmup=10, min_lr_ratio=0.1)
    sch = zt._Schedule(st, "cpu")
    assert abs(sch.lr(0) - 0.1) < 1e-9 and abs(sch.lr(9) - 1.0) < 1e-9
    lrs = [sch.lr(s) for s in range(10, 101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:], strict=False))
    assert abs(sch.lr(100) - 0.1) < 1e-9
    assert not sch.done(98) and sch.done(99)

"""The zoo's RL stage (benchmarks/zoo_train.py: rollout + GRPO-style update) on a tiny CPU model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import zoo_train as zt  # noqa: E402

from quantlrm.demo.tasks import generate  # noqa: E402
from quantlrm.models import build_model, byte_tokenizer, tiny_config  # noqa: E402


def _setup():
    tok = byte_tokenizer()
    model = build_model(tiny_config("llama"), seed=0, dtype=torch.float32)
    probs = generate("arith", 8, seed=1, split="train", level=1)
    return tok, model, probs


def test_rollout_layout_and_rewards():
    tok, model, probs = _setup()
    seen = []

    def reward(p, text):
        seen.append(text)
        return float(len(text) % 2)

    ex, rewards, texts = zt.rollout(model, tok, probs[:3], k=4, temperature=1.0, max_new_tokens=6,
                                    device="cpu", seed=0, reward_fn=reward)
    assert len(ex) == len(rewards) == len(texts) == 12
    assert texts == seen and rewards == [float(len(t) % 2) for t in texts]
    for i, (ids, n_prompt) in enumerate(ex):
        prompt = tok(probs[i // 4].prompt, add_special_tokens=False)["input_ids"]
        assert ids[:n_prompt] == prompt  # the SFT layout: bare prompt, no BOS, no padding
        comp = ids[n_prompt:]
        assert 1 <= len(comp) <= 7
        if tok.eos_token_id in comp:  # generation stops at EOS, which is kept as the last label
            assert comp.index(tok.eos_token_id) == len(comp) - 1
        else:
            assert len(comp) == 6


def test_rl_raises_reward_and_skips_uninformative_groups():
    tok, model, probs = _setup()
    target = set(range(0, 60))

    def reward(p, text):  # a learnable verifiable reward: the first byte is one of 60 of 260 ids
        b = text.encode("utf-8", "replace")[:1]
        return float(bool(b) and b[0] in target)

    cfg = zt.RLConfig(seconds=120, lr=3e-3, prompts_per_rollout=8, k=8, updates=2, max_new_tokens=2,
                      warmup=1, max_rollouts=12)
    log = zt.rl(model, tok, probs, cfg, "cpu", seed=0, reward_fn=reward)
    r = log.extra["reward_means"]
    assert log.extra["rollouts"] == 12 and log.steps > 0
    assert abs(r[0] - log.extra["reward_mean_first"]) < 1e-3 and abs(r[-1] - log.extra["reward_mean_last"]) < 1e-3
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.15, r

    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = zt.rl(model, tok, probs, zt.RLConfig(seconds=60, max_new_tokens=2, prompts_per_rollout=4, k=4,
                                               max_rollouts=2), "cpu", seed=1, reward_fn=lambda p, t: 1.0)
    assert log.steps == 0 and log.extra["groups_kept"] == [0, 0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

"""The benchmark zoo: small reasoning models trained in stages, then quantized every way.

For each zoo model, in one seeded run (GPU, or CPU at toy sizes):

1. train: pre-training (pydoc text + task text) -> SFT on reasoning traces -> DPO -> RL with a
   verifiable reward (GRPO-style), each stage saved in bf16 (`benchmarks/zoo_train.py`), so the
   zoo has SFT->DPO and DPO->RL fine-tuning pairs like Olmo-3-Think;
2. signals of the DPO->RL pair (`quantlrm.signals`); exact-zero update fractions of both pairs;
3. the SFT, DPO and RL models at 16 bits, then the RL model quantized at each setting (W3 g128
   and W4 g128 with every method; harder settings such as W3 per-channel and W2 g128 with the
   main ones) by RTN, AWQ and QuantLRM (ours, `quantlrm.pipeline`) and llm-compressor GPTQ and
   AWQ (`benchmarks/llmc_baseline.py`, when llmcompressor is importable), at W3 g128 and W2 g128
   also our pipeline with GPTQ rounding (QuantLRM's scales, and plain GPTQ), then QuantLRM options;
4. optional extras on one model: the pseudo-fine-tuning curve (`quantlrm.finetune`, Figure 3)
   and the protection table (`quantlrm.protect`, 5%) over all signals.

Every row is graded on the held-out synthetic test sets of `quantlrm.demo.tasks` with the eval
harness's graders (aime, folio, temporal, gpqa), greedy, one batch; per-question outcomes are
kept so that W3 QuantLRM is compared with every baseline by an exact McNemar test
(`benchmarks/zoo_stats.py`). Results go to OUT/<model>.json after every row (a killed run
keeps what it measured), and OUT/zoo.md + OUT/zoo.png at the end. Every model runs in its own
child process (several share one GPU); every row checks the deadline and skips what cannot end
in time; the parent kills late children and always writes the report.

    python benchmarks/zoo.py --out OUT --models llama-30m,qwen3-60m --budget 535   # GPU
    python benchmarks/zoo.py --out /tmp/zoo --toy --budget 300 --device cpu         # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine of this benchmark reaches the hub
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # its INFO lines would bury the results

import torch  # noqa: E402

from quantlrm.demo.tasks import FAMILIES, generate  # noqa: E402

# Paper column order: AIME-120 / FOLIO / Temporal / GPQA-Diamond.
FAMILY_ORDER = ("arith", "logic", "temporal", "science")

# Widths are multiples of 128 so W3/W4 use group 128 on every linear (o_proj's input too).
MODELS: dict[str, dict] = {
    "llama-30m": dict(model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, seed=11),
    "qwen3-60m": dict(model_type="qwen3", hidden_size=640, intermediate_size=1792, num_hidden_layers=12,
                      num_attention_heads=10, num_key_value_heads=2, head_dim=64, seed=12),
    "llama-120m": dict(model_type="llama", hidden_size=768, intermediate_size=2560, num_hidden_layers=16,
                       num_attention_heads=12, num_key_value_heads=4, seed=13),
    # CPU sizes: a learning check (cpu-llama) and smoke tests (toy-*).
    "cpu-llama": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, seed=3),
    "toy-llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, seed=1),
    "toy-qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, seed=2),
}

# key -> (label, kind, options). kind "ours": QuantizeOptions fields; "llmc": llm-compressor.
# "signals": "prev" uses the SFT->DPO pair's signals instead of the quantized pair's (DPO->RL).
METHODS: dict[str, tuple[str, str, dict]] = {
    "rtn": ("RTN", "ours", dict(method="rtn")),
    "awq": ("AWQ (ours)", "ours", dict(method="awq")),
    "quantlrm": ("QuantLRM", "ours", dict(method="quantlrm")),
    "gptq-llmc": ("GPTQ (llm-compressor)", "llmc", dict(method="gptq")),
    "awq-llmc": ("AWQ (llm-compressor)", "llmc", dict(method="awq")),
    "quantlrm-mean": ("QuantLRM (group mean)", "ours", dict(method="quantlrm", group_importance="mean")),
    "quantlrm-act": ("QuantLRM (act factor)", "ours", dict(method="quantlrm", act_factor=True)),
    "quantlrm-prev": ("QuantLRM (SFT->DPO signals)", "ours", dict(method="quantlrm", signals="prev")),
    # QuantLRM's scales, then GPTQ's error-compensated rounding instead of round-to-nearest
    "quantlrm-gptq": ("QuantLRM + GPTQ rounding", "ours", dict(method="quantlrm", rounding="gptq",
                                                                gptq_act_order=False)),
    "gptq-ours": ("GPTQ (ours: RTN scales + GPTQ rounding)", "ours", dict(method="rtn", rounding="gptq",
                                                                          gptq_act_order=False)),
    "quantlrm-gptq-ao": ("QuantLRM + GPTQ rounding (act-order)", "ours",
                         dict(method="quantlrm", rounding="gptq", gptq_act_order=True)),
    "gptq-ours-ao": ("GPTQ (ours, act-order)", "ours", dict(method="rtn", rounding="gptq", gptq_act_order=True)),
}
BASELINES = ["RTN", "AWQ (ours)", "GPTQ (llm-compressor)", "AWQ (llm-compressor)"]
# Further paired comparisons in the report: (method, its baselines), when both rows exist.
EXTRA_COMPARISONS = [("QuantLRM + GPTQ rounding", ["QuantLRM", "GPTQ (llm-compressor)",
                                                   "GPTQ (ours: RTN scales + GPTQ rounding)"]),
                     ("QuantLRM + GPTQ rounding (act-order)", ["QuantLRM + GPTQ rounding", "GPTQ (llm-compressor)",
                                                               "GPTQ (ours, act-order)"])]

# First-guess seconds per decoder layer of a quantization call, before one was measured
# (run 2, llama-30m with 8 layers on an H100: ours 1-2 s, llm-compressor GPTQ 9.6 s, AWQ 36.5 s;
# rounded up), and of one evaluation of all test questions (run 2: 2-5 s per 1000).
# "ours-gptq" (our pipeline with GPTQ rounding) is not measured yet: a guess of twice "ours".
DEFAULT_PER_LAYER = {"ours": 0.4, "ours-gptq": 0.8, "gptq": 1.5, "awq": 5.0, "protect": 0.4}
DEFAULT_EVAL_S = 8.0


def parse_setting(s: str) -> tuple[int, int]:
    """'w3g128' -> (3, 128); 'w3pc' (per output channel) -> (3, -1)."""
    s = s.strip().lower()
    try:
        if s.endswith("pc"):
            return int(s[1:-2]), -1
        b, g = s[1:].split("g")
        return int(b), int(g)
    except ValueError:
        raise SystemExit(f"bad setting {s!r}: use e.g. w3g128 or w3pc (per-channel)") from None


def setting_label(s: str) -> str:
    b, g = parse_setting(s)
    return f"W{b} per-channel" if g == -1 else f"W{b} g{g}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {os.environ.get('ZOO_TAG', 'zoo')}: {msg}", flush=True)


RESUME_FILE = "zoo-state.json"  # in --work/<model>/: the run's results and training fingerprint


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class Clock:
    """Deadline bookkeeping: each step asks whether its estimated cost still fits."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, cost: float) -> bool:
        return self.left() > cost


# ------------------------------------------------------------------ evaluation


def test_sets(n: int, seed: int, level: int) -> list:
    return [p for f in FAMILY_ORDER for p in generate(f, n, seed + 1000, "test", level)]


def evaluate_model(model_or_dir, tests: list, device: str, max_new_tokens: int, tokenizer=None,
                   batch_size: int | None = None) -> dict:
    """Accuracy per family with the eval harness's backend and graders, all tasks in one batch;
    `correct[family]` is the '0'/'1' outcome of every question, in the test set's order."""
    from quantlrm.eval import GenerationConfig, grade, load_model
    from quantlrm.eval.backends import TransformersBackend

    t0 = time.time()
    if isinstance(model_or_dir, (str, Path)):
        model, tok = load_model(model_or_dir, device=device,
                                dtype="bfloat16" if device.startswith("cuda") else "float32")
    else:
        model, tok = model_or_dir, tokenizer
    be = TransformersBackend(model, tok, progress=False)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, greedy=True, think_suffix="",
                           batch_size=batch_size or len(tests))
    gens = be.generate([p.prompt for p in tests], cfg)
    marks: dict[str, list[str]] = {f: [] for f in FAMILY_ORDER}
    for p, g in zip(tests, gens, strict=True):
        marks[p.family].append("1" if grade(FAMILIES[p.family].grader, g.text, p.answer) else "0")
    acc = {f: marks[f].count("1") / max(len(marks[f]), 1) for f in FAMILY_ORDER}
    example = next((g.text for p, g in zip(tests, gens, strict=True) if p.family == "arith"), "")
    return {"acc": acc, "avg": sum(acc.values()) / len(acc), "n_per_task": len(marks["arith"]),
            "eval_s": round(time.time() - t0, 1), "example": example[:200],
            "correct": {f: "".join(m) for f, m in marks.items()}}


# ------------------------------------------------------------------ one model


class ModelRun:
    def __init__(self, name: str, args, clock: Clock):
        self.name, self.args, self.clock = name, args, clock
        self.spec = dict(MODELS[name])
        self.work = Path(args.work) / name
        self.res_path = Path(args.out) / f"{name}.json"
        self.device = args.device
        self.est: dict[str, float] = {}
        self.sig_dirs: dict[tuple[str, str], Path | None] = {}
        self.res: dict = {"model": name, "spec": self.spec, "device": _device_name(self.device),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "settings": {k: v for k, v in vars(args).items() if k not in ("models",)},
                          "task_order": list(FAMILY_ORDER), "stages": [], "rows": [], "errors": [],
                          "skipped": []}

    def save(self) -> None:
        write_json(self.res_path, self.res)
        if self.work.is_dir():  # a copy beside the checkpoints, for --resume
            write_json(self.work / RESUME_FILE, {"fingerprint": self.fingerprint(), "res": self.res,
                                                  "final": getattr(self, "final", None),
                                                  "base": getattr(self, "base", None)})

    def fingerprint(self) -> dict:
        """What the trained models and the test sets depend on; --resume reuses only a match."""
        keys = ("train_seconds", "stage_shares", "pt_steps", "sft_steps", "dpo_steps", "dpo_lr", "rl_seconds_share",
                "rl_lr", "rl_k", "rl_prompts", "rl_updates", "rl_kl", "rl_reward", "batch", "pt_batch", "seqlen",
                "level", "train_per_task", "test_per_task", "dpo_prompts", "max_new_tokens", "toy")
        return {"spec": self.spec, **{k: _jsonable(getattr(self.args, k, None)) for k in keys}}

    def resume(self) -> bool:
        """Reuse this model's trained stages and finished rows from an earlier run with the same
        training settings (its checkpoints still in --work); False if there is none."""
        try:
            saved = json.loads((self.work / RESUME_FILE).read_text())
        except (OSError, ValueError):
            return False
        if saved.get("fingerprint") != self.fingerprint() or not saved.get("final"):
            log(f"{self.name}: the saved run was trained with other settings; training again")
            return False
        self.final, self.base = saved["final"], saved["base"]
        self.dirs = {st: self.work / st for st in ("pt", "sft", "dpo", "rl")}
        if not all((self.dirs[st] / "config.json").is_file() for st in {self.final, self.base}):
            return False
        a, seed = self.args, self.spec["seed"]
        self.train_problems = [p for f in FAMILY_ORDER for p in generate(f, a.train_per_task, seed, "train", a.level)]
        self.tests = test_sets(a.test_per_task, seed, a.level)
        prev = saved["res"]
        self.res.update({k: v for k, v in prev.items() if k not in ("date", "settings", "skipped", "finished")})
        self.res["rows"] = [r for r in prev.get("rows", []) if "error" not in r]
        self.res["errors"] = [e for e in prev.get("errors", []) if e.startswith("rl:")]  # rows are retried
        self.res.setdefault("resumed", []).append(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        log(f"{self.name}: resumed: trained stages and {len(self.res['rows'])} finished rows reused")
        self.save()
        return True

    def done(self, label: str, setting: str | None) -> bool:
        return any(r["method"] == label and r.get("setting") == setting and "avg" in r for r in self.res["rows"])

    def size_factor(self) -> float:
        return max(1.0, self.res.get("params_m", 25.0) / 25.0)

    def guess(self, key: str) -> float:
        """Measured seconds of the last such row (quantize + eval), else a first guess."""
        if key in self.est:
            return self.est[key]
        if key == "eval":
            return DEFAULT_EVAL_S * self.spec["num_hidden_layers"] / 8
        return DEFAULT_PER_LAYER.get(key, 3.0) * self.spec["num_hidden_layers"] + self.guess("eval")

    # -------------------------------------------------------------- training

    def train(self) -> None:
        import zoo_train as zt

        shutil.rmtree(self.work, ignore_errors=True)  # scratch: a previous run's checkpoints are stale
        from transformers import AutoConfig, AutoModelForCausalLM

        from quantlrm.models import byte_tokenizer

        a, spec = self.args, dict(self.spec)
        seed = spec.pop("seed")
        mtype = spec.pop("model_type")
        cfg = AutoConfig.for_model(mtype, vocab_size=260, max_position_embeddings=512, tie_word_embeddings=False,
                                   pad_token_id=256, bos_token_id=257, eos_token_id=258, **spec)
        tok = byte_tokenizer()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
        n_params = sum(p.numel() for p in model.parameters())
        self.res["params_m"] = round(n_params / 1e6, 1)
        log(f"{n_params / 1e6:.1f}M parameters; making data")
        t0 = time.time()
        train = [p for f in FAMILY_ORDER for p in generate(f, a.train_per_task, seed, "train", a.level)]
        self.tests = test_sets(a.test_per_task, seed, a.level)
        docs = zt.general_text() + [p.text for p in train]
        blocks = zt.pack_blocks(tok, docs, a.seqlen, seed)
        self.res["data"] = {"train_problems": len(train), "test_problems": len(self.tests), "level": a.level,
                            "pretrain_tokens_available": blocks.numel(), "seconds": round(time.time() - t0, 1)}
        # The training share: what was asked, but never more than leaves min_eval_seconds.
        T = max(min(a.train_seconds, self.clock.left() - a.min_eval_seconds), 0.2 * a.train_seconds)
        fr = dict(zip(("pt", "sft", "dpo", "rl"), a.stage_shares, strict=True))
        self.res["train_seconds_used"] = round(T, 1)
        self.dirs = {s: self.work / s for s in ("pt", "sft", "dpo", "rl")}

        st_pt = zt.Stage(steps=a.pt_steps, seconds=fr["pt"] * T, lr=1.5e-3, batch_size=a.pt_batch, warmup=100,
                         weight_decay=0.1)
        lg = zt.pretrain(model, tok, blocks, st_pt, self.device, seed)
        self.res["stages"].append(lg.as_dict())
        log(f"pretrain {lg.steps} steps {lg.seconds:.0f}s loss {lg.losses[0]:.3f}->{lg.losses[-1]:.3f}")
        zt.save_bf16(model, tok, self.dirs["pt"])
        del model

        model = zt.load_fp32(self.dirs["pt"], self.device)
        st_sft = zt.Stage(steps=a.sft_steps, seconds=fr["sft"] * T, lr=5e-4, batch_size=a.batch, warmup=50,
                          weight_decay=0.01)
        lg = zt.sft(model, tok, train, st_sft, self.device, seed + 1)
        self.res["stages"].append(lg.as_dict())
        log(f"sft {lg.steps} steps {lg.seconds:.0f}s loss {lg.losses[0]:.3f}->{lg.losses[-1]:.3f}")
        zt.save_bf16(model, tok, self.dirs["sft"])
        del model

        t_dpo = time.time()
        ref = zt.load_fp32(self.dirs["sft"], self.device).eval()
        g = torch.Generator().manual_seed(seed + 2)
        idx = torch.randperm(len(train), generator=g)[: a.dpo_prompts].tolist()
        dpo_probs = [train[i] for i in idx]
        rejected, info = zt.sample_rejected(ref, tok, dpo_probs, self.device, seed + 3, a.max_new_tokens,
                                            batch_size=min(len(dpo_probs), 1024))
        info["sampling_s"] = round(time.time() - t_dpo, 1)
        policy = zt.load_fp32(self.dirs["sft"], self.device)
        # The DPO share includes the sampling of the rejected completions.
        st_dpo = zt.Stage(steps=a.dpo_steps, seconds=max(fr["dpo"] * T - (time.time() - t_dpo), 0.3 * fr["dpo"] * T),
                          lr=a.dpo_lr, batch_size=max(a.batch // 2, 4), warmup=10, min_lr_ratio=0.1, beta=0.1,
                          nll_weight=0.2)
        lg = zt.dpo(policy, ref, tok, dpo_probs, rejected, st_dpo, self.device, seed + 4)
        lg.extra.update(info)
        self.res["stages"].append(lg.as_dict())
        log(f"dpo {lg.steps} steps {lg.seconds:.0f}s loss {lg.losses[0]:.3f}->{lg.losses[-1]:.3f} {info}")
        zt.save_bf16(policy, tok, self.dirs["dpo"])
        del policy, ref
        self.res["zero_updates_sft_to_dpo"] = zt.zero_update_fraction(self.dirs["sft"], self.dirs["dpo"])
        log(f"zero updates SFT->DPO: {self.res['zero_updates_sft_to_dpo']}")
        self.save()

        self.final, self.base = "dpo", "sft"  # fallback if RL is off or fails
        if a.rl_seconds_share > 0 and fr["rl"] > 0:
            try:
                policy = zt.load_fp32(self.dirs["dpo"], self.device)
                ref = zt.load_fp32(self.dirs["dpo"], self.device).eval() if a.rl_kl > 0 else None
                rc = zt.RLConfig(seconds=fr["rl"] * T, lr=a.rl_lr, prompts_per_rollout=a.rl_prompts, k=a.rl_k,
                                 updates=a.rl_updates, kl_coef=a.rl_kl, max_new_tokens=a.max_new_tokens)
                rl_probs = [train[i] for i in torch.randperm(len(train), generator=g)[: 4096].tolist()]
                reward_fn = _smoke_reward if a.rl_reward == "ascii-start" else None
                lg = zt.rl(policy, tok, rl_probs, rc, self.device, seed + 5, ref_model=ref, reward_fn=reward_fn)
                lg.extra["reward"] = a.rl_reward
                self.res["stages"].append(lg.as_dict())
                log(f"rl {lg.steps} steps ({lg.extra['rollouts']} rollouts) {lg.seconds:.0f}s reward "
                    f"{lg.extra['reward_mean_first']} -> {lg.extra['reward_mean_last']}")
                zt.save_bf16(policy, tok, self.dirs["rl"])
                del policy, ref
                z = zt.zero_update_fraction(self.dirs["dpo"], self.dirs["rl"])
                self.res["zero_updates_dpo_to_rl"] = z
                log(f"zero updates DPO->RL: {z}")
                if z["linear_zero_fraction"] < 1.0:
                    self.final, self.base = "rl", "dpo"
                else:  # every group had equal rewards (e.g. a toy model that solves nothing)
                    self.res["errors"].append("rl: no weight changed (no group with mixed rewards); "
                                              "the DPO model is quantized, signals SFT->DPO")
                    log(self.res["errors"][-1])
            except Exception as e:  # noqa: BLE001  (the DPO model is still a result)
                self.res["errors"].append(f"rl: {type(e).__name__}: {e}"[:500])
                traceback.print_exc()
        self.res["quantized_model"] = self.final
        self.res["signal_pair"] = f"{self.base}->{self.final}"
        self.train_problems = train
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.save()

    # -------------------------------------------------------------- rows

    def add_row(self, label: str, setting: str | None, ev: dict | None, extra: dict | None = None,
                error: str | None = None) -> None:
        bits, g = parse_setting(setting) if setting else (16, None)
        row = {"method": label, "bits": bits, "group_size": g, "setting": setting, **(ev or {}), **(extra or {})}
        name = f"{label} {setting_label(setting) if setting else ''}".strip()
        if error:
            row["error"] = error
            self.res["errors"].append(f"{name}: {error}")
        self.res["rows"].append(row)
        self.save()
        if ev:
            log(f"{name:40s} avg {100 * ev['avg']:.1f}  " +
                " ".join(f"{f} {100 * ev['acc'][f]:.0f}" for f in FAMILY_ORDER) + f"  (eval {ev['eval_s']}s)")
        else:
            log(f"{name} FAILED: {error}")

    def evaluate(self, d) -> dict:
        t0 = time.time()
        ev = evaluate_model(d, self.tests, self.device, self.args.max_new_tokens,
                            batch_size=self.args.eval_batch or None)
        self.est["eval"] = time.time() - t0
        return ev

    def affordable(self, what: str, need: float, margin: float = 5) -> bool:
        """True if `need` seconds (plus a start margin) fit before the deadline; else the step
        is recorded as skipped."""
        if self.clock.fits(need + margin):
            return True
        self.res["skipped"].append(f"{what} (deadline)")
        log(f"skip {what}: {self.clock.left():.0f}s left, needs ~{need:.0f}s")
        self.save()
        return False

    def signals(self, base: str, tuned: str) -> Path:
        from quantlrm.signals import compute_signals, save_signals

        d = self.work / f"signals-{base}-{tuned}"
        if (d / "importance.safetensors").exists():
            return d  # finished by an earlier call (--resume)
        t0 = time.time()
        sig = compute_signals(self.dirs[base], self.dirs[tuned], variant="both-ends", device=self.device,
                              progress=False)
        save_signals(sig, d)
        st = {k: v for k, v in sig.stats.items() if k != "modules"}
        self.res.setdefault("signals", {})[f"{base}->{tuned}"] = {"seconds": round(time.time() - t0, 2),
                                                                  **_jsonable(st)}
        log(f"signals {base}->{tuned} in {time.time() - t0:.1f}s")
        self.save()
        return d

    def signal_dir(self, which: str) -> Path:
        """'main' = the quantized model's pair; 'prev' = the pair before it (SFT->DPO)."""
        pair = (self.base, self.final) if which == "main" else ("sft", "dpo")
        if pair not in self.sig_dirs:
            try:
                self.sig_dirs[pair] = self.signals(*pair)
            except Exception as e:  # noqa: BLE001
                self.res["errors"].append(f"signals {pair}: {type(e).__name__}: {e}"[:500])
                traceback.print_exc()
                self.sig_dirs[pair] = None
        d = self.sig_dirs[pair]
        if d is None:
            raise RuntimeError(f"no {which} signals")
        return d

    def quantize_ours(self, opts: dict, bits: int, group: int, out: Path, signals: Path | None = None) -> dict:
        from quantlrm.pipeline import QuantizeOptions, quantize_model

        fields = {f.name for f in dataclasses.fields(QuantizeOptions)}
        kw = dict(model=str(self.dirs[self.final]), out=str(out), bits=bits, group_size=group,
                  device=self.device, calib="builtin", calib_samples=self.args.calib_samples,
                  calib_seqlen=self.args.seqlen_calib)
        kw.update({k: v for k, v in opts.items() if k != "signals"})
        if kw.get("method") == "quantlrm":
            kw["signals"] = str(signals or self.signal_dir(opts.get("signals", "main")))
        unknown = sorted(set(kw) - fields)
        if unknown:
            raise RuntimeError(f"QuantizeOptions has no field(s) {unknown}")
        if "progress" in fields:
            kw["progress"] = False
        t0 = time.time()
        quantize_model(QuantizeOptions(**kw))
        return {"quant_s": round(time.time() - t0, 1), "search": search_diagnostics(out)}

    def quantize_llmc(self, method: str, bits: int, group: int, out: Path) -> dict:
        from llmc_baseline import llmc_quantize
        from transformers import AutoTokenizer

        from quantlrm.calib import load_calibration

        tok = AutoTokenizer.from_pretrained(self.dirs[self.final])
        calib = load_calibration(tok, "builtin", samples=self.args.calib_samples, seqlen=self.args.seqlen_calib)
        info = llmc_quantize(self.dirs[self.final], out, method, bits, group, calib.input_ids.tolist(), self.device)
        return {"quant_s": info["seconds"], "peak_gpu_gb": info["peak_gpu_gb"]}

    def run_method(self, key: str, setting: str) -> None:
        label, kind, opts = METHODS[key]
        est_key = opts["method"] if kind == "llmc" else "ours-gptq" if opts.get("rounding") == "gptq" else "ours"
        est = self.guess(est_key)
        bits, group = parse_setting(setting)
        if not self.affordable(f"{label} {setting_label(setting)}", est):
            return
        out = self.work / f"q-{key}-{setting}"
        t0 = time.time()
        try:
            if kind == "llmc":
                if not _llmc_available():
                    raise RuntimeError("llmcompressor is not importable here")
                extra = self.quantize_llmc(opts["method"], bits, group, out)
            else:
                extra = self.quantize_ours(opts, bits, group, out)
            ev = self.evaluate(out)
            self.add_row(label, setting, ev, extra)
        except Exception as e:  # noqa: BLE001  (one broken method must not lose the others)
            self.add_row(label, setting, None, error=f"{type(e).__name__}: {e}"[:500])
            traceback.print_exc()
        finally:
            shutil.rmtree(out, ignore_errors=True)
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        self.est[est_key] = time.time() - t0

    # -------------------------------------------------------------- extras

    def protect_table(self) -> None:
        from quantlrm.protect import SIGNALS, ProtectOptions, paper_label, protect_model

        rows = []
        self.res["protect"] = {"fraction": self.args.protect_fraction, "bits": 3, "group_size": self.args.protect_group,
                               "pair": f"{self.base}->{self.final}", "rows": rows}
        for signal in SIGNALS:
            need = self.guess("protect")
            if not self.affordable(f"protect {signal}", need):
                continue
            out = self.work / f"protect-{signal}"
            t0 = time.time()
            try:
                protect_model(ProtectOptions(
                    model=str(self.dirs[self.final]), out=str(out), signal=signal,
                    fraction=self.args.protect_fraction, bits=3, group_size=self.args.protect_group,
                    base=str(self.dirs[self.base]), device=self.device, calib="builtin",
                    calib_samples=self.args.calib_samples, calib_seqlen=self.args.seqlen_calib, progress=False))
                ev = self.evaluate(out)
                rows.append({"signal": signal, "label": paper_label(signal), **ev})
                log(f"protect {signal:20s} avg {100 * ev['avg']:.1f}")
            except Exception as e:  # noqa: BLE001
                rows.append({"signal": signal, "error": f"{type(e).__name__}: {e}"[:500]})
                traceback.print_exc()
            finally:
                shutil.rmtree(out, ignore_errors=True)
            self.est["protect"] = time.time() - t0
            self.save()

    def finetune_curve(self) -> None:
        from quantlrm.finetune import FinetuneOptions, finetune

        a = self.args
        steps = sorted(set(a.pft_snapshots))
        need = 0.15 * steps[-1] * self.size_factor() ** 0.5 + 2 * self.guess("ours")
        if not self.affordable("pseudo-fine-tuning curve", need):
            return
        data = self.work / "pseudo_sft.jsonl"
        probs = self.train_problems[-a.pft_examples:]
        data.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.cot}) + "\n" for p in probs))
        out = self.work / "pseudo-ft"
        curve = {"steps": [], "avg": [], "acc": [], "correct": [], "snapshots": steps, "lr": a.pft_lr,
                 "model": self.final, "setting": "w3g128"}
        self.res["finetune_curve"] = curve
        t0 = time.time()
        try:
            finetune(FinetuneOptions(model=str(self.dirs[self.final]), data=str(data), out=str(out),
                                     steps=steps[-1], snapshot_steps=steps, lr=a.pft_lr, batch_size=16, grad_accum=1,
                                     max_len=320, device=self.device, template="raw", seed=0, progress=False,
                                     save_state=False))
        except Exception as e:  # noqa: BLE001
            curve["error"] = f"finetune: {type(e).__name__}: {e}"[:500]
            traceback.print_exc()
            self.save()
            return
        curve["finetune_s"] = round(time.time() - t0, 1)
        log(f"pseudo-fine-tuning {steps[-1]} steps in {curve['finetune_s']}s")
        for k in steps:
            need = self.guess("ours")
            if not self.affordable(f"pseudo-ft step {k}", need):
                continue
            q = self.work / f"q-pft-{k}"
            t1 = time.time()
            try:
                self.quantize_ours(dict(method="quantlrm"), 3, 128, q, signals=out / f"step-{k}")
                ev = self.evaluate(q)
                curve["steps"].append(k)
                curve["avg"].append(ev["avg"])
                curve["acc"].append(ev["acc"])
                curve["correct"].append(ev["correct"])
                log(f"pseudo-ft step {k}: W3 QuantLRM avg {100 * ev['avg']:.1f}")
            except Exception as e:  # noqa: BLE001
                curve.setdefault("errors", []).append(f"step {k}: {type(e).__name__}: {e}"[:300])
                traceback.print_exc()
            finally:
                shutil.rmtree(q, ignore_errors=True)
            self.est["ours"] = time.time() - t1
            self.save()
        base = {r["method"]: 100 * r["avg"] for r in self.res["rows"] if r.get("setting") == "w3g128" and "avg" in r}
        lines = {k: base[k] for k in ("AWQ (ours)", "GPTQ (llm-compressor)", "RTN", "QuantLRM") if k in base}
        if len(curve["steps"]) >= 2:
            from quantlrm.plots import plot_snapshot_curve

            fig = plot_snapshot_curve(curve["steps"], [100 * x for x in curve["avg"]], lines,
                                      Path(a.out) / "zoo_fig3.png",
                                      title=f"W3 g128 QuantLRM, pseudo-fine-tuning signals ({self.name})")
            curve["trend"] = {"slope": fig["slope"], "intercept": fig["intercept"]}
        self.save()

    def extras(self) -> None:
        if self.args.pft_snapshots and len(self.res.get("finetune_curve", {}).get("steps", [])) < 2:
            self.finetune_curve()
        if self.args.protect_fraction > 0 and not any("avg" in r for r in self.res.get("protect", {}).get("rows", [])):
            self.protect_table()

    # -------------------------------------------------------------- all

    def plan(self) -> list[tuple[str, str] | str]:
        """(method key, setting) rows in priority order, with 'extras' where they belong."""
        a = self.args
        items: list[tuple[str, str] | str] = []
        blocks = ([(s, a.main_methods) for s in a.full_settings] + [(s, a.hard_methods) for s in a.hard_settings]
                  + [(s, a.option_methods) for s in a.option_settings])
        for s, keys in blocks:
            if s in a.gptq_settings:  # GPTQ-rounding rows right after the default QuantLRM row
                at = keys.index("quantlrm") + 1 if "quantlrm" in keys else len(keys)
                keys = keys[:at] + [k for k in a.gptq_methods if k not in keys] + keys[at:]
            items += [(k, s) for k in keys if f"{k}@{s}" not in a.skip and (k, s) not in items]
            if a.run_extras and a.extras_after == s and "extras" not in items:
                items.append("extras")
        if a.run_extras and "extras" not in items:
            items.append("extras")
        return items

    def run(self) -> None:
        if not (self.args.resume and self.resume()):
            self.train()
        for stage in ("sft", "dpo", "rl"):
            if stage == self.final:
                break
            if self.done(f"16-bit {stage.upper()}", None):
                continue
            if not self.affordable(f"16-bit {stage.upper()}", self.guess("eval"), margin=60):
                continue
            self.add_row(f"16-bit {stage.upper()}", None, self.evaluate(self.dirs[stage]), {"stage": stage})
        if not self.done("16-bit", None):
            self.add_row("16-bit", None, self.evaluate(self.dirs[self.final]), {"stage": self.final})
        for item in self.plan():
            if item == "extras":
                self.extras()
            elif not self.done(METHODS[item[0]][0], item[1]):
                self.run_method(*item)
        self.res["finished"] = time.strftime("%H:%M:%S")
        self.save()


def _smoke_reward(problem, text: str) -> float:
    """Smoke tests only (--toy): toy models solve nothing, so the graders' reward would be 0 for
    every sample and RL would take no step; this reward (the completion starts with an ASCII
    byte) lets the CPU run exercise the whole DPO->RL path."""
    return float(bool(text) and ord(text[0]) < 128)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    return x


def _llmc_available() -> bool:
    try:
        import llmcompressor  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


# ------------------------------------------------------------------ reports


def _label(f: str) -> str:
    return FAMILIES[f].label


def _zero(r: dict, key: str) -> str:
    z = r.get(key)
    return f"{100 * z['linear_zero_fraction']:.1f}%" if z else "n/a"


def _settings_in(rows: list[dict]) -> list[str | None]:
    return list(dict.fromkeys(x.get("setting") for x in rows))


def markdown(results: list[dict]) -> str:
    """Tables in the paper's layout (accuracy per task, average, % of 16-bit retained), per
    setting; then W3 QuantLRM against each baseline, paired on the same questions (McNemar)."""
    import zoo_stats

    out = []
    for r in results:
        order = tuple(r.get("task_order", FAMILY_ORDER))
        out.append(f"### {r['model']} ({r.get('params_m', '?')}M parameters, {r['spec']['model_type']})\n")
        stages = ", ".join(f"{s['name']} {s['steps']} steps ({s['seconds']}s, loss {s['loss_last']:.3f})"
                           for s in r.get("stages", []) if s.get("loss_last") is not None)
        out.append(f"Training: {stages}.")
        rl = next((s for s in r.get("stages", []) if s["name"] == "rl"), None)
        if rl:
            out.append(f"RL ({rl.get('reward', 'grade')} reward): {rl.get('rollouts')} rollouts of "
                       f"{rl.get('prompts_per_rollout')} prompts x "
                       f"{rl.get('k')} samples, {rl['steps']} updates, reward mean "
                       f"{rl.get('reward_mean_first')} -> {rl.get('reward_mean_last')}.")
        out.append(f"Exact-zero updates of linear weights (bf16): SFT->DPO {_zero(r, 'zero_updates_sft_to_dpo')}, "
                   f"DPO->RL {_zero(r, 'zero_updates_dpo_to_rl')}. Quantized model: "
                   f"{r.get('quantized_model', '?')}; QuantLRM signals from {r.get('signal_pair', '?')}.\n")
        rows = r.get("rows", [])
        ref = next((x["avg"] for x in rows if x["method"] == "16-bit" and "avg" in x), None)
        head = ["Method", "Setting"] + [_label(f) for f in order] + ["Avg", "% of 16-bit", "quantize s"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for s in _settings_in(rows):
            group = [x for x in rows if x.get("setting") == s]
            if s is None:  # the 16-bit stages in training order (a resumed run may add them late)
                group.sort(key=lambda x: {"16-bit SFT": 0, "16-bit DPO": 1}.get(x["method"], 2))
            best = max((y["avg"] for y in group if "avg" in y), default=None)
            for x in group:
                name = setting_label(s) if s else "16"
                if "avg" not in x:
                    cells = [x["method"], name] + ["-"] * len(order) + ["failed", "", ""]
                else:
                    avg = f"{100 * x['avg']:.2f}"
                    if s is not None and x["avg"] == best:
                        avg = f"**{avg}**"
                    label = x["method"]
                    if label == "16-bit":
                        label = f"16-bit {str(x.get('stage', '')).upper()} (the quantized model)"
                    cells = [label, name] + [f"{100 * x['acc'][f]:.1f}" for f in order]
                    cells += [avg, f"{100 * x['avg'] / ref:.1f}" if ref else "", str(x.get("quant_s", ""))]
                out.append("| " + " | ".join(cells) + " |")
        n = next((x.get("n_per_task") for x in rows if x.get("n_per_task")), None)
        out.append(f"\n{n} questions per task, {None if n is None else n * len(order)} per row.\n")
        for method, baselines in [("QuantLRM", BASELINES), *EXTRA_COMPARISONS]:
            cmp_ = zoo_stats.compare_rows(rows, order, method, baselines)
            if cmp_:
                out.append(f"{method} against each baseline at each setting, on the same questions (b = only "
                           f"{method} right, c = only the baseline right; exact two-sided McNemar p):\n")
                out.append(f"| Setting | Baseline | {method} avg | Baseline avg | Diff (points) | b | c | p |")
                out.append("|---|---|---|---|---|---|---|---|")
                for c in cmp_:
                    out.append(f"| {setting_label(c['setting'])} | {c['baseline']} | {c['method_avg']:.2f} | "
                               f"{c['baseline_avg']:.2f} | {c['diff_points']:+.2f} | {c['b']} | {c['c']} | "
                               f"{c['p']:.3g} |")
                out.append("")
        diag = [x for x in rows if x.get("search")]
        if diag:
            out.append("What the scale search did (all layers and scale groups; alpha = 0 is no scaling; "
                       "rank corr = Spearman correlation of QuantLRM's channel importance with AWQ's mean |x|):\n")
            out.append("| Method | Setting | groups | alpha = 0 | mean alpha | group loss change | rank corr |")
            out.append("|---|---|---|---|---|---|---|")
            for x in diag:
                d = x["search"]
                lc = "" if d.get("loss_change") is None else f"{100 * d['loss_change']:+.1f}%"
                rc = "" if d.get("rank_corr_act") is None else f"{d['rank_corr_act']:.2f}"
                out.append(f"| {x['method']} | {setting_label(x['setting'])} | {d['groups']} | "
                           f"{100 * d['alpha_zero']:.0f}% | {d['alpha_mean']:.2f} | {lc} | {rc} |")
            out.append("")
        if r.get("errors"):
            out.append("Failures: " + "; ".join(r["errors"]) + "\n")
        if r.get("skipped"):
            out.append("Skipped (deadline): " + ", ".join(r["skipped"]) + "\n")
        c = r.get("finetune_curve")
        if c and c.get("steps"):
            out.append(f"Pseudo-fine-tuning (W3 g128 QuantLRM of the {c.get('model', '?')} model with signals from "
                       f"SFT steps), {r['model']}: "
                       + ", ".join(f"step {k}: {100 * v:.1f}" for k, v in zip(c["steps"], c["avg"], strict=True))
                       + (f"; trend slope {c['trend']['slope']:.4f} points/step" if "trend" in c else "")  # fit on points
                       + "\n")
        elif c and c.get("error"):
            out.append(f"Pseudo-fine-tuning failed: {c['error']}\n")
        p = r.get("protect")
        if p and p.get("rows"):
            out.append(f"Protection table (W3 g{p.get('group_size', 128)} RTN, top {100 * p['fraction']:.0f}% input "
                       f"channels kept in 16 bits, signals from {p.get('pair', '?')}), {r['model']}:\n")
            head = ["Protection signal"] + [_label(f) for f in order] + ["Avg"]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            for x in p["rows"]:
                if "avg" in x:
                    out.append("| " + " | ".join([x["label"]] + [f"{100 * x['acc'][f]:.1f}" for f in order]
                                                 + [f"{100 * x['avg']:.2f}"]) + " |")
                else:
                    out.append(f"| {x['signal']} | failed: {x['error'][:80]} |")
            out.append("")
    return "\n".join(out) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        rows = [x for x in r.get("rows", []) if "avg" in x]
        ref = next((x["avg"] for x in rows if x["method"] == "16-bit"), None)
        settings = [s for s in _settings_in(rows) if s is not None]
        methods = list(dict.fromkeys(x["method"] for x in rows if x.get("setting") is not None))
        w = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            ys = [next((100 * x["avg"] for x in rows if x["method"] == m and x.get("setting") == s), 0)
                  for s in settings]
            ax.bar([j + i * w for j in range(len(settings))], ys, w, label=m)
        if ref is not None:
            ax.axhline(100 * ref, color="k", linestyle="--", label="16-bit")
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(settings))], [setting_label(s) for s in settings])
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(f"{r['model']} ({r.get('quantized_model', '?')} model, signals {r.get('signal_pair', '?')})")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def search_diagnostics(out: Path) -> dict | None:
    """`quantlrm.pipeline.search_summary` of the quantization written to `out` (None if absent)."""
    from quantlrm.pipeline import search_summary

    try:
        rep = json.loads((out / "quantlrm.json").read_text())
    except (OSError, ValueError):
        return None
    return search_summary(rep)


def report(out: Path, names: list[str]) -> None:
    results = []
    for n in names:
        path = out / f"{n}.json"
        if not path.is_file():
            log(f"no results for {n}: its run ended before its results were first saved (after the DPO "
                "stage); raise --budget or lower --train-seconds")
            continue
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            traceback.print_exc()
    if not results:
        return
    try:
        (out / "zoo.md").write_text(markdown(results))
        print((out / "zoo.md").read_text(), flush=True)
    except Exception:  # noqa: BLE001  (the JSON files are the results; the report is a view)
        traceback.print_exc()
    try:
        plot(results, out / "zoo.png")
    except Exception:  # noqa: BLE001
        traceback.print_exc()


# ------------------------------------------------------------------ main


def _keys(s: str) -> list[str]:
    keys = [x.strip() for x in s.split(",") if x.strip()]
    bad = [k for k in keys if k not in METHODS]
    if bad:
        raise SystemExit(f"unknown method key(s) {bad}; known: {', '.join(METHODS)}")
    return keys


def _settings(s: str) -> list[str]:
    out = [x.strip().lower() for x in s.split(",") if x.strip()]
    for x in out:
        parse_setting(x)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results folder (JSON, Markdown, PNG)")
    ap.add_argument("--work", default=None, help="checkpoints folder (default: OUT/../zoo-work)")
    ap.add_argument("--models", default="llama-30m,qwen3-60m")
    ap.add_argument("--toy", action="store_true", help="CPU smoke-test sizes and step counts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=535, help="seconds for the whole run, report included")
    ap.add_argument("--deadline", type=float, default=None, help="(internal) absolute end time of a child")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the trained models and finished rows left in --work by an earlier run with the "
                         "same training settings (on the GPU machine: a call made while it is still warm)")
    ap.add_argument("--serial", action="store_true", help="models one after the other, not in parallel")
    ap.add_argument("--train-seconds", type=float, default=170, help="all four training stages together")
    ap.add_argument("--stage-shares", type=float, nargs=4, default=[0.45, 0.2, 0.1, 0.25],
                    metavar=("PT", "SFT", "DPO", "RL"),
                    help="shares of --train-seconds per stage (the RL share was 0.18 until runs 7-8, where it "
                         "left two models one rollout of 4 updates at --train-seconds 140; run 6's 0.25 gave 3)")
    ap.add_argument("--min-eval-seconds", type=float, default=150,
                    help="training is shortened so that at least this much is left for the rows")
    ap.add_argument("--pt-steps", type=int, default=100000)
    ap.add_argument("--sft-steps", type=int, default=100000)
    ap.add_argument("--dpo-steps", type=int, default=100000)
    ap.add_argument("--dpo-lr", type=float, default=1e-5)
    ap.add_argument("--rl-seconds-share", type=float, default=1.0, help="0 turns the RL stage off")
    ap.add_argument("--rl-lr", type=float, default=1e-5)
    ap.add_argument("--rl-k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--rl-prompts", type=int, default=128, help="prompts per rollout (generation is latency-bound)")
    ap.add_argument("--rl-updates", type=int, default=4, help="optimizer steps per rollout (minibatches)")
    ap.add_argument("--rl-kl", type=float, default=0.0, help="k3 KL coefficient to the DPO model")
    ap.add_argument("--rl-reward", choices=("grade", "ascii-start"), default=None,
                    help="grade: the eval graders' 1/0 (default); ascii-start: smoke-test reward (--toy default)")
    ap.add_argument("--batch", type=int, default=64, help="SFT batch (DPO: half as many pairs)")
    ap.add_argument("--pt-batch", type=int, default=128, help="pre-training batch (packed blocks)")
    ap.add_argument("--seqlen", type=int, default=256, help="pre-training block length")
    ap.add_argument("--level", type=int, default=1, help="task difficulty (quantlrm.demo.tasks)")
    ap.add_argument("--train-per-task", type=int, default=20000)
    ap.add_argument("--test-per-task", type=int, default=500)
    ap.add_argument("--eval-batch", type=int, default=0,
                    help="questions generated at once (0: all; bound it for large --test-per-task, "
                         "the KV cache grows with it)")
    ap.add_argument("--dpo-prompts", type=int, default=2048)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--full-settings", default="w3g128,w4g128", help="settings where every main method runs")
    ap.add_argument("--main-methods", default="rtn,awq,quantlrm,gptq-llmc,awq-llmc")
    ap.add_argument("--hard-settings", default="w3pc,w2g128", help="harder settings (comma list, '' for none)")
    ap.add_argument("--hard-methods", default="rtn,awq,quantlrm,gptq-llmc")
    ap.add_argument("--gptq-settings", default="w3g128,w2g128",
                    help="settings that also get --gptq-methods, right after QuantLRM ('' for none)")
    ap.add_argument("--gptq-methods", default="quantlrm-gptq,gptq-ours,quantlrm-gptq-ao,gptq-ours-ao",
                    help="our pipeline with GPTQ rounding: QuantLRM scales, and plain (RTN scales)")
    ap.add_argument("--option-settings", default="w3g128")
    ap.add_argument("--option-methods", default="quantlrm-act,quantlrm-mean,quantlrm-prev")
    ap.add_argument("--skip", default="", help="comma list of key@setting rows to leave out, e.g. awq-llmc@w4g128")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen-calib", type=int, default=512)
    ap.add_argument("--extras", default="none", help="'first' model, 'all', or 'none': Fig. 3 + protect table")
    ap.add_argument("--extras-after", default="", help="run the extras right after this setting's rows "
                    "(default: last)")
    ap.add_argument("--protect-fraction", type=float, default=0.05)
    ap.add_argument("--protect-group", type=int, default=128)
    ap.add_argument("--pft-snapshots", type=int, nargs="*", default=[10, 25, 50, 100])
    ap.add_argument("--pft-lr", type=float, default=1e-5)
    ap.add_argument("--pft-examples", type=int, default=4000)
    a = ap.parse_args(argv)
    if a.toy:
        if a.models == "llama-30m,qwen3-60m":
            a.models = "toy-llama,toy-qwen3"
        a.train_seconds = min(a.train_seconds, 60)
        a.min_eval_seconds = min(a.min_eval_seconds, 60)
        a.pt_steps, a.sft_steps, a.dpo_steps = min(a.pt_steps, 40), min(a.sft_steps, 40), min(a.dpo_steps, 10)
        a.pt_batch = 8
        a.batch, a.seqlen, a.train_per_task, a.test_per_task, a.dpo_prompts = 8, 128, 200, 8, 32
        a.rl_prompts, a.rl_k = 4, 4
        a.calib_samples, a.seqlen_calib, a.max_new_tokens, a.pft_examples = 8, 128, 100, 64
        a.pft_snapshots = [2, 4]
        a.rl_reward = a.rl_reward or "ascii-start"
    a.rl_reward = a.rl_reward or "grade"
    if abs(sum(a.stage_shares) - 1) > 1e-6:
        raise SystemExit(f"--stage-shares must add up to 1, got {sum(a.stage_shares)}")
    a.full_settings, a.hard_settings = _settings(a.full_settings), _settings(a.hard_settings)
    a.option_settings, a.gptq_settings = _settings(a.option_settings), _settings(a.gptq_settings)
    a.main_methods, a.hard_methods = _keys(a.main_methods), _keys(a.hard_methods)
    a.option_methods, a.gptq_methods = _keys(a.option_methods), _keys(a.gptq_methods)
    a.skip = [x.strip().lower() for x in a.skip.split(",") if x.strip()]
    a.extras_after = a.extras_after.strip().lower() or None
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.work = a.work or str(out.parent / "zoo-work")
    names = [n for n in a.models.split(",") if n]
    for n in names:
        if n not in MODELS:
            sys.exit(f"unknown model {n!r}; known: {', '.join(MODELS)}")
    if a.deadline is not None:  # a child: one model (or several in series), results as JSON
        first = os.environ.get("ZOO_FIRST", "1") == "1"
        for i, n in enumerate(names):
            os.environ["ZOO_TAG"] = n
            b = argparse.Namespace(**vars(a))
            b.run_extras = a.extras == "all" or (a.extras == "first" and i == 0 and first)
            try:
                ModelRun(n, b, Clock(a.deadline - 5)).run()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        return
    # The parent: children do the work (one per model, or one for all with --serial); the
    # parent kills any child still running 10 s after the deadline and always writes the report.
    t_start = time.time()
    deadline = t_start + a.budget - 15
    groups = [names] if a.serial else [[n] for n in names]
    argv = list(sys.argv[1:] if argv is None else argv)
    procs = []
    for i, grp in enumerate(groups):
        env = dict(os.environ, ZOO_TAG=",".join(grp), ZOO_FIRST="1" if i == 0 else "0", TQDM_DISABLE="1",
                   OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // len(groups))))
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--models", ",".join(grp),
               "--deadline", str(deadline)]
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time() + 10, 1))
        except subprocess.TimeoutExpired:
            log(f"killing child {p.pid} (past the deadline)")
            os.killpg(p.pid, 9)
            p.wait()
    report(out, names)
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()

"""The benchmark zoo: small reasoning models trained in stages, then quantized every way.

For each zoo model, in one seeded run (GPU, or CPU at toy sizes):

1. train: pre-training (pydoc text + task text) -> SFT on reasoning traces -> DPO, each stage
   saved in bf16 (`benchmarks/zoo_train.py`), giving an SFT->DPO fine-tuning pair;
2. signals of the pair (`quantlrm.signals`), exact-zero update fraction reported;
3. the DPO model at 16 bits, and at W3/W4 (group 128) with RTN, AWQ and QuantLRM (ours,
   `quantlrm.pipeline`, default and main options) and llm-compressor AWQ and GPTQ
   (`benchmarks/llmc_baseline.py`, when llmcompressor is importable);
4. optional extras on the first model: the protection table (`quantlrm.protect`, 5%) over
   all signals, and the pseudo-fine-tuning curve (`quantlrm.finetune`, Figure 3).

Every quantized model is graded on the held-out synthetic test sets of `quantlrm.demo.tasks`
with the eval harness's graders (aime, folio, temporal, gpqa), greedy decoding, one batch.
Results go to OUT/<model>.json after every row (a killed run keeps what it measured), and
OUT/zoo.md + OUT/zoo.png at the end. Models run in parallel processes (one GPU is mostly
idle on models this small); every step checks a global deadline and skips what cannot end
in time.

    python benchmarks/zoo.py --out OUT --models llama-30m,qwen3-60m --budget 540   # GPU
    python benchmarks/zoo.py --out /tmp/zoo --toy --budget 600 --device cpu         # smoke test
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
    "llama-120m": dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                       num_attention_heads=12, num_key_value_heads=4, seed=13),
    # CPU sizes: a learning check (cpu-llama) and smoke tests (toy-*).
    "cpu-llama": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, seed=3),
    "toy-llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, seed=1),
    "toy-qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, seed=2),
}

# (label, kind, options). kind "ours": QuantizeOptions fields; "llmc": llm-compressor method.
# The order is the priority order under the deadline.
METHODS: list[tuple[str, str, dict]] = [
    ("RTN", "ours", dict(method="rtn")),
    ("AWQ", "ours", dict(method="awq")),
    ("QuantLRM", "ours", dict(method="quantlrm")),
    ("GPTQ (llm-compressor)", "llmc", dict(method="gptq")),
    ("AWQ (llm-compressor)", "llmc", dict(method="awq")),
    ("QuantLRM (group mean)", "ours", dict(method="quantlrm", group_importance="mean")),
    ("QuantLRM (act factor)", "ours", dict(method="quantlrm", act_factor=True)),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {os.environ.get('ZOO_TAG', 'zoo')}: {msg}", flush=True)


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


def evaluate_model(model_or_dir, tests: list, device: str, max_new_tokens: int, tokenizer=None) -> dict:
    """Accuracy per family with the eval harness's backend and graders, all tasks in one batch."""
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
                           batch_size=len(tests))
    gens = be.generate([p.prompt for p in tests], cfg)
    correct = {f: 0 for f in FAMILY_ORDER}
    total = {f: 0 for f in FAMILY_ORDER}
    for p, g in zip(tests, gens, strict=True):
        total[p.family] += 1
        correct[p.family] += bool(grade(FAMILIES[p.family].grader, g.text, p.answer))
    acc = {f: correct[f] / total[f] for f in FAMILY_ORDER}
    example = next((g.text for p, g in zip(tests, gens, strict=True) if p.family == "arith"), "")
    return {"acc": acc, "avg": sum(acc.values()) / len(acc), "n_per_task": total["arith"],
            "eval_s": round(time.time() - t0, 1), "example": example[:200]}


# ------------------------------------------------------------------ one model


class ModelRun:
    def __init__(self, name: str, args, clock: Clock):
        self.name, self.args, self.clock = name, args, clock
        self.spec = dict(MODELS[name])
        self.work = Path(args.work) / name
        self.res_path = Path(args.out) / f"{name}.json"
        self.device = args.device
        self.res: dict = {"model": name, "spec": self.spec, "device": _device_name(self.device),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "settings": {k: v for k, v in vars(args).items() if k not in ("models",)},
                          "stages": [], "rows": [], "errors": [], "skipped": []}

    def save(self) -> None:
        write_json(self.res_path, self.res)

    # -------------------------------------------------------------- training

    def train(self) -> None:
        import zoo_train as zt
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
        T = a.train_seconds
        st_pt = zt.Stage(steps=a.pt_steps, seconds=0.6 * T, lr=1.5e-3, batch_size=a.pt_batch, warmup=100,
                         weight_decay=0.1)
        lg = zt.pretrain(model, tok, blocks, st_pt, self.device, seed)
        self.res["stages"].append(lg.as_dict())
        log(f"pretrain {lg.steps} steps {lg.seconds:.0f}s loss {lg.losses[0]:.3f}->{lg.losses[-1]:.3f}")
        self.dirs = {s: self.work / s for s in ("pt", "sft", "dpo")}
        zt.save_bf16(model, tok, self.dirs["pt"])
        del model

        model = zt.load_fp32(self.dirs["pt"], self.device)
        st_sft = zt.Stage(steps=a.sft_steps, seconds=0.25 * T, lr=5e-4, batch_size=a.batch, warmup=50,
                          weight_decay=0.01)
        lg = zt.sft(model, tok, train, st_sft, self.device, seed + 1)
        self.res["stages"].append(lg.as_dict())
        log(f"sft {lg.steps} steps {lg.seconds:.0f}s loss {lg.losses[0]:.3f}->{lg.losses[-1]:.3f}")
        zt.save_bf16(model, tok, self.dirs["sft"])
        del model

        ref = zt.load_fp32(self.dirs["sft"], self.device).eval()
        g = torch.Generator().manual_seed(seed + 2)
        idx = torch.randperm(len(train), generator=g)[: a.dpo_prompts].tolist()
        dpo_probs = [train[i] for i in idx]
        t0 = time.time()
        rejected, info = zt.sample_rejected(ref, tok, dpo_probs, self.device, seed + 3, a.max_new_tokens,
                                            batch_size=min(len(dpo_probs), 1024))
        info["sampling_s"] = round(time.time() - t0, 1)
        policy = zt.load_fp32(self.dirs["sft"], self.device)
        st_dpo = zt.Stage(steps=a.dpo_steps, seconds=0.15 * T, lr=a.dpo_lr, batch_size=max(a.batch // 2, 4),
                          warmup=10, min_lr_ratio=0.1, beta=0.1, nll_weight=0.2)
        lg = zt.dpo(policy, ref, tok, dpo_probs, rejected, st_dpo, self.device, seed + 4)
        lg.extra.update(info)
        self.res["stages"].append(lg.as_dict())
        log(f"dpo {lg.steps} steps {lg.seconds:.0f}s loss {lg.losses[0]:.3f}->{lg.losses[-1]:.3f} {info}")
        zt.save_bf16(policy, tok, self.dirs["dpo"])
        del policy, ref
        self.res["zero_updates_sft_to_dpo"] = zt.zero_update_fraction(self.dirs["sft"], self.dirs["dpo"])
        log(f"zero updates SFT->DPO: {self.res['zero_updates_sft_to_dpo']}")
        self.train_problems = train
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.save()

    # -------------------------------------------------------------- rows

    def add_row(self, label: str, bits: int, ev: dict | None, extra: dict | None = None,
                error: str | None = None) -> None:
        row = {"method": label, "bits": bits, **(ev or {}), **(extra or {})}
        if error:
            row["error"] = error
            self.res["errors"].append(f"{label} W{bits}: {error}")
        self.res["rows"].append(row)
        self.save()
        if ev:
            log(f"{label:24s} W{bits:<2d} avg {100 * ev['avg']:.1f}  " +
                " ".join(f"{f} {100 * ev['acc'][f]:.0f}" for f in FAMILY_ORDER) + f"  (eval {ev['eval_s']}s)")
        else:
            log(f"{label} W{bits} FAILED: {error}")

    def evaluate(self, d) -> dict:
        return evaluate_model(d, self.tests, self.device, self.args.max_new_tokens)

    def signals(self) -> None:
        from quantlrm.signals import compute_signals, save_signals

        t0 = time.time()
        sig = compute_signals(self.dirs["sft"], self.dirs["dpo"], variant="both-ends", device=self.device,
                              progress=False)
        self.sig_dir = self.work / "signals"
        save_signals(sig, self.sig_dir)
        st = {k: v for k, v in sig.stats.items() if k != "modules"}
        self.res["signals"] = {"seconds": round(time.time() - t0, 2), **_jsonable(st)}
        log(f"signals in {time.time() - t0:.1f}s: {self.res['signals']}")
        self.save()

    def quantize_ours(self, label: str, opts: dict, bits: int, out: Path, signals: Path | None = None) -> dict:
        from quantlrm.pipeline import QuantizeOptions, quantize_model

        fields = {f.name for f in dataclasses.fields(QuantizeOptions)}
        kw = dict(model=str(self.dirs["dpo"]), out=str(out), bits=bits, group_size=self.args.group_size,
                  device=self.device, calib="builtin", calib_samples=self.args.calib_samples,
                  calib_seqlen=self.args.seqlen_calib)
        kw.update(opts)
        if kw.get("method") == "quantlrm":
            kw["signals"] = str(signals or self.sig_dir)
        for alias_from, alias_to in _OPTION_ALIASES.items():
            if alias_from in kw and alias_from not in fields and alias_to in fields:
                kw[alias_to] = kw.pop(alias_from)
        unknown = sorted(set(kw) - fields)
        if unknown:
            raise RuntimeError(f"QuantizeOptions has no field(s) {unknown}")
        if "progress" in fields:
            kw["progress"] = False
        t0 = time.time()
        quantize_model(QuantizeOptions(**kw))
        return {"quant_s": round(time.time() - t0, 1)}

    def quantize_llmc(self, method: str, bits: int, out: Path) -> dict:
        from llmc_baseline import llmc_quantize
        from transformers import AutoTokenizer

        from quantlrm.calib import load_calibration

        tok = AutoTokenizer.from_pretrained(self.dirs["dpo"])
        calib = load_calibration(tok, "builtin", samples=self.args.calib_samples, seqlen=self.args.seqlen_calib)
        info = llmc_quantize(self.dirs["dpo"], out, method, bits, self.args.group_size,
                             calib.input_ids.tolist(), self.device)
        return {"quant_s": info["seconds"], "peak_gpu_gb": info["peak_gpu_gb"]}

    def run_method(self, label: str, kind: str, opts: dict, bits: int) -> None:
        est = self.est.get(kind, 30.0)
        if not self.clock.fits(est + 5):
            self.res["skipped"].append(f"{label} W{bits} (deadline)")
            log(f"skip {label} W{bits}: {self.clock.left():.0f}s left, needs ~{est:.0f}s")
            self.save()
            return
        out = self.work / f"q-{label.replace(' ', '_').replace('(', '').replace(')', '')}-w{bits}"
        t0 = time.time()
        try:
            if kind == "llmc":
                if not _llmc_available():
                    raise RuntimeError("llmcompressor is not importable here")
                extra = self.quantize_llmc(opts["method"], bits, out)
            else:
                extra = self.quantize_ours(label, opts, bits, out)
            ev = self.evaluate(out)
            self.add_row(label, bits, ev, extra)
        except Exception as e:  # noqa: BLE001  (one broken method must not lose the others)
            self.add_row(label, bits, None, error=f"{type(e).__name__}: {e}"[:500])
            traceback.print_exc()
        finally:
            shutil.rmtree(out, ignore_errors=True)
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        self.est[kind] = max(self.est.get(kind, 0) * 0.5, time.time() - t0)

    # -------------------------------------------------------------- extras

    def protect_table(self) -> None:
        from quantlrm.protect import SIGNALS, ProtectOptions, paper_label, protect_model

        rows = []
        self.res["protect"] = {"fraction": self.args.protect_fraction, "bits": 3, "rows": rows}
        for signal in SIGNALS:
            if not self.clock.fits(self.est.get("protect", 20.0) + 5):
                self.res["skipped"].append(f"protect {signal} (deadline)")
                continue
            out = self.work / f"protect-{signal}"
            t0 = time.time()
            try:
                protect_model(ProtectOptions(
                    model=str(self.dirs["dpo"]), out=str(out), signal=signal, fraction=self.args.protect_fraction,
                    bits=3, group_size=self.args.group_size, base=str(self.dirs["sft"]), device=self.device, calib="builtin",
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
        data = self.work / "pseudo_sft.jsonl"
        probs = self.train_problems[-a.pft_examples:]
        data.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.cot}) + "\n" for p in probs))
        out = self.work / "pseudo-ft"
        steps = sorted(set(a.pft_snapshots))
        curve = {"steps": [], "avg": [], "acc": [], "snapshots": steps, "lr": a.pft_lr}
        self.res["finetune_curve"] = curve
        t0 = time.time()
        try:
            finetune(FinetuneOptions(model=str(self.dirs["dpo"]), data=str(data), out=str(out), steps=steps[-1],
                                     snapshot_steps=steps, lr=a.pft_lr, batch_size=16, grad_accum=1, max_len=320,
                                     device=self.device, template="raw", seed=0, progress=False))
        except Exception as e:  # noqa: BLE001
            curve["error"] = f"finetune: {type(e).__name__}: {e}"[:500]
            traceback.print_exc()
            self.save()
            return
        curve["finetune_s"] = round(time.time() - t0, 1)
        log(f"pseudo-fine-tuning {steps[-1]} steps in {curve['finetune_s']}s")
        for k in steps:
            if not self.clock.fits(self.est.get("ours", 20.0) + 5):
                self.res["skipped"].append(f"pseudo-ft step {k} (deadline)")
                continue
            q = self.work / f"q-pft-{k}"
            try:
                self.quantize_ours("QuantLRM", dict(method="quantlrm"), 3, q, signals=out / f"step-{k}")
                ev = self.evaluate(q)
                curve["steps"].append(k)
                curve["avg"].append(ev["avg"])
                curve["acc"].append(ev["acc"])
                log(f"pseudo-ft step {k}: W3 QuantLRM avg {100 * ev['avg']:.1f}")
            except Exception as e:  # noqa: BLE001
                curve.setdefault("errors", []).append(f"step {k}: {type(e).__name__}: {e}"[:300])
                traceback.print_exc()
            finally:
                shutil.rmtree(q, ignore_errors=True)
            self.save()
        base = {r["method"]: 100 * r["avg"] for r in self.res["rows"] if r.get("bits") == 3 and "avg" in r}
        lines = {k: base[k] for k in ("AWQ", "GPTQ (llm-compressor)", "RTN") if k in base}
        if len(curve["steps"]) >= 2:
            from quantlrm.plots import plot_snapshot_curve

            fig = plot_snapshot_curve(curve["steps"], [100 * x for x in curve["avg"]], lines,
                                      Path(a.out) / "zoo_fig3.png",
                                      title=f"W3 QuantLRM, pseudo-fine-tuning signals ({self.name})")
            curve["trend"] = {"slope": fig["slope"], "intercept": fig["intercept"]}
        self.save()

    # -------------------------------------------------------------- all

    def run(self) -> None:
        a = self.args
        self.est: dict[str, float] = {}
        self.train()
        ev = self.evaluate(self.dirs["sft"])
        self.res["sft_16bit"] = ev
        log(f"SFT model 16-bit avg {100 * ev['avg']:.1f} {ev['acc']}")
        self.add_row("16-bit", 16, self.evaluate(self.dirs["dpo"]))
        try:
            self.signals()
        except Exception as e:  # noqa: BLE001
            self.res["errors"].append(f"signals: {type(e).__name__}: {e}"[:500])
            traceback.print_exc()
            self.sig_dir = None
        for bits in a.bits:
            for label, kind, opts in METHODS:
                if a.methods is not None and label not in a.methods:
                    continue
                if bits != a.bits[0] and label in a.first_bits_only:
                    continue
                if opts.get("method") == "quantlrm" and self.sig_dir is None:
                    self.add_row(label, bits, None, error="no signals")
                    continue
                self.run_method(label, kind, opts, bits)
        if a.extras:
            if a.protect_fraction > 0 and self.sig_dir is not None:
                self.protect_table()
            if a.pft_snapshots:
                self.finetune_curve()
        self.res["finished"] = time.strftime("%H:%M:%S")
        self.save()


_OPTION_ALIASES: dict[str, str] = {}


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


def markdown(results: list[dict]) -> str:
    """Tables in the paper's layout: accuracy per task, average, % of 16-bit retained."""
    out = []
    for r in results:
        z = r.get("zero_updates_sft_to_dpo", {})
        out.append(f"### {r['model']} ({r.get('params_m', '?')}M parameters, {r['spec']['model_type']})\n")
        stages = ", ".join(f"{s['name']} {s['steps']} steps ({s['seconds']}s, loss {s['loss_last']:.3f})"
                           for s in r.get("stages", []) if s.get("loss_last") is not None)
        out.append(f"Training: {stages}. Exact-zero updates SFT->DPO (bf16): "
                   f"{100 * z.get('linear_zero_fraction', float('nan')):.1f}% of linear weights.")
        if "sft_16bit" in r:
            out.append(f" SFT model (16-bit) average: {100 * r['sft_16bit']['avg']:.1f}%.")
        out.append("\n")
        rows = r.get("rows", [])
        ref = next((x["avg"] for x in rows if x.get("bits") == 16 and "avg" in x), None)
        head = ["Method", "Bits"] + [_label(f) for f in FAMILY_ORDER] + ["Avg", "% of 16-bit", "quantize s"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for bits in sorted({x["bits"] for x in rows}, key=lambda b: (b != 16, b)):
            for x in (x for x in rows if x["bits"] == bits):
                if "avg" not in x:
                    cells = [x["method"], f"W{bits}"] + ["-"] * len(FAMILY_ORDER) + ["failed", "", ""]
                else:
                    best = max((y["avg"] for y in rows if y["bits"] == bits and "avg" in y), default=None)
                    avg = f"{100 * x['avg']:.2f}"
                    if bits != 16 and best is not None and x["avg"] == best:
                        avg = f"**{avg}**"
                    cells = [x["method"], "16" if bits == 16 else f"W{bits}"]
                    cells += [f"{100 * x['acc'][f]:.1f}" for f in FAMILY_ORDER]
                    cells += [avg, f"{100 * x['avg'] / ref:.1f}" if ref else "", str(x.get("quant_s", ""))]
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if r.get("errors"):
            out.append("Failures: " + "; ".join(r["errors"]) + "\n")
        if r.get("skipped"):
            out.append("Skipped (deadline): " + ", ".join(r["skipped"]) + "\n")
        p = r.get("protect")
        if p and p.get("rows"):
            out.append(f"Protection table (W3 RTN, top {100 * p['fraction']:.0f}% input channels kept in 16 bits), "
                       f"{r['model']}:\n")
            head = ["Protection signal"] + [_label(f) for f in FAMILY_ORDER] + ["Avg"]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            for x in p["rows"]:
                if "avg" in x:
                    out.append("| " + " | ".join([x["label"]] + [f"{100 * x['acc'][f]:.1f}" for f in FAMILY_ORDER]
                                                 + [f"{100 * x['avg']:.2f}"]) + " |")
                else:
                    out.append(f"| {x['signal']} | failed: {x['error'][:80]} |")
            out.append("")
        c = r.get("finetune_curve")
        if c and c.get("steps"):
            out.append(f"Pseudo-fine-tuning (W3 QuantLRM of the DPO model with signals from SFT steps), {r['model']}: "
                       + ", ".join(f"step {k}: {100 * v:.1f}" for k, v in zip(c["steps"], c["avg"], strict=True))
                       + (f"; trend slope {100 * c['trend']['slope']:.3f} points/step" if "trend" in c else "")
                       + "\n")
    return "\n".join(out) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits_list = [3, 4]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        rows = [x for x in r.get("rows", []) if "avg" in x]
        ref = next((x["avg"] for x in rows if x["bits"] == 16), None)
        methods = list(dict.fromkeys(x["method"] for x in rows if x["bits"] != 16))
        w = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            ys = [next((100 * x["avg"] for x in rows if x["method"] == m and x["bits"] == b), 0) for b in bits_list]
            ax.bar([j + i * w for j in range(len(bits_list))], ys, w, label=m)
        if ref is not None:
            ax.axhline(100 * ref, color="k", linestyle="--", label="16-bit")
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(bits_list))], [f"W{b} g128" for b in bits_list])
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(f"{r['model']} (DPO model, signals SFT->DPO)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(out: Path, names: list[str]) -> None:
    results = [json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").exists()]
    if not results:
        return
    (out / "zoo.md").write_text(markdown(results))
    try:
        plot(results, out / "zoo.png")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    print((out / "zoo.md").read_text(), flush=True)


# ------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results folder (JSON, Markdown, PNG)")
    ap.add_argument("--work", default=None, help="checkpoints folder (default: OUT/../zoo-work)")
    ap.add_argument("--models", default="llama-30m,qwen3-60m")
    ap.add_argument("--toy", action="store_true", help="CPU smoke-test sizes and step counts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole run")
    ap.add_argument("--deadline", type=float, default=None, help="(internal) absolute end time")
    ap.add_argument("--serial", action="store_true", help="models one after the other, not in parallel")
    ap.add_argument("--train-seconds", type=float, default=150)
    ap.add_argument("--pt-steps", type=int, default=20000)
    ap.add_argument("--sft-steps", type=int, default=10000)
    ap.add_argument("--dpo-steps", type=int, default=1000)
    ap.add_argument("--dpo-lr", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=64, help="SFT batch (DPO: half as many pairs)")
    ap.add_argument("--pt-batch", type=int, default=128, help="pre-training batch (packed blocks)")
    ap.add_argument("--seqlen", type=int, default=256, help="pre-training block length")
    ap.add_argument("--level", type=int, default=2, help="task difficulty (quantlrm.demo.tasks)")
    ap.add_argument("--train-per-task", type=int, default=20000)
    ap.add_argument("--test-per-task", type=int, default=250)
    ap.add_argument("--dpo-prompts", type=int, default=2048)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen-calib", type=int, default=512)
    ap.add_argument("--methods", default=None, help="comma list of method labels to run (default: all)")
    ap.add_argument("--first-bits-only", default="QuantLRM (group mean),QuantLRM (act factor)",
                    help="methods run at the first bit width only (comma list)")
    ap.add_argument("--extras", default="first", help="'first' model, 'all', or 'none': protect table + Fig. 3")
    ap.add_argument("--protect-fraction", type=float, default=0.05)
    ap.add_argument("--pft-snapshots", type=int, nargs="*", default=[10, 25, 50, 100, 200])
    ap.add_argument("--pft-lr", type=float, default=1e-5)
    ap.add_argument("--pft-examples", type=int, default=4000)
    a = ap.parse_args(argv)
    if a.toy:
        if a.models == "llama-30m,qwen3-60m":
            a.models = "toy-llama,toy-qwen3"
        a.train_seconds = min(a.train_seconds, 60)
        a.pt_steps, a.sft_steps, a.dpo_steps = min(a.pt_steps, 40), min(a.sft_steps, 40), min(a.dpo_steps, 10)
        a.pt_batch = 8
        a.batch, a.seqlen, a.train_per_task, a.test_per_task, a.dpo_prompts = 8, 128, 200, 8, 32
        a.calib_samples, a.seqlen_calib, a.max_new_tokens, a.pft_examples = 8, 128, 100, 64
        a.pft_snapshots = [2, 4]
    a.methods = None if a.methods is None else [x for x in a.methods.split(",") if x]
    a.first_bits_only = [x for x in a.first_bits_only.split(",") if x]
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
    deadline = a.deadline or time.time() + a.budget
    if len(names) == 1 or a.serial:
        for i, n in enumerate(names):
            os.environ["ZOO_TAG"] = n
            b = argparse.Namespace(**vars(a))
            b.extras = a.extras == "all" or (a.extras == "first" and i == 0 and os.environ.get("ZOO_FIRST", "1") == "1")
            try:
                ModelRun(n, b, Clock(deadline - 5)).run()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        if a.deadline is None:
            report(out, names)
        return
    # Parallel: one child process per model on the same device.
    procs = []
    for i, n in enumerate(names):
        env = dict(os.environ, ZOO_TAG=n, ZOO_FIRST="1" if i == 0 else "0", TQDM_DISABLE="1",
                   OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // len(names))))
        cmd = [sys.executable, __file__, *sys.argv[1:], "--models", n, "--deadline", str(deadline)]
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time() + 10, 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
    report(out, names)


if __name__ == "__main__":
    main()

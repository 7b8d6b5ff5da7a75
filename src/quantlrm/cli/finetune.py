"""`quantlrm finetune`: pseudo-fine-tuning with fine-tuning-signal snapshots."""

from __future__ import annotations

import argparse

HELP = """Fine-tune MODEL briefly (SFT, loss on responses only) and save the fine-tuning signals of
the weights at each snapshot step against the ORIGINAL weights, in OUT/step-K/ (the layout
of `quantlrm signals`). Then quantize the original model with
`quantlrm quantize --model MODEL --method quantlrm --signals OUT/step-K`.

Data: JSONL, one example per line, with prompt/response fields (names set by
--prompt-field/--response-field), or an OpenR1-Math style "messages" list (last assistant
message = response), or "problem"/"solution"."""


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="pseudo-fine-tune a model and snapshot its fine-tuning signals",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="HF checkpoint dir of the model to quantize later"
    )
    p.add_argument("--data", required=True, help="JSONL file of SFT examples")
    p.add_argument(
        "--steps",
        type=int,
        required=True,
        help="optimizer steps of the whole run (sets the schedule)",
    )
    p.add_argument(
        "--snapshot-steps",
        default="",
        help="comma-separated steps to snapshot signals at (default: the last)",
    )
    p.add_argument("--out", required=True, help="run directory (step-K/ signals, state/, run.json)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5)")
    p.add_argument("--batch-size", type=int, default=1, help="examples per micro-batch (default 1)")
    p.add_argument(
        "--grad-accum", type=int, default=8, help="micro-batches per optimizer step (default 8)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="linear warm-up steps before cosine decay (default 3%% of --steps)",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=4096,
        help="truncate examples to this many tokens (default 4096)",
    )
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto (default)")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast over fp32 master weights (default: on where CUDA supports bf16)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute activations in backward (saves memory)",
    )
    p.add_argument(
        "--save-model",
        action="store_true",
        help="also save the fine-tuned model at each snapshot (OUT/step-K/model)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest saved state",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this step (state saved); --resume later",
    )
    p.add_argument(
        "--no-save-state",
        action="store_true",
        help="do not save weights+optimizer at snapshots (saves disk and time; no --resume)",
    )
    p.add_argument(
        "--state-every", type=int, default=None, help="also save the training state every N steps"
    )
    p.add_argument(
        "--template",
        default="auto",
        choices=("auto", "raw", "chat"),
        help="prompt layout: chat template, raw 'prompt\\nresponse', or auto (chat if the tokenizer has one)",
    )
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--messages-field", default="messages")
    p.add_argument(
        "--variant", default="both-ends", help="signal variant of the snapshots (default both-ends)"
    )
    p.add_argument("--y-min", type=float, default=1.0)
    p.add_argument("--y-max", type=float, default=10.0)
    p.add_argument(
        "--optimizer",
        default="adamw",
        choices=("adamw", "adafactor"),
        help="adafactor needs less memory (8B on one 80 GB GPU); its --lr is a relative step size",
    )
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    p.add_argument(
        "--train",
        default="all",
        choices=("all", "linears"),
        help="train every parameter or only the quantized linears",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from quantlrm.finetune import FinetuneOptions, finetune, parse_steps

    opts = FinetuneOptions(
        model=args.model, data=args.data, out=args.out, steps=args.steps,
        snapshot_steps=parse_steps(args.snapshot_steps), lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, warmup=args.warmup, max_len=args.max_len, device=args.device,
        bf16=args.bf16, grad_checkpointing=args.grad_checkpointing, save_model=args.save_model,
        resume=args.resume, stop_after=args.stop_after, save_state=not args.no_save_state,
        state_every=args.state_every, template=args.template,
        prompt_field=args.prompt_field, response_field=args.response_field,
        messages_field=args.messages_field, variant=args.variant, y_min=args.y_min, y_max=args.y_max,
        optimizer=args.optimizer, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        train=args.train, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    out = finetune(opts)
    snaps = sorted(out.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    print(f"signals in: {', '.join(map(str, snaps)) or '(none yet)'}; log: {out / 'run.json'}")
    return 0

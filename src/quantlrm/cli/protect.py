"""`quantlrm protect`: the mixed-precision hypothesis test of the paper (Tables 1 and 3)."""

from __future__ import annotations

import argparse

HELP = """Keep the top FRACTION of input channels of every linear layer, ranked by a channel-
importance signal, in 16 bits (unchanged) and round-to-nearest the rest to BITS bits; write a
dequantized HF checkpoint that `quantlrm eval` scores, plus OUT/protect.json listing the kept
channels per module. Signals: the fine-tuning-signal variants (need --signals DIR or --base
B) or `activation` (mean squared input activation per channel on --calib text). Each group's
grid (scale, zero point) is fitted to its unprotected weights only; protected columns stay
bit-identical."""


def register(sub) -> None:
    from quantlrm.protect import SIGNALS

    p = sub.add_parser(
        "protect",
        help="mixed precision: keep the most important channels in 16 bits, RTN the rest",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="HF checkpoint dir of the (fine-tuned) model")
    p.add_argument("--signal", required=True, choices=SIGNALS, help="channel importance to rank by")
    p.add_argument(
        "--fraction", type=float, default=0.05, help="share of input channels kept (default 0.05)"
    )
    p.add_argument("--bits", type=int, default=3, help="bits of the other weights (default 3)")
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="quantization group (default 128, -1 = per channel)",
    )
    p.add_argument(
        "--signals",
        default=None,
        help="signals dir (quantlrm signals/finetune) of the same variant",
    )
    p.add_argument(
        "--base", default=None, help="pre-fine-tuning checkpoint to compute the signals from"
    )
    p.add_argument(
        "--calib", default=None, help="activation: calibration text (file, dataset, builtin)"
    )
    p.add_argument("--calib-field", default="text")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--y-min", type=float, default=1.0)
    p.add_argument("--y-max", type=float, default=10.0)
    p.add_argument("--device", default="cpu", help="device for signals/activations (cpu, cuda)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from quantlrm.protect import ProtectOptions, protect_model

    opts = ProtectOptions(
        model=args.model, out=args.out, signal=args.signal, fraction=args.fraction,
        bits=args.bits, group_size=args.group_size, signals=args.signals, base=args.base,
        calib=args.calib, calib_field=args.calib_field, calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen, y_min=args.y_min, y_max=args.y_max, device=args.device,
        overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    out = protect_model(opts)
    print(f"mixed-precision model written to {out} (kept channels in {out}/protect.json)")
    return 0

"""`quantlrm signals`: channel importance from a fine-tuned checkpoint and its base."""

from __future__ import annotations

import argparse
import sys

from quantlrm.signals import VARIANTS, compute_signals, format_summary, save_signals


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "signals",
        help="compute fine-tuning signals (per-channel importance) from BASE and FT checkpoints",
        description=(
            "Pair every decoder linear of FT with the same linear of BASE (the checkpoint FT was "
            "fine-tuned from), take dW = |W' - W| in fp32, gather exact global statistics and "
            "write per-input-channel importance (paper Eq. 5-6) to OUT/importance.safetensors "
            "and OUT/stats.json."
        ),
    )
    p.add_argument(
        "--base", required=True, help="checkpoint directory the model was fine-tuned from"
    )
    p.add_argument(
        "--finetuned",
        "--model",
        dest="finetuned",
        required=True,
        help="fine-tuned checkpoint directory (--model is an alias, as in `quantlrm quantize`)",
    )
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument(
        "--variant",
        default="both-ends",
        choices=VARIANTS,
        help="importance variant (default: both-ends)",
    )
    p.add_argument(
        "--y-min", type=float, default=1.0, help="mapping value at the median (default 1)"
    )
    p.add_argument(
        "--y-max", type=float, default=10.0, help="mapping value at the ends (default 10)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--cache-gb",
        type=float,
        default=None,
        help="device memory kept for later passes (default: 60%% of free GPU memory on cuda, 0 on cpu)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="reader threads (default: min(8, CPU cores))"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quantlrm.errors import QuantLRMError

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        # fail before hours of work, not after
        raise QuantLRMError(
            f"output directory {out} already exists and is not empty.",
            "choose another --out or pass --overwrite.",
        )
    if args.workers is not None and args.workers < 1:
        raise QuantLRMError("--workers must be at least 1.", "pass --workers 1 or more.")
    sig = compute_signals(
        args.base,
        args.finetuned,
        variant=args.variant,
        y_min=args.y_min,
        y_max=args.y_max,
        device=args.device,
        progress=not args.quiet,
        cache_bytes=None if args.cache_gb is None else int(args.cache_gb * 1e9),
        workers=args.workers,
    )
    save_signals(sig, out, overwrite=args.overwrite)
    print(format_summary(sig))
    print(f"wrote {out / 'importance.safetensors'} and {out / 'stats.json'}", file=sys.stderr)
    return 0

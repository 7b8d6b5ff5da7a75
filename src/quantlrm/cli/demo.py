"""`quantlrm demo`: train (or reuse) a tiny reasoning pair, quantize it three ways, compare."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end-to-end demo on CPU: tiny reasoning pair, RTN/AWQ/QuantLRM at W3/W4",
        description="Build a tiny reasoning model pair (base -> SFT, bf16), compute fine-tuning "
        "signals, quantize with RTN, AWQ and QuantLRM at W3 and W4, evaluate on held-out "
        "problems and write a report directory.",
    )
    p.add_argument("--out", type=Path, default=Path("quantlrm-demo"),
                   help="report directory (default: ./quantlrm-demo)")
    p.add_argument("--fast", action="store_true",
                   help="fewer test problems and calibration tokens (about a minute)")
    p.add_argument("--retrain", action="store_true",
                   help="train the model pair again on this CPU instead of using the committed weights")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where retrained pairs are cached (default: $QUANTLRM_CACHE/demo or ~/.cache/quantlrm/demo)")
    p.add_argument("--group-size", type=int, default=128,
                   help="quantization group size (default 128, as quantize and the paper; 64 and -1 also divide)")
    p.add_argument("--n-test", type=int, default=None,
                   help="held-out problems per task (default 200; 96 with --fast)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from quantlrm.demo.run import DemoOptions, run_demo
    from quantlrm.errors import QuantLRMError

    if args.n_test is not None and args.n_test < 1:
        raise QuantLRMError(f"--n-test {args.n_test} is not a positive number.", "use e.g. --n-test 200.")
    opts = DemoOptions(out=args.out, fast=args.fast, retrain=args.retrain, cache_dir=args.cache_dir,
                       n_test=args.n_test, group_size=args.group_size, threads=args.threads, progress=not args.no_progress)
    run_demo(opts)
    print(f"\nreport: {args.out}/table.md, accuracy.png, dw_hist.png, results.json")
    return 0

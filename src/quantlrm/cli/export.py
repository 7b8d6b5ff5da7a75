"""`quantlrm export`: re-pack a finished quantize run into another format, without searching again
(GPTQ-rounded runs repeat their calibration forward for the Hessians).

The run's `search.safetensors` (searched scales and clip values) is re-applied to the 16-bit
model through the quantize pipeline with `apply=`, so the integer codes are the run's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from quantlrm.errors import QuantLRMError
from quantlrm.export import FORMATS, _load_formats, check_format


def register(subparsers) -> None:
    _load_formats()
    p = subparsers.add_parser(
        "export",
        help="re-pack a finished quantize run into another checkpoint format",
        description="Re-apply a quantize run's saved search results (search.safetensors) to the "
        "16-bit model and write a packed checkpoint; no search runs again (a --rounding gptq run "
        "repeats its calibration forward to rebuild the Hessians, so its calibration source must "
        "still be there).",
    )
    p.add_argument("--run", required=True, type=Path, help="run directory written by `quantlrm quantize`")
    p.add_argument(
        "--format",
        required=True,
        metavar="FORMAT",
        help=f"output format: {', '.join(sorted(FORMATS))}",
    )
    p.add_argument("--out", required=True, type=Path, help="new output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--model", default=None, help="the 16-bit source model, if it moved since the run")
    p.add_argument("--device", default=None, help="device for re-applying (default: the run's)")
    p.set_defaults(func=run)


def read_run(run_dir: Path) -> dict:
    """The QuantizeOptions fields a run recorded in quantlrm.json."""
    meta = Path(run_dir) / "quantlrm.json"
    if not meta.is_file():
        raise QuantLRMError(
            f"{run_dir} has no quantlrm.json, so it is not a finished quantize run.",
            "pass the --out directory of a completed `quantlrm quantize`.",
        )
    try:
        options = json.loads(meta.read_text()).get("options")
    except json.JSONDecodeError as e:
        raise QuantLRMError(f"{meta} is not valid JSON ({e}).", "re-run quantlrm quantize.") from e
    if not isinstance(options, dict) or "bits" not in options:
        raise QuantLRMError(f"{meta} records no quantize options.", "re-run quantlrm quantize.")
    if not (Path(run_dir) / "search.safetensors").is_file():
        raise QuantLRMError(
            f"{run_dir} has no search.safetensors (the saved scales and clip values).",
            "re-run quantlrm quantize; the run did not finish.",
        )
    return options


def export_options(
    run_dir: Path, fmt: str, out: Path, model: str | None = None, device: str | None = None, overwrite: bool = False
):
    """Build the pipeline's QuantizeOptions that re-apply `run_dir` into format `fmt` at `out`."""
    options = read_run(run_dir)
    check_format(fmt, int(options["bits"]))  # before any work: refuse e.g. AWQ at 3 bits
    from quantlrm.pipeline import QuantizeOptions

    known = {f.name for f in dataclasses.fields(QuantizeOptions)}
    kw = {k: v for k, v in options.items() if k in known}
    kw.update(
        apply=str(Path(run_dir) / "search.safetensors"),
        format=fmt,
        out=str(out),
        resume=False,
        model=model or options.get("model"),
    )
    if "overwrite" in known:  # never inherit the original run's --overwrite
        kw["overwrite"] = overwrite
    if device:
        kw["device"] = device
    if not kw.get("model"):
        raise QuantLRMError(f"{run_dir}/quantlrm.json does not name the source model.", "pass --model DIR.")
    return QuantizeOptions(**kw)


def run(args: argparse.Namespace) -> int:
    opts = export_options(args.run, args.format, args.out, args.model, args.device, args.overwrite)
    from quantlrm.pipeline import quantize_model

    out = quantize_model(opts)
    print(f"wrote {args.format} checkpoint to {out}")
    return 0

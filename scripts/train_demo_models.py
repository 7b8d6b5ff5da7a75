"""Reproduce the committed demo weights in src/quantlrm/demo_assets/pair (CPU, seeded).

    python scripts/train_demo_models.py [--out DIR] [--threads 2]

Trains `quantlrm.demo.pair.PairRecipe()` (the demo's default recipe): a Llama-architecture
model of ~0.7M parameters, base stage (next-token loss on synthetic reasoning text), then
SFT on fresh reasoning traces (completion-only loss), both saved in bf16 with the tokenizer.
Torch CPU kernels may sum in a different order on another thread count or CPU, so weights
can differ in the last bits elsewhere; the recipe hash in recipe.json names what was run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from quantlrm.demo.pair import PairRecipe, train_pair

ASSETS = Path(__file__).resolve().parents[1] / "src" / "quantlrm" / "demo_assets" / "pair"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = args.out.with_name(args.out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    info = train_pair(PairRecipe(), tmp)
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print(json.dumps({k: info[k] for k in ("n_params", "seconds")}), "->", args.out)


if __name__ == "__main__":
    main()

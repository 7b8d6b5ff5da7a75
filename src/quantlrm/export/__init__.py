"""Output formats. The pipeline streams tensors into a `Writer`, layer by layer.

Each format lives in its own module and registers a factory in `FORMATS`; a format
declares which bit widths it can hold so that impossible combinations are refused before
any work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from quantlrm.errors import QuantLRMError
from quantlrm.quantizer import QuantResult


class Writer(Protocol):
    """Receives a model's tensors once each, then `close` writes config.json."""

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor kept as is (embeddings, norms, lm_head, biases), full name."""

    def add_linear(self, name: str, q: QuantResult, dtype: torch.dtype) -> None:
        """A quantized linear; `name` is the module name without `.weight`;
        `dtype` is the checkpoint's original weight dtype."""

    def close(self, config: dict) -> None:
        """Flush shards and write config.json (with quantization_config where needed)."""


# format name -> (bits it can hold, factory(out_dir, bits, group_size) -> Writer)
FORMATS: dict[str, tuple[tuple[int, ...], Callable[[Path, int, int], Writer]]] = {}


def register(name: str, bits: tuple[int, ...]):
    def deco(factory):
        FORMATS[name] = (bits, factory)
        return factory

    return deco


def _load_formats() -> None:
    # Importing the modules fills FORMATS; a format module missing here is simply absent.
    import importlib

    for mod in ("fake", "compressed_tensors", "awq", "gptq"):
        try:
            importlib.import_module(f"quantlrm.export.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"quantlrm.export.{mod}":
                raise


def check_format(fmt: str, bits: int) -> None:
    _load_formats()
    if fmt not in FORMATS:
        raise QuantLRMError(f"unknown format {fmt!r}.", f"use one of: {', '.join(sorted(FORMATS))}.")
    ok = FORMATS[fmt][0]
    if bits not in ok:
        can = sorted(f for f, (b, _) in FORMATS.items() if bits in b)
        raise QuantLRMError(
            f"format {fmt!r} cannot hold {bits}-bit weights (it holds {', '.join(map(str, ok))}-bit).",
            f"for {bits} bits use --format {' or '.join(can)}." if can else "choose other bits.",
        )


def get_writer(fmt: str, out_dir: str | Path, bits: int, group_size: int) -> Writer:
    check_format(fmt, bits)
    return FORMATS[fmt][1](Path(out_dir), bits, group_size)

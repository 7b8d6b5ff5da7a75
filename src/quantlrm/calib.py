"""Calibration text for the scale and clip searches: where it comes from and how it is cut.

Sources, in the order a user reaches for them:

* a local file (`.txt`, `.json`, `.jsonl`): reasoning chains, in-domain text, ...;
  JSON(L) records are read from one field (`--calib-field`, default "text");
* a Hugging Face `datasets` name (the optional `quantlrm[datasets]` extra, hub reachable);
  `pileval` is AWQ's default set (`mit-han-lab/pile-val-backup`, validation split);
* `builtin`: an offline corpus that ships with Python itself, the documentation topics of
  `pydoc_data.topics` (about 465k characters of English prose and code about Python).
  It is what a run uses when nothing is given and `datasets` or the hub is unavailable,
  so quantization always works offline.

Documents are tokenized one by one (no special tokens), joined with the tokenizer's EOS
token and cut into `samples` blocks of `seqlen` tokens, as AWQ concatenates and splits its
calibration text.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from quantlrm.errors import QuantLRMError

log = logging.getLogger(__name__)

PILEVAL = ("mit-han-lab/pile-val-backup", "validation")
BUILTIN = "builtin"


@dataclass
class CalibData:
    input_ids: torch.Tensor  # int64 [samples, seqlen]
    source: str  # what was read: a path, a dataset name or "builtin"
    description: str  # one line for quantlrm.json and logs

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()


def builtin_documents() -> Iterator[str]:
    """Python's own pydoc topic texts: always present, no download, no licence question."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise QuantLRMError(
            "the built-in calibration corpus (Python's pydoc_data.topics) is missing from this Python.",
            "pass --calib FILE with some text (a .txt, .json or .jsonl file).",
        ) from e
    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield text


def file_documents(path: Path, field: str = "text") -> Iterator[str]:
    """Documents of a .txt (blank-line separated), .json or .jsonl file."""
    if not path.is_file():
        raise QuantLRMError(f"calibration file {path} does not exist.", "check the --calib path.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise QuantLRMError(
                            f"{path} line {n} is not valid JSON ({e}).", "fix the line or pass a .txt file."
                        ) from e
                    yield _field(rec, field, path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise QuantLRMError(f"{path} is not valid JSON ({e}).", "fix the file or pass a .txt file.") from e
        if isinstance(data, dict) and isinstance(data.get(field), list):
            data = data[field]  # {"text": ["...", "..."]}
        if not isinstance(data, list):
            raise QuantLRMError(
                f"{path} holds a JSON {type(data).__name__}, not a list of records.",
                f"use a list of strings or of objects with a {field!r} field.",
            )
        for rec in data:
            yield _field(rec, field, path)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        for doc in text.split("\n\n"):
            if doc.strip():
                yield doc.strip()


def _field(rec: object, field: str, path: Path) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        if field not in rec:
            raise QuantLRMError(
                f"a record in {path} has no field {field!r} (fields: {', '.join(map(str, rec)) or 'none'}).",
                "choose the field with --calib-field.",
            )
        value = rec[field]
        if isinstance(value, list):  # chat-style lists of turns
            return "\n".join(v if isinstance(v, str) else json.dumps(v) for v in value)
        return value if isinstance(value, str) else json.dumps(value)
    raise QuantLRMError(
        f"a record in {path} is a {type(rec).__name__}, not text or an object.",
        f"use strings or objects with a {field!r} field.",
    )


def dataset_documents(name: str, field: str = "text") -> Iterator[str]:
    """Stream a `datasets` dataset; 'pileval' is AWQ's default. Raises if unavailable."""
    import datasets  # optional extra; ImportError is handled by the caller

    repo, split = PILEVAL if name == "pileval" else (name.split(":")[0], (name.split(":") + ["train"])[1])
    ds = datasets.load_dataset(repo, split=split, streaming=True)
    for rec in ds:
        text = rec.get(field) if isinstance(rec, dict) else None
        if text is None:
            raise QuantLRMError(
                f"dataset {repo} has no field {field!r} (fields: {', '.join(rec)}).",
                "choose the field with --calib-field.",
            )
        if isinstance(text, str) and text.strip():
            yield text.strip()


def tokenize_blocks(
    docs: Iterable[str], tokenizer, samples: int, seqlen: int
) -> tuple[torch.Tensor, int]:
    """Concatenate tokenized documents (EOS between them) into up to `samples` x `seqlen`."""
    need = samples * seqlen
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    ids: list[int] = []
    n_docs = 0
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
        n_docs += 1
        if len(ids) >= need:
            break
    n_blocks = min(samples, len(ids) // seqlen)
    return torch.tensor(ids[: n_blocks * seqlen], dtype=torch.long).view(n_blocks, seqlen), n_docs


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so an offline machine falls back at once instead of
    sitting through `datasets`' retries (measured: 26 s on a machine without DNS)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_calibration(
    tokenizer,
    source: str | Path | None = None,
    field: str = "text",
    samples: int = 128,
    seqlen: int = 512,
) -> CalibData:
    """Calibration token blocks from a file, a dataset, or the built-in corpus (see module doc)."""
    if samples <= 0 or seqlen <= 0:
        raise QuantLRMError(
            f"calibration size {samples} x {seqlen} tokens is empty.",
            "use positive --calib-samples and --calib-seqlen (defaults 128 x 512).",
        )
    src = str(source) if source is not None else None
    if src is None:
        try:
            import datasets  # noqa: F401
        except ImportError:
            src = BUILTIN
        else:
            src = None if hub_reachable() else BUILTIN
            if src == BUILTIN:
                log.warning("the Hugging Face hub is not reachable; using the built-in corpus.")
        if src is None:
            try:
                return _from_docs(dataset_documents("pileval", "text"), "pileval", tokenizer, samples, seqlen)
            except QuantLRMError:
                raise
            except Exception as e:  # hub unreachable, dataset moved, ...
                log.warning("pile-val is not reachable (%s); using the built-in corpus.", e)
                src = BUILTIN
    if src == BUILTIN:
        return _from_docs(builtin_documents(), "builtin (Python pydoc_data.topics)", tokenizer, samples, seqlen)
    path = Path(src)
    if path.suffix.lower() in (".txt", ".json", ".jsonl", ".md") or path.exists():
        return _from_docs(file_documents(path, field), str(path), tokenizer, samples, seqlen)
    try:
        docs = dataset_documents(src, field)
        return _from_docs(docs, src, tokenizer, samples, seqlen)
    except ImportError as e:
        raise QuantLRMError(
            f"--calib {src!r} is neither a file nor usable as a dataset: the `datasets` package is not installed.",
            "pip install 'quantlrm[datasets]', or pass a local .txt/.json/.jsonl file, or --calib builtin.",
        ) from e
    except QuantLRMError:
        raise
    except Exception as e:
        raise QuantLRMError(
            f"dataset {src!r} could not be loaded ({type(e).__name__}: {e}).",
            "check the name and your network, or pass a local file or --calib builtin.",
        ) from e


def _from_docs(docs: Iterable[str], source: str, tokenizer, samples: int, seqlen: int) -> CalibData:
    ids, n_docs = tokenize_blocks(docs, tokenizer, samples, seqlen)
    if ids.shape[0] == 0:
        raise QuantLRMError(
            f"calibration source {source} gives fewer than {seqlen} tokens ({n_docs} documents).",
            "give more text, or a shorter --calib-seqlen.",
        )
    if ids.shape[0] < samples:
        log.warning("calibration source %s gives only %d of %d blocks.", source, ids.shape[0], samples)
    desc = f"{source}: {ids.shape[0]} x {seqlen} tokens from {n_docs} documents"
    return CalibData(input_ids=ids, source=source, description=desc)

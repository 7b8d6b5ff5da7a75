"""The only module that touches checkpoint files: read shards tensor by tensor, write atomically.

Reading goes through `safetensors.safe_open`, which memory-maps a shard, so holding a
`Checkpoint` costs no memory; a tensor is materialised only when asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantlrm.errors import QuantLRMError

INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype names -> torch dtypes, for `Checkpoint.read` (others fall back to `get`).
_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Checkpoint:
    """A Hugging Face checkpoint directory: config.json plus safetensors shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise QuantLRMError(
                f"{self.path} is not a directory.",
                "pass a Hugging Face checkpoint directory (config.json + *.safetensors).",
            )
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise QuantLRMError(
                f"{self.path} has no config.json, so it is not a checkpoint directory.",
                "point to the folder that save_pretrained wrote.",
            )
        try:
            self.config: dict = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise QuantLRMError(f"{cfg} is not valid JSON ({e}).", "re-download the config.") from e
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = self._map_tensors()

    def _map_tensors(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(
                p.name for p in self.path.glob("*.pt")
            )
            if pickles:
                raise QuantLRMError(
                    f"{self.path} holds only pickle weights ({pickles[0]}); pickles can run code when loaded.",
                    "convert it once with transformers: "
                    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW, safe_serialization=True).",
                )
            raise QuantLRMError(
                f"{self.path} contains no *.safetensors files.",
                "point to a checkpoint directory saved with safetensors.",
            )
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise QuantLRMError(
                    f"{self.path}: shard {missing[0]} named in {INDEX_NAME} is missing.",
                    "download the missing shard(s) again.",
                )
            return dict(weight_map)
        where: dict[str, str] = {}
        for shard in shards:
            for key in self._open(shard).keys():
                where[key] = shard
        return where

    def _open(self, shard: str):
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = safe_open(str(self.path / shard), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise QuantLRMError(
                    f"shard {self.path / shard} cannot be read ({e}); it is truncated or corrupted.",
                    "download that shard again (compare its size with the original).",
                ) from e
            self._handles[shard] = handle
        return handle

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shard_of(self, name: str) -> str:
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a copy in its stored dtype)."""
        if name not in self._where:
            raise QuantLRMError(
                f"tensor {name} is missing from {self.path}.",
                "check that the checkpoint is complete and of the expected architecture.",
            )
        try:
            return self._open(self._where[name]).get_tensor(name)
        except QuantLRMError:
            raise
        except Exception as e:
            raise QuantLRMError(
                f"tensor {name} in {self.path / self._where[name]} cannot be read ({e}); "
                "the shard is truncated or corrupted.",
                "download that shard again.",
            ) from e

    def info(self, name: str) -> tuple[list[int], str]:
        """Shape and dtype string without loading the data."""
        sl = self._open(self._where[name]).get_slice(name)
        return list(sl.get_shape()), sl.get_dtype()

    def read(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        """Load one tensor with plain file reads instead of the memory map.

        Why: pages of a memory-mapped shard that `get` touched stay counted in this
        process's RSS until the kernel reclaims them, so one streaming pass over a 70B
        checkpoint through `get` shows an RSS as large as the page cache. `read` copies the
        bytes with `readinto` into a fresh tensor (pinned on request, for fast copies to a
        GPU), so the process holds exactly the tensors it keeps; the copy releases the GIL,
        so several threads can read ahead.
        """
        if name not in self._where:
            return self.get(name)  # raises the "missing" error
        shard = self._where[name]
        header, data_start, size = self._header(shard)
        entry = header.get(name)
        dtype = _ST_DTYPES.get(entry["dtype"]) if entry else None
        if dtype is None:
            return self.get(name)
        begin, end = entry["data_offsets"]
        path = self.path / shard
        if data_start + end > size:
            raise QuantLRMError(
                f"shard {path} is truncated: tensor {name} ends at byte {data_start + end} "
                f"but the file has {size} bytes.",
                "download that shard again (compare its size with the original).",
            )
        buf = torch.empty(end - begin, dtype=torch.uint8, pin_memory=pin_memory)
        view = memoryview(buf.numpy())
        with open(path, "rb", buffering=0) as f:
            f.seek(data_start + begin)
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise QuantLRMError(f"shard {path} ended early while reading {name}.", "download it again.")
                got += k
        return buf.view(dtype).reshape(entry["shape"])

    def _header(self, shard: str) -> tuple[dict, int, int]:
        """(tensor entries, byte offset of the data section, file size) of one shard, cached."""
        headers = self.__dict__.setdefault("_headers", {})
        if shard not in headers:
            path = self.path / shard
            try:
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                size = path.stat().st_size
            except (OSError, ValueError) as e:
                raise QuantLRMError(
                    f"shard {path} cannot be read ({e}); it is truncated or corrupted.",
                    "download that shard again.",
                ) from e
            headers[shard] = (header, 8 + n, size)
        return headers[shard]

    def shard_files(self) -> list[Path]:
        return [self.path / s for s in sorted(set(self._where.values()))]

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.shard_files())

    def copy_aux_files(self, dest: str | os.PathLike) -> None:
        """Copy tokenizer, generation config and other small non-weight files."""
        for p in self.path.iterdir():
            if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".pt")) and p.name != INDEX_NAME:
                shutil.copy2(p, Path(dest) / p.name)


class ShardedWriter:
    """Write tensors into size-capped safetensors shards plus an index, as save_pretrained does."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 4 << 30):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, torch.Tensor] | list[str]] = []
        self._weight_map: dict[str, str] = {}
        self._n = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        self._n += 1
        name = f"part-{self._n:05d}.safetensors"
        save_file(self._pending, str(self.out_dir / name), metadata={"format": "pt"})
        for k in self._pending:
            self._weight_map[k] = name
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> None:
        """Flush, rename shards to the names transformers expects, and always write the index.

        The index matters even for one shard: vLLM loads every `*.safetensors` in a folder
        that has no index, and a run folder also holds `search.safetensors`.
        """
        self._flush()
        n = self._n
        if n == 1:
            rename = {"part-00001.safetensors": "model.safetensors"}
        else:
            rename = {f"part-{i:05d}.safetensors": f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
        for old, new in rename.items():
            os.replace(self.out_dir / old, self.out_dir / new)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {k: rename[v] for k, v in sorted(self._weight_map.items())},
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `out` only if the body succeeds.

    A crash or an error leaves no half-written `out` behind.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise QuantLRMError(
            f"output directory {out} already exists and is not empty.",
            "choose another --out or remove the old one (or pass --overwrite).",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)

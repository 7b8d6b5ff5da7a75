"""Benchmarks as in-memory tasks, and loaders for the paper's four benchmarks.

A `Task` is a name, a grader name (see `graders.GRADERS`) and a list of `Sample`s
(id, prompt, reference). The demo and the model zoo build their synthetic tasks with
`Task.from_pairs(...)` and are graded by the very same code as the real benchmarks.

Known task names (`load_task(name, source=None)`):

=============  ==========================================  ==========================
name           what                                        data
=============  ==========================================  ==========================
aime           AIME-120: AIME 2022-2025 (120 problems)     local file or hub (never shipped)
folio          FOLIO validation (premises + conclusion)    shipped (v0.0, 204 rows)
temporal       BBH temporal_sequences (250 questions)      shipped (MIT)
gpqa           GPQA-Diamond (198 questions)                local file or hub (never shipped)
val_aime       validation: AIME 2021                       local file or hub (never shipped)
val_folio      validation: 100 FOLIO train examples, seed  shipped
=============  ==========================================  ==========================

Group names: ``paper`` = aime,folio,temporal,gpqa; ``validation`` = val_aime,val_folio.

``source`` is a local file (.json: a list of rows or {"examples"|"data"|"rows": [...]};
.jsonl; .csv; .parquet with pyarrow or pandas installed) or, if no such file exists and
the optional ``datasets`` package is installed, a hub dataset ``NAME[:CONFIG][@SPLIT]``.
Row schemas (field names are matched case-insensitively; the first present wins):

- aime / val_aime: problem text in ``problem|question``; answer in ``answer`` (integer,
  "042" fine); optional year in ``year`` or parsed from ``id|url|source`` ("2023-I-4").
  When years are known, ``aime`` keeps 2022-2025 and ``val_aime`` keeps 2021.
  Example row: {"id": "2023-I-4", "problem": "Find ...", "answer": "042"}.
- gpqa: the official CSV / hub columns ``Question``, ``Correct Answer``,
  ``Incorrect Answer 1..3``; options are shuffled with a fixed seed per question
  (hash of seed + question text, so independent of file order and --limit) and
  lettered (A)-(D).
- folio / val_folio: ``premises`` (list of sentences or one newline-separated string),
  ``conclusion``, ``label`` (True / False / Uncertain; Unknown = Uncertain).
- temporal: ``input`` (question with its "Options:" list) and ``target`` like "(A)".

Prompts are the raw question text; the "\\n<think>\\n" suffix or chat template is added
at generation time (`GenerationConfig`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from quantlrm.errors import QuantLRMError
from quantlrm.eval.graders import GRADERS, normalize_reference

log = logging.getLogger(__name__)

__all__ = [
    "Benchmark",
    "GROUPS",
    "TASKS",
    "Sample",
    "Task",
    "expand_task_names",
    "load_task",
    "read_records",
]


@dataclass
class Sample:
    """One question: the prompt text shown to the model and its reference answer."""

    id: str
    prompt: str
    reference: Any
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    """A named list of samples graded by one grader (a key of `graders.GRADERS`)."""

    name: str
    samples: list[Sample]
    grader: str = "exact"
    display: str | None = None  # column name in reports (default: the name)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[\w.-]+", self.name):
            raise QuantLRMError(
                f"Task name {self.name!r} is not usable as a file name.",
                "use letters, digits, '_', '-' or '.'.",
            )
        if self.grader not in GRADERS:
            raise QuantLRMError(
                f"Task {self.name!r} names unknown grader {self.grader!r}.",
                f"use one of: {', '.join(sorted(GRADERS))}.",
            )
        ids = [s.id for s in self.samples]
        if len(set(ids)) != len(ids):
            raise QuantLRMError(f"Task {self.name!r} has duplicate sample ids.", "make ids unique.")
        for s in self.samples:  # fail at load time, not after hours of generation
            normalize_reference(self.grader, s.reference)

    @classmethod
    def from_pairs(
        cls, name: str, pairs, grader: str = "exact", display: str | None = None
    ) -> Task:
        """Build a task from (prompt, reference) pairs; ids are the positions."""
        samples = [Sample(str(i), p, r) for i, (p, r) in enumerate(pairs)]
        return cls(name, samples, grader, display)

    def head(self, n: int | None) -> Task:
        """The first `n` samples (all when n is None)."""
        return self if n is None else Task(self.name, self.samples[:n], self.grader, self.display)

    def __len__(self) -> int:
        return len(self.samples)


# ---------------------------------------------------------------- reading files


def read_records(path: str | Path) -> list[dict]:
    """Rows of a .json / .jsonl / .csv / .parquet file as dicts."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [
                json.loads(line)
                for line in p.read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
        elif suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                key = next(
                    (k for k in ("examples", "data", "rows", "train", "test") if k in data), None
                )
                if key is None:
                    raise QuantLRMError(
                        f"{p} is a JSON object without an 'examples'/'data'/'rows' list.",
                        'store a list of row objects, or {"examples": [...]}.',
                    )
                data = data[key]
            rows = list(data)
        elif suffix == ".csv":
            with p.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif suffix == ".parquet":
            rows = _read_parquet(p)
        else:
            raise QuantLRMError(
                f"Cannot read {p}: unknown extension {suffix!r}.",
                "use .json, .jsonl, .csv or .parquet.",
            )
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise QuantLRMError(f"Cannot parse {p}: {e}.", "check the file is valid.") from e
    if not all(isinstance(r, dict) for r in rows):
        raise QuantLRMError(
            f"{p}: every row must be an object with named fields.", "see `quantlrm eval --help`."
        )
    return rows


def _read_parquet(p: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    except ImportError:
        pass
    try:
        import pandas as pd

        return pd.read_parquet(p).to_dict("records")
    except ImportError as e:
        raise QuantLRMError(
            f"Reading {p} needs pyarrow or pandas.",
            "pip install pyarrow, or convert the file to JSONL.",
        ) from e


def _load_hub(name: str) -> list[dict]:
    """Rows of a hub dataset "NAME[:CONFIG][@SPLIT]" via the optional `datasets` package."""
    import datasets  # noqa: PLC0415  (optional extra)

    split = "train"
    if "@" in name:
        name, split = name.rsplit("@", 1)
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, gating, missing config: all user-fixable
        raise QuantLRMError(
            f"Could not load hub dataset {name!r} (config {config}, split {split}): {e}",
            "check the name, your hub login and network, or pass a local file.",
        ) from e
    return [dict(r) for r in ds]


def _rows(source: str | Path, task: str, flag: str, where: str) -> list[dict]:
    p = Path(source)
    if p.is_file():
        return read_records(p)
    looks_like_hub = isinstance(source, str) and re.fullmatch(
        r"[\w.-]+/[\w.-]+(:[\w.-]+)?(@[\w.\[\]:%-]+)?", source
    )
    if looks_like_hub:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise QuantLRMError(
                f"{task}: {source!r} is not a local file, and the `datasets` package to fetch it "
                "from the hub is not installed.",
                f"pip install 'quantlrm[datasets]', or pass a local file with {flag}. {where}",
            ) from None
        return _load_hub(source)
    raise QuantLRMError(
        f"{task}: data file {source} does not exist.", f"pass an existing file with {flag}. {where}"
    )


def _field(row: dict, *names: str, required: bool = True, what: str = "") -> Any:
    lower = {k.lower(): v for k, v in row.items()}
    for n in names:
        if n.lower() in lower and lower[n.lower()] is not None:
            return lower[n.lower()]
    if required:
        raise QuantLRMError(
            f"{what}: a row has none of the fields {names} (it has {sorted(row)}).",
            "see the schema in `quantlrm eval --help`.",
        )
    return None


def _shipped(*parts: str) -> Path:
    return Path(str(resources.files("quantlrm").joinpath("data", *parts)))


# ---------------------------------------------------------------- the benchmarks

_AIME_WHERE = (
    "AIME problems are MAA copyright and not shipped: use a local JSON/JSONL/CSV/parquet "
    "file with problem/answer (and year) fields, e.g. exported from a hub mirror of the "
    "AIME problem sets (the Kaggle 'AIME problem set 1983-2024' and AIME 2025)."
)
_GPQA_WHERE = (
    "GPQA asks not to be republished, so it is not shipped: download gpqa_diamond.csv from "
    "github.com/idavidrein/gpqa (password-protected zip), or use the gated hub dataset "
    "Idavidrein/gpqa:gpqa_diamond@train with `datasets` installed."
)


def _aime_year(row: dict) -> int | None:
    y = _field(row, "year", required=False)
    if y is not None:
        try:
            return int(y)
        except (TypeError, ValueError):
            pass
    for key in ("id", "url", "source", "problem_id", "link"):
        v = _field(row, key, required=False)
        if v is not None:
            m = re.search(r"(19[89]\d|20[0-4]\d)", str(v))
            if m:
                return int(m.group(1))
    return None


def _load_aime(source, years: range, name: str, flag: str) -> list[Sample]:
    if source is None:
        raise QuantLRMError(
            f"Task {name!r} needs the AIME problems, which are not shipped.",
            f"pass them with {flag} FILE. {_AIME_WHERE}",
        )
    rows = _rows(source, name, flag, _AIME_WHERE)
    samples = []
    for i, r in enumerate(rows):
        year = _aime_year(r)
        if year is not None and year not in years:
            continue
        sid = str(_field(r, "id", "problem_id", "url", required=False) or i)
        samples.append(
            Sample(
                sid,
                str(_field(r, "problem", "question", what=name)).strip(),
                str(_field(r, "answer", "expected_answer", what=name)).strip(),
                {"year": year},
            )
        )
    if name == "aime" and len(samples) != 120:
        log.warning("aime: %d problems of 2022-2025 in %s (AIME-120 has 120)", len(samples), source)
    if not samples:
        raise QuantLRMError(
            f"{name}: no problems of years {years.start}-{years.stop - 1} in {source}.",
            f"pass a file with those years via {flag}.",
        )
    return samples


def _gpqa_samples(source, seed: int) -> list[Sample]:
    if source is None:
        raise QuantLRMError(
            "Task 'gpqa' needs GPQA-Diamond, which is not shipped.",
            f"pass it with --gpqa FILE. {_GPQA_WHERE}",
        )
    rows = _rows(source, "gpqa", "--gpqa", _GPQA_WHERE)
    samples = []
    for i, r in enumerate(rows):
        q = str(_field(r, "Question", what="gpqa")).strip()
        right = str(_field(r, "Correct Answer", what="gpqa")).strip()
        wrong = [str(_field(r, f"Incorrect Answer {k}", what="gpqa")).strip() for k in (1, 2, 3)]
        options = [right, *wrong]
        # Seeded by the question text: the same letters whatever the file order or --limit.
        rng = random.Random(int(hashlib.sha256(f"{seed}:{q}".encode()).hexdigest()[:16], 16))
        rng.shuffle(options)
        letter = "ABCD"[options.index(right)]
        body = "\n".join(f"({'ABCD'[k]}) {o}" for k, o in enumerate(options))
        sid = str(_field(r, "Record ID", "id", required=False) or i)
        samples.append(Sample(sid, f"{q}\n\nOptions:\n{body}", f"({letter})", {"options": options}))
    if len(samples) != 198:
        log.warning("gpqa: %d questions in %s (GPQA-Diamond has 198)", len(samples), source)
    return samples


def _folio_prompt(premises, conclusion: str) -> str:
    if isinstance(premises, str):
        premises = [p for p in premises.splitlines() if p.strip()]
    lines = "\n".join(p.strip() for p in premises)
    return (
        "Based on the following premises, is the conclusion True, False, or Uncertain?\n\n"
        f"Premises:\n{lines}\n\nConclusion: {conclusion.strip()}"
    )


def _folio_rows_to_samples(rows: list[dict], prefix: str) -> list[Sample]:
    out = []
    for i, r in enumerate(rows):
        sid = _field(r, "example_id", "id", required=False)
        out.append(
            Sample(
                f"{prefix}{sid if sid is not None else i}",
                _folio_prompt(
                    _field(r, "premises", what="folio"), str(_field(r, "conclusion", what="folio"))
                ),
                str(_field(r, "label", what="folio")).strip(),
            )
        )
    return out


def _folio_samples(source, split: str) -> list[Sample]:
    if source is None:
        rows = read_records(_shipped("folio", f"folio-{split}.jsonl"))
    else:
        rows = _rows(
            source, "folio", "--folio", "FOLIO: github.com/Yale-LILY/FOLIO or hub yale-nlp/FOLIO."
        )
    # v0.0 validation rows have no ids; the position is stable for the shipped file.
    return _folio_rows_to_samples(rows, "")


def _temporal_samples(source) -> list[Sample]:
    if source is None:
        rows = read_records(_shipped("bbh", "temporal_sequences.json"))
    else:
        rows = _rows(
            source, "temporal", "--temporal", "BBH: github.com/suzgunmirac/BIG-Bench-Hard."
        )
    return [
        Sample(
            str(i),
            str(_field(r, "input", what="temporal")).strip(),
            str(_field(r, "target", what="temporal")).strip(),
        )
        for i, r in enumerate(rows)
    ]


VAL_FOLIO_N = 100


def _val_folio_samples(source, seed: int) -> list[Sample]:
    if source is None:
        rows = read_records(_shipped("folio", "folio-train.jsonl"))
    else:
        rows = _rows(source, "val_folio", "--folio-train", "FOLIO: github.com/Yale-LILY/FOLIO.")
    samples = _folio_rows_to_samples(rows, "train-")
    idx = sorted(random.Random(seed).sample(range(len(samples)), min(VAL_FOLIO_N, len(samples))))
    return [samples[i] for i in idx]


@dataclass(frozen=True)
class Benchmark:
    """A known benchmark: its grader, its column name in tables, the CLI flag for its
    data, and its loader (source, seed) -> samples."""

    grader: str
    display: str
    flag: str
    load: Callable[[Any, int], list[Sample]]


TASKS: dict[str, Benchmark] = {
    "aime": Benchmark(
        "aime",
        "AIME-120",
        "--aime",
        lambda src, _: _load_aime(src, range(2022, 2026), "aime", "--aime"),
    ),
    "folio": Benchmark(
        "folio", "FOLIO", "--folio", lambda src, _: _folio_samples(src, "validation")
    ),
    "temporal": Benchmark(
        "temporal", "Temporal", "--temporal", lambda src, _: _temporal_samples(src)
    ),
    "gpqa": Benchmark("gpqa", "GPQA-Diamond", "--gpqa", _gpqa_samples),
    "val_aime": Benchmark(
        "aime",
        "AIME-2021 (val)",
        "--aime2021",
        lambda src, _: _load_aime(src, range(2021, 2022), "val_aime", "--aime2021"),
    ),
    "val_folio": Benchmark("folio", "FOLIO-train-100 (val)", "--folio-train", _val_folio_samples),
}
GROUPS = {"paper": ["aime", "folio", "temporal", "gpqa"], "validation": ["val_aime", "val_folio"]}


def expand_task_names(names: str | list[str]) -> list[str]:
    """'paper,ppl' -> ['aime', 'folio', 'temporal', 'gpqa', 'ppl'] (unknown names error)."""
    if isinstance(names, str):
        names = [n for n in re.split(r"[,\s]+", names) if n]
    out: list[str] = []
    for n in names:
        n = n.strip().lower()
        for m in GROUPS.get(n, [n]):
            if m not in TASKS and m != "ppl":
                known = ", ".join([*TASKS, "ppl", *GROUPS])
                raise QuantLRMError(f"Unknown task {m!r}.", f"use one of: {known}.")
            if m not in out:
                out.append(m)
    return out


def load_task(
    name: str, source: str | Path | None = None, *, seed: int = 0, limit: int | None = None
) -> Task:
    """Load a known benchmark as a `Task` (see the module docstring for names and schemas).

    `source` overrides the shipped data (folio, temporal, val_folio) or provides the data
    that cannot be shipped (aime, val_aime, gpqa). `seed` fixes GPQA option order and
    the validation FOLIO subset.
    """
    key = name.strip().lower()
    if key not in TASKS:
        expand_task_names([key])  # raises "unknown task", listing the known ones
        raise QuantLRMError(
            f"{name!r} is not a single benchmark.",
            "expand groups with expand_task_names(); 'ppl' is computed by evaluate().",
        )
    bench = TASKS[key]
    return Task(key, bench.load(source, seed), bench.grader, bench.display).head(limit)

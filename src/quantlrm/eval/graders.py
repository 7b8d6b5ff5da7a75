"""Answer extraction and grading: the one place where a completion is judged right or wrong.

Conventions follow the paper's evaluation (SPEC.md section 3):

- the text after the last ``</think>`` is graded when present (the reasoning before it
  mentions many candidate answers); otherwise the whole completion;
- ``aime``: the integer inside the last ``\\boxed{...}`` (nested braces, spaces, leading
  zeros, thousands separators, ``$``, ``\\text{}`` and ``^\\circ`` are tolerated);
- ``temporal`` / ``gpqa``: the last option letter A-H (the benchmarks use A-D; the
  demo's synthetic variants use up to H; I and J are left out so "Answer: I think"
  is no answer). Letters marked as the answer
  ("Answer: B", "answer is (B)", "**B**", ``\\boxed{B}``) win over bare "(B)" mentions,
  so "The answer is (B), not (A)" grades as B;
- ``folio``: the last True / False / Uncertain (``Unknown`` counts as Uncertain, as in
  FOLIO's training split), with the same preference for answer-marked words.

References may be given in the datasets' own forms: "(A)", "A", "042", 42, "True",
"Unknown". Extra graders for synthetic tasks: ``number`` (boxed integer, else the last
integer in the text), ``choice`` (option letters A-J), ``exact`` (last non-empty line,
case- and whitespace-insensitive).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from quantlrm.errors import QuantLRMError

__all__ = [
    "GRADERS",
    "answer_text",
    "extract",
    "extract_boxed",
    "extract_choice",
    "extract_integer",
    "extract_label",
    "grade",
    "normalize_reference",
]

_THINK_END = "</think>"


def answer_text(completion: str) -> str:
    """The part of a completion that holds the final answer (after the last ``</think>``)."""
    i = completion.rfind(_THINK_END)
    return completion[i + len(_THINK_END) :] if i >= 0 else completion


# ---------------------------------------------------------------- \boxed{...} and integers


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), balancing nested braces."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            best = text[m.end() : j - 1]
    if best is None:  # "\boxed 42" without braces
        ms = list(re.finditer(r"\\boxed\s+(-?\d[\d,]*)", text))
        if ms:
            best = ms[-1].group(1)
    return best


def _clean_math(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)  # degrees
    s = s.replace("{,}", ",")  # LaTeX thousands separator "1{,}000"
    s = re.sub(r"\\[,;:! $]|~|\$|\\\(|\\\)|\\\[|\\\]", "", s)  # spacing, \$, math delimiters
    s = re.sub(r"^\s*[a-zA-Z]\w*\s*=\s*", "", s)  # "x = 42", "N=42"
    s = s.strip().rstrip(".")
    return s.replace(" ", "")


def _as_integer(s: str) -> int | None:
    s = _clean_math(s)
    # Thousands separators only in well-formed groups ("1,000"), never a list ("1,2").
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    m = re.fullmatch(r"([+-]?\d+)\.0*", s)  # "42.0"
    return int(m.group(1)) if m else None


def extract_integer(text: str, fallback_last_number: bool = False) -> int | None:
    """The integer in the last ``\\boxed{}``; optionally the last integer in the text."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return _as_integer(boxed)
    if fallback_last_number:
        nums = re.findall(r"(?<![\w.])-?\d+(?:,\d{3})*(?![\w]|\.\d)", text)
        if nums:
            return _as_integer(nums[-1])
    return None


# ---------------------------------------------------------------- option letters


def _choice_patterns(letters: str) -> tuple[list[re.Pattern], list[re.Pattern]]:
    L = f"[{letters}]"
    end = r"(?![A-Za-z0-9'])"
    marked = [
        # "Answer: B", "answer is (B)", "Final answer: **C**", "the correct option is D"
        rf"(?i:answer)(?:\s+is)?\s*(?::|-|=)?\s*(?:\*\*|\*)?\s*(?:\\boxed\{{)?\(?({L})\)?{end}",
        # "option C", "the correct choice is (C)"; not an echoed "Options:\n(A) ..." list
        rf"(?i:option|choice)\s+(?:is\s+)?\(?({L})\)?{end}",
        rf"\\boxed\{{\s*(?:\\text(?:bf)?\{{)?\s*\(?({L})\)?{end}",  # \boxed{B}, \boxed{\text{(B)}}
        rf"\*\*\s*\(?({L})\)?\s*(?:[.:)]\s*)?\*\*",  # **B**, **(B)**, **B.**
    ]
    bare = [
        rf"\(({L})\)",  # (B)
        rf"(?m)^\s*\[?({L})\]?\s*[.):]?\s*$",  # a line that is only "B" / "B." / "B)"
    ]
    return [re.compile(p) for p in marked], [re.compile(p) for p in bare]


_CHOICE = {n: _choice_patterns(n) for n in ("A-H", "A-J")}


def _last_match(text: str, tiers: tuple[list[re.Pattern], ...]) -> str | None:
    for tier in tiers:
        best = None  # (end position, value)
        for p in tier:
            for m in p.finditer(text):
                if best is None or m.end() > best[0]:
                    best = (m.end(), m.group(1))
        if best is not None:
            return best[1]
    return None


def extract_choice(text: str, letters: str = "A-H") -> str | None:
    """The last option letter given as the answer (answer-marked forms beat bare "(X)")."""
    if letters not in _CHOICE:
        _CHOICE[letters] = _choice_patterns(letters)
    return _last_match(text, _CHOICE[letters])


# ---------------------------------------------------------------- True / False / Uncertain

_LABEL_WORD = r"(true|false|uncertain|unknown)"
_LABEL_MARKED = [
    re.compile(p, re.I)
    for p in (
        # "answer: X", "the conclusion is X"; not the echoed "is the conclusion True, False, ..."
        rf"(?:answer|conclusion|statement|label|verdict)(?:\s+is|\s*[:=-])\s*(?:\*\*|\*)?\s*(?:\\boxed\{{)?\s*(?:\\text\{{)?\s*\(?{_LABEL_WORD}\b",
        rf"\\boxed\{{\s*(?:\\text(?:bf)?\{{)?\s*{_LABEL_WORD}\b",
        rf"\*\*\s*{_LABEL_WORD}\s*[.!]?\s*\*\*",
    )
]
_LABEL_BARE = [re.compile(rf"\b{_LABEL_WORD}\b", re.I)]


def _canon_label(word: str) -> str:
    w = word.strip().lower()
    return "Uncertain" if w == "unknown" else w.capitalize()


def extract_label(text: str) -> str | None:
    """The last True / False / Uncertain in the answer (``Unknown`` -> ``Uncertain``)."""
    found = _last_match(text, (_LABEL_MARKED, _LABEL_BARE))
    return _canon_label(found) if found else None


# ---------------------------------------------------------------- references and registry


def normalize_reference(grader: str, reference: object) -> object:
    """A dataset's reference in the form the extractor returns ("(A)" -> "A", "042" -> 42)."""
    kind = _kind(grader)
    ref = str(reference).strip()
    if kind == "integer":
        value = extract_integer(ref) if "boxed" in ref else _as_integer(ref)
        if value is None:
            raise QuantLRMError(
                f"Reference {reference!r} is not an integer ({grader} grader).",
                "give integer answers such as 42 or '042'.",
            )
        return value
    if kind == "choice":
        m = re.match(r"^\s*\(?\s*([A-Za-z])\s*\)?(?:$|[\s.:)])", ref)
        if not m:
            raise QuantLRMError(
                f"Reference {reference!r} is not an option letter ({grader} grader).",
                "give references like 'B' or '(B)'.",
            )
        return m.group(1).upper()
    if kind == "label":
        if ref.lower() not in ("true", "false", "uncertain", "unknown"):
            raise QuantLRMError(
                f"Reference {reference!r} is not True/False/Uncertain ({grader} grader).",
                "give FOLIO labels True, False, Uncertain (or Unknown).",
            )
        return _canon_label(ref)
    return _norm_exact(ref)


def _norm_exact(s: str) -> str:
    return " ".join(s.split()).strip(" .").lower()


def _last_line(text: str) -> str | None:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return _norm_exact(lines[-1]) if lines else None


# grader name -> (kind, extractor on the answer text)
GRADERS: dict[str, tuple[str, Callable[[str], object]]] = {
    "aime": ("integer", extract_integer),
    "number": ("integer", lambda t: extract_integer(t, fallback_last_number=True)),
    "temporal": ("choice", extract_choice),
    "gpqa": ("choice", extract_choice),
    "choice": ("choice", lambda t: extract_choice(t, "A-J")),
    "folio": ("label", extract_label),
    "exact": ("exact", _last_line),
}
_ALIASES = {"aime120": "aime", "val_aime": "aime", "val_folio": "folio", "bbh_temporal": "temporal"}


def _kind(grader: str) -> str:
    return GRADERS[_resolve(grader)][0]


def _resolve(grader: str) -> str:
    g = _ALIASES.get(grader, grader)
    if g not in GRADERS:
        raise QuantLRMError(
            f"Unknown grader {grader!r}.", f"use one of: {', '.join(sorted(GRADERS))}."
        )
    return g


def extract(grader: str, completion: str) -> object:
    """The answer a grader reads from a completion (None when there is none)."""
    return GRADERS[_resolve(grader)][1](answer_text(completion))


def grade(task: str, completion: str, reference: object) -> bool:
    """True when the completion's final answer matches the reference under `task`'s rules."""
    ref = normalize_reference(task, reference)
    got = extract(task, completion)
    return got is not None and got == ref

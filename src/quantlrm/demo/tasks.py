"""Synthetic reasoning tasks with chain-of-thought answers, small enough for byte-level models.

Four families mirror the paper's benchmarks in miniature, each graded by the evaluation
harness's grader of the same kind:

- ``arith``    (AIME-like): multi-step integer arithmetic, answer in ``\\boxed{N}``  -> grader ``aime``
- ``temporal`` (BBH-like): find the free time slot, lettered options, ``Answer: (X)`` -> ``temporal``
- ``logic``    (FOLIO-like): chained all/no rules, ``Answer: True|False|Uncertain``   -> ``folio``
- ``science``  (GPQA-like): apply a physics/chemistry rule, lettered options          -> ``gpqa``

Generators are deterministic under a seed. Train and test splits are disjoint by
construction: a problem belongs to the test split iff a stable hash of its prompt falls in
the held-out bucket, so no test prompt is ever seen in training, whatever the seeds.
``level`` raises difficulty (more steps / more distractors) for bigger models (the GPU zoo).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from quantlrm.errors import QuantLRMError

# Every prompt ends with this cue; the completion is the reasoning, then the final answer.
THINK = "\n<think>\n"
END_THINK = "</think>\n"
_LETTERS = "ABCDEFGH"
_TEST_BUCKETS = 8  # 1 in 8 prompts is held out for testing


@dataclass(frozen=True)
class Problem:
    """One question: `question` (raw text, as the eval harness stores prompts), `cot`
    (reasoning + final answer, the SFT target) and `answer` (the grader's reference).

    The model sees `prompt` = question + "\n<think>\n", exactly what the eval harness
    feeds by default (raw prompt + think suffix, as the paper's authors did).
    """

    family: str
    question: str
    cot: str
    answer: str

    @property
    def prompt(self) -> str:
        return self.question + THINK

    @property
    def text(self) -> str:
        return self.prompt + self.cot


@dataclass(frozen=True)
class Family:
    name: str
    grader: str  # name of the quantlrm.eval grader for this family
    chance: float  # accuracy of guessing uniformly among the options
    make: Callable[[random.Random, int], Problem]
    # Short label used in tables, in the paper's column names.
    label: str


def is_test_prompt(prompt: str) -> bool:
    """The held-out split: a stable hash bucket of the prompt (independent of seeds)."""
    h = hashlib.blake2b(prompt.encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") % _TEST_BUCKETS == 0


# ---------------------------------------------------------------------------- arithmetic


def _arith(rng: random.Random, level: int) -> Problem:
    # level 1 (the CPU demo): two operations on numbers below 30; level 2+: longer chains
    # of two-digit numbers.
    n_ops = 2 if level <= 1 else rng.randint(2, 2 + level)
    hi = 29 if level <= 1 else 99
    acc = rng.randint(2, hi)
    expr = str(acc)
    steps = []
    for _ in range(n_ops):
        b = rng.randint(2, hi)
        op = "-" if (b <= acc and rng.random() < 0.5) else "+"
        new = acc + b if op == "+" else acc - b
        steps.append(f"{acc}{op}{b}={new}.")
        expr += f"{op}{b}"
        acc = new
    prompt = f"Compute {expr}."
    cot = " ".join(steps) + f"\n{END_THINK}\\boxed{{{acc}}}"
    return Problem("arith", prompt, cot, str(acc))


# ---------------------------------------------------------------------------- temporal

_NAMES = ("Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida", "Jo", "Kim", "Lee")
_PLACES = ("gym", "park", "cafe", "shop", "bank", "zoo", "mall", "pool", "lab", "club")


def _temporal(rng: random.Random, level: int) -> Problem:
    n_slots = 4 if level <= 1 else 5
    # Cut the day [start, end] into n_slots consecutive intervals; one of them is free.
    start = rng.randint(1, 4)
    cuts = sorted(rng.sample(range(start + 1, start + 3 * n_slots), n_slots - 1))
    bounds = [start, *cuts, start + 3 * n_slots]
    slots = [(bounds[i], bounds[i + 1]) for i in range(n_slots)]
    free = rng.randrange(n_slots)
    name = rng.choice(_NAMES)
    places = rng.sample(_PLACES, n_slots)
    busy = [(s, p) for i, (s, p) in enumerate(zip(slots, places, strict=True)) if i != free]
    shown = busy[:]
    rng.shuffle(shown)
    facts = " ".join(f"{p} {a}-{b}." for (a, b), p in shown)
    options = slots[:]
    rng.shuffle(options)
    letter = _LETTERS[options.index(slots[free])]
    opts = " ".join(f"({_LETTERS[i]}) {a}-{b}" for i, (a, b) in enumerate(options))
    prompt = f"{name} was awake {bounds[0]}-{bounds[-1]}. {facts} When was {name} free?\n{opts}"
    busy_sorted = ", ".join(f"{a}-{b}" for (a, b), _ in sorted(busy))
    # Walk the options up to the free slot: the letter is then the one just written, so the
    # model copies forward instead of searching backwards for the matching option.
    walk = []
    for i, (a, b) in enumerate(options[: options.index(slots[free]) + 1]):
        walk.append(f"({_LETTERS[i]}) {a}-{b} {'yes' if (a, b) == slots[free] else 'no'}.")
    cot = (f"Busy {busy_sorted}. Free {slots[free][0]}-{slots[free][1]}. {' '.join(walk)}"
           f"\n{END_THINK}Answer: ({letter})")
    return Problem("temporal", prompt, cot, letter)


# ---------------------------------------------------------------------------- logic

_KINDS = ("wug", "dax", "fep", "blick", "zorp", "mib", "tov", "gark", "nim", "pell", "rux", "sond")


def _logic(rng: random.Random, level: int) -> Problem:
    depth = rng.randint(1, 2 + level)
    kinds = rng.sample(_KINDS, depth + 2)
    chain, spare = kinds[: depth + 1], kinds[depth + 1]
    name = rng.choice(_NAMES)
    # All rules but possibly the last are "All X are Y"; the last may be "No X are Y".
    neg_last = rng.random() < 0.5
    rules = [f"All {a}s are {b}s." for a, b in zip(chain[:-2], chain[1:-1], strict=True)]
    a, b = chain[-2], chain[-1]
    rules.append(f"No {a}s are {b}s." if neg_last else f"All {a}s are {b}s.")
    kind = rng.random()
    if kind < 1 / 3:
        target, label = chain[-1], ("False" if neg_last else "True")
    elif kind < 2 / 3:
        target, label = spare, "Uncertain"
        rules.append(f"All {spare}s are {chain[0]}s.")  # distractor pointing the wrong way
    else:
        # Claim about an intermediate or the final kind, flipped to a negative claim.
        target = chain[-1]
        label = "True" if neg_last else "False"
    negated_claim = kind >= 2 / 3
    shown = rules[:]
    rng.shuffle(shown)
    claim = f"{name} is {'not ' if negated_claim else ''}a {target}."
    prompt = f"{' '.join(shown)} {name} is a {chain[0]}. Claim: {claim}"
    steps = [f"{name} is a {k}." for k in chain[:-1]]
    steps.append(f"{name} is {'not ' if neg_last else ''}a {chain[-1]}.")
    if target == spare:
        steps.append(f"Nothing says if {name} is a {spare}.")
    cot = " ".join(steps) + f"\n{END_THINK}Answer: {label}"
    return Problem("logic", prompt, cot, label)


# ---------------------------------------------------------------------------- science


def _science(rng: random.Random, level: int) -> Problem:
    kind = rng.randrange(3)
    if kind == 0:
        p, n = rng.randint(1, 30), rng.randint(1, 30)
        q = f"An atom has {p} protons and {n} neutrons. What is its mass number?"
        value, work = p + n, f"Mass number = protons + neutrons = {p}+{n} = {p + n}."
        wrong = [abs(p - n), p, n, p + n + rng.choice((1, 2)), max(p + n - rng.choice((1, 2)), 0)]
    elif kind == 1:
        p = rng.randint(3, 30)
        e = p + rng.randint(-3, 3)
        q = f"An ion has {p} protons and {e} electrons. What is its charge?"
        value, work = p - e, f"Charge = protons - electrons = {p}-{e} = {p - e}."
        wrong = [e - p, p - e + 1, p - e - 1, p - e + 2]
    else:
        m, a = rng.randint(2, 9), rng.randint(2, 9)
        q = f"A force accelerates a {m} kg mass at {a} m/s2. What is the force in N?"
        value, work = m * a, f"F = m*a = {m}*{a} = {m * a}."
        wrong = [m + a, m * a + m, m * a - a, m * (a + 1)]
    fmt = (lambda v: f"{v:+d}" if v else "0") if kind == 1 else str
    n_opt = 4 if level <= 1 else 5
    distract = []
    for w in wrong:
        if w != value and fmt(w) not in distract:
            distract.append(fmt(w))
    while len(distract) < n_opt - 1:  # pad with nearby values
        w = value + rng.choice((-5, -4, -3, 3, 4, 5)) * (1 + len(distract))
        if w != value and fmt(w) not in distract:
            distract.append(fmt(w))
    options = [fmt(value), *rng.sample(distract, n_opt - 1)]
    rng.shuffle(options)
    letter = _LETTERS[options.index(fmt(value))]
    opts = " ".join(f"({_LETTERS[i]}) {o}" for i, o in enumerate(options))
    prompt = f"{q}\n{opts}"
    cot = f"{work} That is {fmt(value)}.\n{END_THINK}Answer: ({letter})"
    return Problem("science", prompt, cot, letter)


FAMILIES: dict[str, Family] = {
    "arith": Family("arith", "aime", 0.0, _arith, "AIME-like"),
    "temporal": Family("temporal", "temporal", 0.25, _temporal, "Temporal"),
    "logic": Family("logic", "folio", 1 / 3, _logic, "FOLIO-like"),
    "science": Family("science", "gpqa", 0.25, _science, "GPQA-like"),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise QuantLRMError(
            f"Unknown synthetic task family {name!r}.", f"use one of {', '.join(FAMILIES)}."
        )
    return FAMILIES[name]


def generate(family: str, n: int, seed: int = 0, split: str = "train", level: int = 1) -> list[Problem]:
    """`n` distinct problems of one family from the given split ("train" or "test")."""
    fam = get_family(family)
    if split not in ("train", "test"):
        raise QuantLRMError(f"Unknown split {split!r}.", "use 'train' or 'test'.")
    want_test = split == "test"
    # Seed stream depends on family, split and seed, so splits and families never correlate.
    key = f"{family}/{split}/{seed}/{level}".encode()
    rng = random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))
    out: list[Problem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise QuantLRMError(
                f"Could only make {len(out)} distinct {split} problems of {family!r}.",
                "ask for fewer problems or a higher level.",
            )
        p = fam.make(rng, level)
        if p.question in seen or is_test_prompt(p.question) != want_test:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def mixture(families: list[str], n_per_family: int, seed: int = 0, split: str = "train",
            level: int = 1) -> list[Problem]:
    """Problems of several families, interleaved deterministically."""
    per = [generate(f, n_per_family, seed, split, level) for f in families]
    rng = random.Random(seed)
    out = [p for ps in per for p in ps]
    rng.shuffle(out)
    return out

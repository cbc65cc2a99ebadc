"""Procedural textbook exercises with worked solutions and a final answer that `verify` can check.

`exercise(seed, index)` is a pure function of its arguments (a fresh RNG per index, no shared state), so a
grain MapDataset can index it directly and every host sees the same exercise. One stream serves pretraining
text (`render_document`), SFT prompts and targets (`question`, `solution`) and Pivotal Token Search, which
samples completions to a question and scores each with `verify`. All arithmetic is exact (`Fraction`).

Answers are integers, reduced fractions `a/b` or decimals. A question whose answer is rounded says so
("rounded to 2 decimal places"), and a question with a unit names it ("Give your answer in meters");
`verify` reads both back from the question, so an `Exercise` needs no other fields.

Families: `FAMILIES` are the textbook families, the default mix ('' in a families key); the
`column_addition` drills (`column_addition.NAMES`: digits and operands in the name) are drawn only
when named, so the default streams do not depend on them.

Layout: this module holds the family registry and the stream; each family is a function `rng -> Exercise` in
`arithmetic`, `algebra`, `measures`, `proportion`, `number_theory` or `column_addition`, written with the
shared wording in `text` and `units`; `verifier` checks responses; `reasoning` is the think-then-answer
format and the rewards of a response. The package imports nothing above it.
"""

from __future__ import annotations

import itertools
import operator
import random
import zlib
from collections.abc import Callable, Iterator, Sequence

from phi4_jax.data.synthetic import (algebra, arithmetic, column_addition, long_range, measures,
                                     number_theory, proportion)
from phi4_jax.data.synthetic.text import REFUSAL, Exercise
from phi4_jax.data.synthetic.unanswerable import WORD_FAMILIES, unanswerable
from phi4_jax.data.synthetic.verifier import extract_final_answer, verify

__all__ = ["FAMILIES", "REFUSAL", "Exercise", "documents", "exercise", "extract_final_answer",
           "filler_text", "long_range_exercise", "parse_families", "render_document",
           "unanswerable_exercise", "verify"]

_GENERATORS: dict[str, Callable[[random.Random], Exercise]] = {
    "arithmetic": arithmetic.order_of_operations,
    "linear_equation": algebra.linear_equation,
    "unit_conversion": measures.unit_conversion,
    "percentage": proportion.percentage,
    "ratio": proportion.ratio,
    "rate": measures.rate,
    "gcd_lcm": number_theory.gcd_lcm,
    "modular": number_theory.modular,
}
FAMILIES: tuple[str, ...] = tuple(_GENERATORS)
_CHOICES = f"{','.join(FAMILIES)} ('' = all of these), or {column_addition.NAMES}"


def _generator(name: str) -> Callable[[random.Random], Exercise] | None:
    """The exercise maker a family name selects, None for an unknown name."""
    return _GENERATORS[name] if name in _GENERATORS else column_addition.generator(name)


def _non_negative(name: str, value: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def parse_families(names: str, key: str) -> tuple[str, ...]:
    """The families a config value names: comma-separated family names, '' for all of `FAMILIES`.

    `key` names the config key in the error, which lists the known families.
    """
    if not isinstance(names, str):
        raise ValueError(f"{key} is {names!r}; give comma-separated family names from {_CHOICES}")
    chosen = tuple(name.strip() for name in names.split(",") if name.strip())
    unknown = [name for name in chosen if _generator(name) is None]
    if unknown:
        raise ValueError(f"{key} names unknown exercise families {unknown}; choose from {_CHOICES}")
    return chosen or FAMILIES


def exercise(seed: int, index: int, families: Sequence[str] = FAMILIES) -> Exercise:
    """The exercise at `index` of the stream `seed`: the same on every machine, whatever was asked before.

    The family is drawn from `families` with the same per-index RNG, so a different `families` gives a
    different stream.
    """
    seed, index = _non_negative("seed", seed), _non_negative("index", index)
    if isinstance(families, str) or not families:
        raise ValueError(f"families must be a non-empty sequence of names from {_CHOICES}, got {families!r}")
    unknown = [f for f in families if _generator(f) is None]
    if unknown:
        raise ValueError(f"unknown exercise families {unknown}; choose from {_CHOICES}")
    rng = random.Random(f"phi4_jax.synthetic/{seed}/{index}")  # str seeds hash with SHA-512: same everywhere
    return _generator(families[rng.randrange(len(families))])(rng)


def unanswerable_exercise(seed: int, index: int) -> Exercise:
    """The unanswerable variant at `index` of the stream `seed` (a word problem with one given
    quantity withheld; its answer is `REFUSAL`), pure like `exercise`."""
    seed, index = _non_negative("seed", seed), _non_negative("index", index)
    rng = random.Random(f"phi4_jax.synthetic.unanswerable/{seed}/{index}")

    def word_problem(rng: random.Random) -> Exercise:
        return _GENERATORS[WORD_FAMILIES[rng.randrange(len(WORD_FAMILIES))]](rng)

    return unanswerable(rng, word_problem)


def filler_text(rng: random.Random) -> str:
    """One exercise of any family, rendered: the filler between a planted fact and its question."""
    return render_document(_GENERATORS[FAMILIES[rng.randrange(len(FAMILIES))]](rng))


def long_range_exercise(seed: int, index: int) -> Exercise:
    """The long-range recall document at `index` of the stream `seed` (see `long_range`): a
    fact, filler exercises, and a question only the fact answers; pure like `exercise`."""
    seed, index = _non_negative("seed", seed), _non_negative("index", index)
    return long_range.long_range(random.Random(f"phi4_jax.synthetic.long_range/{seed}/{index}"), filler_text)


_HEADINGS = (("Problem", "Solution"), ("Exercise", "Worked solution"), ("Question", "Answer"),
             ("Example", "Solution"))


def render_document(ex: Exercise) -> str:
    """Textbook-style text for pretraining: the question, then the worked solution with its final answer."""
    problem, solution = _HEADINGS[zlib.crc32(ex.question.encode()) % len(_HEADINGS)]
    return f"{problem}. {ex.question}\n\n{solution}.\n{ex.solution}\n"


def documents(seed: int, start: int = 0) -> Iterator[str]:
    """The endless stream render_document(exercise(seed, i)) for i = start, start + 1, ..."""
    for index in itertools.count(start):
        yield render_document(exercise(seed, index))

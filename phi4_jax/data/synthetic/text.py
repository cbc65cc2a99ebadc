"""Wording shared by every exercise family: exact numbers as text, question and solution layout, vocabulary.

The `Exercise` record lives here too, so the family modules and the verifier can import it without a cycle
through the package's `__init__`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction


REFUSAL = "I don't know"  # the final answer of an exercise that cannot be answered


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One problem: the prompt, its worked solution and the canonical answer the solution ends with."""

    family: str
    question: str
    solution: str
    answer: str


# ----------------------------------------------------------------------------------------------
# Numbers as text.


def decimal_places(value: Fraction, limit: int = 12) -> int | None:
    """How many decimals `value` needs, or None if it does not terminate within `limit` places.

    A reduced fraction terminates iff its denominator is 2**a * 5**b, after max(a, b) places;
    counted on integers, because this runs for every number of every generated exercise."""
    denominator = value.denominator
    twos = (denominator & -denominator).bit_length() - 1
    denominator >>= twos
    fives = 0
    while denominator % 5 == 0 and fives <= limit:
        denominator //= 5
        fives += 1
    places = max(twos, fives)
    return places if denominator == 1 and places <= limit else None


def fixed(value: Fraction, places: int) -> str:
    """`value`, a multiple of 10**-places, written with exactly `places` decimals."""
    scale, remainder = divmod(10**places, value.denominator)
    if remainder:
        raise ValueError(f"{value} has more than {places} decimals")
    digits = str(abs(value.numerator) * scale).rjust(places + 1, "0")
    sign = "-" if value.numerator < 0 else ""
    return sign + (f"{digits[:-places]}.{digits[-places:]}" if places else digits)


def num(value: Fraction) -> str:
    """An exact value as its shortest decimal if that has at most 8 places, else as a reduced fraction."""
    places = decimal_places(value, limit=8)
    return str(value) if places is None else fixed(value, places)


def money(value: Fraction) -> str:
    """A dollar amount: '40' or '12.50' (whole cents only)."""
    return fixed(value, 0 if value.denominator == 1 else 2)


def round_half_up(value: Fraction, places: int) -> Fraction:
    """`value` rounded to `places` decimals, halves away from zero (the schoolbook rule)."""
    scale = 10**places
    magnitude = math.floor(abs(value) * scale + Fraction(1, 2))
    return Fraction(magnitude if value >= 0 else -magnitude, scale)


def approximately(value: Fraction) -> str:
    """'= 213.36' when `value` terminates within 8 decimals, else '≈ 33.07086614...'.

    The approximation is truncated, not rounded, so every digit shown is a digit of the exact value.
    """
    if decimal_places(value, limit=8) is not None:
        return f"= {num(value)}"
    return f"≈ {fixed(Fraction(math.floor(value * 10**8), 10**8), 8)}..."


def rounding_phrase(places: int) -> str:
    """How a question states its rounding."""
    if places == 0:
        return "the nearest whole number"
    return f"{places} decimal place{'' if places == 1 else 's'}"


# ----------------------------------------------------------------------------------------------
# A question's sentences and a solution's lines.


def join_sentences(*sentences: str) -> str:
    """Sentences joined by single spaces, empty ones left out."""
    return " ".join(s for s in sentences if s)


def worked_solution(lines: Sequence[str], answer: str) -> str:
    """Worked lines followed by the canonical last line."""
    return "\n".join([*lines, f"Final answer: {answer}"])


# ----------------------------------------------------------------------------------------------
# Word-problem vocabulary.

PEOPLE = (("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Dev", "he"), ("Elena", "she"), ("Farid", "he"),
          ("Grace", "she"), ("Hiro", "he"), ("Imani", "she"), ("Jonas", "he"), ("Kavya", "she"),
          ("Liam", "he"), ("Mei", "she"), ("Noah", "he"), ("Olu", "he"), ("Priya", "she"))
POSSESSIVE = {"she": "her", "he": "his"}
ITEMS = ("jacket", "bicycle", "lamp", "backpack", "coffee maker", "chair", "video game", "guitar", "watch",
         "tent")

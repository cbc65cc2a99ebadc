"""Unanswerable variants of the word problems: one given quantity is withheld, and the right
response says so and answers "I don't know" (Phi-4 mixes such refusal data into SFT and DPO).

A variant is its source exercise with the first stated number replaced by a phrase that
withholds it ("an unstated number of", "an unstated price", ...), so nothing in the question
determines the answer; the verifier accepts only a refusal as its final answer.
"""

from __future__ import annotations

import random
import re

from phi4_jax.data.synthetic.text import REFUSAL, Exercise, worked_solution

# The families whose questions state quantities in words a phrase can stand in for.
WORD_FAMILIES = ("gcd_lcm", "rate", "percentage", "ratio", "unit_conversion")

_QUANTITY = re.compile(r"\$\d[\d,]*(?:\.\d+)?|\d+(?:\.\d+)?%|\d+:\d+|\b\d[\d,]*(?:\.\d+)?\b")


def _withheld(quantity: str) -> str:
    if quantity.startswith("$"):
        return "an unstated price"
    if quantity.endswith("%"):
        return "an unstated percentage"
    if ":" in quantity:
        return "an unstated ratio"
    return "an unstated number of"


def withhold_quantity(ex: Exercise) -> Exercise | None:
    """The exercise with its first stated quantity withheld, or None if it states none."""
    match = _QUANTITY.search(ex.question)
    if match is None:
        return None
    phrase = _withheld(match.group())
    if not ex.question[:match.start()].strip() or ex.question[:match.start()].rstrip()[-1] in ".?!":
        phrase = phrase[0].upper() + phrase[1:]
    question = ex.question[:match.start()] + phrase + ex.question[match.end():]
    solution = worked_solution(
        [f"The question does not give one of the quantities it depends on: "
         f"{_withheld(match.group())} stands where a value is needed.",
         "Without it the answer cannot be determined, so I should not guess."], REFUSAL)
    return Exercise(family="unanswerable", question=question, solution=solution, answer=REFUSAL)


def unanswerable(rng: random.Random, exercise_from) -> Exercise:
    """An unanswerable variant drawn with `rng`; `exercise_from(rng)` makes the source problem."""
    while True:
        variant = withhold_quantity(exercise_from(rng))
        if variant is not None:
            return variant

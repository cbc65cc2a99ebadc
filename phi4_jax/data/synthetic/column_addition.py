"""The `column_addition` drill: add numbers of equal length column by column, carries written out.

Built for a small model on a byte-level tokenizer (issue 18's toy experiment): every worked line
has the same shape, `4+7+1=12, write 2 carry 1` (a column's digits, the incoming carry, their sum,
the digit written and the carry out), from the ones column leftwards, then `So 482+739=1221.`,
so the steps carry the whole computation and the answer is read off them. Each sum is drawn
uniformly from every sum the operands can make, so no answer is more likely than another.

The difficulty is in the family name: `column_addition` adds two 3-digit numbers,
`column_addition_<digits>` two numbers of that many digits, `column_addition_<digits>_<operands>`
that many numbers (`column_addition_5_3`: three 5-digit numbers). With at most 9 operands every
carry is one digit.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable

from phi4_jax.data.synthetic.text import Exercise, worked_solution

FAMILY = "column_addition"
DIGITS = range(1, 13)
OPERANDS = range(2, 10)
DEFAULT_DIGITS, DEFAULT_OPERANDS = 3, 2
NAMES = (f"{FAMILY}[_<digits {DIGITS[0]}-{DIGITS[-1]}>"
         f"[_<operands {OPERANDS[0]}-{OPERANDS[-1]}>]]")
_NAME = re.compile(rf"{FAMILY}(?:_(\d+)(?:_(\d+))?)?")


def generator(name: str) -> Callable[[random.Random], Exercise] | None:
    """The exercise maker a family name selects (see the module docstring), or None if the name
    is not a column_addition name or its digits or operands are out of range."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    digits = int(match.group(1) or DEFAULT_DIGITS)
    operands = int(match.group(2) or DEFAULT_OPERANDS)
    if digits not in DIGITS or operands not in OPERANDS:
        return None
    return functools.partial(column_addition, digits=digits, operands=operands, family=name)


def _operands_with_sum(rng: random.Random, total: int, digits: int, count: int) -> list[int]:
    """`count` numbers of `digits` digits adding up to `total`, each drawn uniformly from what
    still leaves the rest a reachable sum, in random order."""
    low, high = 10 ** (digits - 1), 10**digits - 1
    numbers = []
    for left in range(count - 1, 0, -1):
        number = rng.randint(max(low, total - left * high), min(high, total - left * low))
        numbers.append(number)
        total -= number
    numbers.append(total)
    rng.shuffle(numbers)
    return numbers


def _column_lines(numbers: list[int]) -> list[str]:
    """One line per column, ones first: its digits, the carry in, the sum, the digit written
    and the carry out."""
    width = len(str(max(numbers)))
    columns = zip(*(str(n).rjust(width, "0")[::-1] for n in numbers))
    lines, carry = [], 0
    for column in columns:
        total = sum(map(int, column)) + carry
        lines.append(f"{'+'.join(column)}+{carry}={total}, write {total % 10} carry {total // 10}")
        carry = total // 10
    return lines


def column_addition(rng: random.Random, *, digits: int, operands: int, family: str) -> Exercise:
    """`operands` numbers of `digits` digits whose sum is uniform over every reachable sum."""
    low, high = 10 ** (digits - 1), 10**digits - 1
    total = rng.randint(operands * low, operands * high)
    numbers = _operands_with_sum(rng, total, digits, operands)
    expression = "+".join(map(str, numbers))
    lines = [*_column_lines(numbers), f"So {expression}={total}."]
    return Exercise(family, f"What is {expression}?", worked_solution(lines, str(total)),
                    str(total))

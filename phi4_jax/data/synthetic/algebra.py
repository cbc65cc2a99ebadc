"""The `linear_equation` family: one unknown, solved by the balance method and checked by substitution.

Four symbolic forms (a·x + b = c, unknowns on both sides, brackets, x/a + b = c) and a number puzzle, with
whole-number coefficients chosen so that the solution is an integer or a simple fraction.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

from phi4_jax.data.synthetic.text import PEOPLE, Exercise, num, worked_solution


_Equation = tuple[str, list[str], Fraction, Fraction, Fraction]  # text, steps, solution, left and right at it


def _linear_text(coefficient: int, constant: int, var: str) -> str:
    """coefficient·var + constant as written: '3x - 7', '-x', 'x + 4', '5'."""
    if coefficient == 0:
        return str(constant)
    term = {1: var, -1: f"-{var}"}.get(coefficient, f"{coefficient}{var}")
    if constant == 0:
        return term
    return f"{term} {'+' if constant > 0 else '-'} {abs(constant)}"


def _equation(a: int, b: int, c: int, d: int, var: str) -> str:
    """The equation a·var + b = c·var + d."""
    return f"{_linear_text(a, b, var)} = {_linear_text(c, d, var)}"


def _change_both_sides(amount: int, var: str = "") -> str:
    """'Add 3x to both sides:' for a positive amount, 'Subtract 3x from both sides:' for a negative one."""
    size = abs(amount)
    term = (var if size == 1 else f"{size}{var}") if var else str(size)
    return f"Add {term} to both sides:" if amount > 0 else f"Subtract {term} from both sides:"


def _isolate(a: int, b: int, c: int, d: int, var: str) -> list[str]:
    """Steps solving a·var + b = c·var + d (a != c): the unknown to the left, the numbers to the right."""
    lines = []
    if c != 0:
        lines += [_change_both_sides(-c, var), _equation(a - c, b, 0, d, var)]
        a, c = a - c, 0
    if b != 0:
        lines += [_change_both_sides(-b), _equation(a, 0, 0, d - b, var)]
        b, d = 0, d - b
    if a == -1:
        lines += ["Multiply both sides by -1:", f"{var} = {-d}"]
    elif a != 1:
        numerator, denominator = (d, a) if a > 0 else (-d, -a)
        lines += [f"Divide both sides by {a}:", f"{var} = {numerator}/{denominator}"]
        if math.gcd(numerator, denominator) != 1:
            lines += ["Simplify the fraction:", f"{var} = {Fraction(numerator, denominator)}"]
    return lines


def _unknown_value(rng: random.Random) -> Fraction:
    """Mostly a small integer; sometimes a simple fraction p/q with q from 2 to 5."""
    if rng.random() < 0.75:
        return Fraction(rng.randint(-12, 12))
    denominator = rng.randint(2, 5)
    numerator = rng.choice([p for p in range(-15, 16) if p != 0 and math.gcd(p, denominator) == 1])
    return Fraction(numerator, denominator)


def _nonzero(rng: random.Random, low: int, high: int) -> int:
    """A random integer in ±[low, high]."""
    return rng.choice((-1, 1)) * rng.randint(low, high)


def _one_sided_equation(rng: random.Random, var: str) -> _Equation:
    """a·x + b = c; for x = p/q the coefficient is a multiple of q so that c is whole."""
    x = _unknown_value(rng)
    a = x.denominator * _nonzero(rng, 1, 3) if x.denominator > 1 else _nonzero(rng, 2, 9)
    b = _nonzero(rng, 1, 20)
    c = int(a * x + b)
    return _equation(a, b, 0, c, var), _isolate(a, b, 0, c, var), x, a * x + b, Fraction(c)


def _two_sided_equation(rng: random.Random, var: str) -> _Equation:
    """a·x + b = c·x + d, with a - c a multiple of x's denominator."""
    x = _unknown_value(rng)
    while True:
        c = _nonzero(rng, 1, 9)
        a = c + x.denominator * _nonzero(rng, 1, 3)
        if a != 0:
            break
    b = _nonzero(rng, 1, 20)
    d = int((a - c) * x + b)
    return _equation(a, b, c, d, var), _isolate(a, b, c, d, var), x, a * x + b, c * x + d


def _bracket_equation(rng: random.Random, var: str) -> _Equation:
    """a(x + b) = c, solved by expanding first."""
    x = _unknown_value(rng)
    a = x.denominator * rng.randint(1, 3) if x.denominator > 1 else rng.randint(2, 9)
    b = _nonzero(rng, 1, 9)
    c = int(a * (x + b))
    lines = ["Expand the brackets:", _equation(a, a * b, 0, c, var), *_isolate(a, a * b, 0, c, var)]
    return f"{a}({_linear_text(1, b, var)}) = {c}", lines, x, a * (x + b), Fraction(c)


def _quotient_equation(rng: random.Random, var: str) -> _Equation:
    """x/a + b = c with a whole solution."""
    a = rng.randint(2, 6)
    x = Fraction(a * _nonzero(rng, 1, 6))
    b = _nonzero(rng, 1, 15)
    c = int(x / a + b)
    lines = [_change_both_sides(-b), f"{var}/{a} = {c - b}",
             f"Multiply both sides by {a}:", f"{var} = {a * (c - b)}"]
    return f"{var}/{a} {'+' if b > 0 else '-'} {abs(b)} = {c}", lines, x, x / a + b, Fraction(c)


def _symbolic_linear_equation(rng: random.Random) -> Exercise:
    var = rng.choice("xyntkmpw")
    form = rng.choice((_one_sided_equation, _two_sided_equation, _bracket_equation, _quotient_equation))
    equation, lines, x, left, right = form(rng, var)
    leads = (f"Solve the following equation for {var}.",
             f"Find the value of {var} that satisfies the equation below.",
             f"Solve for {var}:", f"Determine {var}:")
    note = rng.choice(("", f"If {var} is not a whole number, give it as a fraction in lowest terms."))
    question = f"{rng.choice(leads)}\n\n{equation}" + (f"\n\n{note}" if note else "")
    lines.append(f"Check: with {var} = {x}, the left side is {num(left)} "
                 f"and the right side is {num(right)}.")
    return Exercise("linear_equation", question, worked_solution(lines, str(x)), str(x))


def _number_puzzle(rng: random.Random) -> Exercise:
    """'I think of a number...': the equation a·n + b = c set as a word problem."""
    a, b, n = rng.randint(2, 9), _nonzero(rng, 1, 30), rng.randint(2, 30)
    c = a * n + b
    verb, gerund = ("add", "adding") if b > 0 else ("subtract", "subtracting")
    name, _ = rng.choice(PEOPLE)
    templates = (
        f"I think of a number. If I multiply it by {a} and then {verb} {abs(b)}, the result is {c}. "
        f"What is my number?",
        f"{name} thinks of a number. When you multiply it by {a} and then {verb} {abs(b)}, "
        f"the result is {c}. What number did {name} think of?",
    )
    lines = [f"Call the number n. Multiplying by {a} and then {gerund} {abs(b)} gives {c}, so",
             _equation(a, b, 0, c, "n"), *_isolate(a, b, 0, c, "n"),
             f"Check: {a} × {n} = {a * n}, and {a * n} {'+' if b > 0 else '-'} {abs(b)} = {c}."]
    return Exercise("linear_equation", rng.choice(templates), worked_solution(lines, str(n)), str(n))


def linear_equation(rng: random.Random) -> Exercise:
    """A linear equation to solve: symbolic four times in five, otherwise a number puzzle."""
    return _number_puzzle(rng) if rng.random() < 0.2 else _symbolic_linear_equation(rng)

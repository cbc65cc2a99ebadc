"""Procedural textbook exercises with worked solutions and a final answer that `verify` can check.

`exercise(seed, index)` is a pure function of its arguments (a fresh RNG per index, no shared state), so a
grain MapDataset can index it directly and every host sees the same exercise. One stream serves pretraining
text (`render_document`), SFT prompts and targets (`question`, `solution`) and Pivotal Token Search, which
samples completions to a question and scores each with `verify`. All arithmetic is exact (`Fraction`).

Answers are integers, reduced fractions `a/b` or decimals. A question whose answer is rounded says so
("rounded to 2 decimal places"), and a question with a unit names it ("Give your answer in meters");
`verify` reads both back from the question, so an `Exercise` needs no other fields.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import random
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One problem: the prompt, its worked solution and the canonical answer the solution ends with."""

    family: str
    question: str
    solution: str
    answer: str


# ----------------------------------------------------------------------------------------------
# Numbers as text.


def _decimal_places(value: Fraction, limit: int = 12) -> int | None:
    """How many decimals `value` needs, or None if it does not terminate within `limit` places."""
    for places in range(limit + 1):
        if (value * 10**places).denominator == 1:
            return places
    return None


def _fixed(value: Fraction, places: int) -> str:
    """`value`, a multiple of 10**-places, written with exactly `places` decimals."""
    scaled = value * 10**places
    if scaled.denominator != 1:
        raise ValueError(f"{value} has more than {places} decimals")
    digits = str(abs(scaled.numerator)).rjust(places + 1, "0")
    sign = "-" if scaled < 0 else ""
    return sign + (f"{digits[:-places]}.{digits[-places:]}" if places else digits)


def _num(value: Fraction) -> str:
    """An exact value as its shortest decimal if that has at most 8 places, else as a reduced fraction."""
    places = _decimal_places(value, limit=8)
    return str(value) if places is None else _fixed(value, places)


def _money(value: Fraction) -> str:
    """A dollar amount: '40' or '12.50' (whole cents only)."""
    return _fixed(value, 0 if value.denominator == 1 else 2)


def _round_half_up(value: Fraction, places: int) -> Fraction:
    """`value` rounded to `places` decimals, halves away from zero (the schoolbook rule)."""
    scale = 10**places
    magnitude = math.floor(abs(value) * scale + Fraction(1, 2))
    return Fraction(magnitude if value >= 0 else -magnitude, scale)


def _approximately(value: Fraction) -> str:
    """'= 213.36' when `value` terminates within 8 decimals, else '≈ 33.07086614...'.

    The approximation is truncated, not rounded, so every digit shown is a digit of the exact value.
    """
    if _decimal_places(value, limit=8) is not None:
        return f"= {_num(value)}"
    return f"≈ {_fixed(Fraction(math.floor(value * 10**8), 10**8), 8)}..."


def _rounding_phrase(places: int) -> str:
    """How a question states its rounding."""
    if places == 0:
        return "the nearest whole number"
    return f"{places} decimal place{'' if places == 1 else 's'}"


# ----------------------------------------------------------------------------------------------
# Units: what questions ask for and which words a response may write after its number.


@dataclasses.dataclass(frozen=True)
class _Unit:
    """A unit as questions name it; `dimension` is set for the units that `unit_conversion` uses."""

    singular: str
    plural: str
    abbreviations: tuple[str, ...] = ()
    dimension: str = ""

    @property
    def aliases(self) -> frozenset[str]:
        return frozenset((self.singular, self.plural, *self.abbreviations))

    def of(self, amount: Fraction) -> str:
        """'7 feet', '1 foot', '2.5 hours'."""
        return f"{_num(amount)} {self.singular if amount == 1 else self.plural}"


_UNITS = {
    unit.plural: unit
    for unit in (
        _Unit("millimeter", "millimeters", ("mm", "millimetre", "millimetres"), "length"),
        _Unit("centimeter", "centimeters", ("cm", "centimetre", "centimetres"), "length"),
        _Unit("meter", "meters", ("m", "metre", "metres"), "length"),
        _Unit("kilometer", "kilometers", ("km", "kilometre", "kilometres"), "length"),
        _Unit("inch", "inches", ("in",), "length"),
        _Unit("foot", "feet", ("ft",), "length"),
        _Unit("yard", "yards", ("yd", "yds"), "length"),
        _Unit("mile", "miles", ("mi",), "length"),
        _Unit("gram", "grams", ("g",), "mass"),
        _Unit("kilogram", "kilograms", ("kg", "kilo", "kilos"), "mass"),
        _Unit("tonne", "tonnes", ("t", "metric ton", "metric tons"), "mass"),
        _Unit("ounce", "ounces", ("oz",), "mass"),
        _Unit("pound", "pounds", ("lb", "lbs"), "mass"),
        _Unit("second", "seconds", ("s", "sec", "secs"), "time"),
        _Unit("minute", "minutes", ("min", "mins"), "time"),
        _Unit("hour", "hours", ("h", "hr", "hrs"), "time"),
        _Unit("day", "days", (), "time"),
        _Unit("week", "weeks", ("wk", "wks"), "time"),
        _Unit("liter", "liters", ("l", "litre", "litres")),
        _Unit("cup", "cups"),
        _Unit("dollar", "dollars", ("$", "usd")),
        _Unit("percent", "percent", ("%", "per cent", "pct")),
        _Unit("kilometer per hour", "kilometers per hour",
              ("km/h", "kph", "km per hour", "kilometres per hour")),
        _Unit("mile per hour", "miles per hour", ("mph", "mi/h")),
    )
}

# 1 <first> = <factor> <second>, all exact by definition (the inch is 2.54 cm, the pound 0.45359237 kg).
_FACTS = (
    ("kilometers", "meters", Fraction(1000)),
    ("meters", "centimeters", Fraction(100)),
    ("centimeters", "millimeters", Fraction(10)),
    ("inches", "centimeters", Fraction("2.54")),
    ("feet", "inches", Fraction(12)),
    ("yards", "feet", Fraction(3)),
    ("feet", "meters", Fraction("0.3048")),
    ("yards", "meters", Fraction("0.9144")),
    ("miles", "kilometers", Fraction("1.609344")),
    ("miles", "yards", Fraction(1760)),
    ("tonnes", "kilograms", Fraction(1000)),
    ("kilograms", "grams", Fraction(1000)),
    ("pounds", "kilograms", Fraction("0.45359237")),
    ("pounds", "ounces", Fraction(16)),
    ("ounces", "grams", Fraction("28.349523125")),
    ("weeks", "days", Fraction(7)),
    ("days", "hours", Fraction(24)),
    ("hours", "minutes", Fraction(60)),
    ("minutes", "seconds", Fraction(60)),
)


@dataclasses.dataclass(frozen=True)
class _Leg:
    """One conversion step along a fact '1 big = factor small', in either direction."""

    source: str
    target: str
    big: str
    small: str
    factor: Fraction

    @property
    def ratio(self) -> Fraction:
        """Target units per source unit."""
        return self.factor if self.source == self.big else 1 / self.factor


def _conversion_paths() -> tuple[tuple[_Leg, ...], ...]:
    """Every one- or two-fact route between two units whose overall factor is between 1/5000 and 5000."""
    legs = [_Leg(big, small, big, small, factor) for big, small, factor in _FACTS]
    legs += [_Leg(small, big, big, small, factor) for big, small, factor in _FACTS]
    paths = [(leg,) for leg in legs]
    paths += [(a, b) for a in legs for b in legs if a.target == b.source and b.target != a.source]
    return tuple(p for p in paths if Fraction(1, 5000) <= math.prod(leg.ratio for leg in p) <= 5000)


_CONVERSION_PATHS = _conversion_paths()

_UNIT_NAMES = "|".join(re.escape(name) for name in sorted(_UNITS, key=len, reverse=True))  # longest first
_UNIT_REQUEST = re.compile(rf"(?:answer|result) in ({_UNIT_NAMES})\b", re.IGNORECASE)
_ROUNDING_REQUEST = re.compile(r"to (?:(\d+) decimal places?|the nearest (whole) number)", re.IGNORECASE)


def _instruction(rng: random.Random, unit: str | None, places: int | None = None) -> str:
    """The sentence naming the answer's unit (and rounding) that `verify` reads back; '' without a unit."""
    if unit is None:
        return ""
    if places is None:
        templates = ("Give your answer in {u}.", "Express your answer in {u}.", "State the result in {u}.")
        return rng.choice(templates).format(u=unit)
    templates = ("Give your answer in {u}, rounded to {r}.", "Express your answer in {u}, correct to {r}.",
                 "State the result in {u} to {r}.")
    return rng.choice(templates).format(u=unit, r=_rounding_phrase(places))


def _answer_format(question: str) -> tuple[_Unit | None, int | None]:
    """The unit and the number of decimals a question asks its answer in (None where it asks for none)."""
    units = _UNIT_REQUEST.findall(question)
    roundings = _ROUNDING_REQUEST.findall(question)
    unit = _UNITS[units[-1].lower()] if units else None
    places = None
    if roundings:
        digits, whole = roundings[-1]
        places = 0 if whole else int(digits)
    return unit, places


def _question(*sentences: str) -> str:
    """Sentences joined by single spaces, empty ones left out."""
    return " ".join(s for s in sentences if s)


def _solution(lines: Sequence[str], answer: str) -> str:
    """Worked lines followed by the canonical last line."""
    return "\n".join([*lines, f"Final answer: {answer}"])


# ----------------------------------------------------------------------------------------------
# Family: arithmetic with the order of operations.


@dataclasses.dataclass(frozen=True)
class _Op:
    """A binary operation in an expression tree; leaves are Fractions."""

    symbol: str
    left: _Op | Fraction
    right: _Op | Fraction


_PRECEDENCE = {"+": 1, "-": 1, "×": 2, "÷": 2}
_APPLY = {"+": operator.add, "-": operator.sub, "×": operator.mul, "÷": operator.truediv}


def _operand(value: Fraction) -> str:
    """A number inside an expression; negatives and fractions get brackets so '÷' and '-' read clearly."""
    return f"({value})" if value < 0 or value.denominator != 1 else str(value)


def _needs_brackets(precedence: int, parent: int, right_side: bool) -> bool:
    """Brackets exactly where the tree differs from left-to-right reading with × ÷ before + -."""
    return precedence < parent or (right_side and precedence == parent)


def _render(node: _Op | Fraction, parent: int = 0, right_side: bool = False) -> str:
    """The expression as a textbook writes it, with no more brackets than it needs."""
    if not isinstance(node, _Op):
        return _operand(node)
    precedence = _PRECEDENCE[node.symbol]
    text = f"{_render(node.left, precedence)} {node.symbol} {_render(node.right, precedence, True)}"
    return f"({text})" if _needs_brackets(precedence, parent, right_side) else text


def _value(node: _Op | Fraction) -> Fraction:
    """The exact value; raises ZeroDivisionError on division by zero."""
    if not isinstance(node, _Op):
        return node
    return _APPLY[node.symbol](_value(node.left), _value(node.right))


def _intermediate_values(node: _Op | Fraction) -> list[Fraction]:
    """The result of every operation in the tree."""
    if not isinstance(node, _Op):
        return []
    return [*_intermediate_values(node.left), *_intermediate_values(node.right), _value(node)]


def _leaf(rng: random.Random) -> Fraction:
    return Fraction(rng.randint(2, 12) if rng.random() < 0.8 else rng.randint(13, 60))


def _divisor_for(rng: random.Random, dividend: _Op | Fraction) -> Fraction:
    """Usually a small exact divisor of the dividend, so most divisions come out whole."""
    try:
        value = _value(dividend)
    except ZeroDivisionError:
        return _leaf(rng)
    whole = value.denominator == 1 and value != 0
    divisors = [d for d in range(2, 13) if whole and value.numerator % d == 0]
    return Fraction(rng.choice(divisors)) if divisors and rng.random() < 0.85 else _leaf(rng)


def _random_expression(rng: random.Random, leaves: int) -> _Op | Fraction:
    if leaves == 1:
        return _leaf(rng)
    left_leaves = rng.randint(1, leaves - 1)
    symbol = rng.choice("+-×÷")
    left = _random_expression(rng, left_leaves)
    if symbol == "÷" and leaves - left_leaves == 1:
        return _Op(symbol, left, _divisor_for(rng, left))
    return _Op(symbol, left, _random_expression(rng, leaves - left_leaves))


def _random_expression_tree(rng: random.Random) -> _Op:
    """3 to 5 small integers, every intermediate value modest; roughly one answer in five is a fraction."""
    while True:
        tree = _random_expression(rng, rng.randint(3, 5))
        try:
            values = _intermediate_values(tree)
        except ZeroDivisionError:
            continue
        if not all(abs(v) <= 999 and v.denominator <= 12 for v in values):
            continue
        if values[-1].denominator == 1 or rng.random() < 0.3:
            return tree


@dataclasses.dataclass(frozen=True)
class _Place:
    """Where an operation sits: its path from the root, its bracket group and the group enclosing that."""

    path: tuple[str, ...]
    precedence: int
    group: tuple[str, ...]
    enclosing: tuple[str, ...]
    bracketed: bool
    on_numbers: bool


def _places(node: _Op, path: tuple[str, ...] = (), group: tuple[str, ...] = (), parent: int = 0,
            right_side: bool = False) -> Iterator[_Place]:
    """Every operation in the tree, parents before children, left to right."""
    precedence = _PRECEDENCE[node.symbol]
    bracketed = _needs_brackets(precedence, parent, right_side)
    own_group = path if bracketed else group
    on_numbers = not isinstance(node.left, _Op) and not isinstance(node.right, _Op)
    yield _Place(path, precedence, own_group, group, bracketed, on_numbers)
    for side, right in (("left", False), ("right", True)):
        child = getattr(node, side)
        if isinstance(child, _Op):
            yield from _places(child, (*path, side), own_group, precedence, right)


def _at(node: _Op, path: tuple[str, ...]) -> _Op:
    for side in path:
        node = getattr(node, side)
    return node


def _replace_at(node: _Op, path: tuple[str, ...], value: Fraction) -> _Op | Fraction:
    if not path:
        return value
    child = getattr(node, path[0])
    return dataclasses.replace(node, **{path[0]: _replace_at(child, path[1:], value)})


def _next_operation(node: _Op) -> tuple[_Op | Fraction, _Op, Fraction]:
    """Do what the order of operations does next: in the leftmost innermost brackets (or the whole expression
    once none are left), the first × or ÷, else the first + or -."""
    places = list(_places(node))
    outer_groups = {place.enclosing for place in places if place.bracketed}
    ready = [place for place in places if place.on_numbers and place.group not in outer_groups]
    in_group = [place for place in ready if place.group == ready[0].group]
    path = max(in_group, key=lambda place: place.precedence).path  # max keeps the leftmost of ties
    operation = _at(node, path)
    result = _APPLY[operation.symbol](operation.left, operation.right)
    return _replace_at(node, path, result), operation, result


_ORDER_OF_OPERATIONS = (
    "Use the order of operations: brackets first, then multiplication and division from left to right, "
    "then addition and subtraction from left to right.",
    "Work inside brackets first, then do multiplication and division in order from left to right, "
    "and finally addition and subtraction from left to right.",
    "Following the order of operations, we evaluate brackets, then × and ÷ (left to right), "
    "then + and - (left to right).",
)
_NOW = ("Now we have", "The expression becomes", "This leaves", "So the expression is now")


def _arithmetic(rng: random.Random) -> Exercise:
    tree = _random_expression_tree(rng)
    expression = _render(tree)
    templates = ("Evaluate {e}.", "Compute {e}.", "What is the value of {e}?", "Find the value of {e}.",
                 "Use the order of operations to evaluate {e}.", "Work out {e}.")
    note = "If the result is not a whole number, write it as a fraction in lowest terms."
    lines = [rng.choice(_ORDER_OF_OPERATIONS)]
    node: _Op | Fraction = tree
    while isinstance(node, _Op):
        node, operation, result = _next_operation(node)
        left, right = _operand(operation.left), _operand(operation.right)
        line = f"Step {len(lines)}: {left} {operation.symbol} {right} = {result}."
        lines.append(f"{line} {rng.choice(_NOW)} {_render(node)}." if isinstance(node, _Op) else line)
    answer = str(node)
    question = _question(rng.choice(templates).format(e=expression), note if "÷" in expression else "")
    return Exercise("arithmetic", question, _solution(lines, answer), answer)


# ----------------------------------------------------------------------------------------------
# Word-problem vocabulary.

_PEOPLE = (("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Dev", "he"), ("Elena", "she"), ("Farid", "he"),
           ("Grace", "she"), ("Hiro", "he"), ("Imani", "she"), ("Jonas", "he"), ("Kavya", "she"),
           ("Liam", "he"), ("Mei", "she"), ("Noah", "he"), ("Olu", "he"), ("Priya", "she"))
_POSSESSIVE = {"she": "her", "he": "his"}
_ITEMS = ("jacket", "bicycle", "lamp", "backpack", "coffee maker", "chair", "video game", "guitar", "watch",
          "tent")


def _coprime_pair(rng: random.Random, high: int = 9) -> tuple[int, int]:
    """Two different coprime integers from 1 to `high`: the terms of a ratio in lowest terms."""
    while True:
        p, q = rng.randint(1, high), rng.randint(1, high)
        if p != q and math.gcd(p, q) == 1:
            return p, q


# ----------------------------------------------------------------------------------------------
# Family: linear equations in one unknown.

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
    lines.append(f"Check: with {var} = {x}, the left side is {_num(left)} "
                 f"and the right side is {_num(right)}.")
    return Exercise("linear_equation", question, _solution(lines, str(x)), str(x))


def _number_puzzle(rng: random.Random) -> Exercise:
    """'I think of a number...': the equation a·n + b = c set as a word problem."""
    a, b, n = rng.randint(2, 9), _nonzero(rng, 1, 30), rng.randint(2, 30)
    c = a * n + b
    verb, gerund = ("add", "adding") if b > 0 else ("subtract", "subtracting")
    name, _ = rng.choice(_PEOPLE)
    templates = (
        f"I think of a number. If I multiply it by {a} and then {verb} {abs(b)}, the result is {c}. "
        f"What is my number?",
        f"{name} thinks of a number. When you multiply it by {a} and then {verb} {abs(b)}, "
        f"the result is {c}. What number did {name} think of?",
    )
    lines = [f"Call the number n. Multiplying by {a} and then {gerund} {abs(b)} gives {c}, so",
             _equation(a, b, 0, c, "n"), *_isolate(a, b, 0, c, "n"),
             f"Check: {a} × {n} = {a * n}, and {a * n} {'+' if b > 0 else '-'} {abs(b)} = {c}."]
    return Exercise("linear_equation", rng.choice(templates), _solution(lines, str(n)), str(n))


def _linear_equation(rng: random.Random) -> Exercise:
    return _number_puzzle(rng) if rng.random() < 0.2 else _symbolic_linear_equation(rng)


# ----------------------------------------------------------------------------------------------
# Family: unit conversions with exact factors.


def _conversion_amount(rng: random.Random, ratio: Fraction) -> Fraction:
    """A starting amount that converts to a readable number (from about 0.1 to a few hundred thousand)."""
    if ratio >= 1:
        return Fraction(rng.randint(1, 60)) + (Fraction(1, 2) if rng.random() < 0.25 else 0)
    step = 1
    while step * 10 * ratio <= 1:
        step *= 10
    return Fraction(rng.randint(1, 50) if step == 1 else rng.randint(10, 500) * (step // 10))


def _leg_line(leg: _Leg, amount_text: str, value: Fraction) -> tuple[str, str]:
    """The sentence for one conversion step and the converted amount as the next step will quote it."""
    big, small = _UNITS[leg.big], _UNITS[leg.small]
    multiply = leg.source == leg.big
    verb, symbol = ("multiply", "×") if multiply else ("divide", "÷")
    result = _approximately(value)
    line = (f"1 {big.singular} = {_num(leg.factor)} {small.plural}, so {verb} by {_num(leg.factor)}: "
            f"{amount_text} {symbol} {_num(leg.factor)} {result} {_UNITS[leg.target].plural}.")
    return line, result[2:]


_CONVERSION_CONTEXTS = {
    "length": ("A {thing} is {q} long. What is its length in {u}?",
               ("rope", "hallway", "garden hose", "fence", "ribbon", "hiking trail", "swimming pool")),
    "mass": ("A {thing} weighs {q}. What is its mass in {u}?",
             ("suitcase", "bag of flour", "parcel", "puppy", "watermelon", "box of books")),
    "time": ("A {thing} lasts {q}. How long is that in {u}?",
             ("film", "flight", "bike ride", "concert", "training course", "road trip")),
}


def _unit_conversion(rng: random.Random) -> Exercise:
    path = rng.choice(_CONVERSION_PATHS)
    source, middle, target = _UNITS[path[0].source], _UNITS[path[0].target], _UNITS[path[-1].target]
    ratio = math.prod(leg.ratio for leg in path)
    amount = _conversion_amount(rng, ratio)
    exact = amount * ratio
    needed = _decimal_places(exact)
    places = None
    if needed is None or needed > 3:
        places = rng.choice((0, 1, 2, 2) if exact >= 100 else (1, 2, 2, 3))
    context, things = _CONVERSION_CONTEXTS[source.dimension]
    templates = ("Convert {q} to {u}.", "How many {u} are there in {q}?", "Express {q} in {u}.", context)
    asked = rng.choice(templates).format(q=source.of(amount), u=target.plural, thing=rng.choice(things))
    lines = [f"Convert {source.plural} to {middle.plural}, then to {target.plural}."] if len(path) > 1 else []
    value, text = amount, _num(amount)
    for leg in path:
        value *= leg.ratio
        line, text = _leg_line(leg, text, value)
        lines.append(line)
    if places is None:
        answer = _num(exact)
        lines.append(f"So {source.of(amount)} is exactly {answer} {target.plural}.")
    else:
        answer = _fixed(_round_half_up(exact, places), places)
        rounding = _rounding_phrase(places)
        lines.append(f"Rounded to {rounding}, {source.of(amount)} is {answer} {target.plural}.")
    question = _question(asked, _instruction(rng, target.plural, places))
    return Exercise("unit_conversion", question, _solution(lines, answer), answer)


# ----------------------------------------------------------------------------------------------
# Family: percentages.

_PERCENTS = tuple(Fraction(p) for p in ("5", "10", "12.5", "15", "20", "25", "30", "35", "40", "45", "60",
                                        "62.5", "75", "80", "90"))
_PERCENT_GROUPS = (("students", "school", "walk to school"), ("members", "club", "voted for the new logo"),
                   ("trees", "orchard", "are apple trees"), ("emails", "inbox", "are marked as read"))


def _percent_of(rng: random.Random) -> Exercise:
    p = rng.choice(_PERCENTS)
    rate = p / 100
    lines = [f"{_num(p)}% means {_num(p)}/100 = {_num(rate)}."]
    if rng.random() < 0.5:
        whole = Fraction(rng.randint(4, 400))
        asked = rng.choice(("What is {p}% of {n}?", "Find {p}% of {n}.", "Calculate {p} percent of {n}."))
        question = asked.format(p=_num(p), n=whole)
        lines.append(f"{whole} × {_num(rate)} = {_num(whole * rate)}.")
    else:
        whole = Fraction(rate.denominator * rng.randint(1, max(1, 400 // rate.denominator)))
        group, place, verb = rng.choice(_PERCENT_GROUPS)
        question = f"Of the {whole} {group} in the {place}, {_num(p)}% {verb}. How many {group} {verb}?"
        lines += [f"{whole} × {_num(rate)} = {_num(whole * rate)}.",
                  f"So {_num(whole * rate)} {group} {verb}."]
    answer = _num(whole * rate)
    return Exercise("percentage", question, _solution(lines, answer), answer)


def _what_percent(rng: random.Random) -> Exercise:
    p = rng.choice(_PERCENTS)
    rate = p / 100
    whole = rate.denominator * rng.randint(1, max(1, 300 // rate.denominator))
    part = whole * rate
    name, pronoun = rng.choice(_PEOPLE)
    templates = (
        f"What percent of {whole} is {part}?",
        f"{part} is what percent of {whole}?",
        f"{name} answered {part} of the {whole} questions on a quiz correctly. "
        f"What percentage of the questions did {pronoun} answer correctly?",
    )
    lines = [f"Divide the part by the whole: {part} ÷ {whole} = {_num(rate)}.",
             f"Multiply by 100 to write this as a percentage: {_num(rate)} × 100 = {_num(p)}.",
             f"So {part} is {_num(p)}% of {whole}."]
    question = _question(rng.choice(templates), _instruction(rng, "percent"))
    return Exercise("percentage", question, _solution(lines, _num(p)), _num(p))


def _price_change(rng: random.Random) -> Exercise:
    p = rng.choice((5, 10, 15, 20, 25, 30, 40, 50))
    price, item = Fraction(rng.randint(8, 400)), rng.choice(_ITEMS)
    change = price * p / 100
    if rng.random() < 0.5:
        new = price + change
        templates = (
            f"The price of a {item} is ${price}. The price then increases by {p}%. What is the new price?",
            f"A {item} costs ${price} before a {p}% price increase. What does it cost after the increase?",
        )
        last = f"Add the increase to the original price: {price} + {_money(change)} = {_money(new)}."
    else:
        new = price - change
        templates = (
            f"A {item} that normally costs ${price} is sold at {p}% off. What is the sale price?",
            f"The price of a {item} is ${price}. It is reduced by {p}%. What is the new price?",
        )
        last = f"Subtract the reduction from the original price: {price} - {_money(change)} = {_money(new)}."
    lines = [f"The change is {p}% of ${price}: {price} × {_num(Fraction(p, 100))} = {_money(change)}.", last]
    question = _question(rng.choice(templates), _instruction(rng, "dollars"))
    return Exercise("percentage", question, _solution(lines, _money(new)), _money(new))


def _percent_change(rng: random.Random) -> Exercise:
    p = rng.choice(_PERCENTS[:12])  # up to 62.5%
    rate = p / 100
    before = rate.denominator * rng.randint(max(1, 20 // rate.denominator), max(2, 800 // rate.denominator))
    if rng.random() < 0.5:
        after = before + before * rate
        templates = (
            f"The number of visitors to a museum rose from {before} to {after}. "
            f"What was the percentage increase?",
            f"A town's population grew from {before} to {after}. By what percentage did it increase?",
        )
        first = f"The increase is {after} - {before} = {after - before}."
    else:
        after = before - before * rate
        item = rng.choice(_ITEMS)
        templates = (
            f"The price of a {item} fell from ${before} to ${after}. What was the percentage decrease?",
            f"A company cut its staff from {before} to {after} people. "
            f"By what percentage did the staff decrease?",
        )
        first = f"The decrease is {before} - {after} = {before - after}."
    change = abs(after - before)
    lines = [first, f"Divide by the starting value: {change} ÷ {before} = {_num(rate)}.",
             f"As a percentage: {_num(rate)} × 100 = {_num(p)}."]
    question = _question(rng.choice(templates), _instruction(rng, "percent"))
    return Exercise("percentage", question, _solution(lines, _num(p)), _num(p))


def _original_price(rng: random.Random) -> Exercise:
    p = rng.choice((10, 15, 20, 25, 30, 40, 50))
    original, item = Fraction(rng.randint(10, 500)), rng.choice(_ITEMS)
    kept = Fraction(100 - p, 100)
    sale = _money(original * kept)
    templates = (
        f"After a {p}% discount, a {item} costs ${sale}. What was its original price?",
        f"A {item} is on sale for ${sale}, which is {p}% off its original price. "
        f"What was the original price?",
    )
    lines = [f"A {p}% discount leaves {100 - p}% of the original price, "
             f"so the sale price is {_num(kept)} times the original.",
             f"Original price = {sale} ÷ {_num(kept)} = {_money(original)}."]
    question = _question(rng.choice(templates), _instruction(rng, "dollars"))
    return Exercise("percentage", question, _solution(lines, _money(original)), _money(original))


def _percentage(rng: random.Random) -> Exercise:
    return rng.choice((_percent_of, _what_percent, _price_change, _percent_change, _original_price))(rng)


# ----------------------------------------------------------------------------------------------
# Family: ratios and proportion.

_MIXTURES = (("mortar", "sand", "cement"), ("trail mix", "peanuts", "raisins"),
             ("potting mix", "compost", "grit"), ("bronze alloy", "copper", "tin"))
_PAIRS = (("boys", "girls", "in a class"), ("red marbles", "blue marbles", "in a bag"),
          ("cats", "dogs", "at an animal shelter"), ("adults", "children", "on a school trip"))


def _ratio_share(rng: random.Random) -> Exercise:
    p, q = _coprime_pair(rng)
    part = rng.randint(2, 40)
    total = part * (p + q)
    if rng.random() < 0.5:
        first = rng.choice(_PEOPLE)[0]
        second = rng.choice([name for name, _ in _PEOPLE if name != first])
        who = rng.choice((first, second))
        templates = (
            f"{first} and {second} share ${total} in the ratio {p}:{q}. How much does {who} receive?",
            f"${total} is divided between {first} and {second} in the ratio {p}:{q}. "
            f"How much does {who} get?",
        )
        asked, unit = rng.choice(templates), "dollars"
    else:
        mix, first, second = rng.choice(_MIXTURES)
        who = rng.choice((first, second))
        asked = (f"A {mix} is made from {first} and {second} in the ratio {p}:{q} by mass. "
                 f"How many kilograms of {who} are in {total} kilograms of {mix}?")
        unit = "kilograms"
    parts = p if who == first else q
    lines = [f"The ratio {p}:{q} has {p} + {q} = {p + q} parts in total.",
             f"One part is {total} ÷ {p + q} = {part}.",
             f"{who[0].upper() + who[1:]} gets {parts} parts: {parts} × {part} = {parts * part}."]
    question = _question(asked, _instruction(rng, unit))
    return Exercise("ratio", question, _solution(lines, str(parts * part)), str(parts * part))


def _proportion(rng: random.Random) -> Exercise:
    p, q = _coprime_pair(rng)
    part = rng.randint(2, 15)
    first, second, where = rng.choice(_PAIRS)
    (given, given_parts), (other, other_parts) = rng.choice((((first, p), (second, q)),
                                                             ((second, q), (first, p))))
    count = part * given_parts
    templates = (
        f"The ratio of {first} to {second} {where} is {p}:{q}. If there are {count} {given}, "
        f"how many {other} are there?",
        f"{where[0].upper() + where[1:]}, {first} and {second} are in the ratio {p}:{q}. "
        f"There are {count} {given}. How many {other} are there?",
    )
    lines = [f"The {count} {given} make up {given_parts} parts, "
             f"so one part is {count} ÷ {given_parts} = {part}.",
             f"The {other} make up {other_parts} parts: {other_parts} × {part} = {other_parts * part}."]
    answer = str(other_parts * part)
    return Exercise("ratio", rng.choice(templates), _solution(lines, answer), answer)


def _ratio_as_fraction(rng: random.Random) -> Exercise:
    while True:
        p, q = _coprime_pair(rng, 12)
        if q > 1:
            break
    g = rng.randint(2, 12)
    a, b = p * g, q * g
    templates = (
        f"Write the ratio {a}:{b} as a fraction in lowest terms.",
        f"Express the ratio {a}:{b} as a fraction in simplest form.",
        f"A class has {a} girls and {b} boys. "
        f"Write the ratio of girls to boys as a fraction in lowest terms.",
    )
    lines = [f"The greatest common divisor of {a} and {b} is {g}.",
             f"Divide both terms by {g}: {a} ÷ {g} = {p} and {b} ÷ {g} = {q}.",
             f"So {a}:{b} = {p}:{q}, which as a fraction is {p}/{q}."]
    return Exercise("ratio", rng.choice(templates), _solution(lines, f"{p}/{q}"), f"{p}/{q}")


def _recipe(rng: random.Random) -> Exercise:
    ingredient, things = rng.choice((("flour", "pancakes"), ("oats", "muffins"), ("milk", "waffles"),
                                     ("sugar", "cookies")))
    while True:
        cups = Fraction(rng.choice(("0.5", "1.5", "2", "2.5", "3", "4")))
        made, wanted = rng.choice((2, 3, 4, 6, 8, 12)), rng.randint(2, 24)
        needed = cups * wanted / made
        places = _decimal_places(needed)
        if wanted != made and places is not None and places <= 2:
            break
    templates = (
        f"A recipe uses {_num(cups)} cups of {ingredient} to make {made} {things}. "
        f"How many cups of {ingredient} are needed to make {wanted} {things}?",
        f"To make {made} {things} you need {_num(cups)} cups of {ingredient}. "
        f"How many cups of {ingredient} do you need for {wanted} {things}?",
    )
    lines = [f"The amount of {ingredient} is proportional to the number of {things}, "
             f"so multiply by {wanted} and divide by {made}.",
             f"{_num(cups)} × {wanted} = {_num(cups * wanted)}.",
             f"{_num(cups * wanted)} ÷ {made} = {_num(needed)}."]
    question = _question(rng.choice(templates), _instruction(rng, "cups"))
    return Exercise("ratio", question, _solution(lines, _num(needed)), _num(needed))


def _ratio(rng: random.Random) -> Exercise:
    return rng.choice((_ratio_share, _proportion, _ratio_as_fraction, _recipe))(rng)


# ----------------------------------------------------------------------------------------------
# Family: rates (speed, unit price, flow, pay).

_VEHICLES = (("train", 60, 160), ("car", 40, 110), ("bus", 30, 80), ("ferry", 15, 40))
_HOURS = tuple(Fraction(t) for t in ("0.5", "0.75", "1.25", "1.5", "2", "2.5", "3", "4", "5"))
_GOODS = (("notebook", "notebooks"), ("pen", "pens"), ("ticket", "tickets"), ("candle", "candles"),
          ("bag of rice", "bags of rice"), ("jar of honey", "jars of honey"))


def _speed_and_time(rng: random.Random) -> Exercise:
    vehicle, low, high = rng.choice(_VEHICLES)
    speed, hours = Fraction(rng.randint(low, high)), rng.choice(_HOURS)
    length = rng.choice(("kilometers", "miles"))
    d, s, t = _num(speed * hours), _num(speed), _num(hours)
    if rng.random() < 0.5:
        templates = (
            f"A {vehicle} travels {d} {length} in {t} hours. What is its average speed?",
            f"It takes a {vehicle} {t} hours to cover {d} {length}. What is its average speed?",
        )
        lines = ["Average speed is distance divided by time.", f"{d} ÷ {t} = {s}."]
        answer, unit = s, f"{length} per hour"
    else:
        templates = (
            f"How long does it take a {vehicle} to travel {d} {length} "
            f"at an average speed of {s} {length} per hour?",
            f"A {vehicle} moves at a steady {s} {length} per hour. "
            f"How long does it take to cover {d} {length}?",
        )
        lines = ["Time is distance divided by speed.", f"{d} ÷ {s} = {t}."]
        answer, unit = t, "hours"
    question = _question(rng.choice(templates), _instruction(rng, unit))
    return Exercise("rate", question, _solution(lines, answer), answer)


def _distance_in_minutes(rng: random.Random) -> Exercise:
    name, pronoun = rng.choice(_PEOPLE)
    while True:
        cycling = rng.random() < 0.5
        speed = rng.randint(12, 30) if cycling else rng.randint(3, 6)
        minutes = rng.choice((10, 12, 15, 20, 24, 30, 36, 40, 45, 48, 50, 54, 75, 90))
        distance = Fraction(speed * minutes, 60)
        places = _decimal_places(distance)
        if places is not None and places <= 2:
            break
    verb = "cycles" if cycling else "walks"
    templates = (
        f"{name} {verb} at a steady {speed} kilometers per hour for {minutes} minutes. "
        f"How far does {pronoun} travel?",
        f"{name} {verb} for {minutes} minutes at {speed} kilometers per hour. How far does {pronoun} go?",
    )
    lines = [f"Distance is speed times time, and {minutes} minutes is {minutes}/60 of an hour.",
             f"{speed} × {minutes} = {speed * minutes}.", f"{speed * minutes} ÷ 60 = {_num(distance)}."]
    question = _question(rng.choice(templates), _instruction(rng, "kilometers"))
    return Exercise("rate", question, _solution(lines, _num(distance)), _num(distance))


def _unit_price(rng: random.Random) -> Exercise:
    item, items = rng.choice(_GOODS)
    price = Fraction(rng.randint(25, 1500), 100)
    bought, wanted = rng.randint(2, 12), rng.randint(2, 20)
    while wanted == bought:
        wanted = rng.randint(2, 20)
    cost, total = _money(price * bought), _money(price * wanted)
    templates = (
        f"{bought} {items} cost ${cost}. At the same price, how much do {wanted} {items} cost?",
        f"If {bought} {items} cost ${cost} in total, what is the cost of {wanted} {items}?",
    )
    lines = [f"One {item} costs {cost} ÷ {bought} = ${_money(price)}.",
             f"So {wanted} {items} cost {wanted} × {_money(price)} = ${total}."]
    question = _question(rng.choice(templates), _instruction(rng, "dollars"))
    return Exercise("rate", question, _solution(lines, total), total)


def _fill_time(rng: random.Random) -> Exercise:
    rate, minutes = rng.randint(2, 40), rng.randint(3, 60)
    volume = rate * minutes
    templates = (
        f"A tap fills a tank at {rate} liters per minute. "
        f"How many minutes does it take to fill a {volume}-liter tank?",
        f"A pump moves {rate} liters of water per minute. How long does it take to pump {volume} liters?",
    )
    lines = ["Time is volume divided by flow rate.", f"{volume} ÷ {rate} = {minutes}."]
    question = _question(rng.choice(templates), _instruction(rng, "minutes"))
    return Exercise("rate", question, _solution(lines, str(minutes)), str(minutes))


def _wages(rng: random.Random) -> Exercise:
    name, pronoun = rng.choice(_PEOPLE)
    wage, hours, days = Fraction(rng.randint(24, 90), 2), rng.randint(3, 10), rng.randint(2, 7)
    total = _money(wage * hours * days)
    templates = (
        f"{name} earns ${_money(wage)} per hour and works {hours} hours a day for {days} days. "
        f"How much does {pronoun} earn in total?",
        f"{name} is paid ${_money(wage)} an hour. {pronoun.capitalize()} works {hours} hours a day "
        f"for {days} days. What are {_POSSESSIVE[pronoun]} total earnings?",
    )
    lines = [f"Hours worked: {hours} × {days} = {hours * days}.",
             f"Earnings: {hours * days} × {_money(wage)} = ${total}."]
    question = _question(rng.choice(templates), _instruction(rng, "dollars"))
    return Exercise("rate", question, _solution(lines, total), total)


def _rate(rng: random.Random) -> Exercise:
    return rng.choice((_speed_and_time, _distance_in_minutes, _unit_price, _fill_time, _wages))(rng)


# ----------------------------------------------------------------------------------------------
# Family: greatest common divisor and least common multiple.


def _euclid_lines(a: int, b: int) -> list[str]:
    """The Euclidean algorithm as lines 'x = q × y + r', larger number first, down to remainder 0."""
    x, y = max(a, b), min(a, b)
    lines = []
    while y:
        lines.append(f"{x} = {x // y} × {y} + {x % y}")
        x, y = y, x % y
    return lines


def _gcd_question(rng: random.Random, a: int, b: int, story: bool) -> tuple[str, list[str]]:
    """A question whose answer is gcd(a, b), and the reasoning that leads to the gcd."""
    if not story:
        templates = (f"Find the greatest common divisor of {a} and {b}.",
                     f"What is the highest common factor of {a} and {b}?", f"Compute gcd({a}, {b}).")
        return rng.choice(templates), []
    templates = (
        f"A florist has {a} roses and {b} tulips. She wants to make identical bouquets that use all of the "
        f"flowers, with none left over. What is the greatest number of bouquets she can make?",
        f"A teacher has {a} pencils and {b} erasers to share equally among as many students as possible, "
        f"with none left over. What is the greatest number of students who can share them?",
    )
    why = f"The number of equal groups must divide both {a} and {b}, so the greatest one is gcd({a}, {b})."
    return rng.choice(templates), [why]


def _lcm_question(rng: random.Random, a: int, b: int, story: bool) -> tuple[str, list[str]]:
    """A question whose answer is lcm(a, b) (with its unit sentence), and the reasoning that leads to it."""
    via_gcd = f"Since lcm({a}, {b}) = {a} × {b} ÷ gcd({a}, {b}), find the greatest common divisor first."
    if not story:
        templates = (f"Find the least common multiple of {a} and {b}.", f"Compute lcm({a}, {b}).",
                     f"What is the smallest positive integer that is a multiple of both {a} and {b}?")
        return rng.choice(templates), [via_gcd]
    unit = rng.choice(("minutes", "seconds"))
    asked = {
        "minutes": f"Two buses leave a station together. One leaves every {a} minutes and the other "
                   f"every {b} minutes. After how many minutes will they next leave together?",
        "seconds": f"One lighthouse flashes every {a} seconds and another every {b} seconds. "
                   f"They flash together now. After how many seconds will they next flash together?",
    }[unit]
    why = (f"They coincide again after a time that is a multiple of both {a} and {b}; "
           f"the first such time is lcm({a}, {b}).")
    return _question(asked, _instruction(rng, unit)), [why, via_gcd]


def _gcd_lcm(rng: random.Random) -> Exercise:
    g = rng.randint(2, 15)
    while True:
        m, n = rng.randint(2, 12), rng.randint(2, 12)
        if m != n:
            break
    a, b = g * m, g * n
    gcd, lcm = math.gcd(a, b), math.lcm(a, b)
    want_gcd, story = rng.random() < 0.5, rng.random() < 0.4
    question, why = (_gcd_question if want_gcd else _lcm_question)(rng, a, b, story)
    lines = [*why, "Use the Euclidean algorithm:", *_euclid_lines(a, b),
             f"The last non-zero remainder is {gcd}, so gcd({a}, {b}) = {gcd}."]
    if not want_gcd:
        lines.append(f"Then lcm({a}, {b}) = {a} × {b} ÷ {gcd} = {a * b} ÷ {gcd} = {lcm}.")
    answer = str(gcd if want_gcd else lcm)
    return Exercise("gcd_lcm", question, _solution(lines, answer), answer)


# ----------------------------------------------------------------------------------------------
# Family: remainders and modular arithmetic.


def _division_line(n: int, m: int) -> str:
    return f"{n} = {n // m} × {m} + {n % m}"


def _remainder(rng: random.Random) -> Exercise:
    n, m = rng.randint(100, 9999), rng.randint(3, 19)
    templates = (f"What is the remainder when {n} is divided by {m}?", f"Find {n} mod {m}.",
                 f"Compute the remainder of {n} ÷ {m}.")
    q = n // m
    lines = [f"{m} × {q} = {m * q}, and {m} × {q + 1} = {m * (q + 1)} is more than {n}, "
             f"so {m} goes into {n} {q} times.",
             f"The remainder is {n} - {m * q} = {n % m}.", f"So {_division_line(n, m)}."]
    return Exercise("modular", rng.choice(templates), _solution(lines, str(n % m)), str(n % m))


def _product_remainder(rng: random.Random) -> Exercise:
    a, b, m = rng.randint(20, 999), rng.randint(20, 999), rng.randint(3, 19)
    templates = (f"What is the remainder when {a} × {b} is divided by {m}?",
                 f"Compute ({a} × {b}) mod {m}.")
    ra, rb = a % m, b % m
    lines = ["Reduce each factor first; remainders multiply.",
             f"{_division_line(a, m)}, so {a} ≡ {ra} (mod {m}).",
             f"{_division_line(b, m)}, so {b} ≡ {rb} (mod {m}).",
             f"Then {a} × {b} ≡ {ra} × {rb} = {ra * rb} (mod {m}).",
             f"{_division_line(ra * rb, m)}, so the remainder is {ra * rb % m}."]
    answer = str(a * b % m)
    return Exercise("modular", rng.choice(templates), _solution(lines, answer), answer)


def _power_remainder(rng: random.Random) -> Exercise:
    a, k, m = rng.randint(2, 15), rng.randint(3, 9), rng.randint(3, 17)
    templates = (f"What is the remainder when {a}^{k} is divided by {m}?", f"Compute {a}^{k} mod {m}.")
    asked = rng.choice(templates)
    base = a % m
    lines = [f"Work out successive powers of {a}, reducing modulo {m} at each step.",
             f"{a} ≡ {base} (mod {m})."]
    residue = base
    for power in range(2, k + 1):
        product = residue * base
        lines.append(f"{a}^{power} ≡ {residue} × {base} = {product} ≡ {product % m} (mod {m}).")
        residue = product % m
    return Exercise("modular", asked, _solution(lines, str(residue)), str(residue))


def _clock(rng: random.Random) -> Exercise:
    start, hours = rng.randint(1, 12), rng.randint(13, 200)
    templates = (f"It is {start} o'clock now. "
                 f"What time will it be on a 12-hour clock {hours} hours from now?",
                 f"A clock shows {start} o'clock. What hour will it show {hours} hours later?")
    asked = rng.choice(templates)
    shift = hours % 12
    end = (start + shift - 1) % 12 + 1
    lines = [f"Every 12 hours the clock comes back to the same hour, so only the remainder of {hours} ÷ 12 "
             f"matters: {_division_line(hours, 12)}.", f"{start} + {shift} = {start + shift}."]
    lines.append(f"{start + shift} - 12 = {end}, so the clock shows {end} o'clock." if start + shift > 12
                 else f"The clock shows {end} o'clock.")
    question = _question(asked, "Give the hour as a number from 1 to 12.")
    return Exercise("modular", question, _solution(lines, str(end)), str(end))


def _modular(rng: random.Random) -> Exercise:
    return rng.choice((_remainder, _product_remainder, _power_remainder, _clock))(rng)


# ----------------------------------------------------------------------------------------------
# Public API.

_GENERATORS: dict[str, Callable[[random.Random], Exercise]] = {
    "arithmetic": _arithmetic,
    "linear_equation": _linear_equation,
    "unit_conversion": _unit_conversion,
    "percentage": _percentage,
    "ratio": _ratio,
    "rate": _rate,
    "gcd_lcm": _gcd_lcm,
    "modular": _modular,
}
FAMILIES: tuple[str, ...] = tuple(_GENERATORS)


def _non_negative(name: str, value: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def exercise(seed: int, index: int, families: Sequence[str] = FAMILIES) -> Exercise:
    """The exercise at `index` of the stream `seed`: the same on every machine, whatever was asked before.

    The family is drawn from `families` with the same per-index RNG, so a different `families` gives a
    different stream.
    """
    seed, index = _non_negative("seed", seed), _non_negative("index", index)
    if isinstance(families, str) or not families:
        raise ValueError(f"families must be a non-empty sequence of names from {FAMILIES}, got {families!r}")
    unknown = [f for f in families if f not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown exercise families {unknown}; choose from {FAMILIES}")
    rng = random.Random(f"phi4_jax.synthetic/{seed}/{index}")  # str seeds hash with SHA-512: same everywhere
    return _GENERATORS[families[rng.randrange(len(families))]](rng)


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


_FINAL_ANSWER = re.compile(r"final answer[\s*_]*:[ \t*_]*([^\n]*)", re.IGNORECASE)
_EDGES = re.compile(r"^[\s*_`]+|[\s*_`.]+\Z")  # markdown emphasis, spaces, and a closing full stop
_VARIABLE_PREFIX = re.compile(r"^[a-z]\s*=\s*", re.IGNORECASE)
# sign, '$', number (thousands may be comma-grouped), denominator, and whatever follows (a unit word, '%').
_VALUE = re.compile(r"([-+]?)\s*(\$?)\s*((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s*/\s*(\d+))?\s*(.*)",
                    re.DOTALL)


def extract_final_answer(text: str) -> str | None:
    """What follows the last 'Final answer:' in `text` (to the end of its line), or None if there is none."""
    matches = _FINAL_ANSWER.findall(text)
    answer = matches[-1].strip() if matches else ""
    return answer or None


def _names(unit: _Unit | None, word: str) -> bool:
    return unit is not None and word in unit.aliases


def _parse_value(text: str, unit: _Unit | None) -> Fraction | None:
    """The number in an answer like '1,250', '-3/4', '0.50 m', '$12.50', '12.5%' or 'x = 4.'; None if none.

    A word after the number (or a '$' before it) must name `unit`.
    """
    text = text.replace("\u2212", "-").strip()
    if len(text) > 100:
        return None
    match = _VALUE.fullmatch(_VARIABLE_PREFIX.sub("", _EDGES.sub("", text)))
    if match is None:
        return None
    sign, dollar, number, denominator, tail = match.groups()
    tail = tail.strip().lower()
    if (dollar and not _names(unit, "$")) or (tail and not _names(unit, tail)):
        return None
    if denominator is not None and ("." in number or int(denominator) == 0):
        return None
    value = Fraction(number.replace(",", "")) / int(denominator or 1)
    return -value if sign == "-" else value


def verify(ex: Exercise, response: str) -> bool:
    """True iff the last final answer in `response` equals `ex.answer` as a number.

    Rounded answers compare after rounding the response to the decimals the question asks for; a unit
    word after the number is allowed only if it names the unit the question asks for.
    """
    final = extract_final_answer(response)
    if final is None:
        return False
    unit, places = _answer_format(ex.question)
    got, want = _parse_value(final, unit), _parse_value(ex.answer, None)
    if got is None or want is None:
        return False
    return (got if places is None else _round_half_up(got, places)) == want

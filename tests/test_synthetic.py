"""Synthetic exercises: determinism, every answer re-derived from its question, and `verify`.

The solvers here read each question as a student would (regular expressions, Python's `ast` over Fractions, a
factor table in base units, `decimal` rounding) and never call the generator's own helpers.
"""

import ast
import decimal
import functools
import math
import os
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from phi4_jax.data import synthetic

SAMPLES = 500
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _sample(family: str) -> tuple[synthetic.Exercise, ...]:
    return tuple(synthetic.exercise(11, index, families=(family,)) for index in range(SAMPLES))


def _numbers(text: str) -> list[Fraction]:
    return [Fraction(n) for n in re.findall(r"\d+(?:\.\d+)?", text)]


def _find(pattern: str, text: str) -> Fraction:
    """The number captured by the first group of `pattern` in `text`."""
    return Fraction(re.search(pattern, text).group(1))


_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** int(b)}


def _evaluate(text: str, names: dict[str, Fraction] | None = None) -> Fraction:
    """Exact value of an expression written with × ÷ ^ and implicit products such as '3x' or '2(x + 1)'."""
    source = text.replace("×", "*").replace("÷", "/").replace("^", "**")
    source = re.sub(r"(\d)\s*([a-z(])", r"\1*\2", source).strip()

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        raise AssertionError(f"unexpected syntax {ast.dump(node)} in {text!r}")

    return value(ast.parse(source, mode="eval").body)


def _asked_unit(question: str) -> str | None:
    found = re.findall(r"(?:answer|result) in ([a-z ]+?)[.,]", question)
    return found[-1] if found else None


def _asked_places(question: str) -> int | None:
    if "nearest whole number" in question:
        return 0
    found = re.findall(r"(\d+) decimal place", question)
    return int(found[-1]) if found else None


def _round(value: Fraction, places: int) -> decimal.Decimal:
    with decimal.localcontext(prec=60):
        exact = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
        return exact.quantize(decimal.Decimal(1).scaleb(-places), rounding=decimal.ROUND_HALF_UP)


def _assert_answer(ex: synthetic.Exercise, expected: Fraction) -> None:
    """The answer is `expected` exactly, or rounded as the question asks and written to that many places."""
    places = _asked_places(ex.question)
    if places is None:
        assert Fraction(ex.answer) == expected, ex
    else:
        assert decimal.Decimal(ex.answer) == _round(expected, places), ex
        assert len(ex.answer.partition(".")[2]) == places, ex


# ------------------------------------------------------------------------------------------------
# Arithmetic: a text-based order-of-operations stepper written for this test.

_TOKEN = re.compile(r"\(-?\d+(?:/\d+)?\)|\d+|[-+×÷()]")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b,
          "÷": lambda a, b: a / b}


def _tokens(expression: str) -> list:
    tokens = _TOKEN.findall(expression)
    assert "".join(tokens) == expression.replace(" ", ""), expression
    return [t if t in "+-×÷()" else Fraction(t.strip("()")) for t in tokens]


def _textbook_steps(expression: str) -> list[tuple[Fraction, str, Fraction, Fraction]]:
    """Leftmost innermost brackets first; inside them the first × or ÷, else the first + or -."""
    tokens, steps = _tokens(expression), []
    while len(tokens) > 1:
        close = tokens.index(")") if ")" in tokens else None
        lo = max(i for i in range(close) if tokens[i] == "(") + 1 if close is not None else 0
        hi = close if close is not None else len(tokens)
        products = [i for i in range(lo, hi) if tokens[i] in ("×", "÷")]
        i = (products or [i for i in range(lo, hi) if tokens[i] in ("+", "-")])[0]
        a, op, b = tokens[i - 1], tokens[i], tokens[i + 1]
        steps.append((a, op, b, _APPLY[op](a, b)))
        tokens[i - 1:i + 2] = [steps[-1][3]]
        if close is not None and tokens[lo - 1] == "(" and tokens[lo + 1] == ")":
            tokens[lo - 1:lo + 2] = [tokens[lo]]
    return steps


def test_textbook_stepper_on_a_hand_worked_example():
    assert _textbook_steps("2 + 3 × (4 - 1) ÷ 9") == [
        (4, "-", 1, 3), (3, "×", 3, 9), (9, "÷", 9, 1), (2, "+", 1, 3)]


_STEP = re.compile(r"^Step (\d+): (\S+) ([-+×÷]) (\S+) = (\S+?)\.(?: [A-Za-z ]+? ([(\d].*)\.)?$")


def test_arithmetic_answers_and_every_step_are_right():
    fractions = brackets = 0
    for ex in _sample("arithmetic"):
        expression = max(re.findall(r"[\d(][\d ()+\-×÷]*[\d)]", ex.question), key=len)
        answer = _evaluate(expression)
        assert Fraction(ex.answer) == answer and ex.answer == str(answer), ex  # an integer or reduced a/b
        fractions += answer.denominator > 1
        brackets += "(" in expression
        steps = [_STEP.match(line) for line in ex.solution.splitlines() if line.startswith("Step")]
        assert steps and all(steps), ex.solution
        done = []
        for number, match in enumerate(steps, start=1):
            k, a, op, b, c, rest = match.groups()
            a, b, c = (Fraction(x.strip("()")) for x in (a, b, c))
            assert int(k) == number and _APPLY[op](a, b) == c, match.group(0)
            assert (rest is None) == (number == len(steps)), ex.solution
            assert rest is None or _evaluate(rest) == answer, match.group(0)
            done.append((a, op, b, c))
        assert done == _textbook_steps(expression), ex
    assert fractions > 20 and brackets > 100


# ------------------------------------------------------------------------------------------------
# Linear equations: substitute the answer back into the equation read from the question.

_EQUATION_LINE = re.compile(r"^[-0-9a-z()+/ ]+=[-0-9a-z()+/ ]+$")
_PUZZLE = re.compile(r"multiply it by (\d+) and then (add|subtract) (\d+), the result is (-?\d+)")


def _residual(equation: str, var: str, value: Fraction) -> Fraction:
    left, right = equation.split("=")
    return _evaluate(left, {var: value}) - _evaluate(right, {var: value})


def test_linear_equation_answers_solve_the_equation_in_the_question():
    rational = puzzles = 0
    for ex in _sample("linear_equation"):
        x = Fraction(ex.answer)
        assert ex.answer == str(x), ex  # an integer or reduced a/b
        rational += x.denominator > 1
        displayed = [line for line in ex.question.splitlines() if "=" in line]
        if displayed:
            (equation,) = displayed
            (var,) = set(re.findall(r"[a-z]", equation))
            assert _residual(equation, var, x) == 0, ex
            assert _residual(equation, var, x + 1) != 0, ex  # the solution is unique
        else:
            puzzles += 1
            a, verb, b, c = _PUZZLE.search(ex.question).groups()
            assert (int(c) - int(b) if verb == "add" else int(c) + int(b)) / Fraction(a) == x, ex
        worked = [line for line in ex.solution.splitlines() if _EQUATION_LINE.match(line)]
        assert worked, ex.solution
        for line in worked:  # every intermediate equation still holds at the answer
            (var,) = set(re.findall(r"[a-z]", line))
            assert _residual(line, var, x) == 0, (line, ex)
    assert rational > 30 and puzzles > 30


# ------------------------------------------------------------------------------------------------
# Unit conversions: this test's own table of exact sizes in meters, grams and seconds.

_LENGTH = {"millimeter": "0.001", "centimeter": "0.01", "meter": "1", "kilometer": "1000", "inch": "0.0254",
           "foot": "0.3048", "yard": "0.9144", "mile": "1609.344"}
_MASS = {"gram": "1", "kilogram": "1000", "tonne": "1000000", "ounce": "28.349523125", "pound": "453.59237"}
_TIME = {"second": "1", "minute": "60", "hour": "3600", "day": "86400", "week": "604800"}
_SIZE = {unit: (dimension, Fraction(size))
         for dimension, table in (("length", _LENGTH), ("mass", _MASS), ("time", _TIME))
         for unit, size in table.items()}
_SINGULAR = {**{u: u for u in _SIZE}, **{u + "s": u for u in _SIZE}, "feet": "foot", "inches": "inch"}
_UNIT_WORD = r"\b(" + "|".join(sorted(_SINGULAR, key=len, reverse=True)) + r")\b"


def test_unit_conversion_answers_match_an_independent_factor_table():
    rounded = 0
    for ex in _sample("unit_conversion"):
        amount, source = re.search(r"(\d+(?:\.\d+)?) " + _UNIT_WORD, ex.question).groups()
        source = _SINGULAR[source]
        (target,) = {_SINGULAR[w] for w in re.findall(_UNIT_WORD, ex.question)} - {source}
        (source_dimension, source_size), (target_dimension, target_size) = _SIZE[source], _SIZE[target]
        assert source_dimension == target_dimension, ex
        _assert_answer(ex, Fraction(amount) * source_size / target_size)
        rounded += _asked_places(ex.question) is not None
    assert 50 < rounded < SAMPLES - 50  # both exact and rounded answers are exercised


# ------------------------------------------------------------------------------------------------
# Percentages, ratios, rates: one reading of each kind of question.


def _percentage_answer(q: str) -> Fraction:
    if m := re.search(r"from \$?(\d+) to \$?(\d+)", q):
        before, after = map(Fraction, m.groups())
        return abs(after - before) / before * 100
    if "original price" in q:
        return _find(r"\$(\d+(?:\.\d+)?)", q) / (1 - _find(r"(\d+)%", q) / 100)
    if "$" in q:
        price, p = _find(r"\$(\d+)", q), _find(r"(\d+)%", q)
        return price * (1 + p / 100) if "increase" in q else price * (1 - p / 100)
    readings = ((r"What percent of (\d+) is (\d+)", False), (r"(\d+) is what percent of (\d+)", True),
                (r"answered (\d+) of the (\d+)", True))
    for pattern, part_first in readings:
        if m := re.search(pattern, q):
            part, whole = map(Fraction, m.groups() if part_first else m.groups()[::-1])
            return part / whole * 100
    if m := re.search(r"Of the (\d+) .*?, (\d+(?:\.\d+)?)%", q):
        return Fraction(m.group(1)) * Fraction(m.group(2)) / 100
    p, whole = re.search(r"(\d+(?:\.\d+)?)(?:%| percent) of (\d+)", q).groups()
    return Fraction(p) * Fraction(whole) / 100


def _ratio_answer(q: str) -> Fraction:
    if m := re.search(r"([\d.]+) cups of", q):
        made, wanted = _numbers(re.sub(r"[\d.]+ cups of", "", q, count=1))
        return Fraction(m.group(1)) * wanted / made
    if "as a fraction" in q:
        first, second = _numbers(q)
        return first / second
    p, r = map(Fraction, re.search(r"(\d+):(\d+)", q).groups())
    if m := re.search(r"(\w+) and \w+ share \$(\d+)", q) or re.search(r"divided between (\w+) and", q):
        total, who = _find(r"\$(\d+)", q), re.search(r"How much does (\w+)", q).group(1)
        return total / (p + r) * (p if who == m.group(1) else r)
    if m := re.search(r"made from (\w+) and (\w+) in the ratio", q):
        who, total = re.search(r"kilograms of (\w+) are in (\d+) kilograms", q).groups()
        return Fraction(total) / (p + r) * (p if who == m.group(1) else r)
    count, given = re.search(r"[Tt]here are (\d+) ([a-z ]+?)[,.]", q).groups()
    other = re.search(r"[Hh]ow many ([a-z ]+?) are there", q).group(1)
    given_parts, other_parts = (p, r) if q.index(given) < q.index(other) else (r, p)
    return Fraction(count) / given_parts * other_parts


def _rate_answer(q: str) -> Fraction:
    unit = _asked_unit(q)
    distance = r"(\d+(?:\.\d+)?) (?:kilometers|miles)(?! per)"
    speed = r"(\d+(?:\.\d+)?) (?:kilometers|miles) per hour"
    if unit.endswith("per hour"):
        return _find(distance, q) / _find(r"(\d+(?:\.\d+)?) hours", q)
    if unit == "hours":
        return _find(distance, q) / _find(speed, q)
    if unit == "kilometers":
        return _find(speed, q) * _find(r"(\d+) minutes", q) / 60
    if unit == "minutes":
        per_minute, volume = _numbers(q)
        return volume / per_minute
    if "earn" in q:
        return math.prod(_numbers(q))
    bought, cost, wanted = _numbers(q)
    return cost / bought * wanted


@pytest.mark.parametrize("family, solve", [("percentage", _percentage_answer), ("ratio", _ratio_answer),
                                           ("rate", _rate_answer)])
def test_word_problem_answers_match_an_independent_reading(family, solve):
    for ex in _sample(family):
        _assert_answer(ex, solve(ex.question))


def test_dollar_answers_are_whole_or_in_cents():
    for family in ("percentage", "ratio", "rate"):
        for ex in _sample(family):
            if _asked_unit(ex.question) == "dollars":
                assert re.fullmatch(r"\d+(\.\d\d)?", ex.answer), ex


# ------------------------------------------------------------------------------------------------
# GCD / LCM and remainders.

_DIVISION = re.compile(r"(\d+) = (\d+) × (\d+) \+ (\d+)")


def _assert_divisions(solution: str) -> None:
    for n, q, m, r in _DIVISION.findall(solution):
        assert int(n) == int(q) * int(m) + int(r) and 0 <= int(r) < int(m), solution


def test_gcd_lcm_answers_and_euclid_steps():
    for ex in _sample("gcd_lcm"):
        a, b = (int(n) for n in _numbers(ex.question)[:2])
        q = ex.question.lower()
        wants_gcd = any(w in q for w in ("greatest", "highest", "gcd("))
        assert wants_gcd != any(w in q for w in ("least common", "smallest", "lcm(", "next")), ex
        assert int(ex.answer) == (math.gcd(a, b) if wants_gcd else math.lcm(a, b)), ex
        assert _DIVISION.search(ex.solution), ex
        _assert_divisions(ex.solution)


def _modular_answer(q: str) -> int:
    if m := re.search(r"(\d+) o'clock", q):
        return (int(m.group(1)) + int(re.search(r"(\d+) hours", q).group(1)) - 1) % 12 + 1
    m = (re.search(r"when (.+?) is divided by (\d+)", q) or re.search(r"(?:Find|Compute) (.+?) mod (\d+)", q)
         or re.search(r"remainder of (\d+) ÷ (\d+)", q))
    return int(_evaluate(m.group(1))) % int(m.group(2))


def test_modular_answers_and_division_steps():
    for ex in _sample("modular"):
        assert int(ex.answer) == _modular_answer(ex.question), ex
        _assert_divisions(ex.solution)


# ------------------------------------------------------------------------------------------------
# Every family: shape of the solution, verify on the solution, wrong answers rejected.


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_solutions_end_with_the_answer_and_verify(family):
    for ex in _sample(family):
        assert ex.family == family
        assert ex.solution.splitlines()[-1] == f"Final answer: {ex.answer}"
        assert synthetic.extract_final_answer(ex.solution) == ex.answer
        assert synthetic.verify(ex, ex.solution), ex
        assert synthetic.verify(ex, f"Final answer: {Fraction(ex.answer)}"), ex  # the same value as a/b
        assert not synthetic.verify(ex, f"Final answer: {Fraction(ex.answer) + 1}"), ex
        assert not synthetic.verify(ex, ex.solution.rpartition("\n")[0]), ex  # final answer line removed
    assert len({ex.question for ex in _sample(family)}) > 0.8 * SAMPLES


def test_every_family_has_varied_wording():
    for family in synthetic.FAMILIES:
        openings = {" ".join(re.sub(r"\d+", "#", ex.question).split()[:3]) for ex in _sample(family)}
        assert len(openings) >= 4, (family, openings)


# ------------------------------------------------------------------------------------------------
# verify and extract_final_answer on hand-made responses.


def _exercise(question: str, answer: str) -> synthetic.Exercise:
    return synthetic.Exercise("hand_made", question, f"Final answer: {answer}", answer)


@pytest.mark.parametrize("response, expected", [
    ("Final answer: 1/2", True), ("Final answer: 0.5", True), ("Final answer:  0.50 ", True),
    ("Final answer: 2/4", True), ("Final answer: 1/2.", True), ("**Final answer:** **1/2**", True),
    ("Final answer: x = 1/2", True), ("Final Answer: 1 / 2", True), ("final answer: .5", True),
    ("Final answer: 0.51", False), ("Final answer: 1/3", False), ("Final answer: 1/2 meters", False),
    ("Final answer: $0.50", False), ("Final answer: 50%", False), ("Final answer: 1/0", False),
    ("Final answer:", False), ("The answer is 1/2.", False), ("", False),
])
def test_verify_compares_values_not_strings(response, expected):
    ex = _exercise("Write the ratio 3:6 as a fraction in lowest terms.", "1/2")
    assert synthetic.verify(ex, response) is expected


@pytest.mark.parametrize("question, answer, good, bad", [
    ("Convert 1 foot to inches. Give your answer in inches.", "12",
     ["12 inches", "12 in", "12.0", "12 inch", "12"], ["12 feet", "12 cm", "12 inches long", "13 inches"]),
    ("How much does it cost? Give your answer in dollars.", "1250.50",
     ["$1,250.50", "1250.5 dollars", "$1,250.50.", "1,250.50 USD", "1250.50$"],
     ["1250.51", "$1,2500.50", "1,25,0.50"]),
    ("What percent of 8 is 1? Give your answer in percent.", "12.5",
     ["12.5%", "12.5 %", "12.5 percent", "25/2"], ["12.5 dollars", "0.125", "13%"]),
    ("Convert 7 feet to meters. Give your answer in meters, rounded to 2 decimal places.", "2.13",
     ["2.13", "2.1336 m", "2.134 meters", "2.13 metres", "2.125"], ["2.14", "2.1", "2.12", "2.13 feet"]),
    ("Convert 39 kilograms to pounds. Express your answer in pounds, correct to the nearest whole number.",
     "86", ["86", "85.98 lb", "86.4", "85.5"], ["86.5", "85", "87"]),
    ("Solve 2x = -3.", "-3/2", ["-3/2", "-1.5", "\u22121.5", "x = -1.5"], ["3/2", "1.5", "-1.4"]),
    ("Find 2^11.", "2048", ["2048", "2,048"], ["2,0480", "20,48"]),
])
def test_verify_accepts_equivalent_forms_and_only_the_asked_unit(question, answer, good, bad):
    ex = _exercise(question, answer)
    for text in good:
        assert synthetic.verify(ex, f"Working...\nFinal answer: {text}"), text
    for text in bad:
        assert not synthetic.verify(ex, f"Working...\nFinal answer: {text}"), text


def test_verify_never_raises_on_garbage():
    ex = synthetic.exercise(0, 0)
    garbage = ["", "Final answer", "Final answer: ", "Final answer: \x00\xff", "Final answer: " + "9" * 5000,
               "Final answer: 1" + "0" * 200 + "/3", "Final answer: 1/" + "0" * 50, "Final answer: NaN",
               "Final answer: inf", "Final answer: 1e5", "Final answer: --5", "Final answer: $$5",
               "final answer:" * 1000, "\n" * 100, "Final answer: " + " " * 10000 + ".",
               "Final answer: ." * 3, "Final answer: 5" + "." * 5000]
    rng = np.random.default_rng(0)
    garbage += [bytes(rng.integers(0, 256, size=200, dtype=np.uint8)).decode("latin-1") for _ in range(50)]
    for text in garbage:
        assert synthetic.verify(ex, text) is False
        synthetic.extract_final_answer(text)


def test_extract_final_answer_takes_the_last_one():
    text = "Final answer: 3\nOn second thought...\nFINAL ANSWER: 7\nso that's it"
    assert synthetic.extract_final_answer(text) == "7"
    assert synthetic.extract_final_answer("**Final answer:** 42 ") == "42"
    assert synthetic.extract_final_answer("Final answer: 3\nFinal answer:") is None  # cut off mid-answer
    assert synthetic.extract_final_answer("no answer here") is None
    ex = _exercise("Compute 3 + 4.", "7")
    assert synthetic.verify(ex, "Final answer: 7\nFinal answer: 8") is False
    assert synthetic.verify(ex, "Final answer: 8\nFinal answer: 7") is True


# ------------------------------------------------------------------------------------------------
# Determinism, random access and the public entry points.


def test_same_seed_and_index_give_the_same_exercise_in_any_order():
    forward = [synthetic.exercise(3, i) for i in range(60)]
    by_index = {int(i): synthetic.exercise(3, int(i)) for i in np.random.default_rng(1).permutation(60)}
    assert [by_index[i] for i in range(60)] == forward
    assert synthetic.exercise(3, 10**12 + 5) == synthetic.exercise(3, 10**12 + 5)
    assert synthetic.exercise(3, np.int64(17)) == forward[17]


@pytest.mark.slow
def test_exercises_are_the_same_in_another_process_with_another_hash_seed():
    indices = (0, 1, 99, 2**40 + 3)
    code = f"from phi4_jax.data import synthetic; print([synthetic.exercise(5, i) for i in {indices}])"
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == repr([synthetic.exercise(5, i) for i in indices])


def test_different_indices_and_seeds_give_different_exercises():
    assert len({synthetic.exercise(3, i).question for i in range(300)}) >= 295
    assert sum(synthetic.exercise(3, i) != synthetic.exercise(4, i) for i in range(100)) >= 98


def test_default_stream_mixes_all_families_and_families_argument_restricts_it():
    assert {synthetic.exercise(0, i).family for i in range(400)} == set(synthetic.FAMILIES)
    assert {synthetic.exercise(0, i, ("ratio", "modular")).family for i in range(100)} == {"ratio", "modular"}


@pytest.mark.parametrize("args, error, message", [
    ((-1, 0), ValueError, "seed must be non-negative, got -1"),
    ((0, -5), ValueError, "index must be non-negative, got -5"),
    ((0, 1.5), TypeError, "index must be an integer"),
    ((0, 0, ("arithmetic", "calculus")), ValueError, "unknown exercise families ['calculus']"),
    ((0, 0, "arithmetic"), ValueError, "families must be a non-empty sequence"),
    ((0, 0, ()), ValueError, "families must be a non-empty sequence"),
])
def test_bad_arguments_are_refused_with_a_clear_error(args, error, message):
    with pytest.raises(error, match=re.escape(message)):
        synthetic.exercise(*args)


def test_documents_stream_renders_question_solution_and_answer():
    stream = synthetic.documents(9, start=40)
    for index in range(40, 46):
        doc, ex = next(stream), synthetic.exercise(9, index)
        assert doc == synthetic.render_document(ex)
        assert doc.index(ex.question) < doc.index(ex.solution)
        assert doc.rstrip().endswith(f"Final answer: {ex.answer}")


def _fractions_to_write() -> list[Fraction]:
    rng = np.random.default_rng(5)
    denominators = [1, 2, 3, 4, 5, 7, 8, 16, 20, 25, 40, 64, 125, 625, 1024, 3125, 5**12, 5**13,
                    2**12 * 5**3, 2**13, 6, 12, 1000]
    return [Fraction(int(n), d) for d in denominators for n in rng.integers(-10**6, 10**6, 40)]


@pytest.mark.parametrize("limit", [0, 2, 8, 12])
def test_decimal_places_is_the_fewest_places_that_make_the_value_whole(limit):
    for value in _fractions_to_write():
        want = next((p for p in range(limit + 1) if (value * 10**p).denominator == 1), None)
        assert synthetic.text.decimal_places(value, limit) == want, value


def test_fixed_writes_the_exact_decimal():
    with decimal.localcontext(decimal.Context(prec=60)):
        for value in _fractions_to_write():
            for places in range(14):
                if (value * 10**places).denominator != 1:
                    with pytest.raises(ValueError, match="decimals"):
                        synthetic.text.fixed(value, places)
                    continue
                exact = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
                assert synthetic.text.fixed(value, places) == f"{exact:.{places}f}", (value, places)

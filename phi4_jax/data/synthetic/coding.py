"""Small Python exercises checked by unit tests: write one function, graded by asserts.

`coding_exercise(seed, index)` is pure like `exercise`: a fresh RNG per index picks a family
and its parameters (names, constants, test inputs). Each exercise carries a reference
solution and assert-based tests whose expected values come from running that reference, so
the reference passes by construction. Pivotal Token Search runs a response's code against
the tests in a sandbox (`phi4_jax.search.sandbox`); the exercises are not part of the
pretraining or SFT streams, which stay as they were.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

ANSWER_FORMAT = "Reply with the complete function in a ```python code block."


@dataclasses.dataclass(frozen=True)
class CodingExercise:
    """A function to write: the prompt, a reference solution and the tests (asserts)."""

    family: str
    question: str
    solution: str
    tests: str
    entry_point: str


def _digit_sum(rng: random.Random) -> tuple[str, str, str, list[tuple]]:
    name = rng.choice(["digit_sum", "sum_of_digits", "add_digits"])
    task = "returns the sum of the decimal digits of the integer `n` (ignore a minus sign)"
    code = f"def {name}(n):\n    return sum(int(d) for d in str(abs(n)))\n"
    inputs = [(rng.randint(-10**6, 10**6),) for _ in range(4)] + [(0,)]
    return name, f"{name}(n)` that {task}", code, inputs


def _count_char(rng: random.Random) -> tuple[str, str, str, list[tuple]]:
    name = rng.choice(["count_vowels", "vowel_count"])
    vowels = rng.choice(["aeiou", "aeiouy"])
    task = (f"returns how many characters of the string `text` are one of {vowels!r}, "
            f"ignoring case")
    code = f"def {name}(text):\n    return sum(c in {vowels!r} for c in text.lower())\n"
    words = ["Apple", "sky", "QUEUE", "rhythm", "banana split", "Yellow", "IoU", ""]
    inputs = [(" ".join(rng.sample(words, 2)),) for _ in range(4)] + [("",)]
    return name, f"{name}(text)` that {task}", code, inputs


def _fizz(rng: random.Random) -> tuple[str, str, str, list[tuple]]:
    name = rng.choice(["label", "fizz_buzz"])
    a, b = rng.sample([2, 3, 5, 7], 2)
    word_a, word_b = rng.sample(["Fizz", "Buzz", "Ping", "Pong"], 2)
    task = (f"returns {word_a + word_b!r} if the integer `n` is divisible by both {a} and {b}, "
            f"{word_a!r} if only by {a}, {word_b!r} if only by {b}, and otherwise `str(n)`")
    code = (f"def {name}(n):\n    if n % {a * b} == 0:\n        return {word_a + word_b!r}\n"
            f"    if n % {a} == 0:\n        return {word_a!r}\n"
            f"    if n % {b} == 0:\n        return {word_b!r}\n    return str(n)\n")
    inputs = [(a * b * rng.randint(1, 9),), (a * rng.randint(1, 30),), (b * rng.randint(1, 30),),
              (rng.randint(1, 200),), (1,)]
    return name, f"{name}(n)` that {task}", code, inputs


def _running_max(rng: random.Random) -> tuple[str, str, str, list[tuple]]:
    name = rng.choice(["running_max", "prefix_maxima"])
    task = ("returns a list whose i-th element is the largest of `values[0..i]` (an empty "
            "list for an empty input)")
    code = (f"def {name}(values):\n    out = []\n    for v in values:\n"
            f"        out.append(v if not out else max(out[-1], v))\n    return out\n")
    inputs = [([rng.randint(-50, 50) for _ in range(rng.randint(1, 8))],) for _ in range(4)]
    return name, f"{name}(values)` that {task}", code, inputs + [([],)]


def _arithmetic_term(rng: random.Random) -> tuple[str, str, str, list[tuple]]:
    name = rng.choice(["term", "nth_term"])
    first, step = rng.randint(-20, 20), rng.choice([d for d in range(-9, 10) if d])
    task = (f"returns the n-th term (n = 1, 2, ...) of the arithmetic sequence that starts at "
            f"{first} and changes by {step} each term")
    code = f"def {name}(n):\n    return {first} + (n - 1) * ({step})\n"
    inputs = [(1,)] + [(rng.randint(2, 500),) for _ in range(4)]
    return name, f"{name}(n)` that {task}", code, inputs


def _second_largest(rng: random.Random) -> tuple[str, str, str, list[tuple]]:
    name = rng.choice(["second_largest", "runner_up"])
    task = ("returns the second largest distinct value in the list `values`, or None if it has "
            "fewer than two distinct values")
    code = (f"def {name}(values):\n    distinct = sorted(set(values))\n"
            f"    return distinct[-2] if len(distinct) >= 2 else None\n")
    inputs = [([rng.randint(0, 9) for _ in range(rng.randint(2, 7))],) for _ in range(3)]
    return name, f"{name}(values)` that {task}", code, inputs + [([5, 5],), ([],)]


_FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, str, list[tuple]]]] = {
    "digit_sum": _digit_sum,
    "count_char": _count_char,
    "fizz": _fizz,
    "running_max": _running_max,
    "arithmetic_term": _arithmetic_term,
    "second_largest": _second_largest,
}
CODING_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def coding_exercise(seed: int, index: int) -> CodingExercise:
    """The coding exercise at `index` of the stream `seed`, the same on every machine."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed} and index={index} must be non-negative.")
    rng = random.Random(f"phi4_jax.synthetic.coding/{seed}/{index}")
    family = CODING_FAMILIES[rng.randrange(len(CODING_FAMILIES))]
    name, signature, code, inputs = _FAMILIES[family](rng)
    namespace: dict = {}
    exec(code, namespace)  # our own reference solution: the tests' expected values
    reference = namespace[name]
    tests = "".join(f"assert {name}({', '.join(map(repr, args))}) == "
                    f"{reference(*args)!r}\n" for args in inputs)
    question = f"Write a Python function `{signature}. {ANSWER_FORMAT}"
    return CodingExercise(family, question, code, tests, name)

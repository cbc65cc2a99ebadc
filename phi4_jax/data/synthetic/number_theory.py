"""Families about divisibility: `gcd_lcm` (by the Euclidean algorithm) and `modular` (remainders, clocks)."""

from __future__ import annotations

import math
import random

from phi4_jax.data.synthetic.text import Exercise, join_sentences, worked_solution
from phi4_jax.data.synthetic.units import instruction


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
    return join_sentences(asked, instruction(rng, unit)), [why, via_gcd]


def gcd_lcm(rng: random.Random) -> Exercise:
    """A gcd or lcm of two numbers with a common factor, bare or as a story, via the Euclidean algorithm."""
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
    return Exercise("gcd_lcm", question, worked_solution(lines, answer), answer)


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
    return Exercise("modular", rng.choice(templates), worked_solution(lines, str(n % m)), str(n % m))


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
    return Exercise("modular", rng.choice(templates), worked_solution(lines, answer), answer)


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
    return Exercise("modular", asked, worked_solution(lines, str(residue)), str(residue))


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
    question = join_sentences(asked, "Give the hour as a number from 1 to 12.")
    return Exercise("modular", question, worked_solution(lines, str(end)), str(end))


def modular(rng: random.Random) -> Exercise:
    """A remainder: of a number, a product or a power, or the hour on a 12-hour clock."""
    return rng.choice((_remainder, _product_remainder, _power_remainder, _clock))(rng)

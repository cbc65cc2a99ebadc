"""Families about parts of a whole: `percentage` and `ratio` (sharing, proportion, recipes)."""

from __future__ import annotations

import math
import random
from fractions import Fraction

from phi4_jax.data.synthetic.text import (ITEMS, PEOPLE, Exercise, decimal_places, join_sentences, money, num,
                                          worked_solution)
from phi4_jax.data.synthetic.units import instruction


# ----------------------------------------------------------------------------------------------
# Family: percentages.

_PERCENTS = tuple(Fraction(p) for p in ("5", "10", "12.5", "15", "20", "25", "30", "35", "40", "45", "60",
                                        "62.5", "75", "80", "90"))
_PERCENT_GROUPS = (("students", "school", "walk to school"), ("members", "club", "voted for the new logo"),
                   ("trees", "orchard", "are apple trees"), ("emails", "inbox", "are marked as read"))


def _percent_of(rng: random.Random) -> Exercise:
    p = rng.choice(_PERCENTS)
    rate = p / 100
    lines = [f"{num(p)}% means {num(p)}/100 = {num(rate)}."]
    if rng.random() < 0.5:
        whole = Fraction(rng.randint(4, 400))
        asked = rng.choice(("What is {p}% of {n}?", "Find {p}% of {n}.", "Calculate {p} percent of {n}."))
        question = asked.format(p=num(p), n=whole)
        lines.append(f"{whole} × {num(rate)} = {num(whole * rate)}.")
    else:
        whole = Fraction(rate.denominator * rng.randint(1, max(1, 400 // rate.denominator)))
        group, place, verb = rng.choice(_PERCENT_GROUPS)
        question = f"Of the {whole} {group} in the {place}, {num(p)}% {verb}. How many {group} {verb}?"
        lines += [f"{whole} × {num(rate)} = {num(whole * rate)}.",
                  f"So {num(whole * rate)} {group} {verb}."]
    answer = num(whole * rate)
    return Exercise("percentage", question, worked_solution(lines, answer), answer)


def _what_percent(rng: random.Random) -> Exercise:
    p = rng.choice(_PERCENTS)
    rate = p / 100
    whole = rate.denominator * rng.randint(1, max(1, 300 // rate.denominator))
    part = whole * rate
    name, pronoun = rng.choice(PEOPLE)
    templates = (
        f"What percent of {whole} is {part}?",
        f"{part} is what percent of {whole}?",
        f"{name} answered {part} of the {whole} questions on a quiz correctly. "
        f"What percentage of the questions did {pronoun} answer correctly?",
    )
    lines = [f"Divide the part by the whole: {part} ÷ {whole} = {num(rate)}.",
             f"Multiply by 100 to write this as a percentage: {num(rate)} × 100 = {num(p)}.",
             f"So {part} is {num(p)}% of {whole}."]
    question = join_sentences(rng.choice(templates), instruction(rng, "percent"))
    return Exercise("percentage", question, worked_solution(lines, num(p)), num(p))


def _price_change(rng: random.Random) -> Exercise:
    p = rng.choice((5, 10, 15, 20, 25, 30, 40, 50))
    price, item = Fraction(rng.randint(8, 400)), rng.choice(ITEMS)
    change = price * p / 100
    if rng.random() < 0.5:
        new = price + change
        templates = (
            f"The price of a {item} is ${price}. The price then increases by {p}%. What is the new price?",
            f"A {item} costs ${price} before a {p}% price increase. What does it cost after the increase?",
        )
        last = f"Add the increase to the original price: {price} + {money(change)} = {money(new)}."
    else:
        new = price - change
        templates = (
            f"A {item} that normally costs ${price} is sold at {p}% off. What is the sale price?",
            f"The price of a {item} is ${price}. It is reduced by {p}%. What is the new price?",
        )
        last = f"Subtract the reduction from the original price: {price} - {money(change)} = {money(new)}."
    lines = [f"The change is {p}% of ${price}: {price} × {num(Fraction(p, 100))} = {money(change)}.", last]
    question = join_sentences(rng.choice(templates), instruction(rng, "dollars"))
    return Exercise("percentage", question, worked_solution(lines, money(new)), money(new))


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
        item = rng.choice(ITEMS)
        templates = (
            f"The price of a {item} fell from ${before} to ${after}. What was the percentage decrease?",
            f"A company cut its staff from {before} to {after} people. "
            f"By what percentage did the staff decrease?",
        )
        first = f"The decrease is {before} - {after} = {before - after}."
    change = abs(after - before)
    lines = [first, f"Divide by the starting value: {change} ÷ {before} = {num(rate)}.",
             f"As a percentage: {num(rate)} × 100 = {num(p)}."]
    question = join_sentences(rng.choice(templates), instruction(rng, "percent"))
    return Exercise("percentage", question, worked_solution(lines, num(p)), num(p))


def _original_price(rng: random.Random) -> Exercise:
    p = rng.choice((10, 15, 20, 25, 30, 40, 50))
    original, item = Fraction(rng.randint(10, 500)), rng.choice(ITEMS)
    kept = Fraction(100 - p, 100)
    sale = money(original * kept)
    templates = (
        f"After a {p}% discount, a {item} costs ${sale}. What was its original price?",
        f"A {item} is on sale for ${sale}, which is {p}% off its original price. "
        f"What was the original price?",
    )
    lines = [f"A {p}% discount leaves {100 - p}% of the original price, "
             f"so the sale price is {num(kept)} times the original.",
             f"Original price = {sale} ÷ {num(kept)} = {money(original)}."]
    question = join_sentences(rng.choice(templates), instruction(rng, "dollars"))
    return Exercise("percentage", question, worked_solution(lines, money(original)), money(original))


def percentage(rng: random.Random) -> Exercise:
    """A percentage problem: a percent of, what percent, price change, percent change or original price."""
    return rng.choice((_percent_of, _what_percent, _price_change, _percent_change, _original_price))(rng)


# ----------------------------------------------------------------------------------------------
# Family: ratios and proportion.

_MIXTURES = (("mortar", "sand", "cement"), ("trail mix", "peanuts", "raisins"),
             ("potting mix", "compost", "grit"), ("bronze alloy", "copper", "tin"))
_PAIRS = (("boys", "girls", "in a class"), ("red marbles", "blue marbles", "in a bag"),
          ("cats", "dogs", "at an animal shelter"), ("adults", "children", "on a school trip"))


def _coprime_pair(rng: random.Random, high: int = 9) -> tuple[int, int]:
    """Two different coprime integers from 1 to `high`: the terms of a ratio in lowest terms."""
    while True:
        p, q = rng.randint(1, high), rng.randint(1, high)
        if p != q and math.gcd(p, q) == 1:
            return p, q


def _ratio_share(rng: random.Random) -> Exercise:
    p, q = _coprime_pair(rng)
    part = rng.randint(2, 40)
    total = part * (p + q)
    if rng.random() < 0.5:
        first = rng.choice(PEOPLE)[0]
        second = rng.choice([name for name, _ in PEOPLE if name != first])
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
    question = join_sentences(asked, instruction(rng, unit))
    return Exercise("ratio", question, worked_solution(lines, str(parts * part)), str(parts * part))


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
    return Exercise("ratio", rng.choice(templates), worked_solution(lines, answer), answer)


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
    return Exercise("ratio", rng.choice(templates), worked_solution(lines, f"{p}/{q}"), f"{p}/{q}")


def _recipe(rng: random.Random) -> Exercise:
    ingredient, things = rng.choice((("flour", "pancakes"), ("oats", "muffins"), ("milk", "waffles"),
                                     ("sugar", "cookies")))
    while True:
        cups = Fraction(rng.choice(("0.5", "1.5", "2", "2.5", "3", "4")))
        made, wanted = rng.choice((2, 3, 4, 6, 8, 12)), rng.randint(2, 24)
        needed = cups * wanted / made
        places = decimal_places(needed)
        if wanted != made and places is not None and places <= 2:
            break
    templates = (
        f"A recipe uses {num(cups)} cups of {ingredient} to make {made} {things}. "
        f"How many cups of {ingredient} are needed to make {wanted} {things}?",
        f"To make {made} {things} you need {num(cups)} cups of {ingredient}. "
        f"How many cups of {ingredient} do you need for {wanted} {things}?",
    )
    lines = [f"The amount of {ingredient} is proportional to the number of {things}, "
             f"so multiply by {wanted} and divide by {made}.",
             f"{num(cups)} × {wanted} = {num(cups * wanted)}.",
             f"{num(cups * wanted)} ÷ {made} = {num(needed)}."]
    question = join_sentences(rng.choice(templates), instruction(rng, "cups"))
    return Exercise("ratio", question, worked_solution(lines, num(needed)), num(needed))


def ratio(rng: random.Random) -> Exercise:
    """A ratio problem: sharing in a ratio, a proportion, a ratio as a fraction or scaling a recipe."""
    return rng.choice((_ratio_share, _proportion, _ratio_as_fraction, _recipe))(rng)

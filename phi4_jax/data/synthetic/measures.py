"""Families about quantities with units: `unit_conversion` and `rate` (speed, unit price, flow, pay).

Conversions follow one or two exact defining factors (the inch is 2.54 cm by definition), so the answer is
known exactly; where it needs more than 3 decimals the question asks for it rounded and says how.
"""

from __future__ import annotations

import dataclasses
import math
import random
from fractions import Fraction

from phi4_jax.data.synthetic.text import (PEOPLE, POSSESSIVE, Exercise, approximately, decimal_places, fixed,
                                          join_sentences, money, num, round_half_up, rounding_phrase,
                                          worked_solution)
from phi4_jax.data.synthetic.units import UNITS, instruction


# ----------------------------------------------------------------------------------------------
# Family: unit conversions with exact factors.

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
    big, small = UNITS[leg.big], UNITS[leg.small]
    multiply = leg.source == leg.big
    verb, symbol = ("multiply", "×") if multiply else ("divide", "÷")
    result = approximately(value)
    line = (f"1 {big.singular} = {num(leg.factor)} {small.plural}, so {verb} by {num(leg.factor)}: "
            f"{amount_text} {symbol} {num(leg.factor)} {result} {UNITS[leg.target].plural}.")
    return line, result[2:]


_CONVERSION_CONTEXTS = {
    "length": ("A {thing} is {q} long. What is its length in {u}?",
               ("rope", "hallway", "garden hose", "fence", "ribbon", "hiking trail", "swimming pool")),
    "mass": ("A {thing} weighs {q}. What is its mass in {u}?",
             ("suitcase", "bag of flour", "parcel", "puppy", "watermelon", "box of books")),
    "time": ("A {thing} lasts {q}. How long is that in {u}?",
             ("film", "flight", "bike ride", "concert", "training course", "road trip")),
}


def unit_conversion(rng: random.Random) -> Exercise:
    """An amount to convert along one or two exact factors, rounded only where it needs over 3 decimals."""
    path = rng.choice(_CONVERSION_PATHS)
    source, middle, target = UNITS[path[0].source], UNITS[path[0].target], UNITS[path[-1].target]
    ratio = math.prod(leg.ratio for leg in path)
    amount = _conversion_amount(rng, ratio)
    exact = amount * ratio
    needed = decimal_places(exact)
    places = None
    if needed is None or needed > 3:
        places = rng.choice((0, 1, 2, 2) if exact >= 100 else (1, 2, 2, 3))
    context, things = _CONVERSION_CONTEXTS[source.dimension]
    templates = ("Convert {q} to {u}.", "How many {u} are there in {q}?", "Express {q} in {u}.", context)
    asked = rng.choice(templates).format(q=source.of(amount), u=target.plural, thing=rng.choice(things))
    lines = [f"Convert {source.plural} to {middle.plural}, then to {target.plural}."] if len(path) > 1 else []
    value, text = amount, num(amount)
    for leg in path:
        value *= leg.ratio
        line, text = _leg_line(leg, text, value)
        lines.append(line)
    if places is None:
        answer = num(exact)
        lines.append(f"So {source.of(amount)} is exactly {answer} {target.plural}.")
    else:
        answer = fixed(round_half_up(exact, places), places)
        rounding = rounding_phrase(places)
        lines.append(f"Rounded to {rounding}, {source.of(amount)} is {answer} {target.plural}.")
    question = join_sentences(asked, instruction(rng, target.plural, places))
    return Exercise("unit_conversion", question, worked_solution(lines, answer), answer)


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
    d, s, t = num(speed * hours), num(speed), num(hours)
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
    question = join_sentences(rng.choice(templates), instruction(rng, unit))
    return Exercise("rate", question, worked_solution(lines, answer), answer)


def _distance_in_minutes(rng: random.Random) -> Exercise:
    name, pronoun = rng.choice(PEOPLE)
    while True:
        cycling = rng.random() < 0.5
        speed = rng.randint(12, 30) if cycling else rng.randint(3, 6)
        minutes = rng.choice((10, 12, 15, 20, 24, 30, 36, 40, 45, 48, 50, 54, 75, 90))
        distance = Fraction(speed * minutes, 60)
        places = decimal_places(distance)
        if places is not None and places <= 2:
            break
    verb = "cycles" if cycling else "walks"
    templates = (
        f"{name} {verb} at a steady {speed} kilometers per hour for {minutes} minutes. "
        f"How far does {pronoun} travel?",
        f"{name} {verb} for {minutes} minutes at {speed} kilometers per hour. How far does {pronoun} go?",
    )
    lines = [f"Distance is speed times time, and {minutes} minutes is {minutes}/60 of an hour.",
             f"{speed} × {minutes} = {speed * minutes}.", f"{speed * minutes} ÷ 60 = {num(distance)}."]
    question = join_sentences(rng.choice(templates), instruction(rng, "kilometers"))
    return Exercise("rate", question, worked_solution(lines, num(distance)), num(distance))


def _unit_price(rng: random.Random) -> Exercise:
    item, items = rng.choice(_GOODS)
    price = Fraction(rng.randint(25, 1500), 100)
    bought, wanted = rng.randint(2, 12), rng.randint(2, 20)
    while wanted == bought:
        wanted = rng.randint(2, 20)
    cost, total = money(price * bought), money(price * wanted)
    templates = (
        f"{bought} {items} cost ${cost}. At the same price, how much do {wanted} {items} cost?",
        f"If {bought} {items} cost ${cost} in total, what is the cost of {wanted} {items}?",
    )
    lines = [f"One {item} costs {cost} ÷ {bought} = ${money(price)}.",
             f"So {wanted} {items} cost {wanted} × {money(price)} = ${total}."]
    question = join_sentences(rng.choice(templates), instruction(rng, "dollars"))
    return Exercise("rate", question, worked_solution(lines, total), total)


def _fill_time(rng: random.Random) -> Exercise:
    flow, minutes = rng.randint(2, 40), rng.randint(3, 60)
    volume = flow * minutes
    templates = (
        f"A tap fills a tank at {flow} liters per minute. "
        f"How many minutes does it take to fill a {volume}-liter tank?",
        f"A pump moves {flow} liters of water per minute. How long does it take to pump {volume} liters?",
    )
    lines = ["Time is volume divided by flow rate.", f"{volume} ÷ {flow} = {minutes}."]
    question = join_sentences(rng.choice(templates), instruction(rng, "minutes"))
    return Exercise("rate", question, worked_solution(lines, str(minutes)), str(minutes))


def _wages(rng: random.Random) -> Exercise:
    name, pronoun = rng.choice(PEOPLE)
    wage, hours, days = Fraction(rng.randint(24, 90), 2), rng.randint(3, 10), rng.randint(2, 7)
    total = money(wage * hours * days)
    templates = (
        f"{name} earns ${money(wage)} per hour and works {hours} hours a day for {days} days. "
        f"How much does {pronoun} earn in total?",
        f"{name} is paid ${money(wage)} an hour. {pronoun.capitalize()} works {hours} hours a day "
        f"for {days} days. What are {POSSESSIVE[pronoun]} total earnings?",
    )
    lines = [f"Hours worked: {hours} × {days} = {hours * days}.",
             f"Earnings: {hours * days} × {money(wage)} = ${total}."]
    question = join_sentences(rng.choice(templates), instruction(rng, "dollars"))
    return Exercise("rate", question, worked_solution(lines, total), total)


def rate(rng: random.Random) -> Exercise:
    """A rate problem: speed and time, distance in minutes, unit price, filling time or total pay."""
    return rng.choice((_speed_and_time, _distance_in_minutes, _unit_price, _fill_time, _wages))(rng)

"""Units: what questions ask for and which words a response may write after its number.

`instruction` writes the sentence naming a question's unit and rounding; `answer_format` reads it back for
`verify`, which then accepts after the number only the names of that unit listed in `UNITS`.
"""

from __future__ import annotations

import dataclasses
import random
import re
from fractions import Fraction

from phi4_jax.data.synthetic.text import num, rounding_phrase


@dataclasses.dataclass(frozen=True)
class Unit:
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
        return f"{num(amount)} {self.singular if amount == 1 else self.plural}"


UNITS = {
    unit.plural: unit
    for unit in (
        Unit("millimeter", "millimeters", ("mm", "millimetre", "millimetres"), "length"),
        Unit("centimeter", "centimeters", ("cm", "centimetre", "centimetres"), "length"),
        Unit("meter", "meters", ("m", "metre", "metres"), "length"),
        Unit("kilometer", "kilometers", ("km", "kilometre", "kilometres"), "length"),
        Unit("inch", "inches", ("in",), "length"),
        Unit("foot", "feet", ("ft",), "length"),
        Unit("yard", "yards", ("yd", "yds"), "length"),
        Unit("mile", "miles", ("mi",), "length"),
        Unit("gram", "grams", ("g",), "mass"),
        Unit("kilogram", "kilograms", ("kg", "kilo", "kilos"), "mass"),
        Unit("tonne", "tonnes", ("t", "metric ton", "metric tons"), "mass"),
        Unit("ounce", "ounces", ("oz",), "mass"),
        Unit("pound", "pounds", ("lb", "lbs"), "mass"),
        Unit("second", "seconds", ("s", "sec", "secs"), "time"),
        Unit("minute", "minutes", ("min", "mins"), "time"),
        Unit("hour", "hours", ("h", "hr", "hrs"), "time"),
        Unit("day", "days", (), "time"),
        Unit("week", "weeks", ("wk", "wks"), "time"),
        Unit("liter", "liters", ("l", "litre", "litres")),
        Unit("cup", "cups"),
        Unit("dollar", "dollars", ("$", "usd")),
        Unit("percent", "percent", ("%", "per cent", "pct")),
        Unit("kilometer per hour", "kilometers per hour",
             ("km/h", "kph", "km per hour", "kilometres per hour")),
        Unit("mile per hour", "miles per hour", ("mph", "mi/h")),
    )
}

_UNIT_NAMES = "|".join(re.escape(name) for name in sorted(UNITS, key=len, reverse=True))  # longest first
_UNIT_REQUEST = re.compile(rf"(?:answer|result) in ({_UNIT_NAMES})\b", re.IGNORECASE)
_ROUNDING_REQUEST = re.compile(r"to (?:(\d+) decimal places?|the nearest (whole) number)", re.IGNORECASE)


def instruction(rng: random.Random, unit: str | None, places: int | None = None) -> str:
    """The sentence naming the answer's unit (and rounding) that `verify` reads back; '' without a unit."""
    if unit is None:
        return ""
    if places is None:
        templates = ("Give your answer in {u}.", "Express your answer in {u}.", "State the result in {u}.")
        return rng.choice(templates).format(u=unit)
    templates = ("Give your answer in {u}, rounded to {r}.", "Express your answer in {u}, correct to {r}.",
                 "State the result in {u} to {r}.")
    return rng.choice(templates).format(u=unit, r=rounding_phrase(places))


def answer_format(question: str) -> tuple[Unit | None, int | None]:
    """The unit and the number of decimals a question asks its answer in (None where it asks for none)."""
    units = _UNIT_REQUEST.findall(question)
    roundings = _ROUNDING_REQUEST.findall(question)
    unit = UNITS[units[-1].lower()] if units else None
    places = None
    if roundings:
        digits, whole = roundings[-1]
        places = 0 if whole else int(digits)
    return unit, places

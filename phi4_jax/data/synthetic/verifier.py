"""Checking a response against an exercise: its last 'Final answer:' line, read as an exact number.

Pivotal Token Search scores sampled completions with `verify`, so it accepts the ways a model may write
a correct answer (a fraction for a decimal, thousands separators, the question's unit, markdown emphasis)
and rejects any other unit or a missing final answer.
"""

from __future__ import annotations

import re
from fractions import Fraction

from phi4_jax.data.synthetic.text import REFUSAL, Exercise, round_half_up
from phi4_jax.data.synthetic.units import Unit, answer_format


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


def _names(unit: Unit | None, word: str) -> bool:
    return unit is not None and word in unit.aliases


def _parse_value(text: str, unit: Unit | None) -> Fraction | None:
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


def _is_refusal(final: str) -> bool:
    """'I don't know' (any case, straight or curly apostrophe, or 'I do not know')."""
    words = _EDGES.sub("", final).lower().replace("\u2019", "'")
    return words in ("i don't know", "i do not know")


def verify(ex: Exercise, response: str) -> bool:
    """True iff the last final answer in `response` equals `ex.answer` as a number; for an
    unanswerable exercise (answer `REFUSAL`), iff it is a refusal.

    Rounded answers compare after rounding the response to the decimals the question asks for; a unit
    word after the number is allowed only if it names the unit the question asks for.
    """
    final = extract_final_answer(response)
    if final is None:
        return False
    if ex.answer == REFUSAL:
        return _is_refusal(final)
    unit, places = answer_format(ex.question)
    got, want = _parse_value(final, unit), _parse_value(ex.answer, None)
    if got is None or want is None:
        return False
    return (got if places is None else round_half_up(got, places)) == want

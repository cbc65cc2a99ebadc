"""The column_addition drill: every worked column re-derived with Python ints from the question,
answers that verify, no favourite answer, determinism, and the digits/operands knob in the name."""

import collections
import re

import pytest

from phi4_jax.data import synthetic
from phi4_jax.data.synthetic import reasoning

QUESTION = re.compile(r"What is (\d+(?:\+\d+)+)\?")
COLUMN = re.compile(r"(\d(?:\+\d)+)\+(\d)=(\d+), write (\d) carry (\d)")


def _draws(family: str, count: int, seed: int = 7) -> list[synthetic.Exercise]:
    return [synthetic.exercise(seed, index, (family,)) for index in range(count)]


def _operands(ex: synthetic.Exercise) -> list[int]:
    return [int(n) for n in QUESTION.fullmatch(ex.question).group(1).split("+")]


@pytest.mark.parametrize("family", ["column_addition", "column_addition_1", "column_addition_6_4",
                                    "column_addition_12_9"])
def test_every_column_line_is_the_schoolbook_step(family):
    for ex in _draws(family, 50):
        numbers = _operands(ex)
        digits = len(str(numbers[0]))
        *columns, last, final = ex.solution.split("\n")
        assert len(columns) == digits and final == f"Final answer: {ex.answer}"
        carry, written = 0, []
        for place, line in enumerate(columns):
            shown, carry_in, total, write, carry_out = COLUMN.fullmatch(line).groups()
            assert [int(d) for d in shown.split("+")] == [n // 10**place % 10 for n in numbers]
            assert int(carry_in) == carry
            assert int(total) == sum(n // 10**place % 10 for n in numbers) + carry
            assert (int(write), int(carry_out)) == divmod(int(total), 10)[::-1]
            carry = int(carry_out)
            written.append(write)
        answer = sum(numbers)
        assert ex.answer == str(answer) == (str(carry) if carry else "") + "".join(written[::-1])
        assert last == f"So {'+'.join(map(str, numbers))}={answer}."


def test_answers_verify_and_wrong_ones_do_not():
    fmt = reasoning.ReasoningFormat()
    for ex in _draws("column_addition_4", 40):
        assert synthetic.verify(ex, ex.solution)
        assert synthetic.verify(ex, fmt.split(fmt.trace(ex))[0])
        assert not synthetic.verify(ex, f"Final answer: {int(ex.answer) + 1}")


def test_the_think_block_carries_the_columns():
    fmt = reasoning.ReasoningFormat()
    ex = synthetic.exercise(0, 0, ("column_addition",))
    trace = fmt.trace(ex)
    block = trace[trace.index("<think>"):trace.index("</think>")]
    assert "carry" in block and f"={ex.answer}." in block


def test_answers_have_no_favourite():
    """The most common answer of 400 is at most 1% of them (a prior cannot score); with one digit each
    of the 17 sums 2..18 comes about equally often, where two uniform digits would make 10 come
    nine times as often as 2."""
    three = collections.Counter(ex.answer for ex in _draws("column_addition", 400))
    assert max(three.values()) / 400 <= 0.01
    one = collections.Counter(int(ex.answer) for ex in _draws("column_addition_1", 1700))
    assert set(one) == set(range(2, 19))
    assert 60 <= min(one.values()) and max(one.values()) <= 140, one


@pytest.mark.parametrize("family, digits, operands", [
    ("column_addition", 3, 2), ("column_addition_5", 5, 2), ("column_addition_4_3", 4, 3),
    ("column_addition_1_9", 1, 9)])
def test_the_name_sets_digits_and_operands(family, digits, operands):
    for ex in _draws(family, 30):
        numbers = _operands(ex)
        assert ex.family == family
        assert len(numbers) == operands
        assert all(len(str(n)) == digits for n in numbers)


def test_same_seed_and_index_give_the_same_problem():
    families = ("column_addition_4",)
    assert synthetic.exercise(3, 17, families) == synthetic.exercise(3, 17, families)
    assert len({synthetic.exercise(3, i, families).question for i in range(100)}) == 100
    assert synthetic.exercise(3, 17, families) != synthetic.exercise(4, 17, families)


def test_drills_are_asked_for_by_name_only():
    assert not any(name.startswith("column_addition") for name in synthetic.FAMILIES)
    assert synthetic.parse_families("", "k") == synthetic.FAMILIES
    assert synthetic.parse_families("modular, column_addition_7", "k") == (
        "modular", "column_addition_7")
    mixed = {synthetic.exercise(1, i, ("modular", "column_addition")).family for i in range(40)}
    assert mixed == {"modular", "column_addition"}


@pytest.mark.parametrize("name", ["column_addition_0", "column_addition_13", "column_addition_3_1",
                                  "column_addition_3_10", "column_addition_x", "column_additions"])
def test_out_of_range_names_are_refused_with_the_grammar(name):
    with pytest.raises(ValueError, match=re.escape(f"pts.families names unknown exercise families "
                                                   f"['{name}']")) as error:
        synthetic.parse_families(name, "pts.families")
    assert "column_addition[_<digits 1-12>[_<operands 2-9>]]" in str(error.value)

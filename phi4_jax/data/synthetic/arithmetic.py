"""The `arithmetic` family: an expression of 3 to 5 small numbers, evaluated one operation at a time.

The expression is a tree (`_Op`); the solution replays the order of operations on it, so every step shown is
the one a textbook would take next, and the question writes only the brackets the tree needs.
"""

from __future__ import annotations

import dataclasses
import operator
import random
from collections.abc import Iterator
from fractions import Fraction

from phi4_jax.data.synthetic.text import Exercise, join_sentences, worked_solution


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


def order_of_operations(rng: random.Random) -> Exercise:
    """An expression to evaluate, solved one operation per line in the order of operations."""
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
    question = join_sentences(rng.choice(templates).format(e=expression), note if "÷" in expression else "")
    return Exercise("arithmetic", question, worked_solution(lines, answer), answer)

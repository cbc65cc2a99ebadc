"""Requests of many lengths in a few compiled shapes: sorted longest first and cut into
batches whose length and row count are powers of two, so an evaluation of thousands of
requests compiles a handful of programs instead of one per request.

A batch holds at most `max_rows` requests and `max_tokens` padded tokens, so memory stays
bounded however long the requests get; the last, partial batch of a length is padded up to
a power of two of rows (and to a multiple of the devices the rows split over).
"""

from __future__ import annotations

from collections.abc import Sequence

SMALLEST_LENGTH = 16  # shorter requests share the 16-token shape


def power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def bucket(length: int, largest: int | None = None) -> int:
    """The padded length of a batch whose longest request has `length` tokens: a power of two
    of at least SMALLEST_LENGTH, capped at `largest` (the model's context)."""
    size = max(SMALLEST_LENGTH, power_of_two(length))
    return size if largest is None else max(min(size, largest), length)


def batches(lengths: Sequence[int], *, max_rows: int, max_tokens: int,
            largest: int | None = None) -> list[list[int]]:
    """Request indices grouped into batches, longest first (ties in request order).

    Every batch but the last of its length is full: `rows` requests, the largest power of two
    within `max_rows` and `max_tokens // bucket(longest)` (at least one).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    grouped, at = [], 0
    while at < len(order):
        width = bucket(lengths[order[at]], largest)
        rows = _floor_power_of_two(max(1, min(max_rows, max_tokens // width)))
        grouped.append(order[at:at + rows])
        at += rows
    return grouped


def padded_rows(count: int, multiple: int = 1) -> int:
    """Rows a batch of `count` requests runs as: a power of two, rounded up to a multiple of
    the devices its rows split over (the extra rows repeat a real one and are dropped)."""
    return -(-power_of_two(count) // multiple) * multiple


def _floor_power_of_two(n: int) -> int:
    return 1 << (n.bit_length() - 1)

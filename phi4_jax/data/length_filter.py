"""The minimum-length filter of long-document sources: a source spec's `min_tokens` keeps only
documents of at least that many tokens (Phi-4's mid-training mix draws 30% from documents
longer than 8K tokens). Dropped documents are counted per source and process, and the loop
reports them with the metrics and at the end, as it does bad records.
"""

from __future__ import annotations

import threading

import numpy as np

_COUNTS: dict[str, list[int]] = {}  # source -> [documents read, documents dropped]
_LOCK = threading.Lock()


class MinTokens:
    """A grain filter predicate: True for a next-token pair of a long-enough document."""

    def __init__(self, source: str, min_tokens: int):
        self.source, self.min_tokens = source, min_tokens

    def __call__(self, pair: dict[str, np.ndarray]) -> bool:
        keep = len(pair["inputs"]) >= self.min_tokens  # inputs: the text's tokens, no <|endoftext|>
        with _LOCK:
            counts = _COUNTS.setdefault(self.source, [0, 0])
            counts[0] += 1
            counts[1] += not keep
        return keep


def dropped() -> dict[str, tuple[int, int]]:
    """(dropped, read) per source whose filter dropped any document so far in this run."""
    with _LOCK:
        return {name: (d, r) for name, (r, d) in sorted(_COUNTS.items()) if d}


def reset() -> None:
    with _LOCK:
        _COUNTS.clear()

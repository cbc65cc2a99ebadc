"""A grain MapDataset's elements made in worker processes and read back in index order.

Read threads share one interpreter, and making documents (parsing records, generating
exercises) holds its lock, so threads scale tokenization but not that. `ProcessReader` sends
the dataset once to each of `processes` spawned workers (pickled; spawned rather than forked,
because the parent runs JAX's threads), asks them for elements `buffered` indices ahead, and
returns the elements in index order: the stream and its state (the next index, the same
`{"next_index": i}` as grain's thread reader) do not depend on the worker count, so a run can
resume with another. Each element comes back with the worker's bad-record counts, which the
parent's tallies add up under the sources' budgets (`bad_records`).
"""

from __future__ import annotations

import collections
import multiprocessing
import pickle
import signal
from concurrent import futures
from typing import Any

import grain

from phi4_jax.data import bad_records

_DATASET: grain.MapDataset | None = None  # in a worker: its copy of the dataset


class ProcessReader(grain.IterDataset):
    """`parent`'s elements in order, made `buffered` ahead by `processes` worker processes."""

    def __init__(self, parent: grain.MapDataset, processes: int, buffered: int):
        super().__init__(parent)
        if processes < 1 or buffered < 1:
            raise ValueError(f"processes={processes}, buffered={buffered}; both must be >= 1")
        self._pickled = pickle.dumps(parent)  # now: an unpicklable source fails at start-up
        self._processes, self._buffered = processes, buffered

    def __iter__(self) -> grain.DatasetIterator:
        return _ProcessReaderIterator(self._pickled, len(self._parent), self._processes,
                                      self._buffered)


class _ProcessReaderIterator(grain.DatasetIterator):

    def __init__(self, pickled: bytes, length: int, processes: int, buffered: int):
        super().__init__()
        self._pickled, self._length = pickled, length
        self._processes, self._buffered = processes, buffered
        self._pool: futures.ProcessPoolExecutor | None = None  # started by the first read
        self._pending: collections.deque[futures.Future] = collections.deque()
        self._next = 0

    def __next__(self) -> Any:
        while True:
            if self._next >= self._length:
                raise StopIteration
            if self._pool is None:
                self._pool = futures.ProcessPoolExecutor(
                    self._processes, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_receive, initargs=(self._pickled,))
            while len(self._pending) < min(self._buffered, self._length - self._next):
                self._pending.append(
                    self._pool.submit(_element, self._next + len(self._pending)))
            element, counts = self._pending.popleft().result()
            self._next += 1
            bad_records.add_counts(counts)
            if element is not None:  # None: a record grain's readers skip
                return element

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        for pending in self._pending:
            pending.cancel()
        self._pending.clear()
        self._next = state["next_index"]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # no worker outlives the reader
            self._pool = None
        self._pending.clear()
        super().close()


def _receive(pickled: bytes) -> None:
    global _DATASET
    # Ctrl-C reaches the whole process group: the parent saves and closes the reader, which
    # stops the workers; a worker of its own would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _DATASET = pickle.loads(pickled)


def _element(index: int) -> tuple[Any, list]:
    return _DATASET[index], bad_records.take_new_counts()

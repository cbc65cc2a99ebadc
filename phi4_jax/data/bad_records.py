"""What a run does with records it cannot use: skip them within a budget, counted and each
reported once with its file and line, or stop at the first.

A source raises `BadRecordError` for a record it cannot decode (not JSON) and a converter for
one it cannot use (no text field, no assistant turn, ...). `convert` wraps any
record -> example converter in the source's policy, read from its spec:
- `bad_records`: 'skip' (the default) or 'fail' (stop at the first bad record);
- `max_bad_records`, `max_bad_fraction`: a skipping run stops once a source has more than
  `max_bad_records` distinct bad records *and* they are more than `max_bad_fraction` of the
  records read from it, so a few bad lines never stop a run and a broken source always does.

Pretraining calls it in `pipeline.packed_document_rows`; a post-training stage calls it in its
rows builder on the records the pipeline hands it, before it tokenizes or packs:

    examples = bad_records.convert(name, records, to_example, cfg["sources"][name])

`convert` also reads the first `PREFLIGHT_RECORDS` records at once, so a source that is
obviously broken (a wrong `text_key`, a file that is not JSONL) stops the run at start-up,
before anything is compiled. Counts are per process and per run (`counts`, `reset`): the
loop reports them with the metrics and at the end. A read process (`processes`) counts in its
own tally and sends what is new back with each element; the parent adds it up and applies
the budget, so the budget is the whole source's, whatever the number of read processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import grain

from phi4_jax.errors import ConfigError, Phi4Error

POLICIES = ("skip", "fail")
PREFLIGHT_RECORDS = 64


class BadRecordError(Phi4Error, ValueError):
    """A record that cannot be used (not JSON, a missing field, an empty response, ...); the
    message names where it was read and what is wrong with it."""


# The spec keys of the policy and their defaults (`sources.SPEC_DEFAULTS` includes them).
SPEC_DEFAULTS = {"bad_records": "skip", "max_bad_records": 10, "max_bad_fraction": 0.001}


@dataclasses.dataclass(frozen=True)
class Policy:
    """One source's bad-record policy (see the module docstring)."""

    source: str
    action: str
    max_records: int
    max_fraction: float

    @classmethod
    def of(cls, source: str, spec: Mapping[str, Any]) -> Policy:
        """The policy a source spec sets; keys it leaves out keep their defaults."""
        s = {**SPEC_DEFAULTS, **spec}
        return cls(source, s["bad_records"], s["max_bad_records"], s["max_bad_fraction"])


def check_policy(where: str, spec: Mapping[str, Any]) -> str | None:
    """What is wrong with a spec's policy keys, or None; `where` names the spec."""
    p = Policy.of(where, spec)
    if p.action not in POLICIES:
        return f"{where}.bad_records is {p.action!r}; choose one of {list(POLICIES)}"
    count = p.max_records
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return f"{where}.max_bad_records is {count!r}; give a count >= 0"
    fraction = p.max_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        return f"{where}.max_bad_fraction is {fraction!r}; give a fraction in [0, 1]"
    return None


class Tally:
    """One source's reads and distinct bad records; shared by grain's reading threads."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.reads = 0
        self.bad_reads = 0
        self._seen: set[int] = set()  # `_digest`s of the messages, so each is reported once
        self._last = ""  # the last bad record's message
        self._sent = (0, 0, frozenset())  # what `take_new` has handed out
        self.budgeted = True  # False in a read process: its parent checks the whole budget
        self._lock = threading.Lock()

    def __reduce__(self):
        # A copy sent to a read process (`processes`) is that process's own tally of the source.
        return _read_process_tally, (self.policy,)

    @property
    def bad(self) -> int:
        return len(self._seen)

    def read(self) -> None:
        with self._lock:
            self.reads += 1

    def bad_record(self, error: BadRecordError) -> None:
        """Counts and reports `error` once; raises when the policy says the run must stop."""
        p = self.policy
        with self._lock:
            self.bad_reads += 1
            digest = _digest(str(error))
            first_time = digest not in self._seen
            self._seen.add(digest)
            self._last = str(error)
            bad, fraction = self.bad, self.bad_reads / max(self.reads, 1)
        if p.action == "fail":
            raise BadRecordError(f"data.sources.{p.source}: {error}; the source's bad_records="
                                 f"'fail' stops at the first: fix the record or set "
                                 f"--config.data.sources.{p.source}.bad_records=skip") from error
        if first_time:
            logging.warning("data.sources.%s: skipped bad record %d: %s", p.source, bad, error)
        if self.budgeted:
            self._check_budget(bad, fraction, str(error))

    def take_new(self) -> tuple[int, int, frozenset[int], str]:
        """The reads, bad reads and bad-record hashes since the last call, and the last bad
        record's message: a read process's share, for the parent's tally (`add`)."""
        with self._lock:
            reads, bad_reads, seen = self._sent
            self._sent = (self.reads, self.bad_reads, frozenset(self._seen))
            return self.reads - reads, self.bad_reads - bad_reads, self._sent[2] - seen, self._last

    def add(self, reads: int, bad_reads: int, seen: frozenset[int], last: str) -> None:
        """Counts what a read process took from this source (`take_new`), under the budget."""
        with self._lock:
            self.reads += reads
            self.bad_reads += bad_reads
            self._seen |= seen
            self._last = last or self._last
            bad, fraction, last = self.bad, self.bad_reads / max(self.reads, 1), self._last
        self._check_budget(bad, fraction, last)

    def _check_budget(self, bad: int, fraction: float, last: str) -> None:
        p = self.policy
        if bad > p.max_records and fraction > p.max_fraction:
            raise BadRecordError(
                f"data.sources.{p.source}: {bad} bad records, {fraction:.1%} of the records "
                f"read, over its budget (max_bad_records={p.max_records}, max_bad_fraction="
                f"{p.max_fraction}); the last: {last}. Fix the source, or raise "
                f"--config.data.sources.{p.source}.max_bad_records / .max_bad_fraction")


_TALLIES: dict[str, Tally] = {}
_TALLIES_LOCK = threading.Lock()


def tally(policy: Policy) -> Tally:
    """This process's tally of `policy.source` (one for its train and eval reads)."""
    with _TALLIES_LOCK:
        if policy.source not in _TALLIES or _TALLIES[policy.source].policy != policy:
            _TALLIES[policy.source] = Tally(policy)
        return _TALLIES[policy.source]


def counts() -> dict[str, int]:
    """Distinct bad records per source read so far in this run, sources with none left out."""
    with _TALLIES_LOCK:
        return {name: t.bad for name, t in sorted(_TALLIES.items()) if t.bad}


def _digest(message: str) -> int:
    """A message's hash, the same in every process (`hash` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(message.encode(), digest_size=8).digest(), "little")


def _read_process_tally(policy: Policy) -> Tally:
    counter = tally(policy)
    counter.budgeted = False
    return counter


def take_new_counts() -> list[tuple[Policy, tuple[int, int, frozenset[int], str]]]:
    """`Tally.take_new` of every source this process reads (a read process's report)."""
    with _TALLIES_LOCK:
        tallies = list(_TALLIES.values())
    return [(t.policy, new) for t in tallies if (new := t.take_new())[0] or new[1]]


def add_counts(counts: list[tuple[Policy, tuple[int, int, frozenset[int], str]]]) -> None:
    """Adds a read process's report (`take_new_counts`) to this process's tallies; raises
    when a source is over its budget."""
    for policy, new in counts:
        tally(policy).add(*new)


def reset() -> None:
    """Forgets every count: a run starts from zero."""
    with _TALLIES_LOCK:
        _TALLIES.clear()


class _Converted(grain.MapDataset):
    """`convert(records[i])`, or None (which grain skips) for a bad record the policy skips."""

    def __init__(self, parent: grain.MapDataset, convert: Callable[[Any], Any], counter: Tally):
        super().__init__(parent)
        self._convert, self._tally = convert, counter

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"BadRecordPolicy({self._tally.policy})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        self._tally.read()
        try:
            return self._convert(self._parent[index])
        except BadRecordError as error:
            self._tally.bad_record(error)
            return None


def convert(source: str, records: grain.MapDataset, to_example: Callable[[Any], Any],
            spec: Mapping[str, Any]) -> grain.MapDataset:
    """`to_example` over `records` under the source's bad-record policy; bad records are
    skipped (None, which grain's iterators drop) or stop the run with `BadRecordError`.

    Reads the first `PREFLIGHT_RECORDS` records now, so a broken source fails at start-up,
    and so does one whose every record `to_example` drops as over-long (None): it would never
    yield a row, and the run would wait on it forever.
    """
    counter = tally(Policy.of(source, spec))
    examples = _Converted(records, to_example, counter)
    preflight = min(PREFLIGHT_RECORDS, len(records))
    bad_before = counter.bad_reads
    kept = sum(examples[index] is not None for index in range(preflight))
    dropped = preflight - kept - (counter.bad_reads - bad_before)
    if dropped and not kept:
        raise ConfigError(
            f"data.sources.{source}: all {dropped} of the first records read were dropped as "
            f"over-long (no row fits train.seq_len, less grpo.max_new_tokens for GRPO "
            f"prompts); raise --config.train.seq_len or give the source shorter records")
    return examples

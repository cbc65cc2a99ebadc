"""Data sources: each spec in `data.sources` opened as a grain `MapDataset` of records, and for
pretraining of document strings.

A record is what a source holds: an `Exercise` for `synthetic`, a file's text for `text` and
`python_stdlib`, a decoded JSON object for `jsonl`, `tfds` and JSON `array_record` files.
Post-training stages read records (`open_records`: conversations, preference pairs);
pretraining reads documents (`open_documents`), a record's text. Kinds and what one document is:
- `synthetic`: `render_document(exercise(seed, index))` (`synthetic_unanswerable`: the refusal
  variants, `unanswerable_exercise`; `synthetic_long_range`: a fact, filler exercises and a
  question only the fact answers, `long_range_exercise`), random access by index over a finite span of
  `SYNTHETIC_SPAN` (2**40) indices, so it behaves like any other MapDataset (shardable, repeatable)
  and is endless in practice. The eval split reads the next span, `[SYNTHETIC_SPAN, 2 * SYNTHETIC_SPAN)`.
  A `synthetic` spec's `families` (comma-separated family names, '' = all of `synthetic.FAMILIES`)
  draws its exercises from those families only: a one-family run, a mix ablation, or a
  `column_addition` drill.
- `python_stdlib`: one `.py` file of the running interpreter's standard library (test and
  site-packages folders left out), in sorted path order.
- `text`: one whole file per document (a book, a paper), files in sorted path order.
- `jsonl`: one JSON object per non-empty line, its `text_key` field.
- `array_record`: one record per document, plain UTF-8 text when `text_key` is None or '', else a
  JSON object whose `text_key` field is the text.
- `tfds`: one example of `tfds.data_source(tfds_name, split=..., data_dir=...)` (ArrayRecord files,
  no TensorFlow), its `text_key` feature.

Files and JSONL lines are decoded as UTF-8 with undecodable bytes replaced (U+FFFD), so one bad
byte does not stop a run. A record that cannot be used at all (a line that is not JSON, a record
without its text field) raises `BadRecordError` naming its file and line; the source's policy
(`bad_records`, see `phi4_jax.data.bad_records`) skips it or stops the run.
Finite sources hold out the records whose index hashes below `eval_holdout` (`held_out_mask`),
and at least one record of a source with two or more: the split depends on the record index
alone, so it stays put across seeds and restarts as long as the file list is unchanged. Only the held-out indices are kept in memory (about
`8 * eval_holdout` bytes per record); the training split maps onto the records between them.
A spec's `min_tokens` (pretraining rows only) keeps the documents of at least that many tokens,
counted (`length_filter`), and packs them whole (`packing.pack_whole_documents`).
`jsonl` keeps 20 bytes of line offsets per record: use array_record or TFDS for billions of records.
"""

from __future__ import annotations

import bisect
import functools
import glob
import json
import mmap
import os
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from phi4_jax.data import bad_records, synthetic
from phi4_jax.data.bad_records import BadRecordError
from phi4_jax.errors import Phi4Error

KINDS = ("synthetic", "synthetic_unanswerable", "synthetic_long_range", "python_stdlib", "jsonl", "text", "array_record", "tfds")
# Every spec key and its default; `config_base.source_spec` builds specs from these.
SPEC_DEFAULTS = {"kind": "", "paths": "", "text_key": "text", "tfds_name": "", "split": "train",
                 "data_dir": "", "unique_tokens": 0, "min_tokens": 0, "families": "",
                 **bad_records.SPEC_DEFAULTS}
SPEC_KEYS = frozenset(SPEC_DEFAULTS)
REQUIRED_KEYS = {
    "synthetic": ("kind",),
    "synthetic_unanswerable": ("kind",),
    "synthetic_long_range": ("kind",),
    "python_stdlib": ("kind",),
    "jsonl": ("kind", "paths", "text_key"),
    "text": ("kind", "paths"),
    "array_record": ("kind", "paths"),
    "tfds": ("kind", "tfds_name", "split", "text_key"),
}
SPLITS = ("train", "eval")
SYNTHETIC_KINDS = {"synthetic": synthetic.exercise,
                   "synthetic_unanswerable": synthetic.unanswerable_exercise,
                   "synthetic_long_range": synthetic.long_range_exercise}
SYNTHETIC_SPAN = 2**40
HOLDOUT_CHUNK = 2**22
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


class DataConfigError(Phi4Error, ValueError):
    """A data config or source that cannot work; the message names the key or file and the fix."""


class EmptySplitError(DataConfigError):
    """A source with no records in the split asked for."""


def validate_source_spec(name: str, spec: Mapping[str, Any], *, check_files: bool
                         ) -> dict[str, Any]:
    """Refuses a source spec that could only fail later in training, naming the key and the fix;
    returns it as a dict.

    `check_files` also requires every glob to match files (on for the sources a run reads, off
    for specs a config declares but does not mix); the returned spec's `paths` are then the
    matched files, so opening the source resolves no glob again.
    """
    where = f"data.sources.{name}"
    if not isinstance(spec, Mapping):
        raise DataConfigError(f"{where} is a {type(spec).__name__}; expected a mapping with at least 'kind'")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise DataConfigError(f"{where}.kind is {kind!r}; choose one of {list(KINDS)}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise DataConfigError(f"{where} has unknown keys {unknown}; a source spec takes only {sorted(SPEC_KEYS)}")
    missing = [key for key in REQUIRED_KEYS[kind] if spec.get(key) in (None, "")]
    if missing:
        required = list(REQUIRED_KEYS[kind])
        raise DataConfigError(f"{where} (kind {kind!r}) needs {missing}; set them (required: {required})")
    unique_tokens = spec.get("unique_tokens", 0)
    if isinstance(unique_tokens, bool) or not isinstance(unique_tokens, int) or unique_tokens < 0:
        raise DataConfigError(f"{where}.unique_tokens is {unique_tokens!r}; give a count >= 0 (0 = unknown)")
    min_tokens = spec.get("min_tokens", 0)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise DataConfigError(f"{where}.min_tokens is {min_tokens!r}; give a token count >= 0 "
                              f"(0 keeps every document)")
    families = spec.get("families", "")
    if families and kind != "synthetic":
        raise DataConfigError(f"{where}.families is {families!r}, but only kind 'synthetic' draws "
                              f"from exercise families; remove the key")
    try:
        synthetic.parse_families(families, f"{where}.families")
    except ValueError as e:
        raise DataConfigError(str(e)) from None
    if problem := bad_records.check_policy(where, spec):
        raise DataConfigError(problem)
    if check_files and "paths" in REQUIRED_KEYS[kind]:
        return {**spec, "paths": resolve_paths(name, spec["paths"])}
    return dict(spec)


def resolve_paths(name: str, paths: str | Sequence[str]) -> list[str]:
    """The sorted files that a source's glob or globs match; every glob must match at least one
    file, and not all may be empty (a download or copy that failed, named here by file)."""
    globs = [paths] if isinstance(paths, str) else list(paths)
    if not globs or not all(isinstance(pattern, str) for pattern in globs):
        raise DataConfigError(
            f"data.sources.{name}.paths is {paths!r}; give a glob string or a list of glob strings"
        )
    files: set[str] = set()
    for pattern in globs:
        found = glob.glob(os.path.expanduser(pattern), recursive=True)
        matched = [p for p in found if os.path.isfile(p)]
        if not matched and found:
            raise DataConfigError(
                f"data.sources.{name}.paths: {pattern!r} is a directory, not files; give a glob "
                f"of its files, e.g. {os.path.join(pattern, '*.jsonl')!r}"
            )
        if not matched:
            raise DataConfigError(
                f"data.sources.{name}.paths: glob {pattern!r} matches no files; "
                "fix the path or remove the glob"
            )
        files.update(matched)
    if all(os.path.getsize(p) == 0 for p in files):
        named = ", ".join(sorted(files)[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DataConfigError(
            f"data.sources.{name}.paths: {named} {'is' if len(files) == 1 else 'are all'} empty "
            f"(0 bytes); fill {'it' if len(files) == 1 else 'them'} or point paths at the data"
        )
    return sorted(files)


def open_documents(
    name: str, spec: Mapping[str, Any], *, seed: int, split: str, eval_holdout: float
) -> grain.MapDataset:
    """The documents (str) of one source's train or eval split, in a fixed order."""
    records = open_records(name, spec, seed=seed, split=split, eval_holdout=eval_holdout)
    return records.map(functools.partial(document_text, name, spec))


def open_records(
    name: str, spec: Mapping[str, Any], *, seed: int, split: str, eval_holdout: float
) -> grain.MapDataset:
    """The records of one source's train or eval split, in a fixed order."""
    return open_checked_records(name, validate_source_spec(name, spec, check_files=True),
                                seed=seed, split=split, eval_holdout=eval_holdout)


def open_checked_records(
    name: str, spec: Mapping[str, Any], *, seed: int, split: str, eval_holdout: float
) -> grain.MapDataset:
    """`open_records` for a spec `validate_source_spec` returned with `check_files` (as in
    `pipeline.checked_data_config`)."""
    if split not in SPLITS:
        raise DataConfigError(f"split is {split!r}; choose one of {list(SPLITS)}")
    if spec["kind"] in SYNTHETIC_KINDS:
        start = 0 if split == "train" else SYNTHETIC_SPAN
        indices = grain.MapDataset.range(start, start + SYNTHETIC_SPAN)
        make = SYNTHETIC_KINDS[spec["kind"]]
        if spec.get("families"):
            make = functools.partial(
                make, families=synthetic.parse_families(spec["families"], f"data.sources.{name}.families"))
        return indices.map(functools.partial(make, seed))
    records = _open_records(name, spec)
    held_out = held_out_indices(len(records), eval_holdout)
    count = len(held_out) if split == "eval" else len(records) - len(held_out)
    if count == 0:
        fix = (f"its files hold no records: fix data.sources.{name}.paths" if len(records) == 0
               else "give the source more records or change data.eval_holdout")
        raise EmptySplitError(
            f"data.sources.{name} has no {split} records: {len(records)} records with "
            f"data.eval_holdout={eval_holdout}; {fix}"
        )
    if split == "eval":
        return grain.MapDataset.source(held_out).map(functools.partial(_record_at, records))
    gaps = held_out - np.arange(len(held_out))
    return grain.MapDataset.range(count).map(functools.partial(_train_record, records, gaps))


def held_out_mask(indices: np.ndarray, eval_holdout: float) -> np.ndarray:
    """True for the record indices held out for evaluation: a splitmix64 hash in [0, 1) below the fraction."""
    return _hash_fraction(indices) < eval_holdout


def _hash_fraction(indices: np.ndarray) -> np.ndarray:
    """splitmix64 of each index, as a float in [0, 1)."""
    z = np.asarray(indices, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def held_out_indices(num_records: int, eval_holdout: float) -> np.ndarray:
    """The sorted held-out indices among `num_records`, hashed in chunks so only the holdout is kept.

    A source of two or more records with a positive holdout holds out at least one record (the
    one of smallest hash) and trains on at least one (the one of largest), so a small source
    has something to evaluate on and something to train on.
    """
    chunks = []
    for start in range(0, num_records, HOLDOUT_CHUNK):
        indices = np.arange(start, min(start + HOLDOUT_CHUNK, num_records))
        chunks.append(indices[held_out_mask(indices, eval_holdout)])
    held_out = np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)
    if 0 < held_out.size < num_records or eval_holdout == 0 or num_records == 0:
        return held_out
    if num_records == 1:
        return np.zeros(0, np.int64)  # the only record trains
    hashes = _hash_fraction(np.arange(num_records))
    if held_out.size == 0:
        return np.asarray([np.argmin(hashes)], np.int64)
    return np.delete(np.arange(num_records), np.argmax(hashes))  # all were held out


def stdlib_python_files() -> list[str]:
    """The running interpreter's standard-library `.py` files, sorted, without tests or installed packages."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS]
        files.extend(os.path.join(directory, n) for n in names if n.endswith(".py"))
    return sorted(files)


class FileDocuments:
    """One document per file, read when asked for, so a corpus is never held in memory."""

    def __init__(self, paths: Sequence[str]):
        self._paths = tuple(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> str:
        with open(self._paths[index], encoding="utf-8", errors="replace") as f:
            return f.read()


class JsonRecord(dict):
    """A decoded JSON object that remembers where it was read (`where`, e.g. 'a.jsonl:101'),
    for error messages; a jsonl line number is counted only when a message asks for it."""

    _where: str | Callable[[], str] = ""

    @property
    def where(self) -> str:
        if callable(self._where):
            self._where = self._where()
        return self._where

    @where.setter
    def where(self, value: str | Callable[[], str]) -> None:
        self._where = value


MAPPED_FILES = 64  # jsonl files a reader keeps memory-mapped at once, each an open descriptor


class JsonlRecords:
    """One record per non-empty JSON line; line offsets are indexed once, and a record is a
    slice of its memory-mapped file: no system call, so read threads keep the GIL through it
    (an open, seek, read and close per record let it go each time; on two cores, two read
    threads took 2.5x as long to read the same records as one reading them inline)."""

    def __init__(self, paths: Sequence[str]):
        self._paths = tuple(paths)
        spans = [_line_spans(path) for path in self._paths]
        self._file_ids = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(spans)])
        self._spans = np.concatenate(spans) if spans else np.zeros((0, 2), np.int64)
        self._indexed_bytes = [int(s[-1, 1]) if len(s) else 0 for s in spans]
        self._keep_maps()

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index: int) -> Any:
        file_id = int(self._file_ids[index])
        start, stop = (int(x) for x in self._spans[index])
        line = self._mapped(file_id)[start:stop]
        return _json_record(line, functools.partial(_line_location, self._paths[file_id], start),
                            "a jsonl file needs one JSON value per line")

    def _map_file(self, file_id: int) -> mmap.mmap:
        """The file mapped whole, refused if it is now shorter than its indexed lines (reading
        past a mapping's end would kill the process); a file cut after it is mapped still does."""
        path, indexed = self._paths[file_id], self._indexed_bytes[file_id]
        with open(path, "rb") as f:
            if (size := os.fstat(f.fileno()).st_size) < indexed:
                raise DataConfigError(
                    f"{path} is {size} bytes, shorter than the {indexed} indexed when the run "
                    f"started: it changed during the run; restore it, or restart to index it again")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def _keep_maps(self) -> None:
        self._mapped = functools.lru_cache(maxsize=MAPPED_FILES)(self._map_file)

    def __getstate__(self) -> dict[str, Any]:  # a read process maps the files itself
        return {key: value for key, value in self.__dict__.items() if key != "_mapped"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._keep_maps()


def _line_location(path: str, offset: int) -> str:
    """'path:N' for the line that starts at byte `offset`: newlines are counted on demand, as
    only records in error messages need it."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        before = np.frombuffer(data, np.uint8, count=offset)
        line = int(np.count_nonzero(before == ord("\n"))) + 1
        del before  # the mmap cannot close while a view of it is alive
    return f"{path}:{line}"


def _line_spans(path: str) -> np.ndarray:
    """[start, stop) byte spans of the non-blank lines of a file, found with one vectorized newline scan."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros((0, 2), np.int64)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        buffer = np.frombuffer(data, np.uint8)
        newlines = np.flatnonzero(buffer == ord("\n"))
        starts = np.concatenate([[0], newlines + 1])
        stops = np.concatenate([newlines, [size]])
        last_bytes = buffer[np.maximum(stops - 1, 0)]
        del buffer  # the mmap cannot close while a view of it is alive
    stops = np.where((stops > starts) & (last_bytes == ord("\r")), stops - 1, stops)
    keep = stops > starts
    return np.stack([starts[keep], stops[keep]], axis=1).astype(np.int64)


def _text_field(record: Any, text_key: str, name: str) -> str:
    """The text of a decoded JSON record, or BadRecordError naming the record and the key. The
    record's place is looked up only for an error: a jsonl line number counts the newlines
    before it, which would cost a scan of the file per record."""
    if not isinstance(record, dict) or text_key not in record:
        where = _where(record, name)
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise BadRecordError(
            f"{where} has no {text_key!r} field (it has {keys}); fix the record or the source's text_key"
        )
    text = record[text_key]
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise BadRecordError(f"{_where(record, name)}: field {text_key!r} is a "
                             f"{type(text).__name__}, expected text")
    return text


def _where(record: Any, name: str) -> str:
    """Where a record was read, for an error message."""
    return getattr(record, "where", "") or f"data.sources.{name}: a record"


def _open_records(name: str, spec: Mapping[str, Any]) -> grain.MapDataset:
    """A finite source's records, in a fixed order."""
    kind = spec["kind"]
    if kind == "python_stdlib":
        return grain.MapDataset.source(FileDocuments(stdlib_python_files()))
    if kind == "tfds":
        return _open_tfds(name, spec)
    paths = list(spec["paths"])  # the files validate_source_spec matched
    if kind == "text":
        return grain.MapDataset.source(FileDocuments(paths))
    if kind == "jsonl":
        return grain.MapDataset.source(JsonlRecords(paths))
    records = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
    return records.map_with_index(functools.partial(_array_record, name, spec.get("text_key") or None))


def _open_tfds(name: str, spec: Mapping[str, Any]) -> grain.MapDataset:
    """A prepared TFDS dataset read through its ArrayRecord files, its `text_key` feature as the document."""
    import tensorflow_datasets as tfds  # Here, not at the top: most runs never pay TFDS's import time.

    try:
        data_dir = spec.get("data_dir") or None  # None or '': TFDS's default data directory
        source = tfds.data_source(spec["tfds_name"], split=spec["split"], data_dir=data_dir)
    except Exception as err:
        raise DataConfigError(
            f"data.sources.{name}: cannot open tfds dataset {spec['tfds_name']!r} split {spec['split']!r} "
            f"in data_dir {spec.get('data_dir')!r}; prepare it with file_format='array_record' there first"
        ) from err
    where = f"{spec['tfds_name']}:{spec['split']} example {{}}"
    return grain.MapDataset.source(source).map_with_index(
        lambda index, example: _located(JsonRecord(example), where.format(index)))


def _located(record: JsonRecord, where: str) -> JsonRecord:
    record.where = where
    return record


def _array_record(name: str, text_key: str | None, index: int, record: bytes) -> Any:
    """An ArrayRecord record: plain text when there is no `text_key`, else its decoded JSON."""
    if text_key is None:
        return record.decode("utf-8", errors="replace")
    return _json_record(record, f"data.sources.{name} record {index}",
                        "for plain-text records set text_key to ''")


def _json_record(raw: bytes, where: str | Callable[[], str], hint: str) -> Any:
    """A decoded JSON record (a `JsonRecord` when it is an object), undecodable UTF-8 bytes
    replaced; BadRecordError if it is not JSON. `where` may be a function, called only if needed."""
    try:
        value = json.loads(raw.decode("utf-8", errors="replace").lstrip("\ufeff"))
    except json.JSONDecodeError as err:
        location = where() if callable(where) else where
        raise BadRecordError(f"{location} is not JSON ({err}); {hint}") from err
    if isinstance(value, dict):
        value = JsonRecord(value)
        value.where = where
    return value


def document_text(name: str, spec: Mapping[str, Any], record: Any) -> str:
    """A record's document text: a rendered exercise, a file's text or a JSON record's field."""
    if isinstance(record, synthetic.Exercise):
        return synthetic.render_document(record)
    if isinstance(record, str):
        return record
    return _text_field(record, spec.get("text_key") or "text", name)


def _record_at(records: grain.MapDataset, index: np.integer) -> str:
    """The record at a (NumPy) index of the held-out list."""
    return records[int(index)]


def _train_record(records: grain.MapDataset, gaps: np.ndarray, train_index: int) -> str:
    """The `train_index`-th record that is not held out: skip one record per held-out index at or below it.

    `gaps[k]` is the k-th held-out index minus k, the count of training records before it.
    Searched with `bisect`, which keeps the GIL (NumPy's searchsorted lets it go, a thread
    switch per record when read threads contend).
    """
    return records[train_index + bisect.bisect_right(gaps.data, train_index)]

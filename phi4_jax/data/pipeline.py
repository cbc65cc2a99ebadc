"""The input pipeline: validated config -> per-process, checkpointable batch iterator.

Per source: its train or eval records (`sources`), this process's share (every
`process_count`-th record from `process_index`), shuffled per epoch from a seed derived from
`data.seed` and the source name (train only), repeated without end, turned into rows by the
stage's `RowsFn` (pretraining: documents tokenized on `data.read_threads` threads, or in
`data.read_processes` worker processes, and packed,
`packing`; post-training: conversations or preference pairs). Sources are mixed by the
weights (`mixture`), rows batched to the per-process batch and prefetched on a thread
(`data.prefetch` batches). The returned grain iterator's `get_state()` / `set_state()`
resume the exact batch sequence. The eval stream is the held-out records in a fixed order;
sources without held-out records are left out of it, with a warning.

The data config is checked once per run (`checked_data_config`, at start-up); what it
returns passes through the other entry points unchecked. Records a source or the stage cannot use are handled by
the source's bad-record policy (`bad_records.convert`).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

from phi4_jax.data import bad_records, length_filter, mixture, packing, processes, sources
from phi4_jax.data.sources import DataConfigError, EmptySplitError
from phi4_jax.data.tokenizer import load_tokenizer

# The data.* keys the pipeline reads and their defaults; config_base adds `sources` (the
# built-in ones) to make the `data` section.
DATA_DEFAULTS = {
    "seed": 0,
    "mix": {"synthetic": 0.6, "code": 0.4},
    "eval_holdout": 0.01,
    "read_threads": 4,
    # Worker processes per source that make and tokenize its documents (0: none, on the read
    # threads). Threads scale tokenization but not the Python work of making documents, which
    # holds the interpreter's lock; processes scale both, each costing a start-up (an
    # interpreter, grain and the tokenizer) and one core. Sources with `min_tokens` read on threads.
    # Both counts are capped at the cores this process may run on (`readers`).
    "read_processes": 0,
    "prefetch": 4,
    # The most documents one packed row may hold; the packer splits rows that would hold
    # more. cuDNN's packed attention compiles this many segment slots in (its backward keeps
    # B * this * N * T float32 softmax statistics per layer), so keep it small (MaxText: 32).
    # 1 means one document per row (unpacked data, preference pairs): cuDNN then takes its
    # public single-sequence path.
    "max_segments_per_row": 32,
}
DATA_KEYS = ("sources", *DATA_DEFAULTS)
DOCUMENTS_BUFFERED_PER_THREAD = 4  # long documents (`min_tokens`), read one at a time
# Other documents are read and tokenized in groups: grain's per-element work (about 60 us) is
# then paid once per group, not per document (a synthetic exercise is ~100 tokens, ~45 us of
# tiktoken), and a group is one tokenizer call, which lets the GIL go to the other read
# threads once (`Phi4Tokenizer.encode_documents`).
DOCUMENTS_PER_READ = 32
GROUPS_BUFFERED_PER_THREAD = 2
GROUPS_BUFFERED_PER_PROCESS = 4

# (source name, its endless records for this process, the checked data config) -> rows.
RowsFn = Callable[[str, grain.MapDataset, dict[str, Any]], grain.IterDataset]


class CheckedDataConfig(dict):
    """A data config as a plain dict, every key and source checked."""


def validate_data_config(data_cfg: Mapping[str, Any]) -> None:
    """Refuses a data config that would fail during training, with an error naming the key and the fix."""
    checked_data_config(data_cfg)


def make_train_iterator(
    data_cfg: Mapping[str, Any],
    *,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    tokenizer_name: str = "phi4",
) -> grain.DatasetIterator:
    """Endless iterator of this process's pretraining batches: [batch_size, seq_len] arrays of
    `packing.ROW_KEYS`, documents encoded by the named tokenizer."""
    rows_fn = functools.partial(packed_document_rows, seq_len=seq_len,
                                tokenizer_name=tokenizer_name)
    return make_iterator(data_cfg, rows_fn, batch_size=batch_size, process_index=process_index,
                         process_count=process_count, split=split)


def make_iterator(
    data_cfg: Mapping[str, Any],
    rows_fn: RowsFn,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    indexed: bool = False,
    subsets: Mapping[str, np.ndarray] | None = None,
) -> grain.DatasetIterator:
    """Endless iterator of this process's batches of the rows `rows_fn` makes of each source;
    `indexed` hands it (index in the split, record) pairs instead of records; `subsets` limits
    a source to the records at those indices of its split (e.g. the teachable problems)."""
    cfg = checked_data_config(data_cfg)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; it must be >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count})")
    records = _split_records(cfg, split, process_index, process_count, indexed, subsets or {})
    weights = mixture.normalized_weights({name: cfg["mix"][name] for name in records}, records)
    rows = {name: rows_fn(name, shard, cfg) for name, shard in records.items()}
    batches = mixture.mix_rows(rows, weights).batch(batch_size, drop_remainder=True)
    return iter(grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=cfg["prefetch"]))


def make_eval_batches(
    data_cfg: Mapping[str, Any],
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """A fixed held-out set of pretraining batches (see `first_batches`)."""
    rows_fn = functools.partial(packed_document_rows, seq_len=seq_len)
    return first_batches(data_cfg, rows_fn, batch_size=batch_size, num_batches=num_batches,
                         process_index=process_index, process_count=process_count)


def _split_records(cfg: CheckedDataConfig, split: str, process_index: int,
                   process_count: int, indexed: bool,
                   subsets: Mapping[str, np.ndarray]) -> dict[str, grain.MapDataset]:
    """Each positive-weight source's records for this process; for eval, only the sources that
    hold records out (a warning names the others)."""
    records = {}
    for name, weight in mixture.normalized_weights(cfg["mix"], cfg["sources"]).items():
        if weight == 0:
            continue
        try:
            records[name] = _shard(name, cfg, split, process_index, process_count, indexed,
                                   subsets.get(name))
        except EmptySplitError as error:
            if split != "eval":
                raise
            logging.warning("Evaluation leaves data.sources.%s out: %s", name, error)
    if not records:
        raise EmptySplitError(f"no source of data.mix has {split} records")
    return records


def first_batches(data_cfg: Mapping[str, Any], rows_fn: RowsFn, *, batch_size: int,
                  num_batches: int, process_index: int = 0, process_count: int = 1,
                  indexed: bool = False) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of the eval stream (it cycles small holdouts); none,
    with a warning, when no source holds records out."""
    try:
        iterator = make_iterator(data_cfg, rows_fn, batch_size=batch_size, split="eval",
                                 process_index=process_index, process_count=process_count,
                                 indexed=indexed)
    except EmptySplitError as error:
        logging.warning("Evaluation is skipped: %s.", error)
        return []
    batches = [next(iterator) for _ in range(num_batches)]
    iterator.close()
    return batches


def checked_data_config(data_cfg: Mapping[str, Any]) -> CheckedDataConfig:
    """The data config as a plain dict, every key and source checked (once: a checked config
    is returned as it is)."""
    if isinstance(data_cfg, CheckedDataConfig):
        return data_cfg
    cfg = CheckedDataConfig(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg)
    missing = [key for key in DATA_KEYS if key not in cfg]
    unknown = sorted(set(cfg) - set(DATA_KEYS))
    if missing or unknown:
        raise DataConfigError(
            f"data config: missing keys {missing}, unknown keys {unknown}; it takes exactly {list(DATA_KEYS)}"
        )
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise DataConfigError(f"data.seed is {cfg['seed']!r}; give an integer >= 0")
    holdout = cfg["eval_holdout"]
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise DataConfigError(f"data.eval_holdout is {holdout!r}; give a fraction in [0, 1), e.g. 0.01")
    for key in ("read_threads", "read_processes", "prefetch"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 0:
            raise DataConfigError(f"data.{key} is {cfg[key]!r}; give an integer >= 0 (0 = none)")
    segments = cfg["max_segments_per_row"]
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise DataConfigError(f"data.max_segments_per_row is {segments!r}; give an integer >= 1 "
                              f"(1 = one document per row)")
    if not isinstance(cfg["sources"], Mapping) or not cfg["sources"]:
        raise DataConfigError(f"data.sources is {cfg['sources']!r}; give a mapping from source name to spec")
    if not isinstance(cfg["mix"], Mapping):
        raise DataConfigError(f"data.mix is {cfg['mix']!r}; give a mapping from source name to weight")
    try:
        weights = mixture.normalized_weights(cfg["mix"], cfg["sources"])
    except ValueError as error:
        raise DataConfigError(str(error)) from error
    cfg["sources"] = {name: sources.validate_source_spec(name, spec,
                                                         check_files=weights.get(name, 0) > 0)
                      for name, spec in cfg["sources"].items()}
    return cfg


def shard_records(
    name: str, data_cfg: Mapping[str, Any], *, split: str, process_index: int, process_count: int,
    indexed: bool = False,
) -> grain.MapDataset:
    """The records this process reads from one source, endless, in the order it reads them;
    `indexed` pairs each with its index in the split."""
    return _shard(name, checked_data_config(data_cfg), split, process_index, process_count,
                  indexed)


def _shard(name: str, cfg: CheckedDataConfig, split: str, process_index: int,
           process_count: int, indexed: bool = False,
           subset: np.ndarray | None = None) -> grain.MapDataset:
    records = sources.open_checked_records(
        name, cfg["sources"][name], seed=cfg["seed"], split=split, eval_holdout=cfg["eval_holdout"]
    )
    if subset is not None:  # the records at `subset`, each (when indexed) with its own index
        picked, parent = np.asarray(subset, np.int64), records
        records = grain.MapDataset.range(len(picked)).map(
            lambda k: (int(picked[k]), parent[int(picked[k])]) if indexed else parent[int(picked[k])])
    elif indexed:  # grain passes indices past the end through to a repeated parent: wrap them
        count = len(records)
        records = records.map_with_index(lambda index, record: (index % count, record))
    return _share(name, records, cfg, split, process_index, process_count)


def shard_documents(
    name: str, data_cfg: Mapping[str, Any], *, split: str, process_index: int, process_count: int
) -> grain.MapDataset:
    """The documents (text) this process reads from one source, endless, in reading order."""
    cfg = checked_data_config(data_cfg)
    records = _shard(name, cfg, split, process_index, process_count)
    return records.map(functools.partial(sources.document_text, name, cfg["sources"][name]))


def _share(name: str, records: grain.MapDataset, cfg: dict[str, Any], split: str,
           process_index: int, process_count: int) -> grain.MapDataset:
    share = records[process_index::process_count]
    if len(share) == 0:
        raise EmptySplitError(
            f"data.sources.{name} has {len(records)} {split} records, too few for {process_count} processes"
        )
    if split == "train":
        share = share.shuffle(seed=_source_seed(cfg["seed"], name))
    return share.repeat()


def packed_document_rows(name: str, records: grain.MapDataset, cfg: dict[str, Any], *,
                         seq_len: int, tokenizer_name: str = "phi4") -> grain.IterDataset:
    """Pretraining rows of one source: its documents made and tokenized (by the named
    tokenizer) `DOCUMENTS_PER_READ` at a time, on read threads or in `data.read_processes`
    worker processes (the same rows either way), then packed; records without a document are
    handled by the source's bad-record policy. A source with `min_tokens` keeps only
    documents that long (counted, `length_filter`) and packs them whole."""
    tokenizer = load_tokenizer(tokenizer_name)
    spec = cfg["sources"][name]
    documents = bad_records.convert(name, records, functools.partial(sources.document_text, name, spec),
                                    spec)
    threads = readers(cfg, "read_threads")
    if min_tokens := spec.get("min_tokens", 0):
        pairs = documents.map(functools.partial(packing.document_pair, tokenizer=tokenizer))
        pairs = pairs.filter(packing.has_tokens).filter(length_filter.MinTokens(name, min_tokens))
        read_options = grain.ReadOptions(num_threads=threads,
                                         prefetch_buffer_size=DOCUMENTS_BUFFERED_PER_THREAD * threads)
        return packing.pack_whole_documents(pairs.to_iter_dataset(read_options), seq_len,
                                            cfg["max_segments_per_row"])
    groups = documents.batch(DOCUMENTS_PER_READ,
                             batch_fn=functools.partial(packing.group_pairs, tokenizer=tokenizer))
    if workers := readers(cfg, "read_processes"):
        try:
            read = processes.ProcessReader(groups, workers, GROUPS_BUFFERED_PER_PROCESS * workers)
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            raise DataConfigError(
                f"data.sources.{name} cannot be sent to read processes ({error}); read it on "
                f"threads: --config.data.read_processes=0") from error
    else:
        read = groups.to_iter_dataset(grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=GROUPS_BUFFERED_PER_THREAD * threads))
    return packing.pack_groups(read, seq_len, cfg["max_segments_per_row"])


def readers(cfg: Mapping[str, Any], key: str) -> int:
    """`data.<key>` (read_threads or read_processes) capped at the cores this process may run
    on: readers past them only add hand-offs (on 2 cores, 4 read threads ran at 0.80-0.84x
    the tokens/s of 2, `benchmarks/RESULTS_cpu.md`). Logged once when it caps."""
    cores = _usable_cores()
    if cfg[key] > cores:
        _log_cap(key, cfg[key], cores)
    return min(cfg[key], cores)


@functools.cache
def _log_cap(key: str, requested: int, cores: int) -> None:
    logging.info("data.%s=%d is more than the %d cores this process may run on: each source "
                 "reads with %d", key, requested, cores, cores)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity outside Linux
        return os.cpu_count() or 1


def _source_seed(seed: int, name: str) -> int:
    """A 32-bit shuffle seed of its own per source, stable across runs and processes."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])

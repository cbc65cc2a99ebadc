"""DPO reference log-probs computed once, before training, and stored in the workdir.

Every pair of every (finite) preference source is scored by the reference model (the run's
starting parameters) in one pass over the source in index order; the result, [N, 2] float32
(chosen, rejected; NaN for pairs that yield no rows), is saved as
`<workdir>/reference_log_probs/<source>.<split>.npy`, written to a temporary name and
renamed, so an interrupted pass leaves nothing half-written. A restarted run reuses it.
Training then needs no reference model at all: each batch row carries its pair's scores.
On several processes each scores the records it reads (index i::count) on the shared mesh,
and keeps its own file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from phi4_jax.config_base import ConfigError
from phi4_jax.data import bad_records, mixture, sources
from phi4_jax.data.sources import SYNTHETIC_KINDS
from phi4_jax.parallel.sharding import logical_rules
from phi4_jax.train.state import Run, to_global_batch

SPLITS = ("train", "eval")


def check_finite_sources(data_cfg: Any) -> None:
    """Precomputing needs sources with an end: the built-in synthetic streams have none."""
    weights = mixture.normalized_weights(dict(data_cfg.mix), data_cfg.sources)
    endless = [name for name, w in weights.items()
               if w > 0 and data_cfg.sources[name].kind in SYNTHETIC_KINDS]
    if endless:
        raise ConfigError(
            f"dpo.reference='precomputed' scores every pair once, but data.sources."
            f"{endless[0]} (kind {data_cfg.sources[endless[0]].kind!r}) is an endless stream; "
            f"use dpo.reference='on_the_fly' or a JSONL preference source.")


def _path(workdir: str, name: str, split: str) -> str:
    suffix = f".p{jax.process_index()}" if jax.process_count() > 1 else ""
    return os.path.join(workdir, "reference_log_probs", f"{name}.{split}{suffix}.npy")


def load_or_compute(run: Run, data_cfg: Mapping[str, Any], example: Callable, score: Callable,
                    initial_params: Callable[[], Any], workdir: str
                    ) -> dict[tuple[str, str], np.ndarray]:
    """The reference log-probs of every positive-weight source and split, computed (with the
    starting parameters, loaded only if some are missing) or loaded from the workdir;
    `data_cfg` is the run's checked data config."""
    weights = mixture.normalized_weights(data_cfg["mix"], data_cfg["sources"])
    wanted = [(name, split) for name, w in weights.items() if w > 0 for split in SPLITS]
    tables, params = {}, None
    for name, split in wanted:
        path = _path(workdir, name, split)
        if os.path.exists(path):
            tables[name, split] = np.load(path)
            continue
        if params is None:
            params = initial_params()
        logging.info("Scoring data.sources.%s (%s) with the reference model.", name, split)
        tables[name, split] = _score_source(run, data_cfg, name, split, example, score, params)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            np.save(f, tables[name, split])
        os.replace(path + ".tmp", path)
    return tables


def _score_source(run: Run, data_cfg: Mapping[str, Any], name: str, split: str,
                  example: Callable, score: Callable, params: Any) -> np.ndarray:
    spec = data_cfg["sources"][name]
    records = sources.open_checked_records(name, spec, seed=data_cfg["seed"], split=split,
                                           eval_holdout=data_cfg["eval_holdout"])
    examples = bad_records.convert(name, records, example, spec)  # bad ones are None
    count, index = jax.process_count(), jax.process_index()
    local = run.config.train.global_batch // count
    table = np.full((len(records), 2), np.nan, np.float32)
    mine = list(range(index, len(records), count))
    steps = -(-len(range(0, len(records), count)) // local)  # the busiest process's batches
    filler = _any_rows(examples)
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        scorer = jax.jit(score, in_shardings=(run.model_param_shardings, run.batch_sharding))
        for step in range(steps):
            ids = mine[step * local:(step + 1) * local]
            rows = {i: examples[i] for i in ids}
            kept = [i for i in ids if rows[i] is not None]
            batch = _stacked([rows[i] for i in kept], local, like=filler)
            out = multihost_utils.process_allgather(
                scorer(params, to_global_batch(batch, run.batch_sharding)), tiled=True)
            table[kept] = np.asarray(out)[index * local:index * local + len(kept)]
    return table


def _any_rows(examples) -> Mapping[str, np.ndarray]:
    """Rows of some pair, to pad a process's last batch (padded rows are never read)."""
    for i in range(len(examples)):
        if (rows := examples[i]) is not None:
            return rows
    raise ConfigError("a preference source yields no pair that fits train.seq_len.")


def _stacked(rows: list, size: int, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = rows + [like] * (size - len(rows))
    return {key: np.stack([r[key] for r in rows]) for key in like}


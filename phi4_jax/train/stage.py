"""The contract between a training stage and the shared engine: a stage is a value.

The engine (`train.loop`) owns everything stages have in common: start-up checks, the
sharded state, the jitted step with microbatching, clipping and donation, checkpoints and
exact resume, signals, NaN handling, logging and evaluation. A stage module brings a
`build(config, model_cfg) -> Stage` that checks its own config sections and returns the
frozen description below: what differs (its loss, its rows, what its loss reads besides the
trained parameters, any batch preparation or evaluation of its own). Building loads and
compiles nothing; the engine calls the description's functions, each with what it needs
passed in, so no call depends on another having run first. `phi4_jax.stages.STAGES` maps
`config.stage` to the builders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from phi4_jax.data import pipeline
from phi4_jax.model.config import ModelConfig, param_count
from phi4_jax.train.state import Run
from phi4_jax.train.step import LossFn

HostBatch = dict[str, np.ndarray]
Loader = Callable[[], Any]  # loads the run's starting parameters (new buffers each call)


@dataclasses.dataclass(frozen=True)
class DataShard:
    """This process's part of the global batch: `batch_size` rows of process `index` of `count`."""

    batch_size: int
    index: int
    count: int


@dataclasses.dataclass(frozen=True)
class Rows:
    """What one split reads: the rows a source's records become (`make`), fed (index,
    record) pairs when `indexed`; `subsets` limits each source to those indices of its split."""

    make: pipeline.RowsFn
    indexed: bool = False
    subsets: Mapping[str, np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class StageData:
    """A stage's rows per split ('train', and 'eval' for a held-out loss) and the host-side
    numbers found while making them (reported with every evaluation)."""

    rows: Mapping[str, Rows]
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)


def _nothing_frozen(load_initial: Loader) -> None:
    del load_initial


@dataclasses.dataclass(frozen=True)
class Frozen:
    """What the loss reads but never trains: its bytes over all devices (sharded like the
    parameters; the memory check counts them) and its loader, given the starting-parameter
    loader. `is_start`: the loaded value is the starting parameters themselves."""

    nbytes: int = 0
    load: Callable[[Loader], Any] = _nothing_frozen
    is_start: bool = False


def _as_read(run: Run, batch: HostBatch, params: Any, step: int
             ) -> tuple[HostBatch, dict[str, float]]:
    del run, params, step
    return batch, {}


def _no_evaluation(run: Run, params: Any, frozen: Any, held_out: list) -> dict[str, float]:
    del run, params, frozen, held_out
    return {}


@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything the engine needs from a stage.

    loss: run -> the step's loss `(params, batch, frozen) -> (sum, units, metric sums)`.
    data: (run, checked data config, starting-parameter loader, workdir) -> its rows; a stage
      that picks its rows with the starting model (teachability) or scores them once
      (precomputed DPO) does it here.
    prepare_batch: (run, host batch, params, step) -> (batch, host metrics); on-policy stages
      sample their responses here.
    evaluate: (run, params, frozen, held-out global batches) -> metrics beyond the held-out loss.
    """

    name: str
    loss: Callable[[Run], LossFn]
    data: Callable[[Run, Mapping[str, Any], Loader, str], StageData]
    tokens_per_step: int  # trained tokens per optimizer step, for throughput and MFU
    sequences_per_row: int = 1  # sequences of train.seq_len one batch row holds (2: a pair)
    frozen: Frozen = Frozen()
    prepare_batch: Callable[[Run, HostBatch, Any, int], tuple[HostBatch, dict[str, float]]] = \
        _as_read
    evaluate: Callable[[Run, Any, Any, list], dict[str, float]] = _no_evaluation
    describe: str = ""  # logged once at start-up (e.g. the mixture table)


def starting_copy(model_cfg: ModelConfig) -> Frozen:
    """A frozen copy of the starting parameters (a reference model), in `model.param_dtype`."""
    return Frozen(nbytes=param_count(model_cfg) * jnp.dtype(model_cfg.param_dtype).itemsize,
                  load=lambda load_initial: load_initial(), is_start=True)

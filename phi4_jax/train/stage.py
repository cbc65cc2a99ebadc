"""The contract between a training stage and the shared engine.

The engine (`train.loop`) owns everything stages have in common: start-up checks, the
sharded state, the jitted step with microbatching, clipping and donation, checkpoints and
exact resume, signals, NaN handling, logging and evaluation. A stage brings only what
differs: its loss, its batches, what its loss reads besides the trained parameters, and any
evaluation of its own. Stages live in `phi4_jax.stages`; `main` picks one by `config.stage`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np

from phi4_jax.train.state import Run
from phi4_jax.train.step import LossFn

HostBatch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataShard:
    """This process's part of the global batch: `batch_size` rows of process `index` of `count`."""

    batch_size: int
    index: int
    count: int


class Stage:
    """Defaults are pretraining's; a stage overrides what it changes."""

    name = ""

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        """Stage-specific validation at start-up; raise ConfigError naming the key."""

    def describe(self, config: ml_collections.ConfigDict) -> str:
        """What the run will read, logged once at start-up (e.g. the mixture table)."""
        return ""

    def sequences_per_row(self, config: ml_collections.ConfigDict) -> int:
        """Sequences of `train.seq_len` one batch row holds (2 for a preference pair)."""
        return 1

    def loss_fn(self, run: Run) -> LossFn:
        raise NotImplementedError

    def train_batches(self, run: Run, shard: DataShard) -> Iterator[HostBatch]:
        """An endless, checkpointable (grain) iterator of this process's batches."""
        raise NotImplementedError

    def eval_batches(self, run: Run, shard: DataShard) -> list[HostBatch]:
        return []

    def frozen(self, run: Run, initial_params: Callable[[], Any], workdir: str) -> Any:
        """What the loss reads but never trains (device arrays), or None.

        `initial_params()` loads the run's starting parameters (e.g. as a reference model).
        """
        return None

    def prepare_batch(self, run: Run, batch: HostBatch, params: Any, step: int
                      ) -> tuple[HostBatch, dict[str, float]]:
        """The batch made ready with the current parameters (on-policy stages sample their
        responses here), and host-side metrics to log; by default the batch as read."""
        return batch, {}

    def tokens_per_step(self, config: ml_collections.ConfigDict) -> int:
        """Trained tokens per optimizer step, for throughput and MFU."""
        return config.train.global_batch * config.train.seq_len * self.sequences_per_row(config)

    def evaluate(self, run: Run, params: Any, frozen: Any) -> dict[str, float]:
        """Evaluation beyond the held-out loss (e.g. greedy accuracy), at eval steps."""
        return {}

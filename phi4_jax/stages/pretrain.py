"""Pretraining (and mid-training): next-token loss over packed documents of a weighted mix."""

from __future__ import annotations

import functools

import ml_collections

from phi4_jax.config_base import ConfigError
from phi4_jax.data import mixture, pipeline
from phi4_jax.losses.lm import next_token_loss_sum
from phi4_jax.sampling.scoring import target_log_probs
from phi4_jax.train.stage import DataShard, Stage
from phi4_jax.train.state import Run


def language_model_loss(params, batch, frozen, *, graphdef, chunk_tokens):
    """Summed next-token loss over `loss_mask`, and the token count."""
    del frozen
    log_probs = target_log_probs(params, graphdef, batch, chunk_tokens=chunk_tokens)
    total, tokens = next_token_loss_sum(log_probs, batch["loss_mask"])
    return total, tokens, {}


class Pretrain(Stage):
    name = "pretrain"

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        try:
            pipeline.validate_data_config(config.data)
        except (TypeError, ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from error

    def describe(self, config: ml_collections.ConfigDict) -> str:
        t = config.train
        return "Mixture:\n" + mixture.mixture_report(
            config.data, total_tokens=t.steps * t.global_batch * t.seq_len)

    def loss_fn(self, run: Run):
        return functools.partial(language_model_loss, graphdef=run.graphdef,
                                 chunk_tokens=run.config.train.loss_chunk_tokens)

    def _data_kwargs(self, run: Run, shard: DataShard) -> dict:
        return dict(seq_len=run.config.train.seq_len, batch_size=shard.batch_size,
                    process_index=shard.index, process_count=shard.count)

    def train_batches(self, run: Run, shard: DataShard):
        return pipeline.make_train_iterator(run.config.data, **self._data_kwargs(run, shard))

    def eval_batches(self, run: Run, shard: DataShard):
        return pipeline.make_eval_batches(run.config.data, num_batches=run.config.eval.batches,
                                          **self._data_kwargs(run, shard))

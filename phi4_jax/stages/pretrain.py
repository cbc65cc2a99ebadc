"""Pretraining (and mid-training): next-token loss over packed documents of a weighted mix.

The post-training stages build on this one: SFT keeps its loss and changes the rows, DPO
changes both; all share the data-config checks, the mixture report, batching through
`pipeline.make_iterator` and the greedy-accuracy evaluation.
"""

from __future__ import annotations

import functools
import logging

import jax
import ml_collections

from phi4_jax.config_base import ConfigError
from phi4_jax.data import mixture, pipeline, reasoning, synthetic
from phi4_jax.evals import position_loss, verifiable
from phi4_jax.losses.lm import next_token_loss_sum
from phi4_jax.sampling.scoring import target_log_probs
from phi4_jax.train.stage import DataShard, Stage
from phi4_jax.train.state import Run, to_global_batch

ACCURACY_BATCH = 32  # prompts decoded at once by the greedy-accuracy evaluation


def language_model_loss(params, batch, frozen, *, graphdef, chunk_tokens):
    """Summed next-token loss over `loss_mask`, and the token count."""
    del frozen
    log_probs = target_log_probs(params, graphdef, batch, chunk_tokens=chunk_tokens)
    total, tokens = next_token_loss_sum(log_probs, batch["loss_mask"])
    return total, tokens, {}


class Pretrain(Stage):
    name = "pretrain"
    subsets = None  # per source, the train-split indices to read (None: all of them)

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        try:
            pipeline.validate_data_config(config.data)
        except (TypeError, ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from error

    def describe(self, config: ml_collections.ConfigDict) -> str:
        return "Mixture:\n" + mixture.mixture_report(
            config.data, total_tokens=self.tokens_per_step(config) * config.train.steps)

    def loss_fn(self, run: Run):
        return functools.partial(language_model_loss, graphdef=run.graphdef,
                                 chunk_tokens=run.config.train.loss_chunk_tokens)

    def rows_fn(self, run: Run, split: str) -> pipeline.RowsFn:
        """What one source's records of a split become: here packed documents."""
        return functools.partial(pipeline.packed_document_rows, seq_len=run.config.train.seq_len,
                                 tokenizer_name=run.tokenizer_name)

    def train_batches(self, run: Run, shard: DataShard):
        return pipeline.make_iterator(run.config.data, self.rows_fn(run, "train"),
                                      batch_size=shard.batch_size, process_index=shard.index,
                                      process_count=shard.count, indexed=self.indexed(run),
                                      subsets=self.subsets)

    def eval_batches(self, run: Run, shard: DataShard):
        return pipeline.first_batches(run.config.data, self.rows_fn(run, "eval"),
                                      batch_size=shard.batch_size,
                                      num_batches=run.config.eval.batches,
                                      process_index=shard.index, process_count=shard.count,
                                      indexed=self.indexed(run))

    def indexed(self, run: Run) -> bool:
        """Whether `rows_fn` takes (index, record) pairs rather than records."""
        return False

    def evaluate(self, run: Run, params, frozen) -> dict[str, float]:
        """Loss by position bucket (`eval.position_buckets` > 0) and greedy accuracy on
        held-out built-in problems (`eval.accuracy_problems` > 0)."""
        return {**self._position_losses(run, params), **self._accuracy(run, params)}

    def _position_losses(self, run: Run, params) -> dict[str, float]:
        c = run.config
        if not c.eval.position_buckets or self.name != "pretrain":
            return {}
        if not hasattr(self, "_held_out"):  # the same rows at every evaluation
            shard = DataShard(c.train.global_batch // jax.process_count(), jax.process_index(),
                              jax.process_count())
            self._held_out = [to_global_batch(b, run.batch_sharding)
                              for b in self.eval_batches(run, shard)]
        return position_loss.loss_by_position(
            params, run.graphdef, self._held_out, seq_len=c.train.seq_len,
            buckets=c.eval.position_buckets, chunk_tokens=c.train.loss_chunk_tokens)

    def _accuracy(self, run: Run, params) -> dict[str, float]:
        e = run.config.eval
        if not e.accuracy_problems:
            return {}
        if jax.process_count() > 1:
            logging.warning("eval.accuracy_problems: greedy accuracy runs on one process only; "
                            "skipped on this %d-process run.", jax.process_count())
            return {}
        return verifiable.greedy_accuracy(
            params, run.graphdef, run.model_cfg, run.tokenizer, seed=run.config.data.seed,
            problems=e.accuracy_problems, max_new_tokens=e.max_new_tokens,
            batch_size=min(ACCURACY_BATCH, e.accuracy_problems),
            fmt=reasoning.format_for(run.config),
            families=synthetic.parse_families(e.accuracy_families, "eval.accuracy_families"))

"""Pretraining (and mid-training): next-token loss over packed documents of a weighted mix."""

from __future__ import annotations

import functools

import ml_collections

from phi4_jax.data import pipeline
from phi4_jax.errors import ConfigError
from phi4_jax.evals import position_loss
from phi4_jax.model.config import ModelConfig
from phi4_jax.stages import evaluation
from phi4_jax.train.stage import Rows, Stage, StageData
from phi4_jax.train.state import Run


def check(config: ml_collections.ConfigDict) -> None:
    """The key only pretraining reads: its loss-by-position evaluation."""
    buckets = config.eval.position_buckets
    if not (isinstance(buckets, int) and not isinstance(buckets, bool) and buckets >= 0):
        raise ConfigError(f"eval.position_buckets={buckets!r}: must be an integer >= 0 "
                          f"(0 = off).")


def build(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> Stage:
    check(config)
    tokens = config.train.global_batch * config.train.seq_len
    return Stage(name="pretrain", loss=evaluation.language_model_loss, data=_data,
                 tokens_per_step=tokens, evaluate=_evaluate,
                 describe=evaluation.mixture_description(config, tokens))


def _data(run: Run, data_cfg, load_initial, workdir: str) -> StageData:
    del data_cfg, load_initial, workdir
    rows = Rows(functools.partial(pipeline.packed_document_rows, seq_len=run.config.train.seq_len,
                                  tokenizer_name=run.tokenizer_name))
    return StageData({"train": rows, "eval": rows})


def _evaluate(run: Run, params, frozen, held_out: list) -> dict[str, float]:
    """Loss by position bucket (`eval.position_buckets` > 0) and greedy accuracy."""
    del frozen
    c = run.config
    buckets = {}
    if c.eval.position_buckets:
        buckets = position_loss.loss_by_position(
            params, run.graphdef, held_out, seq_len=c.train.seq_len,
            buckets=c.eval.position_buckets, chunk_tokens=c.train.loss_chunk_tokens)
    return {**buckets, **evaluation.greedy_accuracy(run, params)}

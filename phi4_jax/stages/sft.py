"""Supervised fine-tuning on ChatML conversations (Phi-4 report section 4.1), and on
think-then-answer reasoning traces (Phi-4-reasoning, `sft.template='reasoning'`).

Pretraining's loss with other rows: each conversation is encoded, masked to its assistant
turns (content and `<|im_end|>`) and packed whole into rows (`phi4_jax.data.chat`), so
conversations never attend to each other. Under LoRA each conversation trains the adapter
its record names (`data.adapters`). With `reasoning.teachable_pool` the teachability
filter picks the problems to train on (`stages.teachability`).
"""

from __future__ import annotations

import functools

import ml_collections

from phi4_jax.config_base import ConfigError
from phi4_jax.data import chat, problems
from phi4_jax.data.synthetic import reasoning
from phi4_jax.model.config import ModelConfig
from phi4_jax.stages import evaluation, teachability
from phi4_jax.train.stage import Rows, Stage, StageData
from phi4_jax.train.state import Run

TEMPLATES = ("chat", "reasoning")


def check(config: ml_collections.ConfigDict) -> None:
    """The sft.* keys, and the teachability filter's (which samples reasoning responses)."""
    s = config.sft
    if s.truncation not in chat.TRUNCATION:
        raise ConfigError(f"sft.truncation={s.truncation!r}: choose one of {chat.TRUNCATION}.")
    if s.template not in TEMPLATES:
        raise ConfigError(f"sft.template={s.template!r}: choose one of {TEMPLATES}.")
    teachability.check(config)
    if config.reasoning.teachable_pool and reasoning.format_for(config) is None:
        raise ConfigError(f"reasoning.teachable_pool={config.reasoning.teachable_pool} needs "
                          f"--config.sft.template=reasoning: the filter samples "
                          f"think-then-answer responses (or set it to 0).")


def build(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> Stage:
    check(config)
    counts = chat.Counts()
    tokens = config.train.global_batch * config.train.seq_len
    return Stage(name="sft", loss=evaluation.language_model_loss,
                 data=functools.partial(_data, counts=counts), tokens_per_step=tokens,
                 evaluate=functools.partial(_evaluate, counts=counts),
                 describe=evaluation.mixture_description(config, tokens))


def _data(run: Run, data_cfg, load_initial, workdir: str, *, counts: chat.Counts
          ) -> StageData:
    """Packed conversations; the teachable problems only, when the filter is on."""
    c = run.config
    fmt = reasoning.format_for(c)
    subsets, kept = teachability.kept_subsets(
        run, data_cfg, problems.problem_of, run.tokenizer, fmt,
        teachability.sampling_params(c, run.tokenizer), load_initial, workdir)
    make = functools.partial(chat.conversation_rows, tokenizer=run.tokenizer,
                             seq_len=c.train.seq_len, truncation=c.sft.truncation, counts=counts,
                             reasoning_format=fmt, adapter_names=_adapter_names(run))
    return StageData({"train": Rows(make, subsets=subsets), "eval": Rows(make)}, kept)


def _adapter_names(run: Run) -> tuple[str, ...]:
    """The adapters a conversation may name (`data.adapters`); none without LoRA."""
    return run.model_cfg.lora.adapters if run.model_cfg.lora else ()


def _evaluate(run: Run, params, frozen, held_out: list, *, counts: chat.Counts
              ) -> dict[str, float]:
    del frozen, held_out
    return {**evaluation.greedy_accuracy(run, params), **counts.as_metrics("sft")}

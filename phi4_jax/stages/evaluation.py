"""Pieces several stages share, as plain functions: the language-model loss, the mixture
description logged at start-up and the greedy-accuracy evaluation."""

from __future__ import annotations

import functools
import logging

import jax
import ml_collections

from phi4_jax.data import mixture, synthetic
from phi4_jax.data.synthetic import reasoning
from phi4_jax.evals import verifiable
from phi4_jax.losses.lm import next_token_loss_sum
from phi4_jax.sampling.scoring import target_log_probs
from phi4_jax.train.state import Run

ACCURACY_BATCH = 32  # prompts decoded at once by the greedy-accuracy evaluation


def next_token_loss(params, batch, frozen, *, graphdef, chunk_tokens):
    """Summed next-token loss over `loss_mask`, and the token count."""
    del frozen
    log_probs = target_log_probs(params, graphdef, batch, chunk_tokens=chunk_tokens)
    total, tokens = next_token_loss_sum(log_probs, batch["loss_mask"])
    return total, tokens, {}


def language_model_loss(run: Run):
    """The step's loss of pretraining and SFT."""
    return functools.partial(next_token_loss, graphdef=run.graphdef,
                             chunk_tokens=run.config.train.loss_chunk_tokens)


def mixture_description(config: ml_collections.ConfigDict, tokens_per_step: int) -> str:
    return "Mixture:\n" + mixture.mixture_report(
        config.data, total_tokens=tokens_per_step * config.train.steps)


def greedy_accuracy(run: Run, params) -> dict[str, float]:
    """Greedy accuracy on held-out built-in problems (`eval.accuracy_problems` > 0). The
    unanswerable word problems behind `refusal_accuracy` are left out when
    `eval.accuracy_families` names the families: they belong to none of them."""
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
        families=synthetic.parse_families(e.accuracy_families, "eval.accuracy_families"),
        refusal_problems=0 if e.accuracy_families else None, first=e.accuracy_offset)

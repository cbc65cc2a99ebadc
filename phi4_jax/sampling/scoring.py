"""Scoring given token sequences with a model: per-target log-probabilities, never holding the
[B, T, V] logits (`losses.lm.chunked_token_log_probs`). Training losses, reference models,
evaluation, Pivotal Token Search and GRPO all score through here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from phi4_jax.losses.lm import chunked_token_log_probs, chunked_token_log_probs_and_greedy


def target_log_probs(params: Any, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], *,
                     chunk_tokens: int) -> jax.Array:
    """log p(targets[b, t] | inputs[b, :t+1] in its segment) [B, T], float32.

    `batch` holds `inputs`, `targets`, `positions` and `segment_ids` [B, T], already shifted
    (`losses.lm.shift_for_next_token`), and under LoRA each row's adapter, `adapter_ids` [B]
    (`data.adapters`; rows without them use adapter 0).
    """
    model = nnx.merge(graphdef, params)
    x_BTD, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                            adapter_ids_B=batch.get("adapter_ids"))
    return chunked_token_log_probs(x_BTD, model.head_DV(), batch["targets"],
                                   chunk_tokens=chunk_tokens, remat=_remat_logits(model))


def target_log_probs_and_greedy(params: Any, graphdef: nnx.GraphDef, batch: dict[str, jax.Array],
                                *, chunk_tokens: int) -> tuple[jax.Array, jax.Array]:
    """`target_log_probs` [B, T] and whether each target is the model's argmax there [B, T]:
    the (log-likelihood, is-greedy) pair a multiple-choice evaluation scores with."""
    model = nnx.merge(graphdef, params)
    x_BTD, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    return chunked_token_log_probs_and_greedy(x_BTD, model.head_DV(), batch["targets"],
                                              chunk_tokens=chunk_tokens,
                                              remat=_remat_logits(model))


def _remat_logits(model) -> bool:
    """The LM head's chunks are recomputed in the backward unless the layers keep every
    activation (`remat_policy` none: the memory estimate has room for the logits too)."""
    return model.cfg.remat_policy != "none"


def next_token_candidate_log_probs(params: Any, graphdef: nnx.GraphDef,
                                   batch: dict[str, jax.Array]) -> jax.Array:
    """log p(candidate | prompt) [B, C] for C candidate next tokens of each prompt row.

    `batch` holds `inputs`, `positions`, `segment_ids` [B, T] (the prompt, right-padded),
    `last_index` [B] (its last token), `candidates` [B, C] and under LoRA `adapter_ids` [B]:
    one forward scores every candidate at the prompt's end, as a pivotal-token pair needs.
    """
    model = nnx.merge(graphdef, params)
    x_BTD, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                            adapter_ids_B=batch.get("adapter_ids"))
    x_BD = jnp.take_along_axis(x_BTD, batch["last_index"][:, None, None], axis=1)[:, 0]
    logits_BV = model.logits(x_BD[:, None])[:, 0]
    log_probs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    return jnp.take_along_axis(log_probs_BV, batch["candidates"], axis=-1)

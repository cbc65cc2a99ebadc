"""Losses as pure functions of arrays, in float32."""

import jax
import jax.numpy as jnp


def token_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target) per position, from float32 logits."""
    log_probs = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets_BT[..., None], axis=-1)[..., 0]


def next_token_loss_sum(logits_BTV: jax.Array, targets_BT: jax.Array,
                        weights_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed weighted cross-entropy and summed weight; callers divide once at the end,
    so microbatches and hosts average over tokens, not over batches."""
    weights = weights_BT.astype(jnp.float32)
    return -jnp.sum(token_log_probs(logits_BTV, targets_BT) * weights), jnp.sum(weights)

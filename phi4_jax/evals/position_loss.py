"""Held-out loss by position bucket: the mean next-token loss of targets whose position in
their document falls in each of `buckets` equal slices of the row. After a context extension
it should keep falling past the old context length (Phi-4 mid-training, 4K -> 16K).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi4_jax.sampling.scoring import target_log_probs


def bucket_edges(seq_len: int, buckets: int) -> np.ndarray:
    """The `buckets + 1` position edges of equal slices of a row: [0, T/b, 2T/b, ..., T]."""
    return np.linspace(0, seq_len, buckets + 1).astype(np.int64)


def bucket_sums(log_probs_BT: jax.Array, weights_BT: jax.Array, positions_BT: jax.Array,
                edges: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood and summed weight per bucket [buckets] each."""
    bucket_BT = jnp.searchsorted(jnp.asarray(edges[1:-1]), positions_BT, side="right")
    one_hot_BTK = jax.nn.one_hot(bucket_BT, len(edges) - 1) * weights_BT[..., None]
    return (-jnp.einsum("bt,btk->k", log_probs_BT, one_hot_BTK), one_hot_BTK.sum((0, 1)))


def loss_by_position(params: Any, graphdef: nnx.GraphDef, batches: list[dict[str, Any]], *,
                     seq_len: int, buckets: int, chunk_tokens: int) -> dict[str, float]:
    """`loss_pos<lo>-<hi>` per bucket over the batches (buckets without targets left out)."""
    edges = bucket_edges(seq_len, buckets)

    @jax.jit
    def sums(params, batch):
        log_probs = target_log_probs(params, graphdef, batch, chunk_tokens=chunk_tokens)
        return bucket_sums(log_probs, batch["loss_mask"], batch["positions"], edges)

    totals = [np.zeros(buckets), np.zeros(buckets)]
    for batch in batches:
        for total, part in zip(totals, jax.device_get(sums(params, batch))):
            total += part
    return {f"loss_pos{lo}-{hi}": float(nll / count) for lo, hi, nll, count
            in zip(edges[:-1], edges[1:], *totals) if count}

"""Context parallelism: each row's positions split over the mesh axes the rules give `seq`
(the `sequence` axis), equal to the unsplit computation.

Causal attention makes late positions cost more than early ones, so a plain split would
leave the last device with most of the work. With CP devices the row is cut into 2 * CP
chunks and device i holds chunks i and 2 * CP - 1 - i (`load_balanced_order`): the model
reorders tokens, positions and segment ids once at its input and restores the order of its
output (`transformer.Transformer.hidden`), and every layer between works on the reordered
row; only attention looks across positions. There each device all-gathers K/V (small with
grouped-query heads: 10 KV heads of 40 for Phi-4) and segment ids, and runs blockwise
attention of its own queries against the whole row, causality compared on the original
token indices, so packed documents stay isolated. The backward of the all-gather is a
reduce-scatter of dK/dV, which JAX derives.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from phi4_jax.model.attention.blockwise import blockwise_attention
from phi4_jax.parallel import sharding as sharding_lib


def sequence_axes() -> tuple[str, ...]:
    """The mesh axes of size > 1 that the active rules split `seq` over (none outside a mesh)."""
    rules, mesh = sharding_lib.active_rules(), jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return ()
    return sharding_lib.split_axes(sharding_lib.logical_to_spec(("seq",), rules)[0], mesh)


def sequence_shards() -> int:
    """How many devices split each row's positions (1: no context parallelism)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[axis] for axis in sequence_axes())


def load_balanced_order(seq_len: int, shards: int) -> np.ndarray:
    """Token indices in the order the devices hold them: chunks i and 2 * shards - 1 - i of
    2 * shards equal chunks on device i."""
    if seq_len % (2 * shards):
        raise ValueError(f"train.seq_len={seq_len} must be a multiple of 2 x {shards} "
                         f"sequence shards (mesh.sequence) for the load-balanced split.")
    chunks = np.arange(seq_len).reshape(2 * shards, -1)
    return np.concatenate([chunks[j] for i in range(shards) for j in (i, 2 * shards - 1 - i)])


def context_parallel_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, block_size: int = 512):
    """Causal self-attention of a row held in `load_balanced_order`, positions split over the
    sequence axes; per device: its queries against the all-gathered K/V."""
    rules, mesh = sharding_lib.active_rules(), jax.sharding.get_abstract_mesh()
    axes, shards = sequence_axes(), sequence_shards()
    order = jnp.asarray(load_balanced_order(q_BTNH.shape[1], shards), jnp.int32)
    q_spec = sharding_lib.logical_to_spec(("batch", "seq", "q_heads", "head_dim"), rules)
    kv_spec = sharding_lib.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), rules)
    seg_spec = sharding_lib.logical_to_spec(("batch", "seq"), rules)
    if sharding_lib.split_axes(q_spec[2], mesh) != sharding_lib.split_axes(kv_spec[2], mesh):
        raise ValueError("mesh.rules must split q_heads and kv_heads over the same mesh axes "
                         "for context parallelism (each device's query heads read its kv heads).")
    local = functools.partial(_local_attention, order=order, axes=axes, block_size=block_size)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)


def _local_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, order, axes, block_size):
    """One device: its T/CP queries against the row's gathered keys and values."""
    t = q_BTNH.shape[1]
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=1, tiled=True)
    k_BSKH, v_BSKH, kv_seg_BS = gather(k_BTKH), gather(v_BTKH), gather(seg_BT)
    q_index_T = jax.lax.dynamic_slice_in_dim(order, jax.lax.axis_index(axes) * t, t)
    return blockwise_attention(q_BTNH, k_BSKH, v_BSKH, seg_BT, kv_seg_BS,
                               block_size=min(block_size, t // 2), q_index_T=q_index_T,
                               kv_index_S=order)

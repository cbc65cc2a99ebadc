"""cuDNN flash attention on NVIDIA GPUs, packed documents passed as segment offsets and
lengths (the public `jax.nn.dot_product_attention` has no segment argument)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_offsets(segment_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout: segment starts plus end [B, M+1] and lengths [B, M], -1 padded.

    Assumes the packer's convention: segments numbered 1, 2, ... in order, padding (0) last.
    M = T, the most segments a row can hold, so no packing can overflow it.
    """
    b, t = segment_ids_BT.shape
    rows = jnp.arange(b)[:, None]
    counts = jnp.zeros((b, t + 1), jnp.int32).at[rows, segment_ids_BT].add(1)[:, 1:]
    num_segments = segment_ids_BT.max(axis=1, keepdims=True)
    slot = jnp.arange(t)[None, :]
    lengths = jnp.where(slot < num_segments, counts, -1)
    ends = jnp.cumsum(counts, axis=1)
    starts = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), ends], axis=1)
    offsets = jnp.where(jnp.arange(t + 1)[None, :] <= num_segments, starts, -1)
    return offsets, lengths


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    """cuDNN flash attention with padding-causal masking per packed segment (sm90+, bf16)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top

    offsets, lengths = segment_offsets(segment_ids_BT)
    return cudnn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
        kv_offsets=offsets, scale=q_BTNH.shape[-1] ** -0.5,
        mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")

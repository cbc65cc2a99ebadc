"""The reference attention and the mask every implementation applies.

Query slot i sees key slot j iff j <= i + q_offset (causal), the two carry the same segment
id, and the key's segment id is not 0 (padding). `xla_attention` materializes the
[B, N, T, S] logits; it is the path the others are tested against, and the one cached
decoding takes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, so fully masked rows stay NaN-free on every path


def mask(q_seg_BT, kv_seg_BS, q_index_T, kv_index_S):
    """[B, 1, 1, T, S] boolean: causal, same segment, key not padding."""
    causal_TS = kv_index_S[None, :] <= q_index_T[:, None]
    same_BTS = (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]) & (kv_seg_BS[:, None, :] != 0)
    return (same_BTS & causal_TS)[:, None, None]


def group_heads(q_BTNH, num_kv_heads):
    b, t, n, h = q_BTNH.shape
    return q_BTNH.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def xla_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, kv_segment_ids, q_offset=0):
    """Reference path: full logits, float32 softmax."""
    q_BTKGH = group_heads(q_BTNH, k_BSKH.shape[2])
    scale = q_BTNH.shape[-1] ** -0.5
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    visible = mask(q_segment_ids, kv_segment_ids, jnp.arange(t) + q_offset, jnp.arange(s))
    probs_BKGTS = jax.nn.softmax(jnp.where(visible, logits_BKGTS, MASKED), axis=-1)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                           preferred_element_type=jnp.float32)
    return out_BTKGH.reshape(q_BTNH.shape).astype(q_BTNH.dtype)


def pad_to(x, multiple, axis):
    """Zero-pads one axis up to a multiple (segment id 0 marks the padding as such)."""
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)

"""Causal grouped-query attention over packed sequences, behind one function.

Axes: B batch, T query length, S key length, N query heads, K kv heads, G = N / K query
heads per kv head, H head dim, M segments per row.

Every implementation applies the same mask: query slot i sees key slot j iff
j <= i + q_offset (causal), the two carry the same segment id, and the key's segment id is
not 0 (padding). So no token attends across packed documents on any path.
  - `xla`: the plain einsum/softmax reference; materializes [B, N, T, S] logits.
  - `blockwise`: flash-style online softmax over key blocks with a recomputing backward;
    memory O(T * block) for long sequences where no fused kernel exists; key blocks
    wholly in a query block's future are skipped.
  - `cudnn`: cuDNN flash attention on NVIDIA GPUs, packed documents passed as segment
    offsets and lengths (the plain `jax.nn.dot_product_attention` has no segment argument).
  - `splash`: the Pallas splash-attention kernel on TPU, packed documents passed as segment
    ids and grouped KV heads served natively; under a mesh it runs per device in a
    `shard_map` on the batch rows and heads the logical rules give each device.
Softmax and its statistics are always float32.
"""

from __future__ import annotations

import jax

from phi4_jax.model.attention.blockwise import blockwise_attention
from phi4_jax.model.attention.cudnn import cudnn_attention
from phi4_jax.model.attention.reference import xla_attention
from phi4_jax.model.attention.splash import splash_attention


def resolve_impl(impl: str, seq_len: int, block_size: int) -> str:
    """Picks the implementation for `auto` from the backend and sequence length."""
    if impl != "auto":
        return impl
    if jax.default_backend() == "gpu":
        return "cudnn"
    if jax.default_backend() == "tpu":
        return "splash"
    return "blockwise" if seq_len > 2 * block_size else "xla"


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
              q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_offset: jax.Array | int = 0,
              impl: str = "auto", block_size: int = 512) -> jax.Array:
    """Masked causal attention; returns [B, T, N, H] in the query dtype."""
    impl = resolve_impl(impl, q_BTNH.shape[1], block_size)
    if impl not in ("xla", "blockwise", "cudnn", "splash"):
        raise ValueError(
            f"model.attention_impl={impl!r}: choose auto, xla, blockwise, cudnn or splash.")
    self_attention = (q_BTNH.shape[1] == k_BSKH.shape[1] and isinstance(q_offset, int)
                      and not q_offset)
    if impl == "xla" or not self_attention:
        # Cached decoding (short queries against a long cache) always takes the plain path.
        return xla_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, kv_segment_ids, q_offset)
    if impl == "blockwise":
        return blockwise_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, kv_segment_ids,
                                   block_size=block_size)
    if impl == "cudnn":
        return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids)
    if jax.default_backend() != "tpu":
        raise ValueError(f"model.attention_impl='splash' needs a TPU, but the backend is "
                         f"{jax.default_backend()!r}; use auto, xla or blockwise here.")
    return splash_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, block_size=block_size)

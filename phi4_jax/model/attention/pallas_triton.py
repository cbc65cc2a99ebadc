"""JAX's Pallas Triton flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`) on
NVIDIA GPUs: packed documents passed as segment ids, causal, with its own Triton backward.

The kernel has no grouped-query heads, so K/V are repeated to the query heads. It masks by
segment equality only, so padding (segment 0) sees padding: those rows are garbage here as
on every path. Sequence lengths are padded to the kernel's tile. `interpret` runs it on CPU
for tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton_attention

from phi4_jax.model.attention.reference import pad_to

# JAX's default tiles: 128 x 128 forward, 32 x 32 for the fused backward (which keeps
# [block, H] slices of q, k, v, dO and the gradients on chip at once).
_FORWARD_BLOCK = 128
_BACKWARD_BLOCK = 32


def pallas_triton_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                            segment_ids_BT: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Packed causal self-attention (T == S); pads T up to the forward tile."""
    t, h = q_BTNH.shape[1], q_BTNH.shape[3]
    groups = q_BTNH.shape[2] // k_BSKH.shape[2]
    k_BSNH, v_BSNH = (jnp.repeat(x, groups, axis=2) for x in (k_BSKH, v_BSKH))
    q, k, v = (pad_to(x, _FORWARD_BLOCK, 1) for x in (q_BTNH, k_BSNH, v_BSNH))
    segments = pad_to(segment_ids_BT.astype(jnp.int32), _FORWARD_BLOCK, 1)
    blocks = triton_attention.BlockSizes(
        block_q=_FORWARD_BLOCK, block_k=_FORWARD_BLOCK, block_q_dkv=_BACKWARD_BLOCK,
        block_kv_dkv=_BACKWARD_BLOCK, block_q_dq=_BACKWARD_BLOCK, block_kv_dq=_BACKWARD_BLOCK)
    out = triton_attention.mha(q, k, v, segments, sm_scale=h**-0.5, causal=True,
                               block_sizes=blocks, interpret=interpret)
    return out[:, :t]

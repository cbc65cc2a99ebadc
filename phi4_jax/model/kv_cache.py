"""The key/value cache of batched decoding: every layer's keys and values, and which slots hold
tokens. Axes: L layers, B batch, S cache slots, K kv heads, H head dim."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from phi4_jax.model.config import ModelConfig


@struct.dataclass
class KVCache:
    """Keys/values of every layer for batched decoding; slots fill from index 0 upwards."""

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    segment_ids_BS: jax.Array  # 0 = empty slot or left padding
    index: jax.Array  # scalar int32: the next slot to write

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype),
                   jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

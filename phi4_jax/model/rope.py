"""Rotary position embeddings in the half-split (`rotate_half`) form of the Phi-3/Phi-4 release.

Only the first `rotary_dim` features of each head rotate (Phi-4: all 128; Phi-4-mini: 96);
the rest pass through. Angles are computed in float32 whatever the compute dtype.
"""

import jax
import jax.numpy as jnp


def inverse_frequencies(rotary_dim: int, theta: float) -> jax.Array:
    """theta^(-2i/rotary_dim) for i < rotary_dim/2, as float32."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (theta ** exponents)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, *, theta: float,
               rotary_dim: int) -> jax.Array:
    """Rotates pairs (i, i + rotary_dim/2) of each head by position * frequency."""
    angles_BTR = positions_BT[..., None].astype(jnp.float32) * inverse_frequencies(rotary_dim, theta)
    cos_BT1R = jnp.cos(angles_BTR)[:, :, None, :]
    sin_BT1R = jnp.sin(angles_BTR)[:, :, None, :]
    x_rot, x_pass = x_BTNH[..., :rotary_dim], x_BTNH[..., rotary_dim:]
    x1, x2 = jnp.split(x_rot.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1R - x2 * sin_BT1R, x2 * cos_BT1R + x1 * sin_BT1R], axis=-1)
    return jnp.concatenate([rotated.astype(x_BTNH.dtype), x_pass], axis=-1)

"""Rotary position embeddings in the half-split (`rotate_half`) form of the Phi-3/Phi-4 release,
and Phi-4-mini's LongRoPE rescaling of them.

Only the first `rotary_dim` features of each head rotate (Phi-4: all 128; Phi-4-mini: 96);
the rest pass through. Angles are computed in float32 whatever the compute dtype.

LongRoPE (Phi-3 long-context models, Phi-4-mini) divides each frequency by a factor: the
`short_factor`s while the forward's longest position stays within the original context, the
`long_factor`s once it exceeds it, and multiplies cos and sin by an attention factor at every
length. The switch is transformers' rule exactly: one choice per forward, long when
`max(positions) + 1 > original_max_positions` anywhere in the batch, so a packed or decoding
batch uses one set of frequencies for all its rows (a decode step past the original context
switches while earlier keys in the cache keep the short rotation, as upstream does).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LongRoPE:
    """Per-frequency rescale factors (rotary_dim / 2 each) and the lengths that choose them.

    `max_positions` is the extended context the long factors were fitted for; with
    `original_max_positions` it sets the default attention factor (`scale`).
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_positions: int
    max_positions: int
    attention_factor: float | None = None  # None: the default from the two lengths

    @property
    def scale(self) -> float:
        """The factor on cos and sin: given, or sqrt(1 + ln(s) / ln(original)) for
        s = max / original > 1 (LongRoPE's suggestion, transformers' default), else 1."""
        if self.attention_factor is not None:
            return self.attention_factor
        return default_attention_factor(self.max_positions, self.original_max_positions)


def default_attention_factor(max_positions: int, original_max_positions: int) -> float:
    """transformers' LongRoPE attention factor when the config gives none."""
    factor = max_positions / original_max_positions
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_positions))


def inverse_frequencies(rotary_dim: int, theta: float, factors: jax.Array | None = None
                        ) -> jax.Array:
    """1 / (factor_i * theta^(2i/rotary_dim)) for i < rotary_dim/2, as float32."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    wavelengths = theta ** exponents
    if factors is not None:
        wavelengths = factors * wavelengths
    return 1.0 / wavelengths


def _long_rope_frequencies(positions_BT: jax.Array, rotary_dim: int, theta: float,
                           long_rope: LongRoPE) -> jax.Array:
    """The inverse frequencies this forward uses: long factors past the original context."""
    longest = jnp.max(positions_BT) + 1
    factors = jnp.where(longest > long_rope.original_max_positions,
                        jnp.asarray(long_rope.long_factor, jnp.float32),
                        jnp.asarray(long_rope.short_factor, jnp.float32))
    return inverse_frequencies(rotary_dim, theta, factors)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, *, theta: float, rotary_dim: int,
               long_rope: LongRoPE | None = None) -> jax.Array:
    """Rotates pairs (i, i + rotary_dim/2) of each head by position * frequency."""
    if long_rope is None:
        inv_freq, scale = inverse_frequencies(rotary_dim, theta), 1.0
    else:
        inv_freq = _long_rope_frequencies(positions_BT, rotary_dim, theta, long_rope)
        scale = long_rope.scale
    angles_BTR = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos_BT1R = (jnp.cos(angles_BTR) * scale)[:, :, None, :]
    sin_BT1R = (jnp.sin(angles_BTR) * scale)[:, :, None, :]
    x_rot, x_pass = x_BTNH[..., :rotary_dim], x_BTNH[..., rotary_dim:]
    x1, x2 = jnp.split(x_rot.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1R - x2 * sin_BT1R, x2 * cos_BT1R + x1 * sin_BT1R], axis=-1)
    return jnp.concatenate([rotated.astype(x_BTNH.dtype), x_pass], axis=-1)

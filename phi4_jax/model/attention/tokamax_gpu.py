"""tokamax's Pallas Mosaic GPU flash attention (Hopper and later), packed documents passed
as the first key each query may see (`k_start`), on top of the causal mask.

Query i of a packed row sees keys [start of i's segment, i]: exactly the reference mask for
the packer's rows (segments contiguous, padding last; padding then sees padding, garbage as
on every path). The kernel serves grouped KV heads natively and skips key blocks wholly
before a query block's earliest segment start, as well as those in its future.

tokamax is optional (`pip install tokamax`; Python >= 3.12 for jax 0.11; 0.0.17 also imports
xprof, jaxtyping and tqdm as it loads, so a failed import is shown as it is), and its `Mask`
with `k_start` is not part of its public API (`tokamax._src`), so a tokamax release can move
it: the start-up numerics check (`check.py`) is what vouches for a given install.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids_BT: jax.Array) -> jax.Array:
    """[B, T] index of the first token of each token's segment (a run of equal ids)."""
    t = segment_ids_BT.shape[1]
    index_T = jnp.arange(t, dtype=jnp.int32)
    changed_BT = jnp.concatenate(
        [jnp.ones_like(segment_ids_BT[:, :1], bool),
         segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(changed_BT, index_T[None, :], 0), axis=1)


def tokamax_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                      segment_ids_BT: jax.Array) -> jax.Array:
    """Packed causal self-attention (T == S) with tokamax's Mosaic GPU kernel."""
    try:
        from tokamax._src.ops.attention import base  # pylint: disable=g-import-not-at-top
        from tokamax._src.ops.attention import pallas_mosaic_gpu  # pylint: disable=g-import-not-at-top
    except ImportError as error:  # tokamax missing, or one of its own imports (e.g. xprof)
        raise ImportError(
            f"model.attention_impl='tokamax': importing tokamax's Mosaic GPU attention failed: "
            f"{type(error).__name__}: {error} (pip install tokamax, Python >= 3.12, brings its "
            f"needs; benchmarks/gpu_wheels.sh carries them); or use cudnn or pallas_triton."
        ) from error
    k_start_B1T = segment_starts(segment_ids_BT.astype(jnp.int32))[:, None, :]
    kernel = pallas_mosaic_gpu.PallasMosaicGpuFlashAttention()
    return kernel(q_BTNH, k_BSKH, v_BSKH, mask=base.Mask(k_start=k_start_B1T, is_causal=True),
                  logits_scale=q_BTNH.shape[-1] ** -0.5)

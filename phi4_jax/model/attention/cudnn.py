"""cuDNN flash attention on NVIDIA GPUs, for packed rows and for rows of one document.

Packed rows go through the private packed ("ragged") layout of
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` (sm90+): per row, the start
of each segment [B, M+1] and its length [B, M], int32, -1 in unused slots. Its conventions,
read from JAX's source and its `test_sdpa_packed_layout` (jax 0.10-0.11):
  - offsets hold segment starts only, no end; the last column is always -1 (JAX turns the
    [B, M+1] slots into cuDNN's S+1 cumulative offsets, filling the tail with B*T itself);
  - tokens outside every segment (the row's padding) are computed by no one: their outputs
    and gradients are whatever the buffers held, so both are zeroed here;
  - M is compiled in, and the kernel keeps a float32 softmax-statistics buffer of shape
    (B*M, N, T) for the backward: M must stay small (`data.max_segments_per_row`, which the
    packer enforces), never T;
  - with M = 1 JAX skips the packed conversion altogether, so packed calls use M >= 2;
  - JAX up to 0.11.0 scales `kv_offsets` by the *query* head count (PR #39521 fixed it;
    jax 0.11.2 has the fix), so grouped KV heads would read the wrong keys. Whether the
    installed JAX has the fix is probed once on its own offset conversion
    (`needs_repeated_kv`); without it K/V are repeated to the query heads.
Rows known to hold one document (then padding) take the public
`jax.nn.dot_product_attention` instead: causal with per-row lengths, grouped heads native.
It leaves positions past a row's length the same way (cuDNN writes neither their outputs nor
their dQ/dK/dV), so there too q, k, v and the output are zeroed outside the real tokens: the
selects' gradients drop whatever cuDNN left there, and padding never reaches a weight's
gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn


def segment_offsets(segment_ids_BT: jax.Array, max_segments: int
                    ) -> tuple[jax.Array, jax.Array]:
    """Packed-layout slots of each row: segment starts [B, M+1] and lengths [B, M], -1 padded.

    Assumes the packer's rows: segments numbered 1..k (k <= M) in order, padding (0) last.
    Ids above M are left out of every slot (their tokens are then zeroed by the caller).
    """
    b = segment_ids_BT.shape[0]
    ids_M = jnp.arange(1, max_segments + 1, dtype=jnp.int32)
    counts_BM = jnp.sum(segment_ids_BT[:, :, None] == ids_M[None, None, :], axis=1,
                        dtype=jnp.int32)
    starts_BM = jnp.cumsum(counts_BM, axis=1) - counts_BM
    used_BM = counts_BM > 0
    lengths_BM = jnp.where(used_BM, counts_BM, -1)
    offsets_BM = jnp.where(used_BM, starts_BM, -1)
    unused_end_B1 = jnp.full((b, 1), -1, jnp.int32)
    return jnp.concatenate([offsets_BM, unused_end_B1], axis=1), lengths_BM


@functools.cache
def needs_repeated_kv() -> bool:
    """True when this JAX strides packed K/V offsets by the query heads (before PR #39521):
    probed on its own conversion of a 2-segment row with 2 query heads and 1 KV head.
    Any surprise (the private function moved or changed) answers True: repeating is always
    correct, only slower."""
    try:
        with jax.ensure_compile_time_eval():
            q, k = jnp.zeros((1, 4, 2, 8), jnp.bfloat16), jnp.zeros((1, 4, 1, 8), jnp.bfloat16)
            offsets, lengths = jnp.array([[0, 2, -1]], jnp.int32), jnp.array([[2, 2]], jnp.int32)
            kv_offsets = cudnn._fix_seqlen_offsets(  # pylint: disable=protected-access
                lengths, lengths, offsets, offsets, q, k)[3]
            return int(kv_offsets.ravel()[1]) != 2 * 1 * 8  # token 2 at 1 head of 8
    except Exception:  # pylint: disable=broad-except
        return True


def _zero_outside(x_BTNH: jax.Array, keep_BT: jax.Array) -> jax.Array:
    """Zeroes tokens no segment covers; as a select, its gradient drops theirs too."""
    return jnp.where(keep_BT[:, :, None, None], x_BTNH, jnp.zeros((), x_BTNH.dtype))


def cudnn_packed_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                           segment_ids_BT: jax.Array, *, max_segments: int) -> jax.Array:
    """Causal attention within each packed segment through cuDNN's packed layout (sm90+)."""
    if max_segments < 2:
        raise ValueError(f"max_segments={max_segments}: the packed layout needs at least 2 "
                         f"slots; rows of one document take cudnn_single_document_attention.")
    covered_BT = (segment_ids_BT > 0) & (segment_ids_BT <= max_segments)
    if needs_repeated_kv():
        groups = q_BTNH.shape[2] // k_BSKH.shape[2]
        k_BSKH, v_BSKH = (jnp.repeat(x, groups, axis=2) for x in (k_BSKH, v_BSKH))
    q_BTNH, k_BSKH, v_BSKH = (_zero_outside(x, covered_BT) for x in (q_BTNH, k_BSKH, v_BSKH))
    offsets, lengths = segment_offsets(segment_ids_BT.astype(jnp.int32), max_segments)
    out_BTNH = cudnn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
        kv_offsets=offsets, scale=q_BTNH.shape[-1] ** -0.5,
        mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    return _zero_outside(out_BTNH, covered_BT)


def cudnn_single_document_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                                    segment_ids_BT: jax.Array) -> jax.Array:
    """Causal attention over rows of one document followed by padding (public cuDNN API).

    Only valid when no row holds two documents: the lengths mask the padding, not documents.
    """
    real_BT = segment_ids_BT > 0
    lengths_B = jnp.sum(real_BT, axis=1, dtype=jnp.int32)
    q_BTNH, k_BSKH, v_BSKH = (_zero_outside(x, real_BT) for x in (q_BTNH, k_BSKH, v_BSKH))
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, is_causal=True, query_seq_lengths=lengths_B,
        key_value_seq_lengths=lengths_B, implementation="cudnn")
    return _zero_outside(out_BTNH, real_BT)

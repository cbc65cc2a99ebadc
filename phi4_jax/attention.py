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

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from phi4_jax import sharding as sharding_lib

_MASKED = -1e30  # finite, so fully masked rows stay NaN-free on every path


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


def _mask(q_seg_BT, kv_seg_BS, q_index_T, kv_index_S):
    """[B, 1, 1, T, S] boolean: causal, same segment, key not padding."""
    causal_TS = kv_index_S[None, :] <= q_index_T[:, None]
    same_BTS = (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]) & (kv_seg_BS[:, None, :] != 0)
    return (same_BTS & causal_TS)[:, None, None]


def _group(q_BTNH, num_kv_heads):
    b, t, n, h = q_BTNH.shape
    return q_BTNH.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def xla_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, kv_segment_ids, q_offset=0):
    """Reference path: full logits, float32 softmax."""
    q_BTKGH = _group(q_BTNH, k_BSKH.shape[2])
    scale = q_BTNH.shape[-1] ** -0.5
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    mask = _mask(q_segment_ids, kv_segment_ids, jnp.arange(t) + q_offset, jnp.arange(s))
    probs_BKGTS = jax.nn.softmax(jnp.where(mask, logits_BKGTS, _MASKED), axis=-1)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                           preferred_element_type=jnp.float32)
    return out_BTKGH.reshape(q_BTNH.shape).astype(q_BTNH.dtype)


# --- blockwise (flash-style) -------------------------------------------------------------

def _pad_to(x, multiple, axis):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _block_logits(q_blk, k_blk, q_seg, kv_seg, q_start, kv_start, scale):
    """Masked float32 logits [B, K, G, bq, bk] for one (query block, key block) pair."""
    logits = jnp.einsum("btkgh,bskh->bkgts", q_blk, k_blk, preferred_element_type=jnp.float32)
    mask = _mask(q_seg, kv_seg, q_start + jnp.arange(q_blk.shape[1]),
                 kv_start + jnp.arange(k_blk.shape[1]))
    return jnp.where(mask, logits * scale, _MASKED)


def _split_blocks(x, block, axis=1):
    """[B, T, ...] -> [T / block, B, block, ...] for scanning over blocks."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge_blocks(x, axis=1):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _unless_future(kv_start, q_start, q_block, update, carry, xs):
    """Applies `update` unless the key block lies wholly after the query block: causal
    masking zeroes those blocks, so skipping them halves the work on long sequences."""
    return jax.lax.cond(kv_start <= q_start + q_block - 1, update, lambda c, _: c, carry, xs)


def _flash_forward(q, k, v, q_seg, kv_seg, block):
    """Online-softmax forward; returns the output [B,T,K,G,H] and log-sum-exp [B,K,G,T]."""
    scale = q.shape[-1] ** -0.5
    k_blocks, v_blocks, kv_seg_blocks = (_split_blocks(x, block) for x in (k, v, kv_seg))

    def one_query_block(args):
        q_blk, q_seg_blk, q_start = args
        b, bq, kh, g, h = q_blk.shape

        def update(carry, kv):
            acc, row_max, row_sum = carry
            k_blk, v_blk, kv_seg_blk, kv_start = kv
            logits = _block_logits(q_blk, k_blk, q_seg_blk, kv_seg_blk, q_start, kv_start, scale)
            new_max = jnp.maximum(row_max, logits.max(-1))
            probs = jnp.exp(logits - new_max[..., None])
            correction = jnp.exp(row_max - new_max)
            row_sum = row_sum * correction + probs.sum(-1)
            pv = jnp.einsum("bkgts,bskh->bkgth", probs.astype(v_blk.dtype), v_blk,
                            preferred_element_type=jnp.float32)
            return acc * correction[..., None] + pv, new_max, row_sum

        def step(carry, kv):
            return _unless_future(kv[3], q_start, bq, update, carry, kv), None

        init = (jnp.zeros((b, kh, g, bq, h), jnp.float32),
                jnp.full((b, kh, g, bq), _MASKED, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32))
        kv_starts = jnp.arange(k_blocks.shape[0]) * block
        (acc, row_max, row_sum), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, kv_seg_blocks,
                                                               kv_starts))
        out = acc / row_sum[..., None]
        return jnp.einsum("bkgth->btkgh", out), row_max + jnp.log(row_sum)

    q_starts = jnp.arange(q.shape[1] // block) * block
    out, lse = jax.lax.map(one_query_block, (_split_blocks(q, block), _split_blocks(q_seg, block),
                                             q_starts))
    return _merge_blocks(out), _merge_blocks(lse, axis=3)


def _flash_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, block):
    """Recomputes block probabilities from the log-sum-exp; never holds [T, S]."""
    scale = q.shape[-1] ** -0.5
    delta = jnp.einsum("btkgh,btkgh->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    q_blocks, q_seg_blocks, d_out_blocks = (_split_blocks(x, block) for x in (q, q_seg, d_out))
    lse_blocks, delta_blocks = (_split_blocks(x, block, axis=3) for x in (lse, delta))
    k_blocks, v_blocks, kv_seg_blocks = (_split_blocks(x, block) for x in (k, v, kv_seg))
    starts = jnp.arange(q.shape[1] // block) * block

    def grad_pieces(q_blk, q_seg_blk, q_start, d_out_blk, lse_blk, delta_blk, k_blk, v_blk,
                    kv_seg_blk, kv_start):
        logits = _block_logits(q_blk, k_blk, q_seg_blk, kv_seg_blk, q_start, kv_start, scale)
        probs = jnp.exp(logits - lse_blk[..., None])
        d_probs = jnp.einsum("btkgh,bskh->bkgts", d_out_blk.astype(jnp.float32),
                             v_blk.astype(jnp.float32))
        d_logits = probs * (d_probs - delta_blk[..., None]) * scale
        return probs, d_logits

    def dq_for_query_block(args):
        q_blk, q_seg_blk, q_start, d_out_blk, lse_blk, delta_blk = args

        def update(dq, kv):
            k_blk, v_blk, kv_seg_blk, kv_start = kv
            _, d_logits = grad_pieces(q_blk, q_seg_blk, q_start, d_out_blk, lse_blk, delta_blk,
                                      k_blk, v_blk, kv_seg_blk, kv_start)
            return dq + jnp.einsum("bkgts,bskh->btkgh", d_logits, k_blk.astype(jnp.float32))

        def step(dq, kv):
            return _unless_future(kv[3], q_start, block, update, dq, kv), None

        dq, _ = jax.lax.scan(step, jnp.zeros(q_blk.shape, jnp.float32),
                             (k_blocks, v_blocks, kv_seg_blocks, starts))
        return dq

    def dkv_for_key_block(args):
        k_blk, v_blk, kv_seg_blk, kv_start = args

        def update(carry, qs):
            dk, dv = carry
            q_blk, q_seg_blk, q_start, d_out_blk, lse_blk, delta_blk = qs
            probs, d_logits = grad_pieces(q_blk, q_seg_blk, q_start, d_out_blk, lse_blk, delta_blk,
                                          k_blk, v_blk, kv_seg_blk, kv_start)
            dv = dv + jnp.einsum("bkgts,btkgh->bskh", probs, d_out_blk.astype(jnp.float32))
            dk = dk + jnp.einsum("bkgts,btkgh->bskh", d_logits, q_blk.astype(jnp.float32))
            return dk, dv

        def step(carry, qs):
            return _unless_future(kv_start, qs[2], block, update, carry, qs), None

        zeros = jnp.zeros(k_blk.shape, jnp.float32)
        (dk, dv), _ = jax.lax.scan(step, (zeros, zeros), (q_blocks, q_seg_blocks, starts,
                                                          d_out_blocks, lse_blocks, delta_blocks))
        return dk, dv

    dq = jax.lax.map(dq_for_query_block, (q_blocks, q_seg_blocks, starts, d_out_blocks, lse_blocks,
                                          delta_blocks))
    dk, dv = jax.lax.map(dkv_for_key_block, (k_blocks, v_blocks, kv_seg_blocks, starts))
    return (_merge_blocks(dq).astype(q.dtype), _merge_blocks(dk).astype(k.dtype),
            _merge_blocks(dv).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, block):
    return _flash_forward(q, k, v, q_seg, kv_seg, block)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, block):
    out, lse = _flash_forward(q, k, v, q_seg, kv_seg, block)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(block, residuals, d_out):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    dq, dk, dv = _flash_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, block)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, kv_segment_ids, *,
                        block_size: int = 512):
    """Memory-efficient self-attention (T == S); pads T up to a multiple of the block."""
    t = q_BTNH.shape[1]
    block = min(block_size, t)
    q = _pad_to(_group(q_BTNH, k_BSKH.shape[2]), block, 1)
    k, v = _pad_to(k_BSKH, block, 1), _pad_to(v_BSKH, block, 1)
    q_seg, kv_seg = _pad_to(q_segment_ids, block, 1), _pad_to(kv_segment_ids, block, 1)
    out = _flash(q, k, v, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32), block)
    return out[:, :t].reshape(q_BTNH.shape).astype(q_BTNH.dtype)


# --- cuDNN (NVIDIA) ----------------------------------------------------------------------

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


# --- splash (TPU) ------------------------------------------------------------------------

_TPU_LANES = 128  # the kernel tiles queries and keys in multiples of the TPU lane width


def splash_block(seq_len: int, block_size: int) -> int:
    """The kernel's query and key tile: the configured block, capped at T rounded up to lanes."""
    if block_size % _TPU_LANES:
        raise ValueError(
            f"model.attention_block_size={block_size}: splash attention tiles by multiples of "
            f"{_TPU_LANES} (the TPU lane width); set it to 128, 256, 512 or 1024.")
    return min(block_size, -(-seq_len // _TPU_LANES) * _TPU_LANES)


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, seq_len: int, block: int, interpret: bool):
    """A causal splash kernel over [N, T, H]; its block sparsity is worked out once per shape.

    Built eagerly even inside a trace, so the cached kernel holds constants, not tracers.
    """
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_len, seq_len))] * num_heads)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     segment_ids_BT: jax.Array, *, block_size: int = 512,
                     interpret: bool = False) -> jax.Array:
    """Packed causal self-attention (T == S) with the TPU splash kernel; pads T to the block.

    XLA cannot partition the kernel's custom call, so under a multi-device mesh it runs in a
    `shard_map` over the batch rows and heads each device holds, laid out by the active
    `logical_rules`. The kernel masks by segment equality, so padding (segment 0) sees only
    padding, never a document; those rows are garbage on every path. `interpret` runs it on
    CPU for tests.
    """
    local = functools.partial(_splash_local, block_size=block_size, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    rules = sharding_lib.active_rules()
    if rules is None:
        raise ValueError(
            f"splash attention under the {dict(mesh.shape)} mesh needs the logical rules to "
            f"know which batch rows and heads each device holds (the kernel cannot be "
            f"partitioned by XLA); trace the model inside sharding.logical_rules(mesh.rules).")
    q_spec, kv_spec, seg_spec = _splash_specs(mesh, rules, q_BTNH.shape, k_BSKH.shape[2])
    # check_vma=False: the kernel's pallas_call declares outputs without varying-axis types.
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q_BTNH, k_BSKH, v_BSKH,
                                                            segment_ids_BT)


def _splash_specs(mesh, rules, q_shape, num_kv_heads):
    """Per-device layouts of q, k/v and segment ids; checks each device can run alone.

    The sequence and head dim must be whole on every device (no context parallelism here).
    Query head n reads kv head n // G, so with N and K split contiguously over the same axes
    local query heads find their kv heads locally iff the split count divides K.
    """
    q_spec = sharding_lib.logical_to_spec(("batch", "seq", "q_heads", "head_dim"), rules)
    kv_spec = sharding_lib.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), rules)
    seg_spec = sharding_lib.logical_to_spec(("batch", "seq"), rules)
    for dim, name in ((1, "seq"), (3, "head_dim")):
        if split_axes := sharding_lib.split_axes(q_spec[dim], mesh):
            raise ValueError(
                f"mesh.rules split {name!r} over mesh axes {split_axes}, but splash attention "
                f"needs whole sequences and head dims on each device (no context parallelism "
                f"yet); map {name!r} to None in mesh.rules or use model.attention_impl=xla.")
    head_axes = sharding_lib.split_axes(q_spec[2], mesh)
    if head_axes != sharding_lib.split_axes(kv_spec[2], mesh):
        raise ValueError(
            f"mesh.rules split q_heads over {head_axes} but kv_heads over "
            f"{sharding_lib.split_axes(kv_spec[2], mesh)}; splash attention needs both on the "
            f"same mesh axes so each device holds the kv heads its query heads read.")
    head_splits = math.prod(mesh.shape[axis] for axis in head_axes)
    if num_kv_heads % head_splits:
        raise ValueError(
            f"mesh.rules split heads {head_splits} ways over {head_axes}, which does not divide "
            f"the {num_kv_heads} kv heads; make the tensor axis a divisor of num_kv_heads or "
            f"map q_heads and kv_heads to None in mesh.rules.")
    batch_splits = math.prod(mesh.shape[a] for a in sharding_lib.split_axes(q_spec[0], mesh))
    if q_shape[0] % batch_splits:
        raise ValueError(
            f"batch of {q_shape[0]} rows does not split over the {batch_splits} devices that "
            f"mesh.rules give the batch; use a multiple of {batch_splits} rows.")
    return q_spec, kv_spec, seg_spec


def _splash_local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, block_size, interpret):
    """The kernel on the rows and heads at hand, one batch row at a time."""
    t, h = q_BTNH.shape[1], q_BTNH.shape[3]
    block = splash_block(t, block_size)
    kernel = _splash_kernel(q_BTNH.shape[2], t + -t % block, block, interpret)
    q_BNTH = jnp.einsum("btnh->bnth", _pad_to(q_BTNH * h**-0.5, block, 1))  # kernel does not scale
    k_BKSH, v_BKSH = (jnp.einsum("bskh->bksh", _pad_to(x, block, 1)) for x in (k_BSKH, v_BSKH))
    seg_BT = _pad_to(segment_ids_BT.astype(jnp.int32), block, 1)

    def one_row(q_NTH, k_KSH, v_KSH, seg_T):
        return kernel(q_NTH, k_KSH, v_KSH, splash.SegmentIds(q=seg_T, kv=seg_T))

    out_BNTH = jax.vmap(one_row)(q_BNTH, k_BKSH, v_BKSH, seg_BT)
    return jnp.einsum("bnth->btnh", out_BNTH)[:, :t].astype(q_BTNH.dtype)

"""The Pallas splash-attention kernel on TPU: packed documents passed as segment ids, grouped
KV heads served natively; under a mesh it runs per device in a `shard_map` over the batch
rows and heads the logical rules give each device. Tested on CPU in interpret mode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from phi4_jax.model.attention.reference import pad_to
from phi4_jax.parallel import sharding as sharding_lib

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
    q_BNTH = jnp.einsum("btnh->bnth", pad_to(q_BTNH * h**-0.5, block, 1))  # kernel does not scale
    k_BKSH, v_BKSH = (jnp.einsum("bskh->bksh", pad_to(x, block, 1)) for x in (k_BSKH, v_BSKH))
    seg_BT = pad_to(segment_ids_BT.astype(jnp.int32), block, 1)

    def one_row(q_NTH, k_KSH, v_KSH, seg_T):
        return kernel(q_NTH, k_KSH, v_KSH, splash.SegmentIds(q=seg_T, kv=seg_T))

    out_BNTH = jax.vmap(one_row)(q_BNTH, k_BKSH, v_BKSH, seg_BT)
    return jnp.einsum("bnth->btnh", out_BNTH)[:, :t].astype(q_BTNH.dtype)

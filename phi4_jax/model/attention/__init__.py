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
  - `cudnn` (NVIDIA): cuDNN flash attention. Packed rows go through cuDNN's packed layout
    with at most `max_segments_per_row` segment slots per row (the packer's bound); with
    `max_segments_per_row=1` (rows of one document: unpacked data, preference pairs) the
    public `jax.nn.dot_product_attention` with per-row lengths.
  - `pallas_triton` (NVIDIA): JAX's Pallas Triton flash attention with segment ids.
  - `tokamax` (NVIDIA Hopper+): tokamax's Mosaic GPU kernel with a per-query first key.
  - `splash` (TPU): the Pallas splash kernel with segment ids; under a mesh it runs per
    device in a `shard_map` on the batch rows and heads the logical rules give each device.
Under context parallelism (the rules split `seq` over a mesh axis of size > 1) self-attention
takes `context_parallel`: all-gathered K/V, blockwise locally, whatever `impl` says.
Softmax and its statistics are always float32. `auto` is resolved once, at start-up: the
fastest of `auto_candidates` (cudnn then xla then blockwise on NVIDIA GPUs, splash first on
TPUs, xla or blockwise on CPU) that takes the compute dtype (cuDNN: bf16/fp16 only) and whose
memory estimate fits the device (`train.state.check_memory`, which logs every rejection).
Fused kernels are checked against `xla` before training starts (`check.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phi4_jax.model.attention import context_parallel
from phi4_jax.model.attention.blockwise import blockwise_attention
from phi4_jax.model.attention.reference import xla_attention

IMPLS = ("xla", "blockwise", "cudnn", "pallas_triton", "tokamax", "splash")
# Kernels that are not plain JAX: their numerics are checked at start-up, and each needs
# its accelerator.
FUSED_IMPLS = {"cudnn": "gpu", "pallas_triton": "gpu", "tokamax": "gpu", "splash": "tpu"}


# Kernels that take only some compute dtypes: cuDNN's flash attention runs bf16/fp16 only.
KERNEL_DTYPES = {"cudnn": ("bfloat16", "float16")}
# `auto`'s choices per accelerator, fastest first (GPU_NOTES, one H200 at T=4096, forward +
# backward: cudnn 1.66 ms, xla 13.9 ms, blockwise 24.9 ms). pallas_triton (no grouped heads,
# deprecated upstream) and tokamax (an optional install) are chosen by name only.
AUTO_ORDER = {"gpu": ("cudnn", "xla", "blockwise"), "tpu": ("splash", "xla", "blockwise")}


def auto_candidates(seq_len: int, block_size: int, backend: str | None = None
                    ) -> tuple[str, ...]:
    """What `auto` may stand for on a backend, fastest first; on CPU xla materializes
    [N, T, S] logits, so rows longer than two blocks try blockwise first."""
    backend = backend or jax.default_backend()
    if backend in AUTO_ORDER:
        return AUTO_ORDER[backend]
    return ("xla", "blockwise") if seq_len <= 2 * block_size else ("blockwise", "xla")


def dtype_refusal(impl: str, compute_dtype: str) -> str:
    """Why `impl` cannot run in `compute_dtype`; empty when it can."""
    allowed = KERNEL_DTYPES.get(impl, ())
    if allowed and compute_dtype not in allowed:
        return f"{impl} takes {' or '.join(allowed)} only, not {compute_dtype}"
    return ""


def resolve_impl(impl: str, seq_len: int, block_size: int, compute_dtype: str,
                 backend: str | None = None) -> str:
    """The implementation `auto` stands for when memory is not weighed: the fastest candidate
    that takes the compute dtype. Start-up (`train.state.check_memory`) also drops the
    candidates whose memory estimate does not fit."""
    if impl != "auto":
        return impl
    return next(c for c in auto_candidates(seq_len, block_size, backend)
                if not dtype_refusal(c, compute_dtype))


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
              q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_offset: jax.Array | int = 0,
              impl: str = "auto", block_size: int = 512,
              max_segments_per_row: int = 32) -> jax.Array:
    """Masked causal attention; returns [B, T, N, H] in the query dtype.

    `max_segments_per_row` bounds the documents any row holds (the packer guarantees it);
    the cudnn path compiles it in, and 1 selects its single-document path.
    """
    compute_dtype = jnp.dtype(q_BTNH.dtype).name
    impl = resolve_impl(impl, q_BTNH.shape[1], block_size, compute_dtype)
    if impl not in IMPLS:
        raise ValueError(f"model.attention_impl={impl!r}: choose auto or one of {IMPLS}.")
    self_attention = (q_BTNH.shape[1] == k_BSKH.shape[1] and isinstance(q_offset, int)
                      and not q_offset)
    if self_attention and context_parallel.sequence_shards() > 1:
        return context_parallel.context_parallel_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids,
                                                           block_size=block_size)
    if impl == "xla" or not self_attention:
        # Cached decoding (short queries against a long cache) always takes the plain path.
        return xla_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, kv_segment_ids, q_offset)
    if impl == "blockwise":
        return blockwise_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, kv_segment_ids,
                                   block_size=block_size)
    _check_backend(impl)
    if refusal := dtype_refusal(impl, compute_dtype):
        raise ValueError(f"model.attention_impl={impl!r}: {refusal}; set "
                         f"--config.model.compute_dtype=bfloat16 or attention_impl=auto.")
    return fused_attention(impl, q_BTNH, k_BSKH, v_BSKH, q_segment_ids,
                           block_size=block_size, max_segments_per_row=max_segments_per_row)


def fused_attention(impl: str, q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                    segment_ids_BT: jax.Array, *, block_size: int = 512,
                    max_segments_per_row: int = 32, interpret: bool = False) -> jax.Array:
    """Packed causal self-attention (T == S) with one of the `FUSED_IMPLS` kernels.

    Imports each kernel's module only when it is asked for: the GPU and TPU kernels pull in
    their Pallas backends. `interpret` runs the Pallas kernels on CPU (tests).
    """
    # pylint: disable=g-import-not-at-top
    if impl == "cudnn":
        from phi4_jax.model.attention import cudnn
        if max_segments_per_row == 1:
            return cudnn.cudnn_single_document_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
        return cudnn.cudnn_packed_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT,
                                            max_segments=max_segments_per_row)
    if impl == "pallas_triton":
        from phi4_jax.model.attention.pallas_triton import pallas_triton_attention
        return pallas_triton_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT,
                                       interpret=interpret)
    if impl == "tokamax":
        from phi4_jax.model.attention.tokamax_gpu import tokamax_attention
        return tokamax_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    if impl == "splash":
        from phi4_jax.model.attention.splash import splash_attention
        return splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, block_size=block_size,
                                interpret=interpret)
    raise ValueError(f"{impl!r} is not a fused attention kernel; choose one of "
                     f"{tuple(FUSED_IMPLS)}.")


def _check_backend(impl: str) -> None:
    """Refuses a kernel off its accelerator with what to use instead."""
    needed, backend = FUSED_IMPLS[impl], jax.default_backend()
    if backend != needed:
        device = {"gpu": "an NVIDIA GPU", "tpu": "a TPU"}[needed]
        raise ValueError(f"model.attention_impl={impl!r} needs {device}, but the backend is "
                         f"{backend!r}; use auto, xla or blockwise here.")

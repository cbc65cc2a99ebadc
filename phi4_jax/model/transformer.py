"""The Phi-4 decoder in Flax NNX: pre-norm blocks of GQA attention and a SwiGLU MLP.

Axes: B batch, T query length, S key length, N query heads, K kv heads, H head dim,
D model dim, F ffn dim, V vocab, L layers (J adapters, R adapter rank: `model.lora`).

Layers are stacked on a leading `layers` axis and run under `jax.lax.scan`, so compile time
and remat are per layer, not per model (unrolled on CPU without remat: `scan_unroll`). Every
parameter carries logical axis names (`out_sharding` metadata); `phi4_jax.sharding` maps them
onto the mesh. Training code treats the model as `graphdef` + parameter pytree (`nnx.split` /
`nnx.merge`), so a train step is a pure function of arrays. With `cfg.lora`, each adapted
projection adds its adapter's low-rank update (`model.lora`); `adapter_ids` [B] picks each
row's adapter (None: adapter 0 for every row; a negative id: none for that row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from phi4_jax.model import attention as attention_lib
from phi4_jax.model import lora
from phi4_jax.model.attention import context_parallel
from phi4_jax.model.config import ModelConfig
from phi4_jax.model.kv_cache import KVCache
from phi4_jax.model.rope import apply_rope
from phi4_jax.parallel.sharding import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float,
           dtype: str) -> nnx.Param:
    value = jax.random.normal(rngs.params(), shape, jnp.float32) * std
    return nnx.Param(value.astype(dtype), out_sharding=names, eager_sharding=False)


def _ones(dim: int, dtype: str) -> nnx.Param:
    return nnx.Param(jnp.ones((dim,), dtype), out_sharding=("norm",), eager_sharding=False)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, the statistics in float32."""

    def __init__(self, cfg: ModelConfig):
        self.scale = _ones(cfg.d_model, cfg.param_dtype)
        self.eps = cfg.norm_eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x32 = x_BTD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x_BTD.dtype) * self.scale[...].astype(x_BTD.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and no biases."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h, std, dt = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                               cfg.init_std, cfg.param_dtype)
        self.q_DNH = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), std, dt)
        self.k_DKH = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, dt)
        self.v_DKH = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, dt)
        self.o_NHD = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), std, dt)
        self.adapters = lora.adapters_for("attn", cfg, rngs)
        self.cfg = cfg

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache_kv=None, adapter_ids_B=None):
        cfg, dt = self.cfg, x_BTD.dtype

        def project(kernel, equation, target, x):
            return lora.project(x, kernel, equation, self.adapters, target, adapter_ids_B,
                                plain_weight_grad=plain_weight_grads(cfg))

        q_BTNH = project(self.q_DNH, "btd,dnh->btnh", "q", x_BTD)
        k_BTKH = project(self.k_DKH, "btd,dkh->btkh", "k", x_BTD)
        v_BTKH = project(self.v_DKH, "btd,dkh->btkh", "v", x_BTD)
        q_BTNH, k_BTKH, v_BTKH = (checkpoint_name(a, "qkv_proj")
                                  for a in (q_BTNH, k_BTKH, v_BTKH))
        rope = dict(theta=cfg.rope_theta, rotary_dim=cfg.rotary_dim, long_rope=cfg.long_rope)
        q_BTNH = constrain(apply_rope(q_BTNH, positions_BT, **rope),
                           ("batch", "seq", "q_heads", "head_dim"))
        k_BTKH = constrain(apply_rope(k_BTKH, positions_BT, **rope),
                           ("batch", "seq", "kv_heads", "head_dim"))
        if cache_kv is None:
            k_all, v_all, kv_segments, offset = k_BTKH, v_BTKH, segment_ids_BT, 0
            new_cache_kv = None
        else:
            k_cache, v_cache, kv_segments, offset = cache_kv
            k_all = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BTKH.astype(k_cache.dtype),
                                                        offset, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BTKH.astype(v_cache.dtype),
                                                        offset, axis=1)
            new_cache_kv = (k_all, v_all)
        out_BTNH = attention_lib.attention(
            q_BTNH, k_all.astype(dt), v_all.astype(dt), q_segment_ids=segment_ids_BT,
            kv_segment_ids=kv_segments, q_offset=offset, impl=cfg.attention_impl,
            block_size=cfg.attention_block_size, max_segments_per_row=cfg.max_segments_per_row)
        out_BTD = project(self.o_NHD, "btnh,nhd->btd", "o", out_BTNH)
        return out_BTD, new_cache_kv


def plain_weight_grads(cfg: ModelConfig) -> bool:
    """Whether the projections make their kernels' gradients as plain dots
    (`lora.einsum_plain_weight_grad`): on CPU, where XLA's transposing dot is slow, and without
    layer remat, whose policies look for the dots that the custom gradient hides."""
    return cfg.remat_policy == "none" and jax.default_backend() == "cpu"


def scan_unroll(cfg: ModelConfig) -> int:
    """Layers per iteration of the layer loop (`model.scan_unroll`, 0 resolved here). On CPU
    without remat, all of them: the rolled loop copies each layer's weights out of the stack
    and its saved activations and gradients into stacks, ~0.9x the step time unrolled
    (benchmarks/RESULTS_cpu.md) for ~1.7x the compile time. Elsewhere 1: a 40-layer model
    compiles one layer, and remat's recompute stays in the loop."""
    if cfg.scan_unroll:
        return cfg.scan_unroll
    return cfg.num_layers if plain_weight_grads(cfg) else 1


class MLP(nnx.Module):
    """SwiGLU: down(up(x) * silu(gate(x)))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std, dt = cfg.d_model, cfg.ffn_dim, cfg.init_std, cfg.param_dtype
        self.gate_DF = _param(rngs, (d, f), ("embed", "mlp"), std, dt)
        self.up_DF = _param(rngs, (d, f), ("embed", "mlp"), std, dt)
        self.down_FD = _param(rngs, (f, d), ("mlp", "embed"), std, dt)
        self.adapters = lora.adapters_for("mlp", cfg, rngs)
        self.cfg = cfg

    def __call__(self, x_BTD: jax.Array, adapter_ids_B: jax.Array | None = None) -> jax.Array:
        def project(kernel, equation, target, x):
            return lora.project(x, kernel, equation, self.adapters, target, adapter_ids_B,
                                plain_weight_grad=plain_weight_grads(self.cfg))

        gate_BTF = project(self.gate_DF, "btd,df->btf", "gate", x_BTD)
        up_BTF = project(self.up_DF, "btd,df->btf", "up", x_BTD)
        hidden_BTF = constrain(up_BTF * jax.nn.silu(gate_BTF), ("batch", "seq", "mlp"))
        return project(self.down_FD, "btf,fd->btd", "down", hidden_BTF)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache_kv=None, adapter_ids_B=None):
        attn_out, new_cache_kv = self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT,
                                           cache_kv, adapter_ids_B)
        x_BTD = constrain(x_BTD + attn_out, ("batch", "seq", "embed"))
        x_BTD = constrain(x_BTD + self.mlp(self.mlp_norm(x_BTD), adapter_ids_B),
                          ("batch", "seq", "embed"))
        return x_BTD, new_cache_kv


class Transformer(nnx.Module):
    """Embedding, L stacked blocks, final norm and (untied or tied) LM head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_VD = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                               cfg.init_std, cfg.param_dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head_DV = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                     cfg.init_std, cfg.param_dtype)

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array,
                 segment_ids_BT: jax.Array, adapter_ids_B: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, T, V] of a packed batch (training and scoring)."""
        return self.forward(tokens_BT, positions_BT, segment_ids_BT,
                            adapter_ids_B=adapter_ids_B)[0]

    def forward(self, tokens_BT, positions_BT, segment_ids_BT, cache: KVCache | None = None,
                adapter_ids_B=None):
        """Logits and, when decoding with a cache, the cache with these tokens written in."""
        x_BTD, new_cache = self.hidden(tokens_BT, positions_BT, segment_ids_BT, cache,
                                       adapter_ids_B)
        return self.logits(x_BTD), new_cache

    def hidden(self, tokens_BT, positions_BT, segment_ids_BT, cache: KVCache | None = None,
               adapter_ids_B=None):
        """The final-normed hidden states [B, T, D] (and the updated cache when decoding).

        Training losses take these with `head_DV()` and form the logits chunk by chunk
        (`losses.lm.chunked_token_log_probs`), never holding [B, T, V] at once.
        """
        cfg = self.cfg
        shards = context_parallel.sequence_shards() if cache is None else 1
        if shards > 1:  # each device's chunks of the row together, once, for every layer
            order = context_parallel.load_balanced_order(tokens_BT.shape[1], shards)
            tokens_BT, positions_BT, segment_ids_BT = (
                x[:, order] for x in (tokens_BT, positions_BT, segment_ids_BT))
        # Gather from the whole table, as FSDP gathers every weight before use: from a sharded
        # table the partitioner cannot reach batch-sharded rows and replicates them instead.
        table_VD = constrain(self.embed_VD[...].astype(cfg.compute_dtype), (None, None))
        x_BTD = table_VD[tokens_BT]
        x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
        if cache is None:
            x_BTD = self._run_blocks(x_BTD, positions_BT, segment_ids_BT, adapter_ids_B)
            new_cache = None
        else:
            x_BTD, new_cache = self._run_blocks_cached(x_BTD, positions_BT, segment_ids_BT, cache,
                                                       adapter_ids_B)
        x_BTD = self.final_norm(x_BTD)
        if shards > 1:
            x_BTD = constrain(x_BTD[:, np.argsort(order)], ("batch", "seq", "embed"))
        return x_BTD, new_cache

    def head_DV(self) -> jax.Array:
        """The output projection in the parameter dtype: the LM head, or the tied embedding."""
        return self.embed_VD[...].T if self.cfg.tie_embeddings else self.lm_head_DV[...]

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Float32 logits [B, T, V] of final hidden states."""
        logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, self.head_DV().astype(x_BTD.dtype),
                                preferred_element_type=jnp.float32)
        return constrain(logits_BTV, ("batch", "seq", "vocab"))

    def _run_blocks(self, x_BTD, positions_BT, segment_ids_BT, adapter_ids_B=None):
        # A plain lax.scan over the split layer state: pure JAX, so it traces the same under
        # jit, grad or neither, whichever level the parameters come from.
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(x, positions_BT, segment_ids_BT, adapter_ids_B=adapter_ids_B)[0], None

        unroll = scan_unroll(self.cfg)
        if self.cfg.remat_policy != "none":
            # Inside a rolled loop nothing can merge the recompute with the forward; unrolled,
            # XLA's CSE would, and remat would save nothing.
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.cfg.remat_policy],
                                   prevent_cse=unroll > 1)
        return jax.lax.scan(layer, x_BTD, stacked, unroll=unroll)[0]

    def _run_blocks_cached(self, x_BTD, positions_BT, segment_ids_BT, cache: KVCache,
                           adapter_ids_B):
        t = x_BTD.shape[1]
        kv_segments = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids_BS, segment_ids_BT,
                                                          cache.index, axis=1)
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, xs):
            layer_state, k_cache, v_cache = xs
            block = nnx.merge(graphdef, layer_state)
            x, k_v = block(x, positions_BT, segment_ids_BT,
                           (k_cache, v_cache, kv_segments, cache.index), adapter_ids_B)
            return x, k_v

        x_BTD, (k_LBSKH, v_LBSKH) = jax.lax.scan(layer, x_BTD,
                                                 (stacked, cache.k_LBSKH, cache.v_LBSKH),
                                                 unroll=scan_unroll(self.cfg))
        return x_BTD, KVCache(k_LBSKH, v_LBSKH, kv_segments, cache.index + t)


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A freshly initialized model (use `nnx.eval_shape` for shapes without allocation)."""
    return Transformer(cfg, nnx.Rngs(params=seed))

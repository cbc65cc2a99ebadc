"""Model numerics: sizes, RoPE, causality, packing isolation, attention paths, KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi4_jax.model import attention as attention_lib
from phi4_jax.model.kv_cache import KVCache
from phi4_jax.model import transformer
from phi4_jax.model.transformer import init_model
from phi4_jax.model.config import SIZE_NAMES, ModelConfigError, model_config_for, param_count
from phi4_jax.model.rope import apply_rope

TINY = model_config_for("tiny", vocab_size=97, num_layers=2)


def _batch(b, t, seed=0, vocab=97):
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return tokens, positions, jnp.ones((b, t), jnp.int32)


@pytest.mark.parametrize("size", SIZE_NAMES)
def test_param_count_from_shapes(size):
    cfg = model_config_for(size)
    abstract = nnx.eval_shape(lambda: init_model(cfg))
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert counted == param_count(cfg)


def test_phi4_14b_is_14_66b_by_hand():
    cfg = model_config_for("phi4-14b")
    per_layer = 5120 * (5120 + 2 * 1280) + 5120 * 5120 + 5120 * 2 * 17920 + 17920 * 5120 + 2 * 5120
    assert per_layer == 340_797_440
    assert param_count(cfg) == 40 * per_layer + 2 * 100352 * 5120 + 5120
    assert round(param_count(cfg) / 1e9, 2) == 14.66
    assert (cfg.head_dim, cfg.rotary_dim, cfg.rope_theta) == (128, 128, 250_000.0)


def test_phi4_mini_geometry():
    cfg = model_config_for("phi4-mini")
    assert (cfg.head_dim, cfg.rotary_dim, cfg.tie_embeddings) == (128, 96, True)


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=6), "num_heads"),           # 64 % 6
    (dict(num_kv_heads=3), "num_kv_heads"),     # 4 % 3
    (dict(rotary_fraction=0.3), "rotary_fraction"),  # 16 * 0.3 is not an even integer
    (dict(num_layers=0), "num_layers"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(scan_unroll=3), "scan_unroll"),  # 2 layers
    (dict(scan_unroll=-1), "scan_unroll"),
])
def test_bad_geometry_is_refused_with_field_name(overrides, field):
    with pytest.raises(ModelConfigError, match=f"model.{field}"):
        model_config_for("tiny", **overrides)


def test_layer_loop_unrolls_on_cpu_only_without_remat():
    assert jax.default_backend() == "cpu"
    assert transformer.scan_unroll(TINY.replace(num_layers=6)) == 6
    assert transformer.scan_unroll(TINY.replace(num_layers=6, remat_policy="full")) == 1
    assert transformer.scan_unroll(TINY.replace(num_layers=6, scan_unroll=2)) == 2


def test_unknown_size_lists_known_sizes():
    with pytest.raises(ModelConfigError, match="phi4-14b"):
        model_config_for("phi4-15b")


def _rope_reference(x, positions, theta, rotary_dim):
    """float64 NumPy, written from the rotate_half definition."""
    x = np.asarray(x, np.float64)
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    ang = np.asarray(positions, np.float64)[..., None] * inv
    emb = np.concatenate([ang, ang], -1)[:, :, None, :]
    rot = x[..., :rotary_dim]
    half = rotary_dim // 2
    rotate_half = np.concatenate([-rot[..., half:], rot[..., :half]], -1)
    out = rot * np.cos(emb) + rotate_half * np.sin(emb)
    return np.concatenate([out, x[..., rotary_dim:]], -1)


@pytest.mark.parametrize("rotary_dim, theta", [(16, 10_000.0), (12, 250_000.0)])
def test_rope_matches_float64_reference(rotary_dim, theta):
    x = jax.random.normal(jax.random.key(1), (2, 33, 3, 16))
    positions = jnp.stack([jnp.arange(33), jnp.arange(100, 133)])
    got = apply_rope(x, positions, theta=theta, rotary_dim=rotary_dim)
    np.testing.assert_allclose(got, _rope_reference(x, positions, theta, rotary_dim),
                               rtol=2e-5, atol=2e-5)


def test_rope_keeps_dot_products_relative():
    q, k = jax.random.normal(jax.random.key(2), (2, 1, 1, 1, 16))
    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), theta=1e4, rotary_dim=16)
        rk = apply_rope(k, jnp.array([[pk]]), theta=1e4, rotary_dim=16)
        return float(jnp.sum(rq * rk))
    assert score(3, 1) == pytest.approx(score(103, 101), rel=1e-4)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_causality_by_gradient(impl):
    cfg = TINY.replace(attention_impl=impl, attention_block_size=4)
    model = init_model(cfg, seed=1)
    graphdef, params = nnx.split(model)
    tokens, positions, segments = _batch(1, 12)
    x = model.embed_VD[...][tokens]

    def logit_at(embeddings, params, t):
        m = nnx.merge(graphdef, params)
        h = m._run_blocks(embeddings, positions, segments)
        return m.final_norm(h)[0, t].sum()

    for t in (0, 5, 11):
        grad = jax.jit(jax.grad(logit_at), static_argnums=2)(x, params, t)[0]
        touched = np.nonzero(np.abs(np.asarray(grad)).sum(-1) > 0)[0]
        assert touched.max() == t, f"position {t} depends on {touched}"


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_packed_documents_do_not_see_each_other(impl):
    cfg = TINY.replace(attention_impl=impl, attention_block_size=4)
    model = init_model(cfg, seed=2)
    doc_a = jax.random.randint(jax.random.key(3), (7,), 0, 97)
    doc_b1 = jax.random.randint(jax.random.key(4), (9,), 0, 97)
    doc_b2 = jax.random.randint(jax.random.key(5), (9,), 0, 97)

    def run(doc_b):
        tokens = jnp.concatenate([doc_a, doc_b])[None]
        positions = jnp.concatenate([jnp.arange(7), jnp.arange(9)])[None]
        segments = jnp.concatenate([jnp.ones(7, jnp.int32), 2 * jnp.ones(9, jnp.int32)])[None]
        return model(tokens, positions, segments)

    alone = model(doc_a[None], jnp.arange(7)[None], jnp.ones((1, 7), jnp.int32))
    with_b1, with_b2 = run(doc_b1), run(doc_b2)
    np.testing.assert_allclose(with_b1[:, :7], alone, atol=1e-5)
    np.testing.assert_allclose(with_b2[:, :7], alone, atol=1e-5)
    # and document B is the same as if it sat alone at the start of a row
    b_alone = model(doc_b1[None], jnp.arange(9)[None], jnp.ones((1, 9), jnp.int32))
    np.testing.assert_allclose(with_b1[:, 7:], b_alone, atol=1e-5)


def _qkv(b, t, n, k, h, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, k, h)),
            jax.random.normal(keys[2], (b, t, k, h)))


def _numpy_attention(q, k, v, seg):
    """float64 masked softmax attention with repeated kv heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    seg = np.asarray(seg)
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[1]
    allowed = (np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
               & (seg[:, None, :] != 0))[:, None]
    logits = np.where(allowed, logits, -np.inf)
    with np.errstate(invalid="ignore"):  # padding rows see no key: NaN, excluded by callers
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def test_blockwise_equals_plain_attention_values_and_grads():
    q, k, v = _qkv(2, 40, 4, 2, 8, seed=6)  # 40 is not a multiple of the block: padding path
    seg = jnp.array([[1] * 13 + [2] * 20 + [3] * 7, [1] * 33 + [0] * 7])
    plain = attention_lib.xla_attention(q, k, v, seg, seg)
    block = attention_lib.blockwise_attention(q, k, v, seg, seg, block_size=16)
    reference = _numpy_attention(q, k, v, seg)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(plain)[real], reference[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(block)[real], reference[real], atol=1e-5)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real[..., None, None], fn(q, k, v), 0.0) ** 2)

    g_plain = jax.grad(loss(lambda q, k, v: attention_lib.xla_attention(q, k, v, seg, seg)),
                       argnums=(0, 1, 2))(q, k, v)
    g_block = jax.grad(loss(lambda q, k, v: attention_lib.blockwise_attention(
        q, k, v, seg, seg, block_size=16)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_plain, g_block):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("rotary_fraction, scan_unroll", [(1.0, 0), (0.75, 0), (1.0, 1), (1.0, 2)])
def test_kv_cache_decoding_equals_full_forward(rotary_fraction, scan_unroll):
    cfg = TINY.replace(rotary_fraction=rotary_fraction, num_layers=3, scan_unroll=scan_unroll)
    model = init_model(cfg, seed=3)
    tokens, positions, segments = _batch(3, 14, seed=7)
    full = model(tokens, positions, segments)
    forward = nnx.jit(lambda m, *args: m.forward(*args))  # one compile for the 8 decode steps
    cache = KVCache.zeros(cfg, batch=3, max_len=20)
    logits, cache = forward(model, tokens[:, :6], positions[:, :6], segments[:, :6], cache)
    steps = [logits]
    for i in range(6, 14):
        logits, cache = forward(model, tokens[:, i:i + 1], positions[:, i:i + 1],
                                segments[:, i:i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache.index) == 14


def test_left_padded_prompts_decode_like_unpadded():
    cfg = TINY
    model = init_model(cfg, seed=4)
    prompt = jax.random.randint(jax.random.key(8), (5,), 0, 97)
    alone = model(prompt[None], jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32))
    padded = jnp.concatenate([jnp.zeros(3, jnp.int32), prompt])[None]
    positions = jnp.concatenate([jnp.zeros(3, jnp.int32), jnp.arange(5)])[None]
    segments = jnp.concatenate([jnp.zeros(3, jnp.int32), jnp.ones(5, jnp.int32)])[None]
    logits, _ = model.forward(padded, positions, segments, KVCache.zeros(cfg, 1, 10))
    np.testing.assert_allclose(logits[:, 3:], alone, atol=1e-5)


def test_bfloat16_compute_keeps_float32_logits_and_params():
    cfg = TINY.replace(compute_dtype="bfloat16")
    model = init_model(cfg)
    logits = model(*_batch(1, 8))
    assert logits.dtype == jnp.float32
    assert model.embed_VD[...].dtype == jnp.float32
    ref = init_model(TINY)(*_batch(1, 8))
    np.testing.assert_allclose(logits, ref, atol=0.05)

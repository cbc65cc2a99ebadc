"""The TPU splash-attention path, run by the Pallas interpreter on CPU.

Checked against float64 NumPy and the xla path on packed rows with grouped KV heads, by
perturbing one packed document, and through the dispatcher's fallbacks and errors. On a
2x2x2 mesh of fake CPU devices the kernel must run per shard: equal to the unsharded xla
path, on local shapes, with no collectives, and refusing layouts it cannot run locally.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import NamedSharding

from phi4_jax.model import attention as attention_lib
from phi4_jax.model.attention import splash as splash_lib
from phi4_jax.parallel import sharding
from phi4_jax.config_base import DEFAULT_RULES

B, T, N, K, H = 2, 200, 4, 2, 64  # T is not a multiple of the 128 block: the padding path
SEGMENTS = jnp.array([[1] * 70 + [2] * 90 + [3] * 40, [1] * 150 + [0] * 50], jnp.int32)
REAL = np.asarray(SEGMENTS) != 0


def _qkv(seed, t=T):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (B, t, N, H)), jax.random.normal(keys[1], (B, t, K, H)),
            jax.random.normal(keys[2], (B, t, K, H)))


def _splash(q, k, v, seg=SEGMENTS):
    return splash_lib.splash_attention(q, k, v, seg, block_size=128, interpret=True)


def _numpy_attention(q, k, v, seg):
    """float64 causal attention within segments, query head n reading kv head n // (N / K)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    seg = np.asarray(seg)
    k, v = (np.repeat(a, q.shape[2] // a.shape[2], axis=2) for a in (k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[1]
    allowed = (np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
               & (seg[:, None, :] != 0))[:, None]
    logits = np.where(allowed, logits, -np.inf)
    with np.errstate(invalid="ignore"):  # padding rows see nothing: NaN, and never compared
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.interpret
def test_splash_values_equal_float64_reference_and_xla():
    q, k, v = _qkv(seed=0)
    got = np.asarray(_splash(q, k, v))
    plain = np.asarray(attention_lib.xla_attention(q, k, v, SEGMENTS, SEGMENTS))
    reference = _numpy_attention(q, k, v, SEGMENTS)
    assert got.shape == (B, T, N, H)
    np.testing.assert_allclose(got[REAL], reference[REAL], atol=2e-5)
    np.testing.assert_allclose(got[REAL], plain[REAL], atol=2e-5)


@pytest.mark.interpret
def test_splash_gradients_equal_xla():
    q, k, v = _qkv(seed=1)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(REAL[..., None, None], fn(q, k, v), 0.0) ** 2)

    g_splash = jax.grad(loss(_splash), argnums=(0, 1, 2))(q, k, v)
    g_plain = jax.grad(loss(lambda q, k, v: attention_lib.xla_attention(
        q, k, v, SEGMENTS, SEGMENTS)), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_splash, g_plain):
        np.testing.assert_allclose(a, b, atol=5e-5, err_msg=f"d{name}")


@pytest.mark.interpret
def test_splash_isolates_packed_documents():
    q, k, v = _qkv(seed=2)
    q2, k2, v2 = _qkv(seed=3)
    doc_b = (np.asarray(SEGMENTS) == 2)[..., None, None]  # row 0, slots 70..159
    mixed = [jnp.where(doc_b, new, old) for old, new in zip((q, k, v), (q2, k2, v2))]
    before, after = np.asarray(_splash(q, k, v)), np.asarray(_splash(*mixed))
    others = REAL & ~doc_b[..., 0, 0]
    np.testing.assert_array_equal(after[others], before[others])
    assert np.abs(after[~others & REAL] - before[~others & REAL]).max() > 1e-2
    # Document B computed at the start of its own row gives the same output as packed.
    alone = _splash(*(jnp.roll(x, -70, axis=1) for x in mixed),
                    seg=jnp.array([[1] * 90 + [0] * 110] * B, jnp.int32))
    np.testing.assert_allclose(np.asarray(alone)[0, :90], after[0, 70:160], atol=2e-5)


@pytest.mark.interpret
def test_splash_kernel_built_in_one_trace_serves_the_next():
    splash_lib._splash_kernel.cache_clear()  # pylint: disable=protected-access
    q, k, v = _qkv(seed=6)
    first = jax.jit(_splash)(q, k, v)
    second = jax.jit(lambda q, k, v: 2.0 * _splash(q, k, v))(q, k, v)  # a cache hit
    assert splash_lib._splash_kernel.cache_info().hits >= 1  # pylint: disable=protected-access
    np.testing.assert_allclose(np.asarray(second)[REAL], 2.0 * np.asarray(first)[REAL],
                               rtol=1e-6)


def test_splash_block_rounds_to_lanes_and_refuses_unaligned_blocks():
    assert splash_lib.splash_block(200, 512) == 256
    assert splash_lib.splash_block(4096, 512) == 512
    assert splash_lib.splash_block(16, 128) == 128
    with pytest.raises(ValueError, match="model.attention_block_size=100"):
        splash_lib.splash_block(4096, 100)


def test_auto_picks_splash_on_tpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention_lib.resolve_impl("auto", 4096, 512, "bfloat16") == "splash"
    assert attention_lib.resolve_impl("auto", 4096, 512, "float32") == "splash"
    assert attention_lib.resolve_impl("xla", 4096, 512, "bfloat16") == "xla"


def test_splash_dispatch_falls_back_to_xla_for_cached_decoding():
    q, k, v = _qkv(seed=4)
    step = q[:, 150:151]  # one query against the whole cache, as in decoding
    got = attention_lib.attention(step, k, v, q_segment_ids=SEGMENTS[:, 150:151],
                                  kv_segment_ids=SEGMENTS, q_offset=150, impl="splash")
    full = attention_lib.xla_attention(q, k, v, SEGMENTS, SEGMENTS)
    np.testing.assert_allclose(got[0], full[0, 150:151], atol=1e-5)


def test_splash_dispatch_off_tpu_says_what_to_use():
    q, k, v = _qkv(seed=5)
    with pytest.raises(ValueError, match="needs a TPU.*xla or blockwise"):
        attention_lib.attention(q, k, v, q_segment_ids=SEGMENTS, kv_segment_ids=SEGMENTS,
                                impl="splash")


# --- on a 2x2x2 (data, fsdp, tensor) mesh ------------------------------------------------

MESH_B, MESH_T = 4, 128  # the batch splits 4 ways (data x fsdp), the heads 2 ways (tensor)
MESH_SEGMENTS = jnp.array([[1] * 50 + [2] * 78, [1] * 128, [1] * 30 + [2] * 60 + [0] * 38,
                           [1] * 100 + [0] * 28], jnp.int32)
MESH_REAL = np.asarray(MESH_SEGMENTS) != 0
Q_NAMES = ("batch", "seq", "q_heads", "head_dim")
KV_NAMES = ("batch", "seq", "kv_heads", "head_dim")


def _mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2})


def _mesh_qkv(seed, num_kv_heads=K, batch=MESH_B):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (batch, MESH_T, N, H)),
            jax.random.normal(keys[1], (batch, MESH_T, num_kv_heads, H)),
            jax.random.normal(keys[2], (batch, MESH_T, num_kv_heads, H)))


def _mesh_splash(q, k, v):
    return splash_lib.splash_attention(q, k, v, MESH_SEGMENTS[:q.shape[0]], block_size=128,
                                          interpret=True)


def _values_and_grads(fn):
    """The outputs and the gradients of their masked sum of squares w.r.t. q, k and v."""
    def both(q, k, v):
        out, pullback = jax.vjp(fn, q, k, v)
        return out, pullback(2.0 * jnp.where(MESH_REAL[..., None, None], out, 0.0))
    return both


def _pallas_calls(jaxpr):
    """Every pallas_call equation in a jaxpr, searching nested jaxprs too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += _pallas_calls(inner)
    return found


@pytest.mark.interpret
def test_sharded_splash_values_and_gradients_equal_unsharded_xla():
    q, k, v = _mesh_qkv(seed=7)
    with jax.set_mesh(_mesh()), sharding.logical_rules(DEFAULT_RULES):
        out, grads = jax.jit(_values_and_grads(_mesh_splash))(q, k, v)
    want_out, want_grads = _values_and_grads(lambda q, k, v: attention_lib.xla_attention(
        q, k, v, MESH_SEGMENTS, MESH_SEGMENTS))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[MESH_REAL], np.asarray(want_out)[MESH_REAL],
                               atol=2e-5)
    for name, got, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, want, atol=5e-5, err_msg=f"d{name}")


@pytest.mark.interpret
def test_sharded_splash_runs_the_kernel_on_local_rows_and_heads():
    q, k, v = _mesh_qkv(seed=8)
    mesh = _mesh()
    with jax.set_mesh(mesh), sharding.logical_rules(DEFAULT_RULES):
        jaxpr = jax.make_jaxpr(_mesh_splash)(q, k, v).jaxpr
        shardings = [NamedSharding(mesh, sharding.logical_to_spec(names, DEFAULT_RULES))
                     for names in (Q_NAMES, KV_NAMES, KV_NAMES)]
        hlo = jax.jit(_mesh_splash, in_shardings=shardings, out_shardings=shardings[0]).lower(
            q, k, v).compile().as_text()
    (shard_map,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "shard_map"]
    assert not [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "pallas_call"]
    body = shard_map.params["jaxpr"]
    local_shapes = {var.aval.shape for var in body.invars}
    assert {(MESH_B // 4, MESH_T, N // 2, H), (MESH_B // 4, MESH_T, K // 2, H)} <= local_shapes
    kernel_operands = {var.aval.shape[-3:] for eqn in _pallas_calls(body) for var in eqn.invars}
    assert {(N // 2, MESH_T, H), (K // 2, MESH_T, H)} <= kernel_operands  # local heads only
    assert (N, MESH_T, H) not in kernel_operands
    # Inputs already laid out per device need no gathering: each device works on its own.
    assert not re.findall(r"all-gather|all-reduce|all-to-all|collective-permute", hlo)


@pytest.mark.parametrize("rules, num_kv_heads, batch, message", [
    ((("batch", "data"), ("seq", "fsdp")), K, MESH_B, "split 'seq'.*no context parallelism"),
    ((("batch", "data"), ("head_dim", "tensor")), K, MESH_B, "split 'head_dim'"),
    ((("batch", ("data", "fsdp")), ("q_heads", "tensor")), K, MESH_B,
     r"q_heads over \('tensor',\) but kv_heads over \(\)"),
    (DEFAULT_RULES, 1, MESH_B, "split heads 2 ways.*does not divide the 1 kv heads"),
    (DEFAULT_RULES, K, 2, "batch of 2 rows does not split over the 4 devices"),
])
@pytest.mark.interpret
def test_sharded_splash_refuses_layouts_it_cannot_run_per_device(rules, num_kv_heads, batch,
                                                                 message):
    q, k, v = _mesh_qkv(seed=9, num_kv_heads=num_kv_heads, batch=batch)
    with jax.set_mesh(_mesh()), sharding.logical_rules(rules):
        with pytest.raises(ValueError, match=message) as error:
            jax.eval_shape(_mesh_splash, q, k, v)
    assert "mesh.rules" in str(error.value)  # names the config key to change


@pytest.mark.interpret
def test_sharded_splash_without_rules_says_how_to_lay_it_out():
    q, k, v = _mesh_qkv(seed=10)
    with jax.set_mesh(_mesh()), pytest.raises(ValueError, match="inside sharding.logical_rules"):
        jax.eval_shape(_mesh_splash, q, k, v)


@pytest.mark.interpret
def test_sharded_splash_is_traced_afresh_when_the_rules_change():
    q, k, v = _mesh_qkv(seed=11)
    seq_split = (("batch", "data"), ("seq", "fsdp"))
    fn = jax.jit(_mesh_splash)
    with jax.set_mesh(_mesh()):
        with sharding.logical_rules(DEFAULT_RULES):
            fn.trace(q, k, v)  # a layout that works, now in jit's trace cache
        with sharding.logical_rules(seq_split), pytest.raises(ValueError, match="split 'seq'"):
            fn.trace(q, k, v)

"""The chunked LM head + log-softmax against independent references.

Values against float64 NumPy; gradients (w.r.t. hidden states and the head) against the
plain path that forms the whole [B, T, V] logits; T not a multiple of the chunk, a chunk
longer than T, and a run sharded over a 2x2x2 mesh of fake CPU devices (batch over data
and fsdp, vocab over tensor) against the unsharded one. With bfloat16 hidden states the
gradients against float64 NumPy, and every matmul of the backward in bfloat16.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from phi4_jax.config_base import DEFAULT_RULES
from phi4_jax.losses.lm import chunked_token_log_probs, head_logits, token_log_probs
from phi4_jax.parallel import sharding

B, T, D, V = 4, 37, 16, 96  # 37 is prime: every chunk size below leaves a ragged last chunk


def _inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (B, T, D))
    head = jax.random.normal(keys[1], (D, V)) * 0.3
    targets = jax.random.randint(keys[2], (B, T), 0, V)
    return x, head, targets


def _plain(x, head, targets):
    logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)
    return token_log_probs(logits, targets)


def _numpy_log_probs(x, head, targets):
    logits = np.einsum("btd,dv->btv", np.asarray(x, np.float64), np.asarray(head, np.float64))
    top = logits.max(-1, keepdims=True)
    log_z = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    return np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0] - log_z


@pytest.mark.parametrize("chunk", [8, 36, 64])
def test_values_equal_float64_reference(chunk):
    x, head, targets = _inputs()
    got = chunked_token_log_probs(x, head, targets, chunk_tokens=chunk)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _numpy_log_probs(x, head, targets), atol=2e-5)


@pytest.mark.parametrize("chunk, remat", [(8, True), (8, False), (64, False)])
def test_gradients_equal_the_plain_path(chunk, remat):
    x, head, targets = _inputs(seed=1)
    weights = jax.random.uniform(jax.random.key(9), (B, T))

    def loss(fn):
        return lambda x, head: jnp.sum(fn(x, head) * weights)

    got = jax.grad(loss(lambda x, h: chunked_token_log_probs(x, h, targets, chunk_tokens=chunk,
                                                             remat=remat)),
                   argnums=(0, 1))(x, head)
    want = jax.grad(loss(lambda x, h: _plain(x, h, targets)), argnums=(0, 1))(x, head)
    for name, a, b in zip(("x", "head"), got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"d{name}")


def test_without_remat_the_backward_reuses_the_logits():
    """remat=False drops exactly the recomputed forward matmul of the head from the gradient."""
    x, head, targets = _inputs(seed=3)

    def matmuls(remat):
        grad = jax.grad(lambda x, h: jnp.sum(chunked_token_log_probs(
            x, h, targets, chunk_tokens=8, remat=remat)), argnums=(0, 1))
        return str(jax.make_jaxpr(grad)(x, head)).count("dot_general")

    assert matmuls(remat=True) == matmuls(remat=False) + 1 == 4


def test_sharded_equals_unsharded():
    x, head, targets = _inputs(seed=2)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2})

    def both(x, head, targets):
        return jax.value_and_grad(
            lambda x, h: jnp.sum(chunked_token_log_probs(x, h, targets, chunk_tokens=8)),
            argnums=(0, 1))(x, head)

    want_value, want_grads = jax.jit(both)(x, head, targets)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    vocab = NamedSharding(mesh, PartitionSpec(None, "tensor"))
    with jax.set_mesh(mesh), sharding.logical_rules(DEFAULT_RULES):
        value, grads = jax.jit(both, in_shardings=(batch, vocab, batch))(x, head, targets)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(a, b, atol=2e-5)


def _numpy_gradients(x, head, targets, weights):
    """d/dx and d/dhead of sum(weights * log p(target)), float64."""
    x, head = np.asarray(x, np.float64), np.asarray(head, np.float64)
    logits = np.einsum("btd,dv->btv", x, head)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    grad_logits = -probs
    np.put_along_axis(grad_logits, np.asarray(targets)[..., None],
                      np.take_along_axis(grad_logits, np.asarray(targets)[..., None], -1) + 1, -1)
    grad_logits *= np.asarray(weights, np.float64)[..., None]
    return np.einsum("btv,dv->btd", grad_logits, head), np.einsum("btd,btv->dv", x, grad_logits)


@pytest.mark.parametrize("remat", [True, False])
def test_bfloat16_gradients_equal_float64_reference_with_bfloat16_matmuls(remat):
    """bf16 hidden states, float32 head: the gradients match float64 within bf16 rounding, the
    head's comes back float32, and no matmul of the backward takes a float32 operand (the
    logits' gradient is cast to bf16 first, as in every other layer)."""
    x, head, targets = _inputs(seed=4)
    x = x.astype(jnp.bfloat16)
    weights = jax.random.uniform(jax.random.key(5), (B, T))

    def loss(x, h):
        return jnp.sum(chunked_token_log_probs(x, h, targets, chunk_tokens=8, remat=remat)
                       * weights)

    grad_x, grad_head = jax.grad(loss, argnums=(0, 1))(x, head)
    assert grad_x.dtype == jnp.bfloat16 and grad_head.dtype == jnp.float32
    want_x, want_head = _numpy_gradients(x, head.astype(jnp.bfloat16), targets, weights)
    np.testing.assert_allclose(np.asarray(grad_x, np.float64), want_x,
                               atol=0.02 * np.abs(want_x).max())
    np.testing.assert_allclose(grad_head, want_head, atol=0.01 * np.abs(want_head).max())

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, head)
    operand_dtypes = [tuple(v.aval.dtype for v in eqn.invars) for eqn in _equations(jaxpr.jaxpr)
                      if eqn.primitive.name == "dot_general"]
    assert len(operand_dtypes) == (4 if remat else 3)
    assert all(dtypes == (jnp.bfloat16, jnp.bfloat16) for dtypes in operand_dtypes), operand_dtypes


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


def test_head_logits_gradient_is_the_einsum_gradient_in_float32():
    x, head, _ = _inputs(seed=6)
    cotangent = jax.random.normal(jax.random.key(7), (B, T, V))

    def plain(x, h):
        return jnp.einsum("btd,dv->btv", x, h, preferred_element_type=jnp.float32)

    got = jax.vjp(head_logits, x, head)[1](cotangent)
    want = jax.vjp(plain, x, head)[1](cotangent)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-6 * np.abs(b).max())

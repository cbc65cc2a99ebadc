"""LoRA adapters: a fresh adapter changes nothing, gradients reach only adapters, a merged
adapter gives the adapter's logits, rows choose their adapter (float64 NumPy reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi4_jax.model import lora
from phi4_jax.model.config import ModelConfig, ModelConfigError, model_config_for
from phi4_jax.model.transformer import init_model

PLAIN = model_config_for("tiny", vocab_size=97, num_layers=2)
LORA = lora.LoRAConfig(rank=4, alpha=8.0, targets=tuple(lora.TARGETS), adapters=("math", "code"))
ADAPTED = PLAIN.replace(lora=LORA)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 12)))
POSITIONS = jnp.broadcast_to(jnp.arange(12), TOKENS.shape)
SEGMENTS = jnp.ones_like(TOKENS)


def _params(cfg: ModelConfig):
    return nnx.to_pure_dict(nnx.state(init_model(cfg)))


def _logits(cfg: ModelConfig, params, adapter_ids=None):
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg))), params)
    return model(TOKENS, POSITIONS, SEGMENTS, adapter_ids)


def _trained_adapters(params):
    """The adapters with B drawn too (a fresh B is zero), as after some training."""
    adapters, backbone = lora.split(params)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves), backbone


def test_a_fresh_adapter_leaves_the_logits_unchanged():
    adapters, backbone = lora.split(_params(ADAPTED))
    bs = [x for path, x in jax.tree_util.tree_flatten_with_path(adapters)[0]
          if path[-1].key == "b"]
    assert len(bs) == len(lora.TARGETS) and not any(np.any(b) for b in bs)
    plain = _logits(PLAIN, backbone)
    for ids in (None, jnp.asarray([0, 1, -1])):
        np.testing.assert_array_equal(_logits(ADAPTED, lora.join(adapters, backbone), ids), plain)


def test_gradients_reach_only_the_adapters():
    adapters, backbone = _trained_adapters(_params(ADAPTED))

    def loss(a):
        return jnp.mean(_logits(ADAPTED, lora.join(a, backbone), jnp.asarray([0, 1, 0])) ** 2)

    grads = jax.grad(loss)(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    paths = ["/".join(str(k.key) for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(grads)[0]]
    assert len(paths) == 2 * len(lora.TARGETS) and all("adapters" in p for p in paths)
    for path, g in zip(paths, jax.tree.leaves(grads)):
        # both adapters of every layer take gradient: rows 0 and 2 use one, row 1 the other
        assert np.all(np.abs(np.asarray(g)).reshape(2, 2, -1).max(-1) > 0), path


def test_merged_weights_give_the_adapters_logits():
    adapters, backbone = _trained_adapters(_params(ADAPTED))
    params = lora.join(adapters, backbone)
    for j, name in enumerate(LORA.adapters):
        merged = lora.merged(params, LORA, name)
        assert not lora.split(merged)[0]
        expected = _logits(ADAPTED, params, jnp.full((3,), j))
        np.testing.assert_allclose(_logits(PLAIN, merged), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(lora.LoRAConfigError, match="'vision' is not one of"):
        lora.merged(params, LORA, "vision")


def test_each_row_uses_its_adapter_against_float64():
    """One adapted projection by the formula: x W + alpha/rank (x A_j) B_j, row by row."""
    rng = np.random.default_rng(2)
    cfg = PLAIN.replace(lora=LORA)
    adapter = lora.Adapter("up", cfg, nnx.Rngs(params=0))
    adapter.b[...] = jnp.asarray(rng.normal(size=adapter.b.shape), jnp.float32)
    x = rng.normal(size=(3, 5, cfg.d_model))
    w = rng.normal(size=(cfg.d_model, cfg.ffn_dim))
    ids = np.asarray([1, -1, 0])
    actual = lora.project(jnp.asarray(x, jnp.float32), nnx.Param(jnp.asarray(w, jnp.float32)),
                          "btd,df->btf", {"up": adapter}, "up", jnp.asarray(ids))
    a, b = np.asarray(adapter.a[...], np.float64), np.asarray(adapter.b[...], np.float64)
    expected = x @ w
    for row, j in enumerate(ids):
        if j >= 0:
            expected[row] += LORA.scale * (x[row] @ a[j]) @ b[j]
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-3)


def test_adapter_parameter_count_by_hand():
    # q: 64 -> 4x16, v: 64 -> 2x16, down: 192 -> 64; rank 4, 2 adapters, 2 layers
    cfg = PLAIN.replace(lora=lora.LoRAConfig(4, 8.0, ("q", "v", "down"), ("a", "b")))
    by_hand = 2 * 2 * 4 * ((64 + 64) + (64 + 32) + (192 + 64))
    assert lora.adapter_param_count(cfg) == by_hand
    adapters, _ = lora.split(_params(cfg))
    assert sum(x.size for x in jax.tree.leaves(adapters)) == by_hand


@pytest.mark.parametrize("change, named", [
    (dict(rank=0), "lora.rank=0"), (dict(alpha=-1.0), "lora.alpha=-1.0"),
    (dict(targets=("q", "qkv")), "lora.targets"), (dict(adapters=("a", "a")), "lora.adapters"),
    (dict(backbone_dtype="int8"), "lora.backbone_dtype='int8'")])
def test_bad_adapter_configs_are_refused_by_name(change, named):
    bad = lora.LoRAConfig(**{**dict(rank=4, alpha=8.0, targets=("q",)), **change})
    with pytest.raises(ModelConfigError, match=named):
        PLAIN.replace(lora=bad)


@pytest.mark.parametrize("equation, x_shape, w_shape", [
    ("btd,dnh->btnh", (2, 5, 6), (6, 3, 4)),   # q/k/v: the input is the smaller operand
    ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 7)),  # o
    ("btf,fd->btd", (2, 5, 12), (12, 5)),      # down: the output gradient is the smaller
])
def test_plain_weight_grad_projection_matches_float64(equation, x_shape, w_shape):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    loss = lambda x, w: jnp.sum(jnp.sin(lora.einsum_plain_weight_grad(equation, x, w)))
    value, (dx, dw) = jax.value_and_grad(loss, (0, 1))(jnp.asarray(x, jnp.float32),
                                                      jnp.asarray(w, jnp.float32))
    y = np.einsum(equation, x, w)  # float64 reference: d sum(sin(y)) = cos(y) dy
    lhs, rhs = equation.split("->")[0].split(",")
    out = equation.split("->")[1]
    np.testing.assert_allclose(value, np.sin(y).sum(), rtol=1e-5)
    np.testing.assert_allclose(dx, np.einsum(f"{out},{rhs}->{lhs}", np.cos(y), w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum(f"{lhs},{out}->{rhs}", x, np.cos(y)), rtol=1e-5, atol=1e-5)


def test_plain_weight_grad_refuses_other_equations():
    with pytest.raises(ValueError, match="is not a projection"):
        jax.grad(lambda w: lora.einsum_plain_weight_grad("btd,td->bd", jnp.ones((2, 3, 4)), w).sum())(
            jnp.ones((3, 4)))

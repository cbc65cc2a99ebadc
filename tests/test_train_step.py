"""The pure train step: schedule, decay mask, accumulation, and sharded == unsharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from phi4_jax import config_base
from phi4_jax.losses.lm import next_token_loss_sum, token_log_probs
from phi4_jax.parallel.sharding import logical_rules
from phi4_jax.stages import evaluation
from phi4_jax.train import loop
from phi4_jax.train import state as state_lib
from phi4_jax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask


def _train_cfg(**overrides):
    c = config_base.base_config().train
    c.update(steps=100, warmup_steps=10, lr=1.0, final_lr_fraction=0.1, **overrides)
    return c


def test_linear_schedule_hand_values():
    schedule = learning_rate_schedule(_train_cfg(schedule="linear"))
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(1.0 - 0.9 * 45 / 90)
    assert float(schedule(100)) == pytest.approx(0.1)


def test_cosine_schedule_hand_values():
    schedule = learning_rate_schedule(_train_cfg(schedule="cosine"))
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert float(schedule(100)) == pytest.approx(0.1)


def test_weight_decay_mask_skips_norms_unless_asked():
    params = {"blocks": {"attn_norm": {"scale": 1.0}, "mlp": {"up_DF": 2.0}}, "embed_VD": 3.0}
    assert weight_decay_mask(params) == {"blocks": {"attn_norm": {"scale": False},
                                                    "mlp": {"up_DF": True}}, "embed_VD": True}
    assert weight_decay_mask(params, decay_norms=True)["blocks"]["attn_norm"]["scale"] is True


@pytest.mark.parametrize("grad_clip", [0.0, 0.05, 100.0], ids=["no_clip", "clipping", "under"])
def test_fused_adamw_equals_optax_chain(grad_clip):
    """optax's clip_by_global_norm + adamw (the state layout it keeps) as the reference: four
    steps through warm-up, a masked norm scale, float32; the same state tree and values."""
    train = _train_cfg(grad_clip=grad_clip, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8)
    train.update(lr=1e-2, warmup_steps=2)
    rng = np.random.default_rng(0)
    params = {"blocks": {"attn_norm": {"scale": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
                         "mlp": {"up_DF": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}},
              "embed_VD": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
    chain = optax.chain(
        optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(train), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                    mask=weight_decay_mask(params)))
    fused = make_optimizer(train, params)
    ours, reference = params, params
    our_state, reference_state = fused.init(params), chain.init(params)
    assert jax.tree.structure(our_state) == jax.tree.structure(reference_state)
    for _ in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, our_state = jax.jit(fused.update)(grads, our_state, ours)
        ours = optax.apply_updates(ours, updates)
        updates, reference_state = chain.update(grads, reference_state, reference)
        reference = optax.apply_updates(reference, updates)
    assert float(jnp.abs(ours["embed_VD"] - params["embed_VD"]).max()) > 1e-3  # it moved
    close = functools.partial(np.testing.assert_allclose, rtol=2e-6, atol=1e-7)
    jax.tree.map(close, ours, reference)
    jax.tree.map(close, our_state, reference_state)


def test_loss_sum_against_numpy():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[0, 4, 2], [1, 1, 3]])
    weights = jnp.array([[1, 1, 0], [1, 0, 1]])
    x = np.asarray(logits, np.float64)
    log_probs = x - np.log(np.exp(x).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
    loss, tokens = next_token_loss_sum(token_log_probs(logits, targets), weights)
    assert float(loss) == pytest.approx(-(picked * np.asarray(weights)).sum(), rel=1e-5)
    assert float(tokens) == 4


def _config(mesh=(1, 1, 1), microbatches=1):
    c = config_base.base_config()
    c.model.size = "toy"
    c.train.update(seq_len=16, global_batch=8, microbatches=microbatches, steps=10, lr=1e-2,
                   warmup_steps=0, eps=1e-4)
    c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return c


def _random_batch(seed=0, b=8, t=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 512, (b, t + 1)).astype(np.int32)  # the toy vocabulary
    segments = np.ones((b, t), np.int32)
    segments[:, t // 2:] = 2  # two packed documents per row
    segments[-1, -3:] = 0  # some padding
    positions = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "positions": positions.astype(np.int32),
            "loss_mask": (segments != 0).astype(np.float32)}


def _compiled(config, devices):
    """A run and its jitted train step (compiled on first use, then reused)."""
    run = state_lib.build_run(config, devices)
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        train_fn, _ = loop.compile_steps(run, evaluation.language_model_loss(run), None)
    return run, train_fn


@pytest.fixture(scope="module")
def single_device():
    """The plain one-device step the sharded, accumulated and rematted ones are checked
    against, compiled once for all of them."""
    return _compiled(_config(), jax.devices()[:1])


def _run_steps(compiled, batches):
    run, train_fn = compiled
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        state = state_lib.init_state(run)
        losses = []
        for batch in batches:
            batch = state_lib.to_global_batch(batch, run.batch_sharding)
            state, metrics = train_fn(state, batch, None)
            losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return losses, jax.device_get(state.params), state


# With eps=1e-8, Adam's g / (|g| + eps) turns float noise on gradients near 1e-8 into
# updates of order lr; eps=1e-4 (see _config) bounds the update's sensitivity to lr / eps,
# so reassociation noise in sharded or accumulated reductions stays below 1e-6 while a
# wrong sharding or averaging still moves weights by ~lr = 1e-2.
PARAM_ATOL = 2e-6


def test_sharded_step_equals_single_device(single_device):
    batches = [_random_batch(0), _random_batch(1)]
    single_losses, single_params, _ = _run_steps(single_device, batches)
    sharded_losses, sharded_params, state = _run_steps(
        _compiled(_config(mesh=(2, 2, 2)), jax.devices()), batches)
    # the parameters really are spread over the 2x2x2 mesh
    up = state.params["blocks"]["mlp"]["up_DF"]
    assert up.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert len(up.addressable_shards) == 8 and up.addressable_shards[0].data.shape[1:] == (32, 96)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=PARAM_ATOL),
                 sharded_params, single_params)


def test_microbatch_accumulation_equals_one_batch(single_device):
    batches = [_random_batch(2)]
    one_losses, one_params, _ = _run_steps(single_device, batches)
    acc_losses, acc_params, _ = _run_steps(
        _compiled(_config(microbatches=4), jax.devices()[:1]), batches)
    np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=PARAM_ATOL),
                 acc_params, one_params)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_qkv_proj"])
def test_remat_policies_keep_loss_and_gradients(single_device, policy):
    batches = [_random_batch(3)]
    plain, _, _ = _run_steps(single_device, batches)
    remat_config = _config()
    remat_config.model.remat_policy = policy
    rematted, _, _ = _run_steps(_compiled(remat_config, jax.devices()[:1]), batches)
    np.testing.assert_allclose(rematted, plain, rtol=1e-5)  # (loss, grad norm) per step

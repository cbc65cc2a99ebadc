"""The one training step every stage shares: a pure function of state, batch and a stage's loss.

A stage's loss is `loss_fn(params, batch, frozen) -> (numerator, denominator, metric_sums)`:
the summed loss over the batch's units (tokens for language modelling, pairs for DPO), how
many units there were, and further per-unit sums (rewards, accuracies) the step divides by
the same denominator. Summing first and dividing once makes microbatches (and hosts)
average over units, not over batches. `frozen` is what the loss reads but never trains (a
reference model's parameters); it is an argument of the jitted step, outside the optimizer
state and never donated. Parameters are a plain nested dict of arrays; bind the static
pieces with `functools.partial` and jit with explicit shardings and donation (`loop`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, Any], tuple[jax.Array, jax.Array, Metrics]]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: optax.OptState


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def _split_microbatches(batch: Batch, microbatches: int) -> Batch:
    """[B, ...] -> [M, B/M, ...], microbatch m taking every M-th row so each device keeps its
    share of every microbatch under a batch-sharded layout."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def _as_float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def accumulated_gradients(params: Any, batch: Batch, frozen: Any, *, loss_fn: LossFn,
                          microbatches: int):
    """Mean loss per unit, the unit count, mean metrics and the gradient of the mean loss;
    sums over microbatches are carried in float32."""
    def numerator(p, b):
        num, den, sums = loss_fn(p, b, frozen)
        return num, (den, sums)

    grad_fn = jax.value_and_grad(numerator, has_aux=True)
    if microbatches == 1:
        (total, (units, sums)), grads = grad_fn(params, batch)
    else:
        micro = _split_microbatches(batch, microbatches)
        shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
        zeros = _as_float32(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

        def accumulate(carry, one):
            return jax.tree.map(jnp.add, carry, _as_float32(grad_fn(params, one))), None

        ((total, (units, sums)), grads), _ = jax.lax.scan(accumulate, zeros, micro)
    denom = jnp.maximum(units, 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
    metrics = {key: value / denom for key, value in sums.items()}
    return total / denom, units, metrics, grads


def train_step(state: TrainState, batch: Batch, frozen: Any, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               microbatches: int = 1) -> tuple[TrainState, Metrics]:
    """One optimizer update on a global batch; returns the new state and scalar metrics."""
    loss, units, metrics, grads = accumulated_gradients(state.params, batch, frozen,
                                                        loss_fn=loss_fn, microbatches=microbatches)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step), "units": units}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, frozen: Any, *, loss_fn: LossFn) -> Metrics:
    """Sums of a held-out batch (`loss_sum`, `units`, and each metric's sum); callers add
    batches up and divide once."""
    total, units, sums = loss_fn(params, batch, frozen)
    return {"loss_sum": total, "units": units, **sums}

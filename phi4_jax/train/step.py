"""The pure training and evaluation steps: functions of parameter/optimizer pytrees.

Parameters are a plain nested dict of arrays (`nnx.split` then `to_pure_dict`); the model
is rebuilt from its graphdef inside the step. Bind the static pieces with
`functools.partial` and jit with explicit shardings and buffer donation (see trainer).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from phi4_jax.losses.lm import next_token_loss_sum

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions, loss_mask: [B, T]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: optax.OptState


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def batch_loss_sum(params: Any, graphdef: nnx.GraphDef, batch: Batch):
    """Summed next-token loss and token count of one (micro)batch."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return next_token_loss_sum(logits, batch["targets"], batch["loss_mask"])


def _split_microbatches(batch: Batch, microbatches: int) -> Batch:
    """[B, T] -> [M, B/M, T], microbatch m taking every M-th row so each device keeps its
    share of every microbatch under a batch-sharded layout."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def accumulated_gradients(params: Any, graphdef: nnx.GraphDef, batch: Batch, microbatches: int):
    """Token-weighted mean loss and its gradient, summed over microbatches in float32."""
    grad_fn = jax.value_and_grad(batch_loss_sum, has_aux=True)
    if microbatches == 1:
        (loss_sum, tokens), grads = grad_fn(params, graphdef, batch)
    else:
        def accumulate(carry, micro):
            loss_acc, tok_acc, grad_acc = carry
            (loss_sum, tokens), grads = grad_fn(params, graphdef, micro)
            grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
            return (loss_acc + loss_sum, tok_acc + tokens, grad_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (loss_sum, tokens, grads), _ = jax.lax.scan(
            accumulate, init, _split_microbatches(batch, microbatches))
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
    return loss_sum / denom, tokens, grads


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               microbatches: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch; returns the new state and scalar metrics."""
    loss, tokens, grads = accumulated_gradients(state.params, graphdef, batch, microbatches)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
               "tokens": tokens}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    """Summed loss and tokens of a held-out batch (callers divide after summing batches)."""
    loss_sum, tokens = batch_loss_sum(params, graphdef, batch)
    return {"loss_sum": loss_sum, "tokens": tokens}

"""AdamW with warm-up then decay, global-norm clipping and a weight-decay mask (optax's state,
one fused update)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to `lr`, then linear or cosine decay to `final_lr_fraction * lr`."""
    decay_steps = max(train.steps - train.warmup_steps, 1)
    final_lr = train.lr * train.final_lr_fraction
    if train.schedule == "cosine":
        decay = optax.cosine_decay_schedule(train.lr, decay_steps, alpha=train.final_lr_fraction)
    else:
        decay = optax.linear_schedule(train.lr, final_lr, decay_steps)
    warmup = optax.linear_schedule(0.0, train.lr, train.warmup_steps)
    return optax.join_schedules([warmup, decay], [train.warmup_steps])


def weight_decay_mask(params: Any, decay_norms: bool = False) -> Any:
    """True where weight decay applies: every matrix, and norm scales only if asked."""
    def decays(path, _):
        is_norm = any(getattr(key, "key", None) == "scale" for key in path)
        return decay_norms or not is_norm
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    """The recipe's optimizer: clip, then AdamW. Its state is optax's
    `chain(clip_by_global_norm, adamw)` state (the same tree whether or not clipping is on, so a
    checkpoint resumes under either setting); its update is `fused_adamw_update`."""
    clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity()
    schedule = learning_rate_schedule(train)
    mask = weight_decay_mask(params, train.decay_norms)
    layout = optax.chain(clip, optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps,
                                           weight_decay=train.weight_decay, mask=mask))
    update = functools.partial(fused_adamw_update, schedule=schedule, b1=train.b1, b2=train.b2,
                               eps=train.eps, weight_decay=train.weight_decay, mask=mask,
                               max_norm=train.grad_clip)
    return optax.GradientTransformation(layout.init, update)


def fused_adamw_update(grads, state, params, *, schedule: optax.Schedule, b1: float, b2: float,
                       eps: float, weight_decay: float, mask: Any, max_norm: float):
    """optax's clip-then-AdamW update written as one expression per parameter: the clip is a
    scalar factor instead of a select over every gradient, so XLA reads each gradient, moment
    and weight once per output (0.75x the time of the chained transforms at 125m on CPU,
    benchmarks/RESULTS_cpu.md) and the results equal the chain's."""
    clip_state, (adam, decay_state, lr_state) = state
    factor = 1.0
    if max_norm > 0:
        norm = optax.tree.norm(grads)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    count = optax.safe_increment(adam.count)
    mu_correction = 1 - jnp.asarray(b1, jnp.float32) ** count
    nu_correction = 1 - jnp.asarray(b2, jnp.float32) ** count
    lr = schedule(lr_state.count)

    def one(g, m, v, p, decays):
        g = g * factor
        m_new = ((1 - b1) * g + b1 * m).astype(m.dtype)
        v_new = ((1 - b2) * g * g + b2 * v).astype(v.dtype)
        u = (m_new / mu_correction) / (jnp.sqrt(v_new / nu_correction) + eps)
        if decays and weight_decay:
            u = u + weight_decay * p
        return (-lr * u).astype(p.dtype), m_new, v_new

    triples = jax.tree.map(one, grads, adam.mu, adam.nu, params, mask)
    updates, mu, nu = jax.tree.transpose(jax.tree.structure(grads),
                                         jax.tree.structure((0, 0, 0)), triples)
    state = (clip_state, (optax.ScaleByAdamState(count=count, mu=mu, nu=nu), decay_state,
                          optax.ScaleByScheduleState(count=optax.safe_increment(lr_state.count))))
    return updates, state

"""AdamW with warm-up then decay, global-norm clipping and a weight-decay mask (optax)."""

from __future__ import annotations

from typing import Any

import jax
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
    """The recipe's optimizer: clip, then AdamW. The chain has the same state tree whether or
    not clipping is on, so a checkpoint resumes under either setting."""
    clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity()
    adamw = optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                        weight_decay=train.weight_decay,
                        mask=weight_decay_mask(params, train.decay_norms))
    return optax.chain(clip, adamw)

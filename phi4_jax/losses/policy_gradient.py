"""GRPO: group-relative advantages and the clipped-ratio objective with a KL term, as pure
functions of arrays (log-probs now, at sampling time and under the reference; masks).

For G responses to one prompt with rewards r_1..r_G, each response's advantage is
A_i = (r_i - mean(r)) / (std(r) + eps) (population std; `scale_by_std=False` keeps only the
centring), shared by all of its tokens. Per response token t, with ratio
rho = exp(log pi(t) - log pi_old(t)):

    objective_t = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) - kl_coef * KL_t
    KL_t        = exp(log ref - log pi) - (log ref - log pi) - 1      (the unbiased k3 estimator)

The loss is -objective averaged per response then over responses (`sequence`, GRPO's
original) or over all response tokens of the batch (`token`). A group whose rewards are all
equal has zero advantage and contributes no policy gradient (only the KL term).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("sequence", "token")


def group_advantages(rewards_PG: jax.Array, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> jax.Array:
    """Advantages [P, G] of G responses to each of P prompts, relative to their group."""
    rewards = rewards_PG.astype(jnp.float32)
    centred = rewards - rewards.mean(axis=-1, keepdims=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(axis=-1, keepdims=True) + eps)


def grpo_objective_terms(log_probs_BT: jax.Array, old_log_probs_BT: jax.Array,
                         reference_log_probs_BT: jax.Array, advantages_B: jax.Array, *,
                         clip_low: float, clip_high: float, kl_coef: float
                         ) -> dict[str, jax.Array]:
    """Per-token terms [B, T]: the clipped surrogate, the KL estimate, and whether the ratio
    was clipped (the surrogate's gradient is then zero)."""
    ratio = jnp.exp(log_probs_BT - old_log_probs_BT)
    advantage = advantages_B[:, None]
    unclipped = ratio * advantage
    clipped = jnp.clip(ratio, 1 - clip_low, 1 + clip_high) * advantage
    surrogate = jnp.minimum(unclipped, clipped)
    log_ratio_ref = reference_log_probs_BT - log_probs_BT
    kl = jnp.exp(log_ratio_ref) - log_ratio_ref - 1
    return {"surrogate": surrogate, "kl": kl, "objective": surrogate - kl_coef * kl,
            "clipped": (clipped < unclipped).astype(jnp.float32)}


def grpo_sums(log_probs_BT: jax.Array, old_log_probs_BT: jax.Array,
              reference_log_probs_BT: jax.Array, advantages_B: jax.Array, mask_BT: jax.Array, *,
              clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0,
              normalization: str = "sequence"
              ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(summed loss, units, metric sums) for the training engine: units are responses
    (`sequence`: each response's token mean counts once) or response tokens (`token`)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"grpo.normalization={normalization!r}: choose one of {NORMALIZATIONS}.")
    terms = grpo_objective_terms(log_probs_BT, old_log_probs_BT, reference_log_probs_BT,
                                 advantages_B, clip_low=clip_low, clip_high=clip_high,
                                 kl_coef=kl_coef)
    mask = mask_BT.astype(jnp.float32)
    if normalization == "sequence":
        present = (mask.sum(-1) > 0).astype(jnp.float32)

        def total(x):
            return ((x * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0) * present).sum()
        units = present.sum()
    else:
        def total(x):
            return (x * mask).sum()
        units = mask.sum()
    return -total(terms["objective"]), units, {"kl": total(terms["kl"]),
                                               "clipped_fraction": total(terms["clipped"])}


def grpo_loss(*args, **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scalar GRPO loss of a batch (`grpo_sums` divided by its units) and mean metrics."""
    total, units, sums = grpo_sums(*args, **kwargs)
    units = jnp.maximum(units, 1.0)
    return total / units, {key: value / units for key, value in sums.items()}

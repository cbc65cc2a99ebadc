"""Direct preference optimization losses: pure functions of per-pair sequence log-probabilities.

Inputs are log pi(y | x) of the chosen and rejected responses under the policy and the
reference, one number per pair, summed over the response tokens only
(`losses.lm.sequence_log_probs`; length-normalized for IPO). With
Delta = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)):

  sigmoid          -log sigmoid(beta * Delta)                       (DPO)
  conservative     -(1 - eps) log sigmoid(beta * Delta) - eps log sigmoid(-beta * Delta)
  ipo              (Delta - 1 / (2 beta))^2                          (use length-normalized log-probs)
  hinge            relu(1 - beta * Delta)                            (SLiC)
  robust           [-(1 - eps) log sigmoid(beta * Delta) + eps log sigmoid(-beta * Delta)] / (1 - 2 eps)
  reference_free   -log sigmoid(beta * (log pi(chosen) - log pi(rejected)))

beta enters exactly once, inside the loss: the implicit rewards reported as metrics are
beta * (log pi - log ref) and are not fed back into it. Per-pair weights (judge-guided DPO)
multiply each pair's loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

VARIANTS = ("sigmoid", "conservative", "ipo", "hinge", "robust", "reference_free")


def dpo_losses(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
               reference_rejected: jax.Array, *, beta: float, variant: str = "sigmoid",
               label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair losses [B] and per-pair metrics [B]: implicit rewards, margin, accuracy."""
    if variant not in VARIANTS:
        raise ValueError(f"dpo.variant={variant!r}: choose one of {', '.join(VARIANTS)}.")
    policy_chosen, policy_rejected = (x.astype(jnp.float32) for x in (policy_chosen,
                                                                       policy_rejected))
    if variant == "reference_free":
        reference_chosen = jnp.zeros_like(policy_chosen)
        reference_rejected = jnp.zeros_like(policy_rejected)
    chosen_ratio = policy_chosen - reference_chosen.astype(jnp.float32)
    rejected_ratio = policy_rejected - reference_rejected.astype(jnp.float32)
    delta = chosen_ratio - rejected_ratio
    logits = beta * delta
    eps = label_smoothing
    if variant in ("sigmoid", "reference_free"):
        losses = -jax.nn.log_sigmoid(logits)
    elif variant == "conservative":
        losses = -(1 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
    elif variant == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif variant == "hinge":
        losses = jax.nn.relu(1 - logits)
    else:  # robust
        losses = ((1 - eps) * -jax.nn.log_sigmoid(logits) + eps * jax.nn.log_sigmoid(-logits)
                  ) / (1 - 2 * eps)
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    metrics = {"chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
               "reward_margin": chosen_reward - rejected_reward,
               "reward_accuracy": (chosen_reward > rejected_reward).astype(jnp.float32)}
    return losses, metrics


def weighted_sums(losses: jax.Array, metrics: dict[str, jax.Array], weights: jax.Array,
                  valid: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum of weight * loss, pair count, metric sums) over the valid pairs of a batch: the
    engine's (numerator, denominator, metric sums), so microbatches average over pairs.

    Weights scale a pair's loss but not the count, so judge weights below 1 also lower the
    effective learning rate; the metrics are plain (unweighted) sums.
    """
    valid = valid.astype(jnp.float32)
    total = jnp.sum(losses * weights.astype(jnp.float32) * valid)
    sums = {key: jnp.sum(value * valid) for key, value in metrics.items()}
    return total, jnp.sum(valid), sums

"""DPO losses against float64 NumPy formulas, a hand-worked value and gradient directions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax.losses.preference import VARIANTS, dpo_losses, weighted_sums
from phi4_jax.stages import dpo


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _reference(pc, pr, rc, rr, beta, variant, eps):
    """The formulas of the DPO, cDPO, IPO, SLiC, rDPO papers, in float64."""
    if variant == "reference_free":
        rc, rr = np.zeros_like(rc), np.zeros_like(rr)
    delta = (pc - rc) - (pr - rr)
    z = beta * delta
    return {
        "sigmoid": -_log_sigmoid(z),
        "reference_free": -_log_sigmoid(z),
        "conservative": -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z),
        "ipo": (delta - 1 / (2 * beta)) ** 2,
        "hinge": np.maximum(0.0, 1 - z),
        "robust": (-(1 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1 - 2 * eps),
    }[variant], beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_matches_float64_reference(variant):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-40, 8, 64) for _ in range(4))
    beta, eps = 0.3, 0.15
    losses, metrics = dpo_losses(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)),
                                 beta=beta, variant=variant, label_smoothing=eps)
    want, chosen_reward, rejected_reward = _reference(pc, pr, rc, rr, beta, variant, eps)
    np.testing.assert_allclose(losses, want, rtol=2e-4, atol=2e-4)
    if variant != "reference_free":
        np.testing.assert_allclose(metrics["chosen_reward"], chosen_reward, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(metrics["reward_margin"], chosen_reward - rejected_reward,
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(metrics["reward_accuracy"],
                                      (chosen_reward > rejected_reward).astype(np.float32))


def test_hand_worked_value():
    # beta 0.5; policy-minus-reference log-ratios +0.5 (chosen) and -0.3 (rejected):
    # Delta = 0.8, beta * Delta = 0.4, loss = -log sigmoid(0.4) = log(1 + e^-0.4) = 0.51302.
    losses, metrics = dpo_losses(jnp.array([-10.0]), jnp.array([-12.3]), jnp.array([-10.5]),
                                 jnp.array([-12.0]), beta=0.5)
    assert float(losses[0]) == pytest.approx(0.5130, abs=1e-4)
    assert float(metrics["chosen_reward"][0]) == pytest.approx(0.25)
    assert float(metrics["rejected_reward"][0]) == pytest.approx(-0.15)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_raises_chosen_and_lowers_rejected(variant):
    def loss(policy):
        losses, _ = dpo_losses(policy[0:1], policy[1:2], jnp.array([-5.0]), jnp.array([-5.0]),
                               beta=0.1, variant=variant, label_smoothing=0.1)
        return losses.sum()

    grad = jax.grad(loss)(jnp.array([-5.0, -5.0]))
    assert grad[0] < 0 < grad[1]  # gradient descent raises log pi(chosen), lowers rejected


def test_weights_scale_losses_but_not_the_pair_count():
    losses = jnp.array([1.0, 2.0, 3.0])
    metrics = {"reward_accuracy": jnp.array([1.0, 0.0, 1.0])}
    total, count, sums = weighted_sums(losses, metrics, jnp.array([1.0, 0.5, 0.0]),
                                       jnp.array([1, 1, 1]))
    assert (float(total), float(count)) == (2.0, 3.0)
    assert float(sums["reward_accuracy"]) == 2.0


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="dpo.variant='kto'.*sigmoid"):
        dpo_losses(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=0.1,
                   variant="kto")


def test_reference_free_dpo_scores_no_reference():
    """The stage's loss without a reference equals it with one for the reference-free
    variant, and never calls the scorer on the reference (`frozen` is None)."""
    policy = jnp.asarray([[-3.0, -5.0], [-2.0, -1.0]])
    batch = {"weight": jnp.asarray([1.0, 0.5])}
    scored = []

    def score(params, batch):
        scored.append(params)
        return params

    kw = dict(score=score, variant="reference_free", beta=0.5, label_smoothing=0.0)
    without = dpo.dpo_loss(policy, batch, None, reference="none", **kw)
    assert len(scored) == 1
    with_copy = dpo.dpo_loss(policy, batch, policy - 1.0, reference="frozen", **kw)
    jax.tree.map(np.testing.assert_allclose, without, with_copy)
    want = -(np.log(1 / (1 + np.exp(-0.5 * 2.0))) + 0.5 * np.log(1 / (1 + np.exp(0.5))))
    np.testing.assert_allclose(float(without[0]), want, rtol=1e-6)

"""GRPO against a float64 NumPy reference, the worked group of 8, equal rewards, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax.losses.policy_gradient import grpo_loss, group_advantages


def _reference(new, old, ref, adv, mask, clip_low, clip_high, kl_coef, normalization):
    ratio = np.exp(new - old)
    surrogate = np.minimum(ratio * adv[:, None],
                           np.clip(ratio, 1 - clip_low, 1 + clip_high) * adv[:, None])
    kl = np.exp(ref - new) - (ref - new) - 1
    objective = (surrogate - kl_coef * kl) * mask
    if normalization == "sequence":
        return -np.mean(objective.sum(-1) / mask.sum(-1))
    return -objective.sum() / mask.sum()


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_loss_matches_float64_reference(normalization):
    rng = np.random.default_rng(0)
    b, t = 6, 9
    new, old, ref = (rng.normal(-2.0, 0.3, (b, t)) for _ in range(3))
    adv = rng.normal(0, 1, b)
    mask = (rng.random((b, t)) < 0.8).astype(np.float64)
    mask[:, 0] = 1
    args = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05)
    got, _ = grpo_loss(*(jnp.asarray(x, jnp.float32) for x in (new, old, ref, adv, mask)),
                       normalization=normalization, **args)
    want = _reference(new, old, ref, adv, mask, normalization=normalization, **args)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_worked_group_of_eight():
    # 5 correct (+1) and 3 wrong (-0.5): mean 0.4375, population std sqrt(0.52734375)
    rewards = jnp.array([[1, 1, 1, 1, 1, -0.5, -0.5, -0.5]], jnp.float32)
    advantages = np.asarray(group_advantages(rewards))[0]
    std = np.sqrt(0.71875 - 0.4375**2)
    np.testing.assert_allclose(advantages[:5], (1 - 0.4375) / std, rtol=1e-5)  # +0.7746
    np.testing.assert_allclose(advantages[5:], (-0.5 - 0.4375) / std, rtol=1e-5)  # -1.2910
    assert advantages[0] == pytest.approx(0.7746, abs=1e-4)
    assert advantages[-1] == pytest.approx(-1.2910, abs=1e-4)
    assert abs(advantages.sum()) < 1e-5
    np.testing.assert_allclose(group_advantages(rewards, scale_by_std=False)[0, :2], 0.5625)


def test_equal_rewards_give_no_policy_gradient():
    advantages = group_advantages(jnp.full((1, 4), 1.0))
    np.testing.assert_array_equal(advantages, 0.0)
    old = jnp.full((4, 5), -1.0)

    def loss(new):
        return grpo_loss(new, old, old, advantages[0], jnp.ones((4, 5)), kl_coef=0.0)[0]

    np.testing.assert_array_equal(jax.grad(loss)(old + 0.1), 0.0)


def test_clipping_stops_the_gradient_where_it_should():
    old = jnp.zeros((2, 1))

    def loss(new, advantage):
        return grpo_loss(new, old, new, jnp.array([advantage, advantage]), jnp.ones((2, 1)),
                         clip_low=0.2, clip_high=0.2)[0]

    inside, beyond = jnp.log(1.1), jnp.log(1.5)  # ratios 1.1 and 1.5
    new = jnp.array([[inside], [beyond]])
    grad_positive = jax.grad(loss)(new, 1.0)
    assert grad_positive[0, 0] < 0 and grad_positive[1, 0] == 0  # A > 0: clipped above 1.2
    grad_negative = jax.grad(loss)(jnp.array([[jnp.log(0.9)], [jnp.log(0.5)]]), -1.0)
    assert grad_negative[0, 0] > 0 and grad_negative[1, 0] == 0  # A < 0: clipped below 0.8
    _, metrics = grpo_loss(new, old, new, jnp.array([1.0, 1.0]), jnp.ones((2, 1)))
    assert float(metrics["clipped_fraction"]) == 0.5

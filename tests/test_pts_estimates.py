"""Monte-Carlo success estimates: Clopper-Pearson intervals against closed forms, a textbook
value and exhaustive binomial coverage; the adaptive stopping rule against hand-worked counts;
rounds batched together and rollouts identical to a fixed-count run."""

import math

import pytest

from phi4_jax.search.estimates import (Rollout, RolloutPolicy, clopper_pearson,
                                       estimate_prefixes)


def test_clopper_pearson_closed_forms_and_a_textbook_value():
    for n in (1, 5, 24):
        assert clopper_pearson(0, n, 0.95) == pytest.approx((0.0, 1 - 0.025 ** (1 / n)))
        assert clopper_pearson(n, n, 0.95) == pytest.approx((0.025 ** (1 / n), 1.0))
    assert clopper_pearson(5, 10, 0.95) == pytest.approx((0.18709, 0.81291), abs=1e-5)
    with pytest.raises(ValueError, match="successes=3"):
        clopper_pearson(3, 2, 0.95)


def test_clopper_pearson_covers_at_least_its_level():
    n, level = 12, 0.9
    intervals = [clopper_pearson(k, n, level) for k in range(n + 1)]
    for p in [i / 97 for i in range(1, 97)]:
        covered = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k)
                      for k, (low, high) in enumerate(intervals) if low <= p <= high)
        assert covered >= level - 1e-12


class Bernoulli:
    """Rollout i of a prefix succeeds by a fixed pattern; records each call's requests."""

    def __init__(self, patterns):
        self.patterns, self.calls = patterns, []

    def __call__(self, requests):
        self.calls.append(list(requests))
        return [[Rollout((first + i,), (-0.5,), self.patterns[prefix](first + i))
                 for i in range(count)] for prefix, first, count in requests]


def test_adaptive_rounds_stop_once_the_interval_is_p_gap_wide():
    never, half = (1,), (2,)
    sampler = Bernoulli({never: lambda i: False, half: lambda i: i % 2 == 0})
    policy = RolloutPolicy(rollouts=32, rollouts_per_round=8, confidence=0.9, p_gap=0.2)
    assert policy.looks == 4 and policy.level_per_look == pytest.approx(0.975)
    stop, keep = estimate_prefixes([never, half], sampler, policy)
    # All failures: the upper end is 1 - 0.0125**(1/n), 0.24 at n = 16 and 0.167 at 24 <= 0.2.
    assert [1 - 0.0125 ** (1 / n) <= 0.2 for n in (8, 16, 24)] == [False, False, True]
    assert len(stop.rollouts) == 24 and stop.p == 0.0
    assert stop.interval == pytest.approx((0.0, 1 - 0.0125 ** (1 / 24)))
    assert len(keep.rollouts) == 32 and keep.p == 0.5 and keep.confidence == 0.9
    assert [[(prefix, first, count) for prefix, first, count in call] for call in sampler.calls] \
        == [[(never, 0, 8), (half, 0, 8)], [(never, 8, 8), (half, 8, 8)],
            [(never, 16, 8), (half, 16, 8)], [(half, 24, 8)]]
    fixed = RolloutPolicy(rollouts=32, rollouts_per_round=32, confidence=0.9, p_gap=0.2)
    (all_of_them,) = estimate_prefixes([never], Bernoulli({never: lambda i: False}), fixed)
    assert all_of_them.rollouts[:24] == stop.rollouts  # the same rollouts, fewer of them
    assert all_of_them.interval == pytest.approx((0.0, 1 - 0.05 ** (1 / 32)))


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="rollouts_per_round=9"):
        RolloutPolicy(rollouts=8, rollouts_per_round=9, confidence=0.9, p_gap=0.2)
    with pytest.raises(ValueError, match="confidence=1"):
        RolloutPolicy(rollouts=8, rollouts_per_round=8, confidence=1, p_gap=0.2)

"""p(success | prefix), estimated from Monte-Carlo rollouts that a verifier checks.

A rollout continues the question and a prefix of a response to the end; the estimate is the
fraction of rollouts the verifier accepts. Every estimate carries a Clopper-Pearson interval,
which holds the true probability with probability at least `RolloutPolicy.confidence`.

Adaptive sampling (`rollouts_per_round < rollouts`) samples every prefix in rounds and stops
a prefix once its interval is no wider than `p_gap` (its probability is known to within the
gap the search tests for), or at `rollouts`. Looking after every round would let a fixed-n
interval miss more often than its level says, so each look uses level
1 - (1 - confidence) / looks_max (Bonferroni over the possible looks): the stated confidence
holds for the interval at whichever round sampling stopped. With one round (not adaptive)
the interval is the plain Clopper-Pearson interval at `confidence`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from scipy import special

Prefix = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rollout:
    """A sampled continuation of a prefix, its tokens' log-probs, and the verifier's verdict."""

    tokens: tuple[int, ...]
    log_probs: tuple[float, ...]
    success: bool


@dataclasses.dataclass(frozen=True)
class Estimate:
    """p(success | prefix) and what it rests on: the rollouts (none when exact) and an
    interval that holds the true value with probability >= `confidence`."""

    p: float
    rollouts: tuple[Rollout, ...]
    interval: tuple[float, float]
    confidence: float

    @classmethod
    def exact(cls, p: float) -> "Estimate":
        """A known probability (a whole response, checked by the verifier without sampling)."""
        return cls(float(p), (), (float(p), float(p)), 1.0)


@dataclasses.dataclass(frozen=True)
class RolloutPolicy:
    """How many rollouts a prefix gets: `rollouts` at most, in rounds of `rollouts_per_round`
    (equal: a fixed count, no early stop), stopping once the interval is <= `p_gap` wide."""

    rollouts: int
    rollouts_per_round: int
    confidence: float
    p_gap: float

    def __post_init__(self) -> None:
        if not 0 < self.rollouts_per_round <= self.rollouts:
            raise ValueError(f"rollouts_per_round={self.rollouts_per_round} must lie in "
                             f"[1, rollouts={self.rollouts}].")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence} must lie in (0, 1).")

    @property
    def looks(self) -> int:
        """The most rounds a prefix can take."""
        return math.ceil(self.rollouts / self.rollouts_per_round)

    @property
    def level_per_look(self) -> float:
        return 1 - (1 - self.confidence) / self.looks

    def interval(self, successes: int, n: int) -> tuple[float, float]:
        return clopper_pearson(successes, n, self.level_per_look)

    def decided(self, successes: int, n: int) -> bool:
        low, high = self.interval(successes, n)
        return high - low <= self.p_gap


def clopper_pearson(successes: int, n: int, level: float) -> tuple[float, float]:
    """The exact (conservative) two-sided binomial interval for `successes` of `n` at `level`."""
    if not 0 <= successes <= n or n < 1:
        raise ValueError(f"need 0 <= successes={successes} <= n={n} and n >= 1.")
    alpha = 1 - level
    low = 0.0 if successes == 0 else float(special.betaincinv(successes, n - successes + 1,
                                                              alpha / 2))
    high = 1.0 if successes == n else float(special.betaincinv(successes + 1, n - successes,
                                                               1 - alpha / 2))
    return low, high


# (prefix, index of its first new rollout, how many) -> those rollouts, for every request.
Request = tuple[Prefix, int, int]
RolloutSampler = Callable[[Sequence[Request]], Sequence[Sequence[Rollout]]]


def estimate_prefixes(prefixes: Sequence[Prefix], sample: RolloutSampler,
                      policy: RolloutPolicy) -> list[Estimate]:
    """Estimates for distinct `prefixes`, every round of every prefix sampled in one call.

    Rollout i of a prefix is the same whether sampling stops early or not (the sampler keys
    it by its index), so an adaptive estimate's rollouts are the first ones of a fixed one.
    """
    drawn: dict[Prefix, list[Rollout]] = {prefix: [] for prefix in prefixes}
    active = list(drawn)
    while active:
        requests = [(prefix, len(drawn[prefix]),
                     min(policy.rollouts_per_round, policy.rollouts - len(drawn[prefix])))
                    for prefix in active]
        for prefix, rollouts in zip(active, sample(requests)):
            drawn[prefix].extend(rollouts)
        active = [prefix for prefix in active if len(drawn[prefix]) < policy.rollouts and
                  not policy.decided(_successes(drawn[prefix]), len(drawn[prefix]))]
    return [_estimate(tuple(drawn[prefix]), policy) for prefix in prefixes]


def _successes(rollouts: Sequence[Rollout]) -> int:
    return sum(r.success for r in rollouts)


def _estimate(rollouts: tuple[Rollout, ...], policy: RolloutPolicy) -> Estimate:
    k, n = _successes(rollouts), len(rollouts)
    return Estimate(k / n, rollouts, policy.interval(k, n), policy.confidence)

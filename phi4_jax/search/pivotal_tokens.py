"""Pivotal Token Search (Phi-4 report, Fig. 4 and section 4.3), as pure functions of a scorer.

A scorer maps response prefixes (token ids after the question) to `Estimate`s of
p(success | question + prefix). The report's recursion

    Subdivide(P, T): if |T| <= 1 or |p(P) - p(P + T)| < p_gap: return [T]
                     L, R = Split(T); return Subdivide(P, L) ++ Subdivide(P + L, R)

keeps the spans it does not split; a kept span of one token whose two ends differ by at
least `p_gap` is a pivotal token (the right half is searched with the left half appended to
its prefix). Each split needs one new estimate, p(P + L), and whether a span splits depends
only on its two ends, so the recursion is evaluated level by level: all spans of a depth
are decided at once and their split points scored in one scorer call (one sampler batch),
with every prefix memoized (`Memo`). The result is the recursion's, in the same order.

Consequences of the recursion, by design: a span whose ends differ by less than `p_gap` is
never looked inside, so a rise and a fall inside it that cancel are not found, and a
drift spread over many tokens (each step < p_gap) yields no pivot. Searching costs about
k log2 T estimates for k pivots in T tokens, not T.

Split (`split_index`): by default at the cumulative midpoint of the tokens' log-probs, the
index j in [1, n - 1] whose cumulative surprise -sum(log p[:j]) is nearest half the span's
total (the first such j on ties; the index midpoint if the span has no surprise at all), so
unlikely tokens, where pivots tend to sit, are isolated in fewer splits. `index` splits at
n // 2, as the one public implementation does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from phi4_jax.search.estimates import Estimate, Prefix, Rollout

SPLIT_RULES = ("log_prob", "index")
# |difference| >= p_gap, with ties kept despite binary rounding (0.7 - 0.5 < 0.2 in floats).
_TOLERANCE = 1e-9

Scorer = Callable[[Sequence[Prefix]], Sequence[Estimate]]


class Memo:
    """The scorer behind a table: each distinct prefix is scored once, in as few calls as the
    search asks for (`calls` counts them)."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.table: dict[Prefix, Estimate] = {}
        self.calls = 0

    def get(self, prefixes: Sequence[Prefix]) -> list[Estimate]:
        missing = list(dict.fromkeys(p for p in prefixes if p not in self.table))
        if missing:
            self.calls += 1
            self.table.update(zip(missing, self.scorer(missing)))
        return [self.table[p] for p in prefixes]

    def known(self, prefix: Prefix, estimate: Estimate) -> None:
        """Records an estimate obtained without the scorer (a whole, verified response)."""
        self.table[prefix] = estimate

    @property
    def rollouts(self) -> int:
        return sum(len(e.rollouts) for e in self.table.values())


@dataclasses.dataclass(frozen=True)
class Pivot:
    """Token `token` at `index` of a response moves p(success) from `before` (the prefix
    before it) to `after` (the prefix including it) by at least p_gap."""

    index: int
    prefix: Prefix
    token: int
    before: Estimate
    after: Estimate

    @property
    def sign(self) -> int:
        """+1 if the token raises p(success), -1 if it lowers it."""
        return 1 if self.after.p > self.before.p else -1


def reaches(a: float, b: float, p_gap: float) -> bool:
    """|a - b| >= p_gap (ties within 1e-9 included)."""
    return abs(a - b) >= p_gap - _TOLERANCE


def split_index(log_probs: Sequence[float], rule: str = "log_prob") -> int:
    """Where a span of n >= 2 tokens splits: left = tokens[:j], right = tokens[j:], 1 <= j < n."""
    n = len(log_probs)
    if n < 2:
        raise ValueError(f"a span of {n} token(s) cannot be split.")
    if rule == "index":
        return n // 2
    if rule != "log_prob":
        raise ValueError(f"split rule {rule!r}: choose one of {SPLIT_RULES}.")
    surprise = [0.0]
    for log_p in log_probs:
        surprise.append(surprise[-1] - float(log_p))
    total = surprise[-1]
    if total <= 0:
        return n // 2
    return min(range(1, n), key=lambda j: (abs(surprise[j] - total / 2), j))


def kept_spans(response: Sequence[int], log_probs: Sequence[float], memo: Memo, *,
               p_gap: float, split: str = "log_prob") -> list[tuple[int, int]]:
    """The spans [start, end) that Subdivide(empty, response) returns, in order.

    p(empty prefix) comes from `memo`; p(whole response) must already be in it (`Memo.known`).
    """
    response = tuple(response)
    level, kept = [(0, len(response))], []
    while level:
        ends = memo.get([response[:i] for span in level for i in span])
        splitting = []
        for n, (start, end) in enumerate(level):
            if end - start > 1 and reaches(ends[2 * n].p, ends[2 * n + 1].p, p_gap):
                splitting.append((start, start + split_index(log_probs[start:end], split), end))
            else:
                kept.append((start, end))
        memo.get([response[:middle] for _, middle, _ in splitting])  # one call per depth
        level = [span for start, middle, end in splitting
                 for span in ((start, middle), (middle, end))]
    return sorted(kept)


def pivotal_tokens(response: Sequence[int], log_probs: Sequence[float], success: bool,
                   memo: Memo, *, p_gap: float, split: str = "log_prob") -> list[Pivot]:
    """The pivotal tokens of one sampled response, whose own verdict is `success`.

    The whole response is scored by its verdict (p = 1 or 0), never by sampling.
    """
    response = tuple(response)
    if len(log_probs) != len(response):
        raise ValueError(f"{len(response)} tokens but {len(log_probs)} log-probs.")
    if not response:
        return []
    memo.known(response, Estimate.exact(1.0 if success else 0.0))
    pivots = []
    for start, end in kept_spans(response, log_probs, memo, p_gap=p_gap, split=split):
        before, after = memo.get([response[:start], response[:end]])
        if end - start == 1 and reaches(before.p, after.p, p_gap):
            pivots.append(Pivot(start, response[:start], response[start], before, after))
    return pivots


@dataclasses.dataclass(frozen=True)
class PivotPair:
    """A DPO pair at a pivot: prompt = question + `pivot.prefix`, and two single tokens.

    The pivot token is one side; the other is the first token of rollouts from the same
    prefix that ended the opposite way (the report's footnote). Each side's success rate is
    recorded with the rollouts it rests on: the pivot token's is p(prefix + token), the
    alternative's the success rate of the prefix's rollouts that begin with it.
    """

    pivot: Pivot
    chosen: int
    rejected: int
    chosen_rate: float
    rejected_rate: float
    chosen_rollouts: int
    rejected_rollouts: int


def pivot_pair(pivot: Pivot) -> PivotPair | None:
    """The pair at `pivot`, or None when no rollout from its prefix ended the other way with
    another first token.

    The alternative is the first token with the most opposite-outcome rollouts (the earliest
    rollout first on ties).
    """
    opposite = pivot.sign < 0  # a raising pivot is paired with a token that led to failure
    by_token: dict[int, list[Rollout]] = {}
    for rollout in pivot.before.rollouts:
        if rollout.tokens:
            by_token.setdefault(rollout.tokens[0], []).append(rollout)
    candidates = [t for t, group in by_token.items()
                  if t != pivot.token and any(r.success == opposite for r in group)]
    if not candidates:
        return None
    other = max(candidates, key=lambda t: sum(r.success == opposite for r in by_token[t]))
    group = by_token[other]
    other_rate, other_count = sum(r.success for r in group) / len(group), len(group)
    own = (pivot.after.p, len(pivot.after.rollouts))  # 0 rollouts: a verified whole response
    if pivot.sign > 0:
        return PivotPair(pivot, pivot.token, other, own[0], other_rate, own[1], other_count)
    return PivotPair(pivot, other, pivot.token, other_rate, own[0], other_count, own[1])


@dataclasses.dataclass(frozen=True)
class QuestionSearch:
    """One question's search: p(success | question) and whether it was kept, the responses
    searched, their pivots and pairs, and every prefix's estimate (the memo)."""

    root: Estimate
    kept: bool
    responses: tuple[Rollout, ...]
    pivots: tuple[Pivot, ...]
    pairs: tuple[PivotPair, ...]
    estimates: dict[Prefix, Estimate]
    scorer_calls: int

    @property
    def rollouts(self) -> int:
        return sum(len(e.rollouts) for e in self.estimates.values())


def search_question(scorer: Scorer, *, p_gap: float, success_range: tuple[float, float],
                    responses: int, split: str = "log_prob") -> QuestionSearch:
    """Samples the question (the empty prefix), keeps it when p(success) lies in
    `success_range` (inclusive), and searches its first `responses` rollouts for pivots;
    pivots found in more than one response are kept once."""
    memo = Memo(scorer)
    (root,) = memo.get([()])
    kept = success_range[0] - _TOLERANCE <= root.p <= success_range[1] + _TOLERANCE
    searched = root.rollouts[:responses] if kept else ()
    pivots: dict[tuple[Prefix, int], Pivot] = {}
    for response in searched:
        for pivot in pivotal_tokens(response.tokens, response.log_probs, response.success,
                                    memo, p_gap=p_gap, split=split):
            pivots.setdefault((pivot.prefix, pivot.token), pivot)
    pairs = tuple(pair for pivot in pivots.values() if (pair := pivot_pair(pivot)) is not None)
    return QuestionSearch(root, kept, tuple(searched), tuple(pivots.values()), pairs,
                          dict(memo.table), memo.calls)


"""Pivotal Token Search as pure functions: planted pivots under exact scorers, thresholds, the
report's caveats, the cost in scored prefixes, memoization, the split rule, the recursion of
Fig. 4 transcribed literally as the reference, and the pairs built from rollouts."""

import math

import numpy as np
import pytest

from phi4_jax.search.estimates import Estimate, Rollout
from phi4_jax.search.pivotal_tokens import (Memo, Pivot, pivot_pair, pivotal_tokens, reaches,
                                            search_question, split_index)


class StepScorer:
    """p(prefix) = p0 + the jumps of the tokens it contains: token i moves p by jumps[i].
    Exact (no sampling); records every prefix it is asked about, call by call."""

    def __init__(self, p0, jumps):
        self.p0, self.jumps, self.calls = p0, jumps, []

    def p(self, length):
        return self.p0 + sum(d for i, d in self.jumps.items() if i < length)

    def __call__(self, prefixes):
        self.calls.append(list(prefixes))
        return [Estimate.exact(self.p(len(prefix))) for prefix in prefixes]

    @property
    def scored(self):
        return [prefix for call in self.calls for prefix in call]


def _search(length, p0, jumps, *, p_gap=0.2, split="index", log_probs=None):
    scorer = StepScorer(p0, jumps)
    response = tuple(range(100, 100 + length))
    success = scorer.p(length) > 0.5
    assert scorer.p(length) in (0.0, 1.0) or math.isclose(scorer.p(length), round(scorer.p(length)))
    log_probs = [-1.0] * length if log_probs is None else log_probs
    pivots = pivotal_tokens(response, log_probs, success, Memo(scorer), p_gap=p_gap, split=split)
    return [(p.index, p.sign, round(p.before.p, 6), round(p.after.p, 6)) for p in pivots], scorer


def _reference(length, p_of, log_probs, p_gap, split):
    """Fig. 4 of the report, transcribed: the recursion and the loop that yields pivots."""
    def subdivide(start, end):  # prefix = tokens[:start], T = tokens[start:end]
        if end - start <= 1 or abs(p_of(start) - p_of(end)) < p_gap - 1e-9:
            return [(start, end)]
        middle = start + split_index(log_probs[start:end], split)
        return subdivide(start, middle) + subdivide(middle, end)

    found = []
    for start, end in subdivide(0, length):
        if end - start == 1 and abs(p_of(start) - p_of(end)) >= p_gap - 1e-9:
            before, after = p_of(start), p_of(end)
            found.append((start, 1 if after > before else -1, round(before, 6), round(after, 6)))
    return found


def test_planted_pivots_of_both_signs_are_found():
    pivots, _ = _search(32, 0.5, {5: 0.3, 20: -0.8})
    assert pivots == [(5, 1, 0.5, 0.8), (20, -1, 0.8, 0.0)]


def test_threshold_at_and_around_p_gap():
    assert reaches(0.7, 0.5, 0.2) and reaches(0.5, 0.7, 0.2)  # 0.7 - 0.5 < 0.2 in binary floats
    assert not reaches(0.7, 0.51, 0.2)
    # 0.3 -> 0.5 at token 3 (exactly p_gap), then 0.5 -> 1.0 at token 7
    assert _search(8, 0.3, {3: 0.2, 7: 0.5})[0] == [(3, 1, 0.3, 0.5), (7, 1, 0.5, 1.0)]
    assert _search(8, 0.3, {3: 0.2, 7: 0.5}, p_gap=0.2001)[0] == [(7, 1, 0.5, 1.0)]
    assert _search(8, 0.3, {3: 0.1999, 7: 0.5001})[0] == [(7, 1, 0.4999, 1.0)]


def test_a_span_whose_ends_are_close_is_not_searched_inside():
    # p dips from 0.85 to 0.25 and recovers to 1.0: the ends differ by 0.15 < p_gap, so the
    # two large pivots inside are not found and only the question itself is ever sampled.
    pivots, scorer = _search(8, 0.85, {3: -0.6, 6: 0.75})
    assert pivots == [] and scorer.scored == [()]
    # A slow drift, 0.05 per token, has no pivot although p rises from 0.2 to 1.0.
    assert _search(16, 0.2, {i: 0.05 for i in range(16)})[0] == []


def test_a_rise_and_a_fall_that_cancel_inside_a_span_are_not_found():
    # Tokens 2 (-0.4) and 5 (+0.4) lie in the first half [0, 8), whose ends are equal; the
    # pivot in the second half is found.
    pivots, _ = _search(16, 0.5, {2: -0.4, 5: 0.4, 12: 0.5})
    assert pivots == [(12, 1, 0.5, 1.0)]


def test_cost_is_about_k_log_t_prefixes_one_scorer_call_per_depth():
    length, positions = 1024, (37, 500, 901)
    pivots, scorer = _search(length, 0.1, {i: 0.3 for i in positions})
    assert [p[0] for p in pivots] == list(positions)
    scored = scorer.scored
    assert len(scored) == len(set(scored))  # memoized: no prefix scored twice
    assert len(scored) <= len(positions) * math.log2(length) + 1 < length // 10
    assert len(scorer.calls) <= math.log2(length) + 1  # the root, then one call per depth


def test_memo_scores_each_prefix_once_across_searches():
    scorer = StepScorer(0.5, {4: 0.5})
    memo = Memo(scorer)
    response = tuple(range(8))
    first = pivotal_tokens(response, [-1.0] * 8, True, memo, p_gap=0.2)
    calls = len(scorer.calls)
    again = pivotal_tokens(response, [-1.0] * 8, True, memo, p_gap=0.2)
    assert first == again and len(scorer.calls) == calls
    assert memo.get([(0, 1, 2)]) and len(scorer.calls) == calls + 1  # a new prefix


def test_split_rule_on_hand_worked_spans():
    # surprise so far: [0, .1, .2, 4.2, 4.3]; half of 4.3 is 2.15, nearest at j = 2
    assert split_index([-0.1, -0.1, -4.0, -0.1]) == 2
    # [0, 3, 3.1, 3.2, 3.3, 3.4]: half 1.7, nearest at j = 1 (the unlikely token alone)
    assert split_index([-3.0, -0.1, -0.1, -0.1, -0.1]) == 1
    assert split_index([-3.0, -0.1, -0.1, -0.1, -0.1], "index") == 2
    assert split_index([-1.0, -2.0, -1.0]) == 1  # [0, 1, 3, 4]: j = 1 and 2 tie, first wins
    assert split_index([0.0, 0.0, 0.0, 0.0, 0.0]) == 2  # no surprise at all: the index midpoint
    assert split_index([-5.0, -5.0]) == 1
    with pytest.raises(ValueError, match="cannot be split"):
        split_index([-1.0])


@pytest.mark.parametrize("split", ["log_prob", "index"])
def test_level_by_level_equals_the_recursion_of_fig4(split):
    rng = np.random.default_rng(0)
    for _ in range(40):
        length = int(rng.integers(1, 80))
        jumps = {int(i): float(rng.choice([-0.5, -0.25, -0.1, 0.1, 0.25, 0.5]))
                 for i in rng.choice(length, size=min(length, 4), replace=False)}
        scorer = StepScorer(0.5, jumps)
        final = 1.0 if scorer.p(length) > 0.5 else 0.0  # the verdict replaces p(whole)
        log_probs = list(-rng.exponential(1.0, length))

        def p_of(n, scorer=scorer, length=length, final=final):
            return final if n == length else scorer.p(n)

        got, _ = _search_with_verdict(length, scorer, final, log_probs, split)
        assert got == _reference(length, p_of, log_probs, 0.2, split)


def _search_with_verdict(length, scorer, final, log_probs, split):
    pivots = pivotal_tokens(tuple(range(length)), log_probs, final == 1.0, Memo(scorer),
                            p_gap=0.2, split=split)
    return [(p.index, p.sign, round(p.before.p, 6), round(p.after.p, 6)) for p in pivots], scorer


def _rollout(first, success):
    return Rollout((first, 50), (-1.0, -1.0), success)


def _estimate(rollouts):
    p = sum(r.success for r in rollouts) / len(rollouts)
    return Estimate(p, tuple(rollouts), (0.0, 1.0), 0.9)


def test_pairs_take_the_other_token_from_rollouts_with_the_opposite_outcome():
    before = _estimate([_rollout(7, True), _rollout(9, False), _rollout(4, False),
                        _rollout(9, False), _rollout(7, False), _rollout(9, True)])
    after = _estimate([_rollout(1, True)] * 9 + [_rollout(1, False)])
    rising = pivot_pair(Pivot(3, (11, 12, 13), 7, before, after))
    # failures other than 7 begin with 9 (twice) and 4 (once): 9, whose rollouts succeed 1/3
    assert (rising.chosen, rising.rejected) == (7, 9)
    assert (rising.chosen_rate, rising.chosen_rollouts) == (0.9, 10)
    assert (rising.rejected_rate, rising.rejected_rollouts) == (pytest.approx(1 / 3), 3)
    falling = pivot_pair(Pivot(3, (11, 12, 13), 9, before, _estimate([_rollout(1, False)])))
    # a success that does not begin with 9: only 7 (rate 1/2 over its two rollouts)
    assert (falling.chosen, falling.rejected) == (7, 9)
    assert (falling.chosen_rate, falling.rejected_rate) == (0.5, 0.0)
    assert falling.pivot.sign == -1
    only_pivot_token = _estimate([_rollout(7, True), _rollout(7, False)])
    assert pivot_pair(Pivot(0, (), 7, only_pivot_token, after)) is None


class ScriptedSampler:
    """Rollouts from a table: prefix -> outcomes; first tokens 10 + rollout index."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def __call__(self, prefixes):
        self.asked.extend(prefixes)
        return [_estimate([Rollout((20 + len(prefix), 30 + i), (-1.0, -1.0), ok)
                           for i, ok in enumerate(self.table[prefix])]) for prefix in prefixes]


@pytest.mark.parametrize("outcomes,kept", [((0, 1, 0, 0, 0), True), ((0, 1, 1, 1, 1), True),
                                           ((0, 0, 0, 0, 0), False), ((1, 1, 1, 1, 1), False),
                                           ((0, 1, 0, 0, 0, 0), False)])
def test_questions_are_kept_when_p_success_lies_in_the_range_inclusive(outcomes, kept):
    # The first response (20, 30) failed and p(20) = 1: token 20 raises p from p(question)
    # (0.2 or 0.8: at least p_gap) and token 30 lowers it from 1 to 0.
    sampler = ScriptedSampler({(): [bool(o) for o in outcomes], (20,): [True] * 4})
    result = search_question(sampler, p_gap=0.2, success_range=(0.2, 0.8), responses=1)
    assert result.kept is kept
    assert result.root.p == pytest.approx(sum(outcomes) / len(outcomes))
    if kept:
        assert sampler.asked == [(), (20,)]
        assert [(p.index, p.token, p.sign) for p in result.pivots] == [(0, 20, 1), (1, 30, -1)]
        assert result.pivots[1].after.p == 0.0  # the whole failed response, verified
        # every rollout from the question begins with 20: no pair for the first pivot; from
        # (20,) every rollout begins with 21 and succeeds: 21 is preferred to 30
        assert [(p.chosen, p.rejected) for p in result.pairs] == [(21, 30)]
    else:
        assert sampler.asked == [()] and not result.pivots and not result.pairs

"""What a question's search writes: JSONL records, pure functions of the search result.

- Pivotal-token pairs, the PTS-DPO stage's input as is (`dpo.pair_format='pivotal_token'`):
  `prompt_ids` (the chat prompt, then the response tokens before the pivot), `chosen_id`,
  `rejected_id`, and for reading: `question_id`, `pivot_index`, `sign`, `p_before`,
  `p_after` with their rollout counts and intervals, each side's success rate and rollouts,
  and decoded text of the response prefix and both tokens.
- Whole-response pairs from the same rollouts (a correct response against an incorrect one
  to the same question), in the sequence format the DPO stage reads by default, for
  comparing PTS-DPO with plain DPO on the same sampling budget.
- A summary line per question: p(success), whether it was kept, counts, and the byte
  offsets of the two pair files after its records (how a restart drops a partial write).
"""

from __future__ import annotations

from collections.abc import Sequence

from phi4_jax.data.tokenizer import Phi4Tokenizer
from phi4_jax.search.estimates import Estimate
from phi4_jax.search.pivotal_tokens import PivotPair, QuestionSearch


def _text(ids: Sequence[int], tokenizer: Phi4Tokenizer, stop_ids: Sequence[int]) -> str:
    return tokenizer.decode([t for t in ids if t not in stop_ids])


def _estimate_fields(name: str, estimate: Estimate) -> dict:
    return {f"p_{name}": estimate.p, f"rollouts_{name}": len(estimate.rollouts),
            f"interval_{name}": list(estimate.interval)}


def pair_record(question_id: int, prompt: Sequence[int], pair: PivotPair,
                tokenizer: Phi4Tokenizer) -> dict:
    """One pivotal-token pair as the PTS-DPO stage reads it, with what explains it."""
    pivot = pair.pivot
    return {"prompt_ids": [*prompt, *pivot.prefix], "chosen_id": pair.chosen,
            "rejected_id": pair.rejected, "question_id": question_id,
            "pivot_index": pivot.index, "sign": pivot.sign,
            **_estimate_fields("before", pivot.before), **_estimate_fields("after", pivot.after),
            "confidence": pivot.before.confidence,
            "chosen_success_rate": pair.chosen_rate, "chosen_rollouts": pair.chosen_rollouts,
            "rejected_success_rate": pair.rejected_rate,
            "rejected_rollouts": pair.rejected_rollouts,
            "prefix_text": tokenizer.decode(pivot.prefix),
            "chosen_text": tokenizer.decode([pair.chosen]),
            "rejected_text": tokenizer.decode([pair.rejected])}


def whole_responses(search: QuestionSearch) -> list[tuple[tuple[int, ...], bool]]:
    """Every distinct complete response the search sampled (prefix + rollout), with its
    verdict: the question's own rollouts first, then the prefixes' in the order scored."""
    seen: dict[tuple[int, ...], bool] = {}
    for prefix, estimate in search.estimates.items():
        for rollout in estimate.rollouts:
            seen.setdefault(prefix + rollout.tokens, rollout.success)
    return list(seen.items())


def response_pair_records(question_id: int, question: str | list[dict[str, str]],
                          search: QuestionSearch,
                          tokenizer: Phi4Tokenizer, stop_ids: Sequence[int], limit: int
                          ) -> list[dict]:
    """Up to `limit` (correct, incorrect) whole-response pairs: the i-th correct response
    against the i-th incorrect one. `question` is the prompt as the pair data takes it: the
    question text (plain chat) or the prompt's messages (the reasoning template)."""
    responses = whole_responses(search)
    correct = [ids for ids, ok in responses if ok]
    wrong = [ids for ids, ok in responses if not ok]
    return [{"prompt": question, "chosen": _text(good, tokenizer, stop_ids),
             "rejected": _text(bad, tokenizer, stop_ids), "question_id": question_id,
             "chosen_ids": list(good), "rejected_ids": list(bad)}
            for good, bad in list(zip(correct, wrong))[:limit]]


def question_record(question_id: int, search: QuestionSearch | None, *, seconds: float,
                    response_pairs: int = 0, skipped: str = "") -> dict:
    """The summary line of one finished question (`skipped` says why it was not searched)."""
    if search is None:
        return {"question_id": question_id, "kept": False, "skipped": skipped,
                "seconds": seconds}
    return {"question_id": question_id, **_estimate_fields("success", search.root),
            "kept": search.kept, "responses_searched": len(search.responses),
            "pivots": len(search.pivots), "pairs": len(search.pairs),
            "response_pairs": response_pairs,
            "prefixes_sampled": sum(bool(e.rollouts) for e in search.estimates.values()),
            "rollouts": search.rollouts,
            "scorer_calls": search.scorer_calls, "seconds": seconds}

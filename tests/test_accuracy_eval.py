"""Greedy-accuracy evaluation: a model that always gives one answer scores exactly the
held-out set's share of that answer, and the eval says so beside the accuracy."""

import pytest

from phi4_jax.evals import verifiable


class _Bytes:
    """A tokenizer whose tokens are the text's UTF-8 bytes."""

    def encode(self, text):
        return list(text.encode())


def _eval_with_responses(monkeypatch, respond, problems=64, **kwargs):
    """greedy_accuracy on `modular` problems, the model replaced by `respond(question)`."""
    monkeypatch.setattr(verifiable, "chat_prompt", lambda question, tokenizer, fmt=None: question)
    monkeypatch.setattr(verifiable, "greedy_responses",
                        lambda params, graphdef, cfg, prompts, tokenizer, **kw:
                        [respond(q) for q in prompts])
    return verifiable.greedy_accuracy(None, None, None, _Bytes(), seed=0, problems=problems,
                                      max_new_tokens=8, batch_size=8, families=("modular",),
                                      **kwargs)


def test_a_constant_answer_scores_its_share_and_is_flagged(monkeypatch):
    exercises = verifiable.held_out_problems(0, 64, families=("modular",))
    zeros = sum(ex.answer == "0" for ex in exercises)
    counts = {}
    for ex in exercises:
        counts[ex.answer] = counts.get(ex.answer, 0) + 1
    assert 0 < zeros < 64
    scores = _eval_with_responses(monkeypatch, lambda q: "Some steps.\nFinal answer: 0")
    assert scores["accuracy"] == pytest.approx(zeros / 64)
    assert scores["accuracy_baseline"] == pytest.approx(max(counts.values()) / 64)
    assert scores["answer_mode_share"] == 1.0
    assert scores["greedy_response_tokens"] == len("Some steps.\nFinal answer: 0")
    assert "refusal_accuracy" in scores  # a quarter as many unanswerable problems by default


def test_no_refusal_problems_when_asked_for_none(monkeypatch):
    asked = []
    scores = _eval_with_responses(monkeypatch, lambda q: asked.append(q) or "Final answer: 1",
                                  problems=8, refusal_problems=0)
    assert len(asked) == 8 and "refusal_accuracy" not in scores


def test_responses_without_an_answer_have_no_mode(monkeypatch):
    scores = _eval_with_responses(monkeypatch, lambda q: "I am still thinking", problems=16)
    assert scores["accuracy"] == 0.0 and scores["answer_mode_share"] == 0.0


def test_mode_share_by_hand():
    assert verifiable.mode_share(["3", "3", None, "4"]) == 0.5
    assert verifiable.mode_share([None, None]) == 0.0
    assert verifiable.mode_share(["7"]) == 1.0


def test_an_offset_reads_problems_past_the_reported_ones():
    reported = verifiable.held_out_problems(0, 8, families=("modular",))
    validation = verifiable.held_out_problems(0, 4, families=("modular",), first=8)
    assert validation == verifiable.held_out_problems(0, 12, families=("modular",))[8:]
    assert not {ex.question for ex in validation} & {ex.question for ex in reported}

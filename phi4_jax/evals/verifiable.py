"""Greedy accuracy on held-out verifiable problems: the model answers each built-in exercise of
the eval span (never trained on) in ChatML, and the verifier reads the final answer from the
response alone. Unanswerable variants score a refusal ("I don't know") as correct.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from phi4_jax.data import synthetic
from phi4_jax.data.chat import prompt_messages
from phi4_jax.data.synthetic.reasoning import ReasoningFormat
from phi4_jax.data.sources import SYNTHETIC_SPAN
from phi4_jax.data.tokenizer import Phi4Tokenizer
from phi4_jax.model.config import ModelConfig
from phi4_jax.sampling import decode


def held_out_problems(seed: int, count: int, *, unanswerable: bool = False,
                      families: Sequence[str] = synthetic.FAMILIES,
                      first: int = 0) -> list[synthetic.Exercise]:
    """`count` exercises of the synthetic eval span from its index `first` on, drawn from
    `families` (or the unanswerable variants, which have their own word-problem families).
    A `first` past the reported problems gives a validation set apart from them."""
    start = SYNTHETIC_SPAN + first
    if unanswerable:
        return [synthetic.unanswerable_exercise(seed, start + i) for i in range(count)]
    return [synthetic.exercise(seed, start + i, families) for i in range(count)]


def chat_prompt(question: str, tokenizer: Phi4Tokenizer,
                fmt: ReasoningFormat | None = None) -> list[int]:
    """The ChatML prompt that asks a question (in the reasoning format, if given)."""
    messages = fmt.messages(question) if fmt else prompt_messages(question)
    return tokenizer.encode_chat(messages, add_generation_prompt=True).ids


def greedy_responses(params: Any, graphdef: nnx.GraphDef, cfg: ModelConfig,
                     prompts: Sequence[Sequence[int]], tokenizer: Phi4Tokenizer, *,
                     max_new_tokens: int, batch_size: int) -> list[str]:
    """The greedy completion of each prompt, decoded up to its stop token."""
    sampling = decode.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                     stop_ids=(tokenizer.end_of_turn_id, tokenizer.eot_id),
                                     pad_id=tokenizer.pad_id)
    return sampled_responses(params, graphdef, cfg, prompts, tokenizer, sampling=sampling,
                             batch_size=batch_size)


def sampled_responses(params: Any, graphdef: nnx.GraphDef, cfg: ModelConfig,
                      prompts: Sequence[Sequence[int]], tokenizer: Phi4Tokenizer, *,
                      sampling: decode.SamplingParams, batch_size: int, seed: int = 0,
                      row_ids: Sequence[int] | None = None) -> list[str]:
    """Each prompt's completion as `sampling` says, decoded up to its stop token; row i draws
    with the key of (`seed`, `row_ids[i]`), by default its index."""
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    generate = decode.compiled_generate(graphdef, cfg, sampling)
    length = max(len(p) for p in prompts)
    responses = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape for every batch
        out = generate(params, decode.left_pad([prompts[i] for i in rows], length, tokenizer.pad_id),
                       decode.row_keys(seed, [row_ids[i] for i in rows]))
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        for row in range(len(chunk)):
            ids = [t for t, m in zip(tokens[row], mask[row]) if m and t not in sampling.stop_ids]
            responses.append(tokenizer.decode(ids))
    return responses


def greedy_accuracy(params: Any, graphdef: nnx.GraphDef, cfg: ModelConfig,
                    tokenizer: Phi4Tokenizer, *, seed: int, problems: int, max_new_tokens: int,
                    batch_size: int, fmt: ReasoningFormat | None = None,
                    families: Sequence[str] = synthetic.FAMILIES,
                    refusal_problems: int | None = None, first: int = 0) -> dict[str, float]:
    """`accuracy` on answerable held-out problems of `families` and `refusal_accuracy` on
    `refusal_problems` unanswerable ones (by default a quarter as many; 0 skips them). With a
    reasoning format the prompt asks for a think block and the answer is read after it.

    Beside `accuracy`: `accuracy_baseline`, what always giving the problems' most common
    answer would score, `answer_mode_share`, the share of responses giving the model's own
    most common final answer, and `greedy_response_tokens`, the mean length of a response (its
    decoded text encoded again). A tiny model that learns one answer shows accuracy equal
    to the baseline and a share near 1: a prior, not a skill. The problems start at index
    `first` of the eval span."""
    if refusal_problems is None:
        refusal_problems = max(1, problems // 4)
    scores = {}
    for name, unanswerable, count in (("accuracy", False, problems),
                                      ("refusal_accuracy", True, refusal_problems)):
        if not count:
            continue
        exercises = held_out_problems(seed, count, unanswerable=unanswerable, families=families,
                                      first=first)
        responses = greedy_responses(params, graphdef, cfg,
                                     [chat_prompt(ex.question, tokenizer, fmt) for ex in exercises],
                                     tokenizer, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size)
        answers = [fmt.split(r)[0] if fmt else r for r in responses]
        scores[name] = float(np.mean([synthetic.verify(ex, a) for ex, a in zip(exercises,
                                                                                answers)]))
        if not unanswerable:
            scores["accuracy_baseline"] = mode_share([ex.answer for ex in exercises])
            scores["answer_mode_share"] = mode_share([synthetic.extract_final_answer(a)
                                                      for a in answers])
            scores["greedy_response_tokens"] = float(np.mean([len(tokenizer.encode(r))
                                                       for r in responses]))
    return scores


def mode_share(values: Sequence[str | None]) -> float:
    """The share of `values` equal to the most common one; None (no answer) never counts."""
    counts = collections.Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][1] / len(values) if counts else 0.0

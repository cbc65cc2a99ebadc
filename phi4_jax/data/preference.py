"""Preference data for DPO: records -> (prompt, chosen, rejected) token ids -> fixed-shape rows.

Records:
  - JSON `{"prompt": ..., "chosen": ..., "rejected": ...}`; the prompt is text (one user turn)
    or a list of messages, each response text or a list of messages ending in the
    assistant's. Optional `"scores": {"chosen": {...}, "rejected": {...}}` hold judge scores
    per criterion (accuracy, style, detail) within `SCORE_RANGE`.
  - JSON `{"prompt_ids": [...], "chosen_id": t, "rejected_id": t}`: a pivotal-token pair
    (Pivotal Token Search output), token ids end to end, nothing re-tokenized.
  - a built-in exercise: chosen is its worked solution, rejected a corrupted one (a wrong
    last step, or only a wrong final answer); unanswerable variants prefer "I don't know" to
    an invented number; with judge scores, a terse unexplained answer is a third kind of
    rejected response. As a pivotal-token pair, the prompt is the question and the worked
    solution up to its final answer, and the pivot is the answer's first token.

Sequence pairs become [2, T] rows (chosen, rejected), each the prompt followed by the
response, shifted once (`losses.lm.shift_for_next_token`), with the loss mask on the
response's targets only, built from lengths, never from token values, so a pad id equal to
the end token cannot mask the real end. Pivotal pairs become one prompt row and the two
candidate tokens, scored at the prompt's last position by a single forward. Any record may
name its LoRA adapter (`"adapter": k`, `data.adapters`).
"""

from __future__ import annotations

import dataclasses
import random
import re
import functools
import zlib
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import grain
import numpy as np

from phi4_jax.data import adapters, bad_records, pipeline, synthetic
from phi4_jax.data.chat import Counts, RecordPlace, prompt_messages, where
from phi4_jax.data.sources import BadRecordError
from phi4_jax.data.tokenizer import Phi4Tokenizer
from phi4_jax.losses.lm import shift_for_next_token

PAIR_FORMATS = ("sequence", "pivotal_token")
SCORE_CRITERIA = ("accuracy", "style", "detail")
SCORE_RANGE = (0.0, 10.0)


@dataclasses.dataclass(frozen=True)
class Pair:
    """Token ids of one preference pair; `scores` maps side -> criterion -> judge score."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    scores: Mapping[str, Mapping[str, float]] | None = None


@dataclasses.dataclass(frozen=True)
class JudgeWeighting:
    """How judge scores weight a pair's loss: `none` (1 for every pair) or `margin`:
    clip(mean over criteria of (chosen - rejected) / margin_scale, min_weight, 1)."""

    scheme: str = "none"
    margin_scale: float = 5.0
    min_weight: float = 0.1

    def weight(self, pair: Pair, source: RecordPlace | str) -> float:
        if self.scheme == "none":
            return 1.0
        if pair.scores is None:
            raise BadRecordError(f"{source} has no judge scores, but dpo.judge_weighting="
                                 f"{self.scheme!r} weights pairs by them")
        margin = np.mean([pair.scores["chosen"][c] - pair.scores["rejected"][c]
                          for c in SCORE_CRITERIA])
        return float(np.clip(margin / self.margin_scale, self.min_weight, 1.0))


# --- records -> pairs ----------------------------------------------------------------------

def pair_from_record(record: Any, tokenizer: Phi4Tokenizer, *, pair_format: str,
                     judged: bool) -> Pair:
    """The token-id pair a record holds; BadRecordError if it holds no usable pair."""
    source = where(record)
    if isinstance(record, synthetic.Exercise):
        return _exercise_pair(record, tokenizer, pair_format=pair_format, judged=judged)
    if not isinstance(record, Mapping):
        raise BadRecordError(f"{source} is not a JSON object; a preference record has prompt, "
                             f"chosen and rejected")
    if pair_format == "pivotal_token":
        pair = _pivotal_record(record, tokenizer, source)
    else:
        pair = _sequence_record(record, tokenizer, source)
    if pair.chosen == pair.rejected:
        raise BadRecordError(f"{source}: chosen and rejected are identical; the pair teaches "
                             f"nothing")
    return pair


def _pivotal_record(record: Mapping, tokenizer: Phi4Tokenizer, source: RecordPlace) -> Pair:
    missing = [k for k in ("prompt_ids", "chosen_id", "rejected_id") if k not in record]
    if missing:
        raise BadRecordError(f"{source} lacks {missing}; a pivotal-token pair has prompt_ids, "
                             f"chosen_id and rejected_id (dpo.pair_format='pivotal_token')")
    ids = [*record["prompt_ids"], record["chosen_id"], record["rejected_id"]]
    if not record["prompt_ids"] or not all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size
                                           for i in ids):
        raise BadRecordError(f"{source}: prompt_ids must be non-empty and every id an integer "
                             f"in [0, {tokenizer.vocab_size})")
    return Pair(tuple(record["prompt_ids"]), (record["chosen_id"],), (record["rejected_id"],),
                _scores(record, source))


def _sequence_record(record: Mapping, tokenizer: Phi4Tokenizer, source: RecordPlace) -> Pair:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise BadRecordError(f"{source} lacks {missing}; a preference record is "
                             f'{{"prompt": ..., "chosen": ..., "rejected": ...}}')
    prompt = record["prompt"]
    messages = prompt_messages(prompt) if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not messages:
        raise BadRecordError(f"{source}: prompt must be text or a non-empty list of messages")
    try:
        prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True).ids
    except (TypeError, ValueError) as error:
        raise BadRecordError(f"{source}: prompt: {error}") from error
    return Pair(tuple(prompt_ids), _response_ids(record["chosen"], tokenizer, source, "chosen"),
                _response_ids(record["rejected"], tokenizer, source, "rejected"),
                _scores(record, source))


def _response_ids(response: Any, tokenizer: Phi4Tokenizer, source: RecordPlace, side: str
                  ) -> tuple[int, ...]:
    """An assistant response (text, or messages whose last is the assistant's) as the tokens
    after the generation prompt: its content and the turn end (`<|im_end|>`; Phi-4-mini `<|end|>`)."""
    if isinstance(response, list) and response and isinstance(response[-1], Mapping):
        if response[-1].get("role") != "assistant":
            raise BadRecordError(f"{source} {side}: the last message must be the assistant's")
        response = response[-1].get("content")
    if not isinstance(response, str) or not response.strip():
        raise BadRecordError(f"{source} {side} is empty; both responses need text")
    return (*tokenizer.encode(response), tokenizer.end_of_turn_id)


def _scores(record: Mapping, source: RecordPlace) -> dict | None:
    scores = record.get("scores")
    if scores is None:
        return None
    low, high = SCORE_RANGE
    try:
        table = {side: {c: float(scores[side][c]) for c in SCORE_CRITERIA}
                 for side in ("chosen", "rejected")}
    except (KeyError, TypeError, ValueError) as error:
        raise BadRecordError(f"{source}: scores need chosen and rejected, each with numbers for "
                             f"{list(SCORE_CRITERIA)} ({error!r})") from error
    bad = [(s, c, v) for s, row in table.items() for c, v in row.items() if not low <= v <= high]
    if bad:
        raise BadRecordError(f"{source}: judge score {bad[0][0]}.{bad[0][1]}={bad[0][2]} lies "
                             f"outside the declared range [{low}, {high}]")
    return table


# --- built-in pairs from exercises -------------------------------------------------------------

def _exercise_pair(ex: synthetic.Exercise, tokenizer: Phi4Tokenizer, *, pair_format: str,
                   judged: bool) -> Pair:
    rng = random.Random(zlib.crc32(ex.question.encode()))
    prompt = tuple(tokenizer.encode_chat(prompt_messages(ex.question),
                                         add_generation_prompt=True).ids)
    if pair_format == "pivotal_token":
        return _pivotal_exercise_pair(ex, prompt, tokenizer, rng)
    rejected, scores = corrupted_solution(ex, rng, judged=judged)

    def response(text):
        return (*tokenizer.encode(text), tokenizer.end_of_turn_id)

    return Pair(prompt, response(ex.solution), response(rejected), scores)


def _pivotal_exercise_pair(ex: synthetic.Exercise, prompt: tuple[int, ...],
                           tokenizer: Phi4Tokenizer, rng: random.Random) -> Pair:
    """Prompt = question + the solution up to its final answer; the pivot is the answer's
    first token against the first token of a wrong answer."""
    head, _, _ = ex.solution.rpartition(ex.answer)
    wrong = str(rng.randint(2, 99)) if ex.answer == synthetic.REFUSAL else \
        _wrong_answer(ex.answer, rng)
    chosen, rejected = tokenizer.encode(head + ex.answer), tokenizer.encode(head + wrong)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == min(len(chosen), len(rejected)):
        raise BadRecordError(f"exercise {ex.question[:40]!r}...: its right and wrong answers "
                             f"share every token, so no single token decides between them")
    return Pair(prompt + tuple(chosen[:shared]), (chosen[shared],), (rejected[shared],), None)


def corrupted_solution(ex: synthetic.Exercise, rng: random.Random, *, judged: bool
                       ) -> tuple[str, dict]:
    """A rejected response for an exercise and judge scores for both sides (0-10).

    Kinds: a wrong last step (the wrong value where the solution computes the answer and in
    the final answer), a wrong final answer only, for unanswerable exercises an invented
    number, and (only when `judged`) a correct but unexplained answer.
    """
    good = {"accuracy": 10.0, "style": 8.0, "detail": 9.0}
    if ex.answer == synthetic.REFUSAL:
        invented = f"The answer is {rng.randint(2, 99)}.\nFinal answer: {rng.randint(2, 99)}"
        return invented, {"chosen": good, "rejected": {"accuracy": 0.0, "style": 6.0,
                                                       "detail": 2.0}}
    kinds = ["step", "final"] + (["terse"] if judged else [])
    kind = kinds[rng.randrange(len(kinds))]
    if kind == "terse":
        return f"Final answer: {ex.answer}", {"chosen": good, "rejected": {
            "accuracy": 9.0, "style": 5.0, "detail": 1.0}}
    wrong = _wrong_answer(ex.answer, rng)
    body, _, _ = ex.solution.rpartition("Final answer:")
    if kind == "step":
        lines = body.rstrip("\n").split("\n")
        lines[-1] = _replace_last(lines[-1], ex.answer, wrong)
        body = "\n".join(lines) + "\n"
    scores = {"accuracy": 1.0, "style": 7.0, "detail": 8.0 if kind == "step" else 7.0}
    return f"{body}Final answer: {wrong}", {"chosen": good, "rejected": scores}


def _replace_last(text: str, old: str, new: str) -> str:
    head, found, tail = text.rpartition(old)
    return head + new + tail if found else text


def _wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer in the same format (integer, decimal or fraction)."""
    if match := re.fullmatch(r"(-?\d+)/(\d+)", answer):
        return f"{int(match.group(1)) + rng.choice([-1, 1, 2])}/{match.group(2)}"
    value = Fraction(answer)
    places = len(answer.partition(".")[2])
    step = Fraction(1, 10**places) * rng.choice([1, 2, 3, 10])
    wrong = value + step * rng.choice([-1, 1])
    return f"{float(wrong):.{places}f}" if places else str(int(wrong))


# --- pairs -> rows -------------------------------------------------------------------------

def sequence_rows(pair: Pair, *, seq_len: int, pad_id: int, weight: float
                  ) -> dict[str, np.ndarray] | None:
    """[2, T] rows (chosen, rejected) of a pair, or None if a side exceeds `seq_len` targets."""
    sides = []
    for response in (pair.chosen, pair.rejected):
        tokens = np.asarray(pair.prompt + response, np.int32)
        if len(tokens) - 1 > seq_len:
            return None
        token_mask = np.r_[np.zeros(len(pair.prompt)), np.ones(len(response))].astype(np.float32)
        sides.append(_padded_row(*shift_for_next_token(tokens, token_mask), seq_len, pad_id))
    rows = {key: np.stack([side[key] for side in sides]) for key in sides[0]}
    return {**rows, "weight": np.float32(weight)}


def pivotal_rows(pair: Pair, *, seq_len: int, pad_id: int, weight: float
                 ) -> dict[str, np.ndarray] | None:
    """One prompt row and its two candidate next tokens, or None if the prompt exceeds `seq_len`."""
    n = len(pair.prompt)
    if n > seq_len:
        return None
    inputs = np.full(seq_len, pad_id, np.int32)
    inputs[:n] = pair.prompt
    real = np.arange(seq_len) < n
    return {"inputs": inputs, "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32),
            "segment_ids": real.astype(np.int32), "last_index": np.int32(n - 1),
            "candidates": np.asarray([pair.chosen[0], pair.rejected[0]], np.int32),
            "weight": np.float32(weight)}


def _padded_row(inputs: np.ndarray, targets: np.ndarray, loss_mask: np.ndarray, seq_len: int,
                pad_id: int) -> dict[str, np.ndarray]:
    n = len(inputs)
    real = np.arange(seq_len) < n

    def pad(x, value):
        return np.concatenate([x, np.full(seq_len - n, value, x.dtype)])

    return {"inputs": pad(inputs, pad_id), "targets": pad(targets, pad_id),
            "loss_mask": pad(loss_mask, 0.0),
            "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32),
            "segment_ids": real.astype(np.int32)}


def pair_example(record: Any, *, tokenizer: Phi4Tokenizer, pair_format: str, judged: bool,
                 weighting: JudgeWeighting, seq_len: int, counts: Counts,
                 routing: adapters.Routing = adapters.Routing(())
                 ) -> dict[str, np.ndarray] | None:
    """One record's pair rows (under LoRA with the pair's `adapter_ids`, `data.adapters`), or
    None when over-long (counted as dropped)."""
    source = where(record)
    adapter_id = routing.id_of(record, source)
    pair = pair_from_record(record, tokenizer, pair_format=pair_format, judged=judged)
    counts.add(examples=1)
    make_rows = pivotal_rows if pair_format == "pivotal_token" else sequence_rows
    rows = make_rows(pair, seq_len=seq_len, pad_id=tokenizer.pad_id,
                     weight=weighting.weight(pair, source))
    if rows is None:
        counts.add(dropped=1)
        return None
    return adapters.with_id(rows, adapter_id)


def with_reference(table: np.ndarray, example: Callable, indexed: tuple[int, Any]
                   ) -> dict[str, np.ndarray] | None:
    """A record's rows with its stored reference log-probs [2] (over (index, record))."""
    index, record = indexed
    rows = example(record)
    if rows is None:
        return None
    return {**rows, "reference_log_probs": table[index]}


def pair_rows(name: str, records: grain.MapDataset, cfg: Mapping[str, Any], *,
              example: Callable, reference: Mapping[str, np.ndarray] | None = None
              ) -> grain.IterDataset:
    """One source's pair rows (a `pipeline.RowsFn`); with precomputed reference log-probs
    (per source), records arrive as (index, record) and each row carries its pair's."""
    if reference is not None:
        example = functools.partial(with_reference, reference[name], example)
    rows = bad_records.convert(name, records, example, cfg["sources"][name])
    threads = pipeline.readers(cfg, "read_threads")
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * max(threads, 1))
    return rows.filter(lambda r: r is not None).to_iter_dataset(read_options)

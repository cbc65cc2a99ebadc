"""Problems with a checkable answer (GRPO, the teachability filter) and the training rows
of responses sampled to them.

A problem is a built-in exercise or a JSON record `{"question": ..., "answer": ...}` (which
may name its LoRA adapter, `"adapter": k`, `data.adapters`). Its row
is the reasoning prompt left-padded to a fixed length, with the question and answer text
kept for the reward. After sampling, `response_rows` lays prompt and response out as
training rows in the same slots the sampler used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from phi4_jax.data import adapters, bad_records, synthetic
from phi4_jax.data.chat import Counts, where
from phi4_jax.data.synthetic.reasoning import ReasoningFormat
from phi4_jax.data.sources import BadRecordError
from phi4_jax.data.tokenizer import Phi4Tokenizer
from phi4_jax.sampling import decode


def problem_of(record: Any) -> synthetic.Exercise:
    """A problem with a checkable answer: a built-in exercise, or JSON with `question` and
    `answer`; BadRecordError otherwise."""
    if isinstance(record, synthetic.Exercise):
        return record
    question = record.get("question") if isinstance(record, dict) else None
    answer = record.get("answer") if isinstance(record, dict) else None
    if not isinstance(question, str) or not isinstance(answer, (str, int, float)) or \
            not str(answer).strip():
        raise BadRecordError(f"{where(record)} is not a problem with a checkable answer; a GRPO "
                             f'record is {{"question": ..., "answer": ...}}')
    return synthetic.Exercise("json", question, "", str(answer))


def problem_row(record: Any, *, tokenizer: Phi4Tokenizer, fmt: ReasoningFormat,
                prompt_len: int, counts: Counts,
                routing: adapters.Routing = adapters.Routing(())) -> dict[str, np.ndarray] | None:
    """A problem's left-padded prompt (reasoning template), its question and answer text and
    under LoRA its `adapter_ids` (`data.adapters`)."""
    adapter_id = routing.id_of(record, where(record))
    ex = problem_of(record)
    ids = tokenizer.encode_chat(fmt.messages(ex.question), add_generation_prompt=True).ids
    counts.add(examples=1)
    if len(ids) > prompt_len:
        counts.add(dropped=1)
        return None
    padded = decode.left_pad([ids], prompt_len, tokenizer.pad_id)
    return adapters.with_id({**{f"prompt_{key}": value[0] for key, value in padded.items()},
                             "question": np.asarray(ex.question),
                             "answer": np.asarray(ex.answer)}, adapter_id)


def problem_rows(name: str, records: grain.MapDataset, cfg: Mapping[str, Any], *,
                 example) -> grain.IterDataset:
    """One source's problem rows (a `pipeline.RowsFn`)."""
    examples = bad_records.convert(name, records, example, cfg["sources"][name])
    return examples.filter(lambda r: r is not None).to_iter_dataset()


def response_rows(prompt: dict[str, np.ndarray], out: decode.Generation,
                  advantages: np.ndarray) -> dict[str, np.ndarray]:
    """Training rows [R, T] of prompts and their sampled responses, in the sampler's slots.

    The sequence is prompt (P slots) + response (N slots); position t predicts slot t + 1,
    so T = P + N - 1. Only emitted response tokens are trained on.
    """
    prompts, positions = prompt["tokens"], prompt["positions"]
    tokens = np.concatenate([prompts, out.tokens], axis=1)
    emitted = out.mask.astype(bool)
    real = np.concatenate([prompt["segment_ids"].astype(bool), emitted], axis=1)
    steps = np.arange(out.tokens.shape[1])
    all_positions = np.concatenate([positions, positions[:, -1:] + 1 + steps], axis=1)
    target_mask = np.concatenate([np.zeros(prompts.shape, np.float32)[:, 1:],
                                  emitted.astype(np.float32)], axis=1)
    old = np.concatenate([np.zeros(prompts.shape, np.float32)[:, 1:], out.log_probs], axis=1)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.where(real, all_positions, 0)[:, :-1].astype(np.int32),
            "segment_ids": real[:, :-1].astype(np.int32), "loss_mask": target_mask,
            "old_log_probs": old.astype(np.float32), "advantages": advantages.astype(np.float32)}

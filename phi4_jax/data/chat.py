"""Supervised fine-tuning data: conversations -> ChatML token rows with a mask on what the model
must learn to say.

A record is a conversation: a JSON object with `messages` (a list of `{role, content}` with
roles system / user / assistant), or a built-in exercise (the user asks its question, the
assistant gives its worked solution; unanswerable variants answer "I don't know"). It is
encoded with Phi-4's ChatML (`tokenizer.encode_chat`), trained on the assistant turns'
content and their `<|im_end|>` only, shifted once (`losses.lm.shift_for_next_token`) and
packed first-fit into rows without splitting a conversation, at most
`data.max_segments_per_row` to a row: each conversation is its own segment, so none attends
to another. Under LoRA each conversation carries its adapter id (`data.adapters`) through
packing, one per token, and its row keeps one `adapter_ids` (packed rows never mix adapters).

Over-long conversations (more than `seq_len + 1` tokens) follow `truncation`: `drop` skips
them, `truncate` keeps their first `seq_len + 1` tokens if an assistant token survives (else
skips them). Either way they are counted (`Counts`). A record that cannot be a training
example (no `messages`, no assistant turn, an empty assistant reply) raises
`BadRecordError`.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from phi4_jax.data import adapters, bad_records, pipeline, synthetic
from phi4_jax.data.packing import training_row
from phi4_jax.data.synthetic.reasoning import ReasoningFormat
from phi4_jax.data.sources import BadRecordError
from phi4_jax.data.tokenizer import Phi4Tokenizer
from phi4_jax.losses.lm import shift_for_next_token

TRUNCATION = ("drop", "truncate")
PACKING_BINS = 16  # first-fit bins open at once: more bins, less padding, more mixing of epochs


@dataclasses.dataclass
class Counts:
    """Examples seen, truncated and dropped as over-long; shared by the reading threads."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, delta in deltas.items():
                setattr(self, key, getattr(self, key) + delta)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_examples": float(self.examples),
                f"{prefix}_truncated": float(self.truncated),
                f"{prefix}_dropped_over_length": float(self.dropped)}


class RecordPlace:
    """Where a record came from, formatted only when a message is: a JSONL record's line number
    counts the newlines before it (`sources.JsonRecord`), a scan of the file per record."""

    def __init__(self, record: Any):
        self._record = record

    def __str__(self) -> str:
        return getattr(self._record, "where", "") or "a record"


def where(record: Any) -> RecordPlace:
    """Where a record came from, for messages (looked up when one is formatted)."""
    return RecordPlace(record)


def messages_of(record: Any, reasoning_format: ReasoningFormat | None = None
                ) -> list[Mapping[str, str]]:
    """The conversation a record holds; BadRecordError if it holds none. A built-in exercise
    becomes a plain exchange, or with `reasoning_format` a think-then-answer trace."""
    if isinstance(record, synthetic.Exercise):
        if reasoning_format is not None:
            return [*reasoning_format.messages(record.question),
                    {"role": "assistant", "content": reasoning_format.trace(record)}]
        return [{"role": "user", "content": record.question},
                {"role": "assistant", "content": record.solution}]
    messages = record.get("messages") if isinstance(record, Mapping) else None
    if not isinstance(messages, list) or not messages:
        raise BadRecordError(f"{where(record)} has no 'messages' list; an SFT record is "
                             f'{{"messages": [{{"role": "user", "content": ...}}, ...]}}')
    return messages


def prompt_messages(question: str) -> list[dict[str, str]]:
    """The conversation that asks a question (a generation prompt follows it)."""
    return [{"role": "user", "content": question}]


def encode_conversation(messages: Sequence[Mapping[str, str]], tokenizer: Phi4Tokenizer, *,
                        source: str | RecordPlace) -> tuple[np.ndarray, np.ndarray]:
    """ChatML ids and the 0/1 mask of the tokens trained on; BadRecordError for a conversation
    without a non-empty assistant turn."""
    try:
        encoding = tokenizer.encode_chat(messages)
    except (TypeError, ValueError) as error:
        raise BadRecordError(f"{source}: {error}") from error
    assistant = [m for m in messages if m.get("role") == "assistant"]
    if not assistant:
        raise BadRecordError(f"{source} has no assistant turn: nothing to train on")
    if not all(str(m.get("content", "")).strip() for m in assistant):
        raise BadRecordError(f"{source} has an empty assistant reply")
    return np.asarray(encoding.ids, np.int32), np.asarray(encoding.loss_mask, np.float32)


def sft_example(record: Any, *, tokenizer: Phi4Tokenizer, seq_len: int, truncation: str,
                counts: Counts, reasoning_format: ReasoningFormat | None = None,
                routing: adapters.Routing = adapters.Routing(())
                ) -> dict[str, np.ndarray] | None:
    """One conversation's `inputs`, `targets`, `loss_mask` (at most `seq_len` long) and under
    LoRA its adapter id per token (for packing), or None when it is skipped as over-long."""
    source = where(record)
    adapter_id = routing.id_of(record, source)
    ids, mask = encode_conversation(messages_of(record, reasoning_format), tokenizer,
                                    source=source)
    counts.add(examples=1)
    if len(ids) > seq_len + 1:
        if truncation == "drop" or not mask[:seq_len + 1][1:].any():
            counts.add(dropped=1)
            return None
        counts.add(truncated=1)
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    inputs, targets, loss_mask = shift_for_next_token(ids, mask)
    example = {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}
    if adapter_id is not None:
        example["adapter_ids"] = np.full(len(inputs), adapter_id, np.int32)
    return example


def pack_examples(examples: grain.IterDataset, seq_len: int, max_segments: int,
                  with_adapter_ids: bool = False) -> grain.IterDataset:
    """Rows of `seq_len` holding whole examples first-fit, each its own segment
    (`packing.ROW_KEYS`), at most `max_segments` per row (`data.max_segments_per_row`, the
    slots cuDNN's packed attention compiles in); padding is segment 0 with no loss.
    `with_adapter_ids`: the examples carry adapter ids, and so do the rows."""
    keys = ("inputs", "targets", "loss_mask", *(("adapter_ids",) if with_adapter_ids else ()))
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={key: seq_len for key in keys},
        num_packing_bins=PACKING_BINS, shuffle_bins=False, max_sequences_per_bin=max_segments)
    return packed.map(training_row)


def conversation_rows(name: str, records: grain.MapDataset, cfg: Mapping[str, Any], *,
                      tokenizer: Phi4Tokenizer, seq_len: int, truncation: str, counts: Counts,
                      reasoning_format: ReasoningFormat | None,
                      adapter_names: tuple[str, ...] = ()) -> grain.IterDataset:
    """One source's conversations packed whole into rows (a `pipeline.RowsFn`), each routed
    to its adapter among `adapter_names` (`lora.adapters`; none without LoRA)."""
    routing = adapters.Routing(adapter_names, packed=cfg["max_segments_per_row"] > 1)
    example = functools.partial(sft_example, tokenizer=tokenizer, seq_len=seq_len,
                                truncation=truncation, counts=counts,
                                reasoning_format=reasoning_format, routing=routing)
    examples = bad_records.convert(name, records, example, cfg["sources"][name])
    examples = examples.filter(lambda e: e is not None)
    threads = pipeline.readers(cfg, "read_threads")
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * max(threads, 1))
    return pack_examples(examples.to_iter_dataset(read_options), seq_len,
                         cfg["max_segments_per_row"], with_adapter_ids=bool(routing.adapters))

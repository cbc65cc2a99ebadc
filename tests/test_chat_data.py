"""SFT data: ChatML ids and masks against a hand-built conversation, refusals, bad records,
truncation and whole-conversation packing."""

import grain
import numpy as np
import pytest

from phi4_jax.data import chat, synthetic
from phi4_jax.data.sources import BadRecordError, JsonRecord
from phi4_jax.data.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer("phi4")
IM_START, IM_END, IM_SEP = 100264, 100265, 100266
USER, ASSISTANT, SYSTEM = 882, 78191, 9125


def _record(messages):
    record = JsonRecord({"messages": messages})
    record.where = "chat.jsonl line 3"
    return record


def _example(record, seq_len=64, truncation="truncate", counts=None):
    return chat.sft_example(record, tokenizer=TOKENIZER, seq_len=seq_len, truncation=truncation,
                            counts=counts or chat.Counts())


def test_ids_and_mask_against_a_hand_built_conversation():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    system, question, answer = (TOKENIZER.encode(t) for t in ("Be brief.", "Hi", "Hello!"))
    ids = [IM_START, SYSTEM, IM_SEP, *system, IM_END, IM_START, USER, IM_SEP, *question, IM_END,
           IM_START, ASSISTANT, IM_SEP, *answer, IM_END]
    trained = [0] * (len(ids) - len(answer) - 1) + [1] * (len(answer) + 1)  # content + im_end
    example = _example(_record(messages))
    np.testing.assert_array_equal(example["inputs"], ids[:-1])
    np.testing.assert_array_equal(example["targets"], ids[1:])
    np.testing.assert_array_equal(example["loss_mask"], trained[1:])
    # the trained targets are exactly the reply and its end
    assert example["targets"][example["loss_mask"] == 1].tolist() == [*answer, IM_END]


def test_exercises_become_conversations_and_refusals_say_i_dont_know():
    ex = synthetic.unanswerable_exercise(0, 5)
    example = _example(ex, seq_len=512)
    reply = TOKENIZER.decode(example["targets"][example["loss_mask"] == 1][:-1])
    assert reply == ex.solution and reply.endswith("Final answer: I don't know")
    assert synthetic.verify(ex, reply)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "Hi"}], "no assistant turn"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}], "empty"),
    ([{"role": "robot", "content": "Hi"}], "robot"),
])
def test_unusable_conversations_are_bad_records(messages, message):
    with pytest.raises(BadRecordError, match=f"chat.jsonl line 3.*{message}"):
        _example(_record(messages))


def test_record_without_messages_is_a_bad_record():
    with pytest.raises(BadRecordError, match="no 'messages'"):
        _example(JsonRecord({"text": "hello"}))


def test_over_long_conversations_are_truncated_or_dropped_and_counted():
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "word " * 100}]
    counts = chat.Counts()
    kept = _example(_record(messages), seq_len=32, counts=counts)
    assert len(kept["inputs"]) == 32 and kept["loss_mask"].sum() > 0
    assert _example(_record(messages), seq_len=32, truncation="drop", counts=counts) is None
    # an assistant turn that starts past the limit leaves nothing to train on: dropped
    long_question = [{"role": "user", "content": "why " * 100},
                     {"role": "assistant", "content": "ok"}]
    assert _example(_record(long_question), seq_len=32, counts=counts) is None
    assert (counts.examples, counts.truncated, counts.dropped) == (3, 1, 2)


def test_packed_conversations_keep_their_own_segments_and_masks():
    examples = [_example(synthetic.exercise(1, i), seq_len=256) for i in range(6)]
    rows = list(chat.pack_examples(grain.MapDataset.source(examples).to_iter_dataset(), 256,
                                   max_segments=32))
    for row in rows:
        segments = row["segment_ids"]
        assert row["loss_mask"][segments == 0].sum() == 0
        for s in set(segments.tolist()) - {0}:  # each segment is one whole conversation
            piece = row["inputs"][segments == s]
            assert piece[0] == IM_START and (row["positions"][segments == s] ==
                                            np.arange(len(piece))).all()
    packed_targets = sorted(int(r["loss_mask"].sum()) for r in rows)
    assert sum(packed_targets) == sum(int(e["loss_mask"].sum()) for e in examples)


@pytest.mark.parametrize("max_segments", [1, 2, 3])
def test_packed_rows_hold_at_most_the_segment_bound(max_segments):
    """Short conversations would fill a row several at a time; the bound (cuDNN's compiled
    slots) caps them, and every conversation still lands in some row."""
    examples = [_example(synthetic.exercise(1, i), seq_len=1024) for i in range(8)]
    assert sum(len(e["inputs"]) for e in examples[:4]) < 1024  # 4+ would fit one row
    rows = list(chat.pack_examples(grain.MapDataset.source(examples).to_iter_dataset(), 1024,
                                   max_segments=max_segments))
    assert max(int(r["segment_ids"].max()) for r in rows) == max_segments
    assert sum(int(r["loss_mask"].sum()) for r in rows) == sum(
        int(e["loss_mask"].sum()) for e in examples)

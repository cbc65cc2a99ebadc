"""Packing: hand-worked rows, a plain per-token reference packer, no token lost or repeated,
grouped tokenization against per-document encoding, resumable state."""

import json

import grain
import numpy as np
import pytest

from phi4_jax.data import packing
from phi4_jax.data.tokenizer import load_tokenizer


def _groups_of(documents, group_size=2):
    """`group_pairs` groups of already-tokenized documents (each ending in its end token),
    built one document at a time: `inputs` d[:-1], `targets` d[1:], laid end to end."""
    groups = []
    for first in range(0, len(documents), group_size):
        group = documents[first:first + group_size]
        groups.append({"inputs": np.int32([t for d in group for t in d[:-1]]),
                       "targets": np.int32([t for d in group for t in d[1:]]),
                       "lengths": np.int64([len(d) - 1 for d in group])})
    return groups


def _dataset(documents, seq_len, max_segments=32, group_size=2):
    groups = grain.MapDataset.source(_groups_of(documents, group_size)).to_iter_dataset()
    return packing.pack_groups(groups, seq_len, max_segments)


def _rows(documents, seq_len, max_segments=32, group_size=2):
    return list(_dataset(documents, seq_len, max_segments, group_size))


def _reference_rows(documents, seq_len, max_segments):
    """Rows packed token by token: pairs end to end, a new row every `seq_len` tokens, a new
    segment where the document changes or the row starts, then rows of more than `max_segments`
    segments split into rows of `max_segments`, each padded with zeros."""
    stream = [(d[i], d[i + 1], k) for k, d in enumerate(documents) for i in range(len(d) - 1)]
    rows = []
    for start in range(0, len(stream), seq_len):
        segments = []  # each a list of (input, target) pairs
        for index, (inp, tgt, doc) in enumerate(stream[start:start + seq_len]):
            if index == 0 or doc != stream[start + index - 1][2]:
                segments.append([])
            segments[-1].append((inp, tgt))
        for first in range(0, len(segments), max_segments):
            row = {key: np.zeros(seq_len, np.int32) for key in ("inputs", "targets", "segment_ids",
                                                                "positions")}
            row["loss_mask"] = np.zeros(seq_len, np.float32)
            column = 0
            for number, segment in enumerate(segments[first:first + max_segments], 1):
                for position, (inp, tgt) in enumerate(segment):
                    row["inputs"][column], row["targets"][column] = inp, tgt
                    row["segment_ids"][column], row["positions"][column] = number, position
                    row["loss_mask"][column] = 1
                    column += 1
            rows.append(row)
    return rows


@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_hand_worked_rows_of_8(group_size):
    # Documents of 4, 6 and 10 tokens give pairs of 3, 5 and 9 tokens.
    documents = [[1, 2, 3, 4], [11, 12, 13, 14, 15, 16], list(range(21, 31))]
    rows = _rows(documents, seq_len=8, group_size=group_size)
    expected = [
        dict(inputs=[1, 2, 3, 11, 12, 13, 14, 15], targets=[2, 3, 4, 12, 13, 14, 15, 16],
             segment_ids=[1, 1, 1, 2, 2, 2, 2, 2], positions=[0, 1, 2, 0, 1, 2, 3, 4], loss_mask=[1] * 8),
        dict(inputs=[21, 22, 23, 24, 25, 26, 27, 28], targets=[22, 23, 24, 25, 26, 27, 28, 29],
             segment_ids=[1] * 8, positions=list(range(8)), loss_mask=[1] * 8),
        dict(inputs=[29, 0, 0, 0, 0, 0, 0, 0], targets=[30, 0, 0, 0, 0, 0, 0, 0],
             segment_ids=[1, 0, 0, 0, 0, 0, 0, 0], positions=[0] * 8, loss_mask=[1, 0, 0, 0, 0, 0, 0, 0]),
    ]
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert set(row) == set(packing.ROW_KEYS)
        for key, values in want.items():
            np.testing.assert_array_equal(row[key], values, err_msg=key)
        assert row["loss_mask"].dtype == np.float32
        assert all(row[k].dtype == np.int32 for k in ("inputs", "targets", "segment_ids", "positions"))


def test_document_longer_than_three_rows_is_split_in_order():
    document = list(range(100, 130))  # 29 next-token pairs into rows of 8: 8 + 8 + 8 + 5.
    rows = _rows([document], seq_len=8)
    assert len(rows) == 4
    for key, expected in (("targets", document[1:]), ("inputs", document[:-1])):
        np.testing.assert_array_equal(np.concatenate([r[key][r["loss_mask"] > 0] for r in rows]), expected)
    for row in rows[:3]:
        np.testing.assert_array_equal(row["segment_ids"], np.ones(8))
        np.testing.assert_array_equal(row["positions"], np.arange(8))
    np.testing.assert_array_equal(rows[3]["segment_ids"], [1, 1, 1, 1, 1, 0, 0, 0])


TEXTS = [
    "def f(x):\n    return x + 1\n",
    "",  # empty: nothing to predict, dropped
    "A",  # one token: its pair is ([A], [eot])
    "Literal <|endoftext|> and <|im_end|> in a page are plain text.",
    "Unicode: naïve café, 数学, emoji 🙂. " * 7,
    " ".join(str(i) for i in range(150)),
]


@pytest.mark.parametrize("group_size", [1, 4])
def test_real_documents_lose_and_repeat_no_token(group_size):
    tokenizer = load_tokenizer("phi4")
    reference = [tokenizer.encode(t) + [tokenizer.eot_id] for t in TEXTS if t]
    groups = [packing.group_pairs(TEXTS[i:i + group_size], tokenizer)
              for i in range(0, len(TEXTS), group_size)]
    rows = list(packing.pack_groups(grain.MapDataset.source(groups).to_iter_dataset(), 16, 32))

    pieces = [r["targets"][r["segment_ids"] == s] for r in rows for s in range(1, r["segment_ids"].max() + 1)]
    # Pieces in order must tile the documents' targets exactly, a piece never spanning two documents.
    position = 0
    for document in reference:
        rebuilt = []
        while len(rebuilt) < len(document) - 1:
            rebuilt.extend(pieces[position].tolist())
            position += 1
        assert rebuilt == document[1:]
    assert position == len(pieces)
    for row in rows:
        real = row["loss_mask"] > 0
        np.testing.assert_array_equal(real, row["segment_ids"] > 0)
        same_segment = (row["segment_ids"][1:] == row["segment_ids"][:-1]) & real[1:]
        np.testing.assert_array_equal(row["inputs"][1:][same_segment], row["targets"][:-1][same_segment])
    assert sum(int(r["loss_mask"].sum()) for r in rows) == sum(len(d) - 1 for d in reference)
    # Special-token strings in text are ordinary text: the end token appears once per document.
    ends = sum(int((r["targets"][r["loss_mask"] > 0] == tokenizer.eot_id).sum()) for r in rows)
    assert ends == len(reference)


def test_empty_document_has_no_tokens():
    pair = packing.document_pair("", load_tokenizer("phi4"))
    assert not packing.has_tokens(pair)


def test_group_pairs_are_each_documents_pair_end_to_end():
    # None is a record the bad-record policy skipped; "" has no target: both leave no pair.
    tokenizer = load_tokenizer("phi4")
    texts = [TEXTS[0], None, "", TEXTS[2], TEXTS[3]]
    documents = [tokenizer.encode(t) + [tokenizer.eot_id] for t in texts if t]
    group = packing.group_pairs(texts, tokenizer)
    want = _groups_of(documents, group_size=len(documents))[0]
    for key in ("inputs", "targets", "lengths"):
        np.testing.assert_array_equal(group[key], want[key], err_msg=key)
    assert group["inputs"].dtype == group["targets"].dtype == np.int32
    empty = packing.group_pairs([None, ""], tokenizer)
    assert [len(v) for v in empty.values()] == [0, 0, 0]


@pytest.mark.parametrize("seq_len,max_segments,group_size", [(8, 32, 1), (16, 3, 4), (32, 1, 7),
                                                             (5, 2, 3), (64, 32, 50)])
def test_rows_match_a_per_token_reference(seq_len, max_segments, group_size):
    rng = np.random.default_rng(seq_len)
    documents = [rng.integers(1, 1000, size=rng.integers(2, 3 * seq_len)).tolist() for _ in range(60)]
    rows = _rows(documents, seq_len, max_segments, group_size)
    expected = _reference_rows(documents, seq_len, max_segments)
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert set(row) == set(packing.ROW_KEYS)
        for key in packing.ROW_KEYS:
            np.testing.assert_array_equal(row[key], want[key], err_msg=key)
            assert row[key].dtype == want[key].dtype, key


@pytest.mark.parametrize("group_size", [1, 3])
def test_packed_iterator_resumes_exactly_after_any_row(group_size):
    rng = np.random.default_rng(0)
    documents = [rng.integers(1, 1000, size=rng.integers(2, 40)).tolist() for _ in range(25)]
    # max_segments=2 splits rows too: a state may fall between the pieces of one row.
    dataset = _dataset(documents, 16, max_segments=2, group_size=group_size)
    iterator = iter(dataset)
    states, rows = [iterator.get_state()], []
    for row in iterator:
        rows.append(row)
        states.append(json.loads(json.dumps(iterator.get_state())))  # as a checkpoint holds it
    for done, state in enumerate(states):
        resumed = iter(dataset)
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(rows) - done
        for want, got in zip(rows[done:], rest):
            for key in packing.ROW_KEYS:
                np.testing.assert_array_equal(want[key], got[key])


def test_a_state_of_another_packer_is_refused_by_name():
    iterator = iter(_dataset([[1, 2, 3]], 8))
    concat_then_split = {"parent_state": {}, "remainder_slices": {},
                         "elements_from_buffer_after_checkpoint": 0}
    with pytest.raises(ValueError, match="saved by another packer"):
        iterator.set_state(concat_then_split)


def test_seq_len_must_be_positive():
    with pytest.raises(ValueError, match="seq_len"):
        _dataset([[1, 2]], 0)
    with pytest.raises(ValueError, match="data.max_segments_per_row"):
        _dataset([[1, 2]], 8, max_segments=0)


def test_rows_of_more_segments_than_the_bound_are_split_whole_segments_in_order():
    # Pairs of 2, 1, 1, 2 and 2 tokens fill one row of 8 with five segments; at most two per
    # row, they become three padded rows.
    documents = [[1, 2, 3], [4, 5], [6, 7], [8, 9, 10], [11, 12, 13]]
    rows = _rows(documents, seq_len=8, max_segments=2)
    expected = [
        dict(inputs=[1, 2, 4, 0, 0, 0, 0, 0], segment_ids=[1, 1, 2, 0, 0, 0, 0, 0],
             positions=[0, 1, 0, 0, 0, 0, 0, 0], loss_mask=[1, 1, 1, 0, 0, 0, 0, 0]),
        dict(inputs=[6, 8, 9, 0, 0, 0, 0, 0], targets=[7, 9, 10, 0, 0, 0, 0, 0],
             segment_ids=[1, 2, 2, 0, 0, 0, 0, 0], positions=[0, 0, 1, 0, 0, 0, 0, 0]),
        dict(inputs=[11, 12, 0, 0, 0, 0, 0, 0], segment_ids=[1, 1, 0, 0, 0, 0, 0, 0],
             positions=[0, 1, 0, 0, 0, 0, 0, 0]),
    ]
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        for key, values in want.items():
            np.testing.assert_array_equal(row[key], values, err_msg=key)


@pytest.mark.parametrize("max_segments", [1, 3])
def test_bound_holds_and_no_token_is_lost_or_repeated(max_segments):
    rng = np.random.default_rng(1)
    documents = [rng.integers(1, 1000, size=rng.integers(2, 9)).tolist() for _ in range(80)]
    rows = _rows(documents, seq_len=32, max_segments=max_segments)
    assert max(int(r["segment_ids"].max()) for r in rows) <= max_segments
    assert max(int(r["segment_ids"].max()) for r in _rows(documents, 32)) > 3
    targets = np.concatenate([r["targets"][r["loss_mask"] > 0] for r in rows])
    np.testing.assert_array_equal(targets, np.concatenate([d[1:] for d in documents]))
    for row in rows:
        seg = row["segment_ids"]
        np.testing.assert_array_equal(row["loss_mask"] > 0, seg > 0)
        starts = np.nonzero((seg > 0) & (np.diff(seg, prepend=0) != 0))[0]
        assert (row["positions"][starts] == 0).all()

"""Packing: hand-worked rows, no token lost or repeated, long documents, resumable state."""

import grain
import numpy as np
import pytest

from phi4_jax.data import packing
from phi4_jax.data.tokenizer import load_tokenizer


def _pairs_of(documents):
    """Next-token pairs of already-tokenized documents (each ending in its end token)."""
    return [{"inputs": np.int32(d[:-1]), "targets": np.int32(d[1:])} for d in documents]


def _rows(pairs, seq_len, max_segments=32):
    return list(packing.pack_pairs(grain.MapDataset.source(pairs).to_iter_dataset(), seq_len,
                                   max_segments))


def test_hand_worked_rows_of_8():
    # Documents of 4, 6 and 10 tokens give pairs of 3, 5 and 9 tokens.
    documents = [[1, 2, 3, 4], [11, 12, 13, 14, 15, 16], list(range(21, 31))]
    rows = _rows(_pairs_of(documents), seq_len=8)
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
    rows = _rows(_pairs_of([document]), seq_len=8)
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


def test_real_documents_lose_and_repeat_no_token():
    tokenizer = load_tokenizer("phi4")
    reference = [tokenizer.encode(t) + [tokenizer.eot_id] for t in TEXTS if t]
    pairs = [packing.document_pair(t, tokenizer) for t in TEXTS]
    pairs = [p for p in pairs if packing.has_tokens(p)]
    rows = _rows(pairs, seq_len=16)

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


def test_packed_iterator_resumes_exactly():
    rng = np.random.default_rng(0)
    documents = [rng.integers(1, 1000, size=rng.integers(2, 40)).tolist() for _ in range(60)]
    dataset = packing.pack_pairs(grain.MapDataset.source(_pairs_of(documents)).to_iter_dataset(), 16,
                                 max_segments=2)  # splits rows too: the flat map's state resumes
    iterator = iter(dataset)
    for _ in range(7):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(10)]
    resumed = iter(dataset)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(10)]):
        for key in packing.ROW_KEYS:
            np.testing.assert_array_equal(want[key], got[key])


def test_seq_len_must_be_positive():
    with pytest.raises(ValueError, match="seq_len"):
        packing.pack_pairs(grain.MapDataset.source(_pairs_of([[1, 2]])).to_iter_dataset(), 0, 32)
    with pytest.raises(ValueError, match="data.max_segments_per_row"):
        packing.pack_pairs(grain.MapDataset.source(_pairs_of([[1, 2]])).to_iter_dataset(), 8, 0)


def test_rows_of_more_segments_than_the_bound_are_split_whole_segments_in_order():
    # Pairs of 2, 1, 1, 2 and 2 tokens fill one row of 8 with five segments; at most two per
    # row, they become three padded rows.
    documents = [[1, 2, 3], [4, 5], [6, 7], [8, 9, 10], [11, 12, 13]]
    rows = _rows(_pairs_of(documents), seq_len=8, max_segments=2)
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
    rows = _rows(_pairs_of(documents), seq_len=32, max_segments=max_segments)
    assert max(int(r["segment_ids"].max()) for r in rows) <= max_segments
    assert max(int(r["segment_ids"].max()) for r in _rows(_pairs_of(documents), 32)) > 3
    targets = np.concatenate([r["targets"][r["loss_mask"] > 0] for r in rows])
    np.testing.assert_array_equal(targets, np.concatenate([d[1:] for d in documents]))
    for row in rows:
        seg = row["segment_ids"]
        np.testing.assert_array_equal(row["loss_mask"] > 0, seg > 0)
        starts = np.nonzero((seg > 0) & (np.diff(seg, prepend=0) != 0))[0]
        assert (row["positions"][starts] == 0).all()

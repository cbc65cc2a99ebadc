"""Mid-training's long-document data: the `min_tokens` filter (counted), whole-document packing
(hand-worked rows, nothing lost), the long-range recall family, and the mixture report."""

import json

import grain
import numpy as np
import pytest

from phi4_jax import config_base
from phi4_jax.data import length_filter, mixture, packing, pipeline, sources, synthetic
from phi4_jax.data.tokenizer import load_tokenizer


def _pairs_of(lengths, start=1):
    """Pairs of documents of the given target counts, token values unique across documents."""
    pairs, value = [], start
    for n in lengths:
        tokens = np.arange(value, value + n + 1, dtype=np.int32)
        pairs.append({"inputs": tokens[:-1], "targets": tokens[1:]})
        value += 1000
    return pairs


def _whole_rows(pairs, seq_len, max_segments=32):
    return list(packing.pack_whole_documents(grain.MapDataset.source(pairs).to_iter_dataset(),
                                             seq_len, max_segments))


def test_whole_document_packing_hand_worked():
    # Documents of 5, 6 and 3 targets in rows of 8: first fit puts 5 + 3 in one row and 6 in
    # another, where concat-then-split would cut the 6-token document across two rows.
    rows = _whole_rows(_pairs_of([5, 6, 3]), seq_len=8)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0]["inputs"], [1, 2, 3, 4, 5, 2001, 2002, 2003])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(rows[1]["inputs"], [1001, 1002, 1003, 1004, 1005, 1006, 0, 0])
    np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(rows[1]["loss_mask"], [1, 1, 1, 1, 1, 1, 0, 0])


def test_whole_packing_keeps_every_fitting_document_in_one_row_and_loses_nothing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 80).tolist() + [70, 33]  # two longer than a row of 32
    rows = _whole_rows(_pairs_of(lengths), seq_len=32, max_segments=4)
    pieces = {}
    for row in rows:
        assert row["segment_ids"].max() <= 4
        for s in range(1, row["segment_ids"].max() + 1):
            targets = row["targets"][row["segment_ids"] == s]
            positions = row["positions"][row["segment_ids"] == s]
            np.testing.assert_array_equal(positions, np.arange(len(targets)))
            pieces.setdefault(int(targets[0]) // 1000, []).append(targets)
    for doc, n in enumerate(lengths):
        pieces[doc].sort(key=lambda p: p[0])  # first fit may place a later piece in an earlier row
        if n <= 32:
            assert len(pieces[doc]) == 1, (doc, n)  # whole, in one row
        else:
            assert [len(p) for p in pieces[doc]] == [32] * (n // 32) + [n % 32] * bool(n % 32)
        np.testing.assert_array_equal(np.concatenate(pieces[doc]),
                                      np.arange(doc * 1000 + 2, doc * 1000 + n + 2))


def test_min_tokens_keeps_long_documents_and_counts_the_rest(tmp_path):
    tokenizer = load_tokenizer("phi4")
    texts = [" ".join(["word"] * n) for n in (3, 40, 7, 60, 25, 90)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = config_base.source_spec("jsonl", paths=str(tmp_path / "a.jsonl"), min_tokens=30)
    data = config_base.base_config().data
    data.update(sources={"long": spec}, mix={"long": 1.0}, eval_holdout=0.0, read_threads=0)
    length_filter.reset()
    cfg = pipeline.checked_data_config(data)
    records = sources.open_records("long", cfg["sources"]["long"], seed=0, split="train",
                                   eval_holdout=0.0)
    rows = pipeline.packed_document_rows("long", records, cfg, seq_len=128)
    got = sorted(int((row["segment_ids"] == s).sum()) for row in rows
                 for s in range(1, row["segment_ids"].max() + 1))
    lengths = [len(tokenizer.encode(t)) for t in texts]
    assert got == sorted(n for n in lengths if n >= 30)  # targets: the tokens after the first, then <|endoftext|>
    assert length_filter.dropped()["long"] == (sum(n < 30 for n in lengths), len(texts))


def test_min_tokens_must_be_a_count():
    with pytest.raises(sources.DataConfigError, match="data.sources.s.min_tokens is -1"):
        sources.validate_source_spec("s", {"kind": "synthetic", "min_tokens": -1},
                                     check_files=False)


def test_long_range_documents_ask_for_a_fact_stated_far_earlier():
    tokenizer = load_tokenizer("phi4")
    distances = []
    for index in range(60):
        ex = synthetic.long_range_exercise(0, index)
        text = synthetic.render_document(ex)
        fact = text.index(f" is {ex.answer}.")
        what = text[text.index("the code of ", fact - 40) + len("the code of "):fact]
        question = text.index(f"What is the code of {what}?")
        assert fact < question
        assert synthetic.extract_final_answer(text) == ex.answer
        assert text.count(f"the code of {what} is") == 1
        distances.append(len(tokenizer.encode(text[fact:question])))
    assert min(distances) < 300 and max(distances) > 3000, distances
    assert synthetic.long_range_exercise(0, 7) == synthetic.long_range_exercise(0, 7)
    assert synthetic.long_range_exercise(0, 7) != synthetic.long_range_exercise(1, 7)


def test_mixture_report_covers_long_and_replayed_sources():
    c = config_base.load_config("configs/midtrain.py")
    report = mixture.mixture_report(c.data, total_tokens=250_000_000_000)
    assert "| long (documents >= 8192 tokens) | 0.300 | 75B |" in report
    assert "| synthetic | 0.280 | 70B | 290B | 0.24 |" in report

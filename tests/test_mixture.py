"""Mixing by tokens, the mixture report, and the mixed stream: seeds, resume, process shards."""

import json
import math
import re

import numpy as np
import pytest

from phi4_jax.data import mixture, pipeline
from phi4_jax.data.tokenizer import load_tokenizer

FRUITS = ("apple", "banana", "cherry")


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def _data_cfg(sources, mix, **overrides):
    cfg = dict(seed=0, sources=sources, mix=mix, eval_holdout=0.0, read_threads=1, read_processes=0, prefetch=2,
               max_segments_per_row=32)
    return {**cfg, **overrides}


@pytest.fixture()
def fruit_sources(tmp_path):
    """Three jsonl sources, each writing one fruit word repeated, so a token names its source."""
    rng = np.random.default_rng(1)
    sources = {}
    for fruit in FRUITS:
        texts = [(" " + fruit) * int(n) for n in rng.integers(1, 120, size=30)]
        path = _write_jsonl(tmp_path / f"{fruit}.jsonl", texts)
        sources[fruit] = {"kind": "jsonl", "paths": path, "text_key": "text"}
    return sources


def test_token_proportions_follow_weights(fruit_sources):
    tokenizer = load_tokenizer("phi4")
    fruit_of_token = {tokenizer.encode(" " + f)[0]: f for f in FRUITS}
    assert len(fruit_of_token) == 3
    cfg = _data_cfg(fruit_sources, {"apple": 7, "banana": 2, "cherry": 1})  # normalized to 0.7 / 0.2 / 0.1
    iterator = pipeline.make_train_iterator(cfg, seq_len=64, batch_size=50)
    counts = dict.fromkeys(FRUITS, 0.0)
    for _ in range(40):  # 2000 rows of 64 tokens
        batch = next(iterator)
        for targets, mask in zip(batch["targets"], batch["loss_mask"]):
            fruits = {fruit_of_token[t] for t in targets[mask > 0] if t in fruit_of_token}
            assert len(fruits) == 1, "a row mixes sources"
            counts[fruits.pop()] += float(mask.sum())
    iterator.close()
    total = sum(counts.values())
    assert total == 2000 * 64
    for fruit, weight in zip(FRUITS, (0.7, 0.2, 0.1)):
        assert abs(counts[fruit] / total - weight) < 0.01, (fruit, counts)


def _first_batches(cfg, n, **kwargs):
    iterator = pipeline.make_train_iterator(cfg, seq_len=32, batch_size=4, **kwargs)
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_stream_is_a_function_of_the_seed(fruit_sources):
    cfg = _data_cfg(fruit_sources, {"apple": 1, "banana": 1, "cherry": 1})
    assert _same(_first_batches(cfg, 6), _first_batches(cfg, 6))
    assert not _same(_first_batches(cfg, 6), _first_batches({**cfg, "seed": 1}, 6))


def test_iterator_state_resumes_the_same_batches(fruit_sources):
    cfg = _data_cfg(fruit_sources, {"apple": 0.5, "banana": 0.3, "cherry": 0.2}, read_threads=2, prefetch=3)
    iterator = pipeline.make_train_iterator(cfg, seq_len=32, batch_size=4)
    for _ in range(9):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # survives a round trip through a checkpoint file
    expected = [next(iterator) for _ in range(8)]
    iterator.close()
    resumed = pipeline.make_train_iterator(cfg, seq_len=32, batch_size=4)
    resumed.set_state(state)
    assert _same(expected, [next(resumed) for _ in range(8)])
    resumed.close()


@pytest.mark.slow  # spawns read processes
def test_read_processes_make_the_thread_stream_and_share_its_state(fruit_sources):
    # Worker processes make the same rows as read threads, and either resumes the other's state.
    sources = {f: fruit_sources[f] for f in ("apple", "banana")}
    cfg = _data_cfg(sources, {"apple": 0.6, "banana": 0.4})
    threads = pipeline.make_train_iterator(cfg, seq_len=32, batch_size=4)
    expected = [next(threads) for _ in range(9)]
    thread_state = threads.get_state()
    expected += [next(threads) for _ in range(8)]
    threads.close()
    processes = pipeline.make_train_iterator({**cfg, "read_processes": 1}, seq_len=32, batch_size=4)
    assert _same(expected[:9], [next(processes) for _ in range(9)])
    assert processes.get_state() == thread_state
    processes.set_state(thread_state)
    assert _same(expected[9:], [next(processes) for _ in range(8)])
    processes.close()


def test_a_source_read_processes_cannot_take_is_named(fruit_sources, monkeypatch):
    monkeypatch.setattr(pipeline.packing, "group_pairs", lambda texts, tokenizer: {})
    cfg = _data_cfg({"apple": fruit_sources["apple"]}, {"apple": 1.0}, read_processes=2)
    with pytest.raises(pipeline.DataConfigError,
                       match=r"data\.sources\.apple cannot be sent to read processes .*"
                             r"--config\.data\.read_processes=0"):
        pipeline.make_train_iterator(cfg, seq_len=32, batch_size=4)


def _document_ids(batches):
    """Ids of the documents 'id NNNN end' whose ends appear in a single-source stream's targets."""
    tokenizer = load_tokenizer("phi4")
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    return {int(m) for m in re.findall(r"(\d{4}) end<\|endoftext\|>", tokenizer.decode(targets))}


def test_processes_read_disjoint_shares(tmp_path):
    path = _write_jsonl(tmp_path / "ids.jsonl", [f"id {i:04d} end" for i in range(40)])
    cfg = _data_cfg({"ids": {"kind": "jsonl", "paths": path, "text_key": "text"}}, {"ids": 1.0})
    seen = [_document_ids(_first_batches(cfg, 12, process_index=p, process_count=2)) for p in range(2)]
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(40))


def test_eval_stream_reads_only_held_out_records(tmp_path):
    path = _write_jsonl(tmp_path / "ids.jsonl", [f"id {i:04d} end" for i in range(200)])
    spec = {"kind": "jsonl", "paths": path, "text_key": "text"}
    cfg = _data_cfg({"ids": spec}, {"ids": 1.0}, eval_holdout=0.2)
    train = _document_ids(_first_batches(cfg, 30))
    held_out = _document_ids(pipeline.make_eval_batches(cfg, seq_len=32, batch_size=4, num_batches=10))
    assert train and held_out
    assert not train & held_out
    assert train | held_out == set(range(200))


@pytest.mark.parametrize(
    "mix, message",
    [
        ({}, "data.mix is empty"),
        ({"apple": 1.0, "durian": 1.0}, "data.mix.durian has no source spec"),
        ({"apple": -0.5}, "data.mix.apple is -0.5"),
        ({"apple": math.nan}, "data.mix.apple is nan"),
        ({"apple": math.inf}, "data.mix.apple is inf"),
        ({"apple": "0.5"}, "data.mix.apple is '0.5'"),
        ({"apple": 0.0, "banana": 0}, "all zero"),
    ],
)
def test_bad_mix_is_refused_before_training(fruit_sources, mix, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pipeline.validate_data_config(_data_cfg(fruit_sources, mix))


def test_zero_weight_source_is_never_read(fruit_sources):
    cfg = _data_cfg(fruit_sources, {"apple": 1.0, "banana": 0.0, "cherry": 0.0})
    banana = load_tokenizer("phi4").encode(" banana")[0]
    assert not any((b["targets"] == banana).any() for b in _first_batches(cfg, 5))


PAPER_MIX = {"web": 0.15, "web_rewrites": 0.15, "synthetic": 0.4, "code": 0.2, "books": 0.1}
PAPER_UNIQUE = {"web": 1.3e12, "web_rewrites": 290e9, "synthetic": 290e9, "code": 820e9, "books": 580e9}
# Epochs in the Phi-4 report's Table 5 (tokens over 10T divided by unique tokens).
PAPER_EPOCHS = {"web": 1.2, "web_rewrites": 5.2, "synthetic": 13.8, "code": 2.4, "books": 1.7}


def _paper_cfg():
    sources = {name: {"kind": "jsonl", "paths": "unused", "text_key": "text", "unique_tokens": int(u)}
               for name, u in PAPER_UNIQUE.items()}
    return {"sources": sources, "mix": PAPER_MIX}


def test_report_reproduces_the_papers_epochs():
    rows = {row.source: row for row in mixture.mixture_rows(_paper_cfg(), total_tokens=int(10e12))}
    for name, epochs in PAPER_EPOCHS.items():
        assert rows[name].tokens == pytest.approx(PAPER_MIX[name] * 10e12)
        assert rows[name].epochs == pytest.approx(epochs, abs=0.05), name
    assert rows["synthetic"].epochs == pytest.approx(4e12 / 290e9)
    report = mixture.mixture_report(_paper_cfg(), total_tokens=int(10e12))
    assert "| synthetic | 0.400 | 4T | 290B | 13.79 |" in report
    assert "| web | 0.150 | 1.5T | 1.3T | 1.15 |" in report
    assert "| books | 0.100 | 1T | 580B | 1.72 |" in report  # 0.1 * 10T rounds to 1T, not 1e+03B


def test_report_marks_unknown_unique_tokens():
    cfg = {"sources": {"a": {"kind": "synthetic"}, "b": {"kind": "synthetic", "unique_tokens": 1000}},
           "mix": {"a": 3, "b": 1}}
    rows = mixture.mixture_rows(cfg, total_tokens=4000)
    assert [(r.weight, r.tokens, r.epochs) for r in rows] == [(0.75, 3000, None), (0.25, 1000, 1.0)]
    assert "| a | 0.750 | 3K | unknown | - |" in mixture.mixture_report(cfg, total_tokens=4000)

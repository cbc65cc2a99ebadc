"""Bad records under both policies: skipped within the budget (counted, each reported once with
its file and line), or the run stopped with one clear error; broken sources fail at start-up;
small sources still evaluate."""

import json
import logging

import pytest

from phi4_jax.data import bad_records, pipeline, sources

SEQ_LEN, BATCH = 32, 4


@pytest.fixture(autouse=True)
def _fresh_counts():
    bad_records.reset()
    yield
    bad_records.reset()


def _jsonl(path, lines: dict[int, str], total: int) -> str:
    """`total` good lines, with `lines` (1-based line number -> raw text) put in their place."""
    rows = [lines.get(i, json.dumps({"text": f"document number {i}"})) for i in range(1, total + 1)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def _cfg(path, **spec):
    source = {"kind": "jsonl", "paths": path, "text_key": "text", **spec}
    return dict(seed=0, sources={"web": source}, mix={"web": 1.0}, eval_holdout=0.01,
                read_threads=2, read_processes=0, prefetch=1, max_segments_per_row=32)


def _batches(cfg, n):
    iterator = pipeline.make_train_iterator(cfg, seq_len=SEQ_LEN, batch_size=BATCH)
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


BAD_LINES = {101: "{not json", 150: json.dumps({"body": "no text key"})}


def test_skip_counts_each_bad_record_once_with_its_line(tmp_path, caplog):
    path = _jsonl(tmp_path / "web.jsonl", BAD_LINES, total=200)
    with caplog.at_level(logging.WARNING):
        _batches(_cfg(path), 40)  # ~3 epochs of the 198 training records
    assert bad_records.counts() == {"web": 2}
    skipped = [r.getMessage() for r in caplog.records if "skipped bad record" in r.getMessage()]
    assert len(skipped) == 2, skipped
    assert any(f"{path}:101 is not JSON" in m for m in skipped), skipped
    assert any(f"{path}:150 has no 'text' field (it has ['body'])" in m for m in skipped), skipped


@pytest.mark.slow  # spawns read processes
def test_read_processes_report_their_bad_records_to_this_process(tmp_path):
    path = _jsonl(tmp_path / "web.jsonl", BAD_LINES, total=200)
    _batches({**_cfg(path), "read_processes": 2}, 40)
    assert bad_records.counts() == {"web": 2}
    over = _jsonl(tmp_path / "over.jsonl", {i: "{not json" for i in range(10, 200, 20)}, total=200)
    budget = dict(max_bad_records=3, max_bad_fraction=0.01)
    with pytest.raises(bad_records.BadRecordError, match="4 bad records.*over its budget"):
        _batches({**_cfg(over, **budget), "read_processes": 2}, 40)


def test_fail_stops_at_the_first_bad_record_at_start_up(tmp_path):
    path = _jsonl(tmp_path / "web.jsonl", {7: "{not json"}, total=40)
    with pytest.raises(bad_records.BadRecordError,
                       match=rf"data\.sources\.web: {path}:7 is not JSON.*bad_records='fail'.*"
                             r"--config\.data\.sources\.web\.bad_records=skip"):
        pipeline.make_train_iterator(_cfg(path, bad_records="fail"), seq_len=SEQ_LEN, batch_size=BATCH)


def test_a_broken_source_fails_before_training(tmp_path):
    path = _jsonl(tmp_path / "web.jsonl", {}, total=200)
    with pytest.raises(bad_records.BadRecordError,
                       match=r"data\.sources\.web: 11 bad records, 100\.0% of the records read, over "
                             r"its budget.*has no 'body' field.*max_bad_records"):
        pipeline.make_train_iterator(_cfg(path, text_key="body"), seq_len=SEQ_LEN, batch_size=BATCH)


@pytest.mark.parametrize("budget, stops", [(dict(max_bad_records=3, max_bad_fraction=0.01), True),
                                           (dict(max_bad_records=3, max_bad_fraction=0.5), False),
                                           (dict(max_bad_records=20, max_bad_fraction=0.0), False)])
def test_budget_stops_when_both_the_count_and_the_fraction_are_exceeded(tmp_path, budget, stops):
    path = _jsonl(tmp_path / "web.jsonl", {i: "{not json" for i in range(10, 200, 20)}, total=200)
    if stops:
        with pytest.raises(bad_records.BadRecordError, match="4 bad records.*over its budget"):
            _batches({**_cfg(path, **budget), "read_threads": 0}, 40)  # counted in read order
    else:
        _batches(_cfg(path, **budget), 40)
        assert bad_records.counts() == {"web": 10}


def test_small_sources_evaluate_or_skip_evaluation(tmp_path, caplog):
    rows_fn = pipeline.functools.partial(pipeline.packed_document_rows, seq_len=SEQ_LEN)
    fifty = _cfg(_jsonl(tmp_path / "fifty.jsonl", {}, total=50))
    assert len(pipeline.first_batches(fifty, rows_fn, batch_size=BATCH, num_batches=2)) == 2
    one = _cfg(_jsonl(tmp_path / "one.jsonl", {}, total=1))
    with caplog.at_level(logging.WARNING):
        assert pipeline.first_batches(one, rows_fn, batch_size=BATCH, num_batches=2) == []
    assert "Evaluation is skipped" in caplog.text and "data.sources.web has no eval records" in caplog.text
    assert len(_batches(one, 2)) == 2  # and the one record still trains


def test_spec_keys_are_declared_once():
    from phi4_jax import config_base

    spec = config_base.source_spec("jsonl")
    assert set(spec) == sources.SPEC_KEYS
    assert bad_records.Policy.of("web", spec) == bad_records.Policy("web", "skip", 10, 0.001)

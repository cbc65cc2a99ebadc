"""Sources read back what was written; held-out splits; the config errors raised before training."""

import json
import logging
import os
import pickle
import re
import sysconfig

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter

from phi4_jax.data import pipeline, sources, synthetic

DOCS = [
    "first document\nwith two lines",
    "",
    "naïve café 数学 🙂",
    '{"looks": "like json"}',
    "x" * 5000,
]


def _train_split(name, spec):
    return sources.open_documents(name, spec, seed=0, split="train", eval_holdout=0.0)


def _train(name, spec):
    return list(_train_split(name, spec))


def test_jsonl_reads_each_line_skipping_blank_ones(tmp_path):
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:3]) + "\n\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_bytes(("\r\n".join(lines[3:])).encode())  # CRLF, no final newline
    (tmp_path / "c.jsonl").write_text("", encoding="utf-8")
    spec = {"kind": "jsonl", "paths": str(tmp_path / "*.jsonl"), "text_key": "text"}
    assert _train("j", spec) == DOCS


def test_jsonl_missing_field_names_the_record(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "no text key"}) + "\n", encoding="utf-8")
    spec = {"kind": "jsonl", "paths": str(tmp_path / "a.jsonl"), "text_key": "text"}
    with pytest.raises(sources.BadRecordError, match=r"a\.jsonl:1 has no 'text' field \(it has \['body'\]\)"):
        _train("j", spec)


def test_jsonl_good_records_never_count_lines(tmp_path, monkeypatch):
    # A line number costs a scan of the file up to the record; only error messages need one.
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    monkeypatch.setattr(sources, "_line_location", lambda *_: pytest.fail("counted lines"))
    spec = {"kind": "jsonl", "paths": str(tmp_path / "a.jsonl"), "text_key": "text"}
    assert _train("j", spec) == DOCS


def test_jsonl_bad_line_names_the_file(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n\n\nnot json\n', encoding="utf-8")
    spec = {"kind": "jsonl", "paths": str(tmp_path / "a.jsonl"), "text_key": "text"}
    with pytest.raises(sources.BadRecordError, match=r"a\.jsonl:4 is not JSON"):
        _train("j", spec)


def test_jsonl_bytes_that_are_not_utf8_are_replaced(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "caf\xe9 ok"}\n\xef\xbb\xbf{"text": "bom"}\n')
    spec = {"kind": "jsonl", "paths": str(tmp_path / "a.jsonl"), "text_key": "text"}
    assert _train("j", spec) == ["caf\ufffd ok", "bom"]


def test_jsonl_records_across_more_files_than_it_keeps_mapped(tmp_path, monkeypatch):
    """Records read in a shuffled order, twice, from 5 files with 2 kept mapped at a time, and
    from a pickled copy (as read processes get it)."""
    monkeypatch.setattr(sources, "MAPPED_FILES", 2)
    want, paths = [], []
    for f in range(5):
        texts = [f"file {f} line {i} " + "y" * (i * 700) for i in range(3)]
        (tmp_path / f"{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        paths.append(str(tmp_path / f"{f}.jsonl"))
        want += texts
    records = sources.JsonlRecords(paths)
    copy = pickle.loads(pickle.dumps(records))
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(want)), 2))
    for reader in (records, copy):
        assert [reader[int(i)]["text"] for i in order] == [want[i] for i in order]


@pytest.mark.parametrize("requested, cores, want", [(4, 2, 2), (2, 2, 2), (0, 2, 0), (3, 1, 1)])
@pytest.mark.parametrize("key", ["read_threads", "read_processes"])
def test_readers_are_capped_at_the_cores_the_process_may_run_on(key, requested, cores, want,
                                                                  monkeypatch, caplog):
    monkeypatch.setattr(pipeline, "_usable_cores", lambda: cores)
    pipeline._log_cap.cache_clear()
    with caplog.at_level(logging.INFO):
        assert pipeline.readers({key: requested}, key) == want
    assert (f"data.{key}={requested} is more than the {cores} cores" in caplog.text) == (
        requested > cores)


def test_jsonl_file_cut_after_indexing_is_named_not_read_past_its_end(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    records = sources.JsonlRecords([str(path)])
    path.write_text(json.dumps({"text": DOCS[0]}) + "\n")
    with pytest.raises(sources.DataConfigError,
                       match=r"a\.jsonl is \d+ bytes, shorter than the \d+ indexed .* restart"):
        records[len(DOCS) - 1]


def test_text_reads_one_document_per_file_in_sorted_order(tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / "books" / f"{i:02d}").mkdir(parents=True)
        (tmp_path / "books" / f"{i:02d}" / "book.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")  # latin-1 byte: replaced, not fatal
    spec = {"kind": "text", "paths": [str(tmp_path / "books" / "**" / "*.txt"), str(tmp_path / "bad.txt")]}
    assert _train("t", spec) == ["caf\ufffd", *DOCS]


def _write_array_record(path, records):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()


def test_array_record_plain_text_and_json_records(tmp_path):
    _write_array_record(tmp_path / "plain.array_record", [d.encode() for d in DOCS])
    _write_array_record(tmp_path / "json.array_record", [json.dumps({"body": d}).encode() for d in DOCS])
    plain = {"kind": "array_record", "paths": str(tmp_path / "plain.array_record"), "text_key": ""}
    as_json = {"kind": "array_record", "paths": str(tmp_path / "json.array_record"), "text_key": "body"}
    assert _train("plain", plain) == DOCS
    assert _train("json", as_json) == DOCS
    with pytest.raises(sources.BadRecordError, match="record 0 is not JSON.*set text_key to ''"):
        _train("plain", {**plain, "text_key": "text"})


class Phi4JaxTinyText(tfds.core.GeneratorBasedBuilder):
    """A five-example text dataset, prepared as ArrayRecord files without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, doc in enumerate(DOCS):
            yield i, {"text": doc}


def test_tfds_reads_a_prepared_array_record_dataset(tmp_path):
    Phi4JaxTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    spec = {"kind": "tfds", "tfds_name": "phi4_jax_tiny_text", "split": "train", "data_dir": str(tmp_path),
            "text_key": "text"}
    assert sorted(_train("tf", spec)) == sorted(DOCS)  # TFDS shuffles examples when it writes them
    with pytest.raises(ValueError, match="cannot open tfds dataset 'phi4_jax_tiny_text' split 'validation'"):
        _train("tf", {**spec, "split": "validation"})


def test_python_stdlib_is_the_sorted_standard_library_without_tests():
    files = sources.stdlib_python_files()
    root = sysconfig.get_paths()["stdlib"]
    assert files == sorted(files) and len(files) > 500
    assert os.path.join(root, "json", "decoder.py") in files
    for path in files:
        parts = os.path.relpath(path, root).split(os.sep)
        assert path.endswith(".py") and not sources.STDLIB_EXCLUDED_DIRS & set(parts)
    documents = _train_split("code", {"kind": "python_stdlib"})
    index = files.index(os.path.join(root, "json", "decoder.py"))
    with open(files[index], encoding="utf-8") as f:
        assert documents[index] == f.read()


def test_synthetic_train_and_eval_use_disjoint_index_spans():
    def opened(split, seed=3):
        return sources.open_documents("s", {"kind": "synthetic"}, seed=seed, split=split, eval_holdout=0.01)

    train, held_out = opened("train"), opened("eval")
    assert len(train) == len(held_out) == sources.SYNTHETIC_SPAN
    for index in (0, 1, 12345):
        assert train[index] == synthetic.render_document(synthetic.exercise(3, index))
        eval_exercise = synthetic.exercise(3, sources.SYNTHETIC_SPAN + index)
        assert held_out[index] == synthetic.render_document(eval_exercise)
    assert [train[i] for i in range(5)] != [opened("train", seed=4)[i] for i in range(5)]


def test_synthetic_families_draw_only_the_named_families(monkeypatch):
    called = []
    monkeypatch.setattr(synthetic, "_GENERATORS", {  # record which generator makes each one
        name: (lambda rng, name=name, make=make: called.append(name) or make(rng))
        for name, make in synthetic._GENERATORS.items()})
    spec = {"kind": "synthetic", "families": " modular, rate "}
    for split, start in (("train", 0), ("eval", sources.SYNTHETIC_SPAN)):
        records = sources.open_records("s", spec, seed=3, split=split, eval_holdout=0.01)
        called.clear()
        exercises = [records[i] for i in range(40)]
        assert set(called) == {"modular", "rate"}
        assert exercises[5] == synthetic.exercise(3, start + 5, ("modular", "rate"))
    everything = sources.open_records("s", {"kind": "synthetic", "families": ""}, seed=3,
                                      split="train", eval_holdout=0.01)
    called.clear()
    assert [everything[i] for i in range(40)][7] == synthetic.exercise(3, 7)
    assert len(set(called)) > 2


def test_held_out_mask_is_a_stable_fraction_of_indices():
    mask = sources.held_out_mask(np.arange(200_000), 0.01)
    assert abs(mask.mean() - 0.01) < 0.001
    np.testing.assert_array_equal(mask[777:1000], sources.held_out_mask(np.arange(777, 1000), 0.01))
    assert not sources.held_out_mask(np.arange(1000), 0.0).any()
    # Raising the fraction only adds records, so a larger holdout contains a smaller one.
    assert np.all(sources.held_out_mask(np.arange(5000), 0.05)[mask[:5000]])


def test_held_out_indices_are_the_same_in_chunks(monkeypatch):
    whole = np.flatnonzero(sources.held_out_mask(np.arange(10_000), 0.03))
    monkeypatch.setattr(sources, "HOLDOUT_CHUNK", 1000)
    np.testing.assert_array_equal(sources.held_out_indices(10_000, 0.03), whole)
    assert sources.held_out_indices(0, 0.03).size == 0


SPLITS = ("train", "eval")


def test_train_and_eval_partition_a_finite_source(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(300)))
    spec = {"kind": "jsonl", "paths": str(tmp_path / "a.jsonl"), "text_key": "text"}
    split = {s: list(sources.open_documents("j", spec, seed=0, split=s, eval_holdout=0.1)) for s in SPLITS}
    held_out = np.flatnonzero(sources.held_out_mask(np.arange(300), 0.1))
    assert 10 <= len(held_out) <= 50
    assert split["eval"] == [str(i) for i in held_out]
    assert split["train"] == [str(i) for i in range(300) if i not in set(held_out)]


def _cfg(sources_, mix, **overrides):
    cfg = dict(seed=0, sources=sources_, mix=mix, eval_holdout=0.01, read_threads=1, read_processes=0, prefetch=1,
               max_segments_per_row=32)
    return {**cfg, **overrides}


SYNTH = {"kind": "synthetic"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "parquet"}, "data.sources.s.kind is 'parquet'; choose one of"),
        ({"kind": "jsonl", "text_key": "text"}, "data.sources.s (kind 'jsonl') needs ['paths']"),
        ({"kind": "tfds", "tfds_name": "c4", "split": "train"}, "needs ['text_key']"),
        ({"kind": "synthetic", "path": "x"}, "data.sources.s has unknown keys ['path']"),
        ({"kind": "synthetic", "unique_tokens": -1}, "data.sources.s.unique_tokens is -1"),
        ({"kind": "text", "paths": "/nonexistent/dir/*.txt"},
         "data.sources.s.paths: glob '/nonexistent/dir/*.txt' matches no files"),
        ({"kind": "text", "paths": []}, "data.sources.s.paths is []"),
        ({"kind": "synthetic", "bad_records": "ignore"}, "data.sources.s.bad_records is 'ignore'"),
        ({"kind": "synthetic", "max_bad_records": -1}, "data.sources.s.max_bad_records is -1"),
        ({"kind": "synthetic", "max_bad_fraction": 2.0}, "data.sources.s.max_bad_fraction is 2.0"),
        ({"kind": "synthetic", "families": "modular,calculus"},
         "data.sources.s.families names unknown exercise families ['calculus']"),
        ({"kind": "synthetic_unanswerable", "families": "modular"},
         "data.sources.s.families is 'modular', but only kind 'synthetic'"),
    ],
)
def test_bad_source_spec_is_refused_before_training(spec, message):
    with pytest.raises(sources.DataConfigError, match=re.escape(message)):
        pipeline.validate_data_config(_cfg({"s": spec}, {"s": 1.0}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(eval_holdout=1.0), "data.eval_holdout is 1.0"),
        (dict(read_threads=-1), "data.read_threads is -1"),
        (dict(read_processes=True), "data.read_processes is True; give an integer >= 0"),
        (dict(seed=1.5), "data.seed is 1.5"),
        (dict(mixture={}), "unknown keys ['mixture']"),
    ],
)
def test_bad_data_keys_are_refused(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pipeline.validate_data_config(_cfg({"s": SYNTH}, {"s": 1.0}, **overrides))


def test_files_are_required_only_for_sources_the_mix_reads():
    declared = {"kind": "jsonl", "paths": "/nonexistent/web/*.jsonl", "text_key": "text"}
    pipeline.validate_data_config(_cfg({"s": SYNTH, "web": declared}, {"s": 1.0}))
    pipeline.validate_data_config(_cfg({"s": SYNTH, "web": declared}, {"s": 1.0, "web": 0.0}))
    with pytest.raises(sources.DataConfigError, match="data.sources.web.paths"):
        pipeline.validate_data_config(_cfg({"s": SYNTH, "web": declared}, {"s": 1.0, "web": 0.5}))


def test_missing_data_key_is_named():
    cfg = _cfg({"s": SYNTH}, {"s": 1.0})
    del cfg["prefetch"]
    with pytest.raises(ValueError, match=re.escape("missing keys ['prefetch']")):
        pipeline.validate_data_config(cfg)


def test_source_with_no_eval_records_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    spec = {"kind": "jsonl", "paths": str(tmp_path / "a.jsonl"), "text_key": "text"}
    with pytest.raises(sources.EmptySplitError, match=re.escape("data.sources.j has no eval records: 1 records")):
        sources.open_documents("j", spec, seed=0, split="eval", eval_holdout=0.01)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(sources.DataConfigError, match=re.escape(
            f"data.sources.j.paths: {tmp_path / 'empty.jsonl'} is empty (0 bytes); fill it or "
            f"point paths at the data")):
        sources.open_documents("j", {**spec, "paths": str(tmp_path / "empty.jsonl")}, seed=0,
                               split="train", eval_holdout=0.01)
    (tmp_path / "empty.jsonl").unlink()
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(sources.EmptySplitError, match="no train records: 0 records.*hold no records"):
        sources.open_documents("j", {**spec, "paths": str(tmp_path / "blank.jsonl")}, seed=0,
                               split="train", eval_holdout=0.01)


def test_a_directory_given_as_paths_is_named_as_one(tmp_path):
    spec = {"kind": "jsonl", "paths": str(tmp_path), "text_key": "text"}
    with pytest.raises(sources.DataConfigError, match=re.escape(
            f"data.sources.j.paths: {str(tmp_path)!r} is a directory, not files; give a glob of "
            f"its files, e.g. {str(tmp_path / '*.jsonl')!r}")):
        sources.open_documents("j", spec, seed=0, split="train", eval_holdout=0.01)


def test_small_source_holds_out_at_least_one_record(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(50)))
    spec = {"kind": "jsonl", "paths": str(tmp_path / "a.jsonl"), "text_key": "text"}
    assert not sources.held_out_mask(np.arange(50), 0.01).any()  # the hash alone holds none out
    split = {s: list(sources.open_documents("j", spec, seed=0, split=s, eval_holdout=0.01)) for s in SPLITS}
    assert len(split["eval"]) == 1 and len(split["train"]) == 49
    assert sorted(split["train"] + split["eval"], key=int) == [str(i) for i in range(50)]
    assert sources.held_out_indices(50, 0.0).size == 0 and sources.held_out_indices(1, 0.99).size == 0
    assert len(sources.held_out_indices(3, 0.99)) == 2  # one record is always left to train on


def test_config_dict_is_accepted():
    import ml_collections

    pipeline.validate_data_config(ml_collections.ConfigDict(_cfg({"s": SYNTH}, {"s": 1.0})))

"""Preference pairs: record validation, built-in pairs, row layout, and the scoring that feeds
the DPO loss (shift, masks, padding, the one-forward pivotal path)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi4_jax.data import chat, preference, synthetic
from phi4_jax.data.sources import BadRecordError, JsonRecord
from phi4_jax.errors import ConfigError
from phi4_jax.data.tokenizer import load_tokenizer
from phi4_jax.model.config import model_config_for
from phi4_jax.model.transformer import init_model
from phi4_jax.sampling.scoring import next_token_candidate_log_probs
from phi4_jax.stages.dpo import pair_log_probs

TOKENIZER = load_tokenizer("phi4")
SMALL = model_config_for("tiny", vocab_size=97, num_layers=2)


def _record(**fields):
    record = JsonRecord(fields)
    record.where = "pairs.jsonl line 7"
    return record


def _pair(record, pair_format="sequence"):
    return preference.pair_from_record(record, TOKENIZER, pair_format=pair_format, judged=False)


@pytest.mark.parametrize("fields, message", [
    (dict(prompt="2+2?", chosen="4", rejected="4"), "identical"),
    (dict(prompt="2+2?", chosen="4", rejected="  "), "rejected is empty"),
    (dict(prompt="2+2?", chosen="4"), r"lacks \['rejected'\]"),
    (dict(prompt="q", chosen="a", rejected="b",
          scores={"chosen": {"accuracy": 11, "style": 1, "detail": 1},
                  "rejected": {"accuracy": 1, "style": 1, "detail": 1}}), "outside the declared"),
    (dict(prompt="q", chosen=[{"role": "user", "content": "x"}], rejected="b"), "assistant's"),
])
def test_bad_pairs_name_the_record_and_the_problem(fields, message):
    with pytest.raises(BadRecordError, match=f"pairs.jsonl line 7.*{message}|{message}"):
        _pair(_record(**fields))


def test_good_records_never_look_up_where_they_were_read():
    """A JSONL record's line number costs a scan of its file up to the record; only a message
    about a bad record may ask for it."""
    def record(**fields):
        read = JsonRecord(fields)
        read.where = lambda: pytest.fail("looked up a good record's line")
        return read

    example = preference.pair_example(
        record(prompt="2+2?", chosen="4", rejected="5"), tokenizer=TOKENIZER,
        pair_format="sequence", judged=False, weighting=preference.JudgeWeighting(), seq_len=64,
        counts=chat.Counts())
    assert example is not None
    assert chat.sft_example(record(messages=[{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4"}]),
                            tokenizer=TOKENIZER, seq_len=64, truncation="drop",
                            counts=chat.Counts()) is not None
    bad = JsonRecord(prompt="q", chosen="a", rejected=" ")
    bad.where = lambda: "pairs.jsonl:9"
    with pytest.raises(BadRecordError, match="^pairs.jsonl:9 rejected is empty"):
        _pair(bad)


def test_pivotal_record_ids_are_checked():
    with pytest.raises(BadRecordError, match="pairs.jsonl line 7.*every id"):
        _pair(_record(prompt_ids=[1, 2], chosen_id=5, rejected_id=10**9), "pivotal_token")
    with pytest.raises(BadRecordError, match="lacks"):
        _pair(_record(prompt_ids=[1, 2], chosen_id=5), "pivotal_token")


def test_messages_and_text_responses_give_the_same_ids():
    text = _pair(_record(prompt="What is 2+2?", chosen="4", rejected="5"))
    messages = _pair(_record(prompt=[{"role": "user", "content": "What is 2+2?"}],
                             chosen=[{"role": "user", "content": "What is 2+2?"},
                                     {"role": "assistant", "content": "4"}],
                             rejected="5"))
    assert text == messages
    im_start, im_sep, im_end = (TOKENIZER.special_id(t) for t in
                                ("<|im_start|>", "<|im_sep|>", "<|im_end|>"))
    assert text.prompt == (im_start, 882, im_sep, *TOKENIZER.encode("What is 2+2?"), im_end,
                           im_start, 78191, im_sep)
    assert text.chosen == (*TOKENIZER.encode("4"), im_end)


def test_judge_margin_weighting_hand_value():
    scores = {"chosen": {"accuracy": 9, "style": 8, "detail": 7},
              "rejected": {"accuracy": 3, "style": 8, "detail": 4}}
    pair = _pair(_record(prompt="q", chosen="a", rejected="b", scores=scores))
    weighting = preference.JudgeWeighting("margin", margin_scale=5.0, min_weight=0.1)
    assert weighting.weight(pair, "x") == pytest.approx(3.0 / 5.0)  # mean margin (6+0+3)/3 = 3
    assert preference.JudgeWeighting().weight(pair, "x") == 1.0
    with pytest.raises(BadRecordError, match="no judge scores"):
        weighting.weight(_pair(_record(prompt="q", chosen="a", rejected="b")), "x")


def test_builtin_pairs_prefer_the_verified_solution():
    for index in range(40):
        ex = synthetic.exercise(3, index)
        pair = preference.pair_from_record(ex, TOKENIZER, pair_format="sequence", judged=False)
        chosen, rejected = (TOKENIZER.decode(ids[:-1]) for ids in (pair.chosen, pair.rejected))
        assert synthetic.verify(ex, chosen) and not synthetic.verify(ex, rejected), rejected
    refusal = synthetic.unanswerable_exercise(3, 0)
    pair = preference.pair_from_record(refusal, TOKENIZER, pair_format="sequence", judged=False)
    assert synthetic.verify(refusal, TOKENIZER.decode(pair.chosen[:-1]))
    assert not synthetic.verify(refusal, TOKENIZER.decode(pair.rejected[:-1]))


def test_builtin_pivotal_pairs_split_at_the_final_answer():
    for index in range(20):
        ex = synthetic.exercise(4, index)
        pair = preference.pair_from_record(ex, TOKENIZER, pair_format="pivotal_token",
                                           judged=False)
        text = TOKENIZER.decode(pair.prompt + pair.chosen)
        assert pair.chosen != pair.rejected
        assert ex.solution.startswith(text.split("<|im_sep|>")[-1])
        assert "Final answer:" in text


def test_sequence_rows_mask_only_the_response_even_when_pad_is_the_end_token():
    pair = preference.Pair(prompt=(5, 6, 7), chosen=(8, 3), rejected=(9, 9, 3))
    rows = preference.sequence_rows(pair, seq_len=8, pad_id=3, weight=0.5)  # pad == end id 3
    np.testing.assert_array_equal(rows["targets"][0], [6, 7, 8, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][1], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(rows["segment_ids"][1], [1, 1, 1, 1, 1, 0, 0, 0])
    assert rows["weight"] == np.float32(0.5)
    assert preference.sequence_rows(pair, seq_len=4, pad_id=3, weight=1.0) is None


def _small_model(seed=0):
    model = init_model(SMALL, seed)
    graphdef, params = nnx.split(model)
    return model, graphdef, nnx.to_pure_dict(params)


def _numpy_log_probs(model, tokens):
    logits = np.asarray(model(jnp.asarray([tokens]), jnp.arange(len(tokens))[None],
                              jnp.ones((1, len(tokens)), jnp.int32)), np.float64)[0]
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_sequence_log_probs_are_summed_response_log_softmax_without_shift_errors():
    model, graphdef, params = _small_model()
    pair = preference.Pair(prompt=(5, 6, 7, 11), chosen=(8, 2, 3), rejected=(9, 3))
    rows = preference.sequence_rows(pair, seq_len=12, pad_id=0, weight=1.0)
    batch = {k: jnp.asarray(v[None]) for k, v in rows.items() if k != "weight"}
    got = pair_log_probs(params, batch, graphdef=graphdef, chunk_tokens=5,
                         pair_format="sequence", length_normalize=False)[0]
    for side, response in enumerate((pair.chosen, pair.rejected)):
        tokens = pair.prompt + response
        log_probs = _numpy_log_probs(model, tokens)
        # token i is predicted at position i - 1: only the response's tokens count
        want = sum(log_probs[i - 1, tokens[i]] for i in range(len(pair.prompt), len(tokens)))
        assert float(got[side]) == pytest.approx(want, rel=1e-5)
    longer = preference.sequence_rows(pair, seq_len=20, pad_id=0, weight=1.0)
    longer_batch = {k: jnp.asarray(v[None]) for k, v in longer.items() if k != "weight"}
    padded = pair_log_probs(params, longer_batch, graphdef=graphdef, chunk_tokens=5,
                            pair_format="sequence", length_normalize=False)[0]
    np.testing.assert_allclose(padded, got, rtol=1e-6)  # padding length changes nothing


def test_pivotal_one_forward_equals_the_general_path():
    model, graphdef, params = _small_model(1)
    pair = preference.Pair(prompt=(5, 6, 7, 11, 13), chosen=(8,), rejected=(21,))
    pivotal = preference.pivotal_rows(pair, seq_len=10, pad_id=0, weight=1.0)
    sequence = preference.sequence_rows(pair, seq_len=10, pad_id=0, weight=1.0)
    one_forward = next_token_candidate_log_probs(
        params, graphdef, {k: jnp.asarray(v[None]) for k, v in pivotal.items() if k != "weight"})
    general = pair_log_probs(params, {k: jnp.asarray(v[None]) for k, v in sequence.items()
                                      if k != "weight"}, graphdef=graphdef, chunk_tokens=4,
                             pair_format="sequence", length_normalize=False)
    np.testing.assert_allclose(one_forward, general, rtol=1e-5)
    log_probs = _numpy_log_probs(model, pair.prompt)
    np.testing.assert_allclose(one_forward[0], log_probs[-1, [8, 21]], rtol=1e-5)


def test_length_normalized_is_the_mean_over_response_tokens():
    _, graphdef, params = _small_model(2)
    pair = preference.Pair(prompt=(5, 6), chosen=(8, 2, 3, 4), rejected=(9, 3))
    rows = preference.sequence_rows(pair, seq_len=8, pad_id=0, weight=1.0)
    batch = {k: jnp.asarray(v[None]) for k, v in rows.items() if k != "weight"}
    summed, mean = (pair_log_probs(params, batch, graphdef=graphdef, chunk_tokens=8,
                                   pair_format="sequence", length_normalize=norm)[0]
                    for norm in (False, True))
    np.testing.assert_allclose(mean, summed / np.array([4.0, 2.0]), rtol=1e-6)


def _pair_source(seq_len, count=20):
    """`count` built-in pairs as one source's rows at `seq_len`."""
    import grain

    from phi4_jax.data import bad_records, chat
    bad_records.reset()
    pair = dict(prompt="What is 12 + 30?", chosen="12 + 30 = 42. Final answer: 42",
                rejected="12 + 30 = 52. Final answer: 52")
    records = grain.MapDataset.source([_record(**pair) for _ in range(count)])
    example = functools.partial(
        preference.pair_example, tokenizer=load_tokenizer("bytes"), pair_format="sequence",
        judged=False, weighting=preference.JudgeWeighting(), seq_len=seq_len,
        counts=chat.Counts())
    cfg = {"sources": {"pairs": {}}, "read_threads": 0}
    return preference.pair_rows("pairs", records, cfg, example=example)


def test_a_source_whose_every_pair_is_over_long_fails_at_start_up():
    """It could never yield a row: refused when its rows are built, not a run that waits."""
    with pytest.raises(ConfigError, match=r"data.sources.pairs: all 20 .* over-long.*"
                                          r"train.seq_len"):
        _pair_source(seq_len=16)
    assert next(iter(_pair_source(seq_len=256)))["inputs"].shape == (2, 256)

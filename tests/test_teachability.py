"""The teachability filter: a source limited to chosen records, the success-rate band and its
counts (hand-worked), the stored rates reused on restart, bad input, and a reasoning SFT run
that samples, filters and trains."""

import contextlib
import json
import types

import numpy as np
import pytest

from phi4_jax import config_base, stages
from phi4_jax.data import pipeline, sources, synthetic
from phi4_jax.data.synthetic.reasoning import ReasoningFormat
from phi4_jax.data.tokenizer import load_tokenizer
from phi4_jax.data.problems import problem_of
from phi4_jax.stages import sft, teachability
from phi4_jax.stages.teachability import sampling_params


def _value_rows(name, records, cfg, *, indexed):
    def row(item):
        index, record = item if indexed else (-1, item)
        return {"text_id": np.int64(int(record["text"].split()[1])), "index": np.int64(index)}
    return records.map(row).to_iter_dataset()


@pytest.mark.parametrize("indexed", [False, True])
def test_subsets_limit_a_source_to_those_records(tmp_path, indexed):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40)))
    cfg = dict(seed=0, sources={"docs": {"kind": "jsonl", "paths": str(path), "text_key": "text"}},
               mix={"docs": 1.0}, eval_holdout=0.1, read_threads=0, read_processes=0, prefetch=0,
               max_segments_per_row=32)
    train = sources.open_records("docs", cfg["sources"]["docs"], seed=0, split="train",
                                 eval_holdout=0.1)
    picked = [3, 11, 20]
    expected = {int(train[i]["text"].split()[1]): i for i in picked}  # line number -> index
    iterator = pipeline.make_iterator(
        cfg, lambda *a: _value_rows(*a, indexed=indexed), batch_size=4, indexed=indexed,
        subsets={"docs": np.asarray(picked)})
    seen = np.concatenate([next(iterator)["text_id"] for _ in range(6)])
    assert set(seen.tolist()) == set(expected)  # every picked record, nothing else
    if indexed:
        batch = next(iterator)
        assert [expected[t] for t in batch["text_id"].tolist()] == batch["index"].tolist()
    iterator.close()


def _grpo_config(pool=6, low=0.1, high=0.9):
    c = config_base.load_config("configs/grpo.py", "toy")
    c.reasoning.update(teachable_pool=pool, teachable_samples=4, teachable_low=low,
                       teachable_high=high)
    return c


def test_band_keeps_the_problems_between_the_bounds_and_reuses_stored_rates(tmp_path,
                                                                             monkeypatch):
    config = _grpo_config()
    run = types.SimpleNamespace(config=config)
    sources_on = [n for n, w in config.data.mix.items() if w > 0]
    rates = np.asarray([0.0, 0.5, 1.0, 0.25, 0.9, 0.1])  # 0 too hard, 2 too easy, bounds kept
    calls = []

    def fake_rates(run, params, problems, *args, **kwargs):
        calls.append(len(problems))
        return rates[:len(problems)]

    monkeypatch.setattr(teachability, "success_rates", fake_rates)
    args = (run, pipeline.checked_data_config(config.data), problem_of, None, None, None,
            lambda: "params", str(tmp_path))
    subsets, counts = teachability.kept_subsets(*args)
    for name in sources_on:
        assert subsets[name].tolist() == [1, 3, 4, 5]
    n = len(sources_on)
    assert counts == {"teachable_pool": 6.0 * n, "teachable_kept": 4.0 * n,
                      "teachable_too_easy": 1.0 * n, "teachable_too_hard": 1.0 * n}
    assert calls == [6] * n

    def no_sampling(*args, **kwargs):
        raise AssertionError("stored rates must be reused")

    monkeypatch.setattr(teachability, "success_rates", no_sampling)
    again, _ = teachability.kept_subsets(*args)
    assert {k: v.tolist() for k, v in again.items()} == {k: v.tolist() for k, v in subsets.items()}


def test_a_band_that_keeps_nothing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(teachability, "success_rates", lambda run, p, problems, *a, **k:
                        np.zeros(len(problems)))
    run = types.SimpleNamespace(config=_grpo_config(low=0.5, high=1.0))
    data = pipeline.checked_data_config(run.config.data)
    with pytest.raises(config_base.ConfigError, match=r"keeps none of the 6 problems"):
        teachability.kept_subsets(run, data, problem_of, None, None, None, lambda: None,
                                  str(tmp_path))


def test_off_by_default_and_refused_without_the_reasoning_template():
    run = types.SimpleNamespace(config=_grpo_config(pool=0))
    assert teachability.kept_subsets(run, None, problem_of, None, None, None, None, "") == (
        None, {})
    c = config_base.load_config("configs/sft.py", "toy")
    c.reasoning.teachable_pool = 4
    with pytest.raises(config_base.ConfigError, match="sft.template=reasoning"):
        sft.check(c)
    c.reasoning.update(teachable_low=0.8, teachable_high=0.2)
    with pytest.raises(config_base.ConfigError, match="teachable_low/high"):
        teachability.check(c)


@pytest.mark.slow
def test_reasoning_sft_samples_filters_and_trains(tmp_path):
    c = config_base.load_config("configs/reasoning_sft.py", "toy")
    c.train.update(steps=1, global_batch=8, seq_len=1024, warmup_steps=1)  # traces in bytes
    c.reasoning.update(teachable_pool=3, teachable_samples=2, teachable_low=0.0,
                       teachable_high=1.0)
    c.grpo.max_new_tokens = 4
    c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
    c.eval.update(every_steps=1, batches=1, accuracy_problems=0, at_start=False)
    history = stages.run(c, str(tmp_path))
    scored = [h for h in history if "teachable_kept" in h][-1]
    sources_on = [n for n, w in c.data.mix.items() if w > 0]
    assert scored["teachable_pool"] == scored["teachable_kept"] == 3 * len(sources_on)
    for name in sources_on:
        with np.load(tmp_path / "teachability" / f"{name}.npz") as stored:
            assert stored["indices"].tolist() == [0, 1, 2]
            assert set(stored["rates"].tolist()) <= {0.0, 0.5, 1.0}  # 2 samples each
    assert sampling_params(c, load_tokenizer("bytes")).max_new_tokens == 4


def test_success_rates_count_each_problems_accepted_samples(monkeypatch):
    """Planted responses: problem i's sample j answers correctly after the think block when
    j < solved[i]; the others answer wrongly, or correctly but only inside the block (which
    the reward reads as no answer). The rates are solved[i] / samples, worked by hand."""
    fmt, tokenizer = ReasoningFormat(), load_tokenizer("phi4")
    problems = [synthetic.exercise(0, i, ("modular",)) for i in range(5)]
    solved, samples = [0, 3, 1, 4, 2], 4
    prompt_of = {tuple(teachability.chat_prompt(ex.question, tokenizer, fmt)): i
                 for i, ex in enumerate(problems)}
    assert len(prompt_of) == len(problems)
    seen = []

    def planted(params, graphdef, cfg, prompts, tok, *, sampling, batch_size, seed):
        seen.append((len(prompts), batch_size, seed))
        responses, drawn = [], {}
        for prompt in prompts:
            i = prompt_of[tuple(prompt)]
            j = drawn[i] = drawn.get(i, -1) + 1
            answer = problems[i].answer
            responses.append(
                f"<think>\nsteps\n</think>\nFinal answer: {answer}" if j < solved[i] else
                f"<think>\nFinal answer: {answer}\n</think>\nno answer here" if j % 2 else
                f"<think>\nsteps\n</think>\nFinal answer: {answer}1")
        return responses

    monkeypatch.setattr(teachability, "sampled_responses", planted)
    monkeypatch.setattr(teachability.jax, "set_mesh", lambda mesh: contextlib.nullcontext())
    run = types.SimpleNamespace(mesh=None, rules=(), graphdef=None, model_cfg=None)
    rates = teachability.success_rates(run, None, problems, tokenizer, fmt, samples=samples,
                                       sampling=None, seed=7)
    np.testing.assert_array_equal(rates, [0.0, 0.75, 0.25, 1.0, 0.5])
    assert seen == [(20, 20, 7)]  # every sample in one call, with the run's seed
    assert teachability.success_rates(run, None, [], tokenizer, fmt, samples=samples,
                                      sampling=None, seed=7).shape == (0,)

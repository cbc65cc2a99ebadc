"""The Pivotal Token Search job: its records are the DPO stage's input as is, output survives a
crash mid-write and a restart skips finished questions (ending byte-identical to a straight
run), questions split over processes, `pts` keys are validated, and `stage=pts_search`
dispatches to the job."""

import functools
import json

import pytest

from phi4_jax import config_base, stages
from phi4_jax.data import preference, synthetic
from phi4_jax.data.tokenizer import load_tokenizer
from phi4_jax.search import job, records, verifiers
from phi4_jax.search.estimates import Estimate, Rollout
from phi4_jax.search.pivotal_tokens import search_question


def _scripted(prefixes):
    """The question succeeds 2 times in 5; its first response (20, 30, 40) failed; after
    token 20 every rollout succeeds (beginning with 21), after (20, 30) every one fails."""
    table = {(): [False, True, False, True, False], (20,): [True] * 4, (20, 30): [False] * 4}
    return [Estimate(sum(table[p]) / len(table[p]),
                     tuple(Rollout((20 + len(p), 30 + i, 40), (-1.0,) * 3, ok)
                           for i, ok in enumerate(table[p])), (0.0, 1.0), 0.9)
            for p in prefixes]


def test_records_are_read_by_the_dpo_stage_as_they_are():
    tokenizer = load_tokenizer("phi4")
    search = search_question(_scripted, p_gap=0.2, success_range=(0.2, 0.8), responses=1)
    assert [(p.index, p.sign) for p in search.pivots] == [(0, 1), (1, -1)]
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Q?"}],
                                   add_generation_prompt=True).ids
    (record,) = [records.pair_record(7, prompt, pair, tokenizer) for pair in search.pairs]
    record = json.loads(json.dumps(record))
    pair = preference.pair_from_record(record, tokenizer, pair_format="pivotal_token",
                                       judged=False)
    assert pair == preference.Pair(tuple(prompt) + (20,), (21,), (30,))
    assert (record["sign"], record["p_before"], record["p_after"]) == (-1, 1.0, 0.0)
    assert (record["chosen_success_rate"], record["rejected_success_rate"]) == (1.0, 0.0)
    assert record["question_id"] == 7 and record["prefix_text"] == tokenizer.decode([20])
    wholes = records.response_pair_records(7, "Q?", search, tokenizer, (), limit=3)
    # successes: two from the question, four after (20,); failures: three, then (20, 30)'s
    assert len(wholes) == 3
    assert (wholes[0]["chosen_ids"], wholes[0]["rejected_ids"]) == ([20, 31, 40], [20, 30, 40])
    sequence = preference.pair_from_record(json.loads(json.dumps(wholes[0])), tokenizer,
                                           pair_format="sequence", judged=False)
    assert sequence.chosen[-1] == tokenizer.im_end_id


def test_whole_responses_are_decoded_without_the_question_or_stop_tokens():
    tokenizer = load_tokenizer("phi4")
    ex = synthetic.Exercise("rate", "Final answer: 12. How much?", "", "12")
    problem = verifiers.Problem(ex.question, ex.answer, functools.partial(synthetic.verify, ex))
    responses = [tokenizer.encode("Final answer: 12.0") + [tokenizer.im_end_id],
                 tokenizer.encode("It is 12.") + [tokenizer.im_end_id]]
    assert job.response_outcomes(responses, problem_=problem, tokenizer=tokenizer,
                                 stop_ids=(tokenizer.im_end_id,), workers=1) == [True, False]


def test_a_reasoning_model_is_asked_and_checked_in_its_format():
    """sft.template='reasoning': the prompt carries the system message, only the text after
    the think block counts, the whole-response pairs keep that prompt, and the questions
    come from pts.families."""
    tokenizer = load_tokenizer("phi4")
    config = config_base.load_config("configs/pts_search.py", "toy")
    config.sft.template, config.pts.families = "reasoning", "modular"
    model = type("Model", (), {"sampling": type("S", (), {"stop_ids": (tokenizer.im_end_id,)})})
    search_one = job._ModelSearch(config, model, tokenizer)
    fmt = search_one.fmt
    ex = synthetic.exercise(config.data.seed, 5, ("modular",))
    problem = verifiers.problem("synthetic", config.data.seed, 5, families=search_one.families,
                                fmt=fmt)
    assert problem.question == ex.question
    assert problem.check(f"<think>\nwork\n</think>\nFinal answer: {ex.answer}")
    assert not problem.check(f"<think>\nFinal answer: {ex.answer}\n</think>\nunsure")
    assert not problem.check(f"Final answer: {ex.answer}")  # no think block: no answer part
    search = search_question(_scripted, p_gap=0.2, success_range=(0.2, 0.8), responses=1)
    (whole, *_) = records.response_pair_records(5, fmt.messages(ex.question), search,
                                                tokenizer, (), limit=1)
    pair = preference.pair_from_record(json.loads(json.dumps(whole)), tokenizer,
                                       pair_format="sequence", judged=False)
    asked = tokenizer.encode_chat(fmt.messages(ex.question), add_generation_prompt=True).ids
    assert pair.prompt == tuple(asked) and fmt.system in tokenizer.decode(asked)


def _fake_search(question_id):
    summary = {"question_id": question_id, "kept": question_id % 2 == 0,
               "pivots": question_id, "pairs": question_id, "rollouts": 10}
    pairs = [{"prompt_ids": [1, question_id], "chosen_id": 2, "rejected_id": 3}] * question_id
    return summary, pairs, [{"prompt": "q", "chosen": "a", "rejected": "b"}]


def _contents(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_restart_after_a_torn_write_ends_as_a_straight_run(tmp_path):
    ids = list(range(6))

    def run(folder, upto):
        shard = job.ShardFiles(folder, 0, 1)
        progress = job.Progress(len(ids), shard.finished.values(), bar=False, every=100)
        job.search_questions(ids[:upto], _fake_search, shard, progress)
        shard.close()
        return progress

    run(tmp_path / "straight", 6)
    run(tmp_path / "crashed", 3)
    crashed = tmp_path / "crashed"
    with open(crashed / "pairs-00000-of-00001.jsonl", "ab") as f:  # question 3 half written
        f.write(b'{"prompt_ids": [1, 3], "chosen_id": 2, "rejected_id": 3}\n{"prompt_i')
    with open(crashed / "questions-00000-of-00001.jsonl", "ab") as f:
        f.write(b'{"question_id": 3, "ki')
    asked = []
    shard = job.ShardFiles(crashed, 0, 1)
    assert sorted(shard.finished) == [0, 1, 2]
    progress = job.Progress(len(ids), shard.finished.values(), bar=False, every=100)
    job.search_questions(ids, lambda q: asked.append(q) or _fake_search(q), shard, progress)
    shard.close()
    assert asked == [3, 4, 5]
    assert progress.totals["questions"] == 6 and progress.totals["pairs"] == 15
    assert _contents(crashed) == _contents(tmp_path / "straight")


def test_questions_split_over_processes_and_layouts_do_not_mix(tmp_path):
    pts = config_base.base_config().pts
    pts.update(first_question=10, questions=8)
    assert [job.question_ids(pts, i, 3) for i in range(3)] == [[10, 13, 16], [11, 14, 17],
                                                               [12, 15]]
    job.ShardFiles(tmp_path, 1, 3).close()
    with pytest.raises(job.ShardFilesError, match="another process count"):
        job.ShardFiles(tmp_path, 0, 2)


@pytest.mark.parametrize("key,value,message", [
    ("p_gap", 0.0, "pts.p_gap=0.0"), ("task", "essay", "pts.task='essay'"),
    ("rollouts_per_round", 40, "pts.rollouts_per_round=40"), ("split", "middle", "pts.split"),
    ("max_new_tokens", 4096, "pts.max_new_tokens=4096"), ("temperature", 0.0, "temperature"),
    ("families", "modular,geometry", r"pts.families names unknown exercise families \['geometry'\]")])
def test_bad_pts_keys_are_refused_by_name(key, value, message):
    config = config_base.load_config("configs/pts_search.py", "toy")
    config.pts[key] = value
    with pytest.raises(config_base.ConfigError, match=message):
        job.check(config, config_base.validate_config(config))


@pytest.mark.slow
def test_the_stage_name_dispatches_to_the_job(tmp_path):
    config = config_base.load_config("configs/pts_search.py", "toy")
    assert config.stage == "pts_search"
    with pytest.raises(config_base.ConfigError, match="init_from='': Pivotal Token Search"):
        stages.run(config, str(tmp_path))
    config.stage = "search"
    with pytest.raises(config_base.ConfigError, match="pts_search"):
        stages.builder_for(config)

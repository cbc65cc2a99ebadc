"""GRPO plumbing: the reasoning reward, the rows a sampled group becomes, problems without a
checkable answer, group-size checks, and a short resumable run on the engine."""

import numpy as np
import pytest

from phi4_jax import config_base, stages
from phi4_jax.data import synthetic
from phi4_jax.data.synthetic import reasoning
from phi4_jax.data.sources import BadRecordError, JsonRecord
from phi4_jax.sampling.decode import Generation
from phi4_jax.data.problems import problem_of, response_rows
from phi4_jax.stages import grpo

FMT = reasoning.ReasoningFormat()
RULES = reasoning.RewardRules()
EX = synthetic.Exercise("x", "What is 6 x 7?", "", "42")
SHORT_SYSTEM = "Think in <think></think>, then answer."  # short prompts: rows of 256 tokens


@pytest.mark.parametrize("response, finished, total, correct, well_formed", [
    ("<think>6 sevens</think>\nFinal answer: 42", True, 1.0, True, True),
    ("<think>6 sevens</think>\nFinal answer: 41", True, -0.5, False, True),
    ("Final answer: 42", True, -1.0, False, False),  # no think block: no answer after it
    ("<think>6 sevens\nFinal answer: 42", False, -1.5, False, False),  # never closed, cut off
    ("<think>a</think><think>b</think>Final answer: 42", True, 0.5, True, False),
    ("<think>Final answer: 42</think>\nFinal answer: 40", True, -0.5, False, True),
])
def test_reward_rules(response, finished, total, correct, well_formed):
    got = reasoning.reward(EX, response, finished=finished, fmt=FMT, rules=RULES)
    assert (got.total, got.correct, got.well_formed) == (total, correct, well_formed)


def test_traces_put_the_steps_in_the_think_block():
    ex = synthetic.exercise(0, 3)
    trace = FMT.trace(ex)
    answer, well_formed = FMT.split(trace)
    assert well_formed and answer.strip() == f"Final answer: {ex.answer}"
    assert reasoning.reward(ex, trace, finished=True, fmt=FMT, rules=RULES).total == 1.0


def test_problems_need_a_checkable_answer():
    record = JsonRecord({"question": "Why?"})
    record.where = "problems.jsonl line 4"
    with pytest.raises(BadRecordError, match="problems.jsonl line 4.*checkable answer"):
        problem_of(record)
    assert problem_of(JsonRecord({"question": "2+2?", "answer": 4})).answer == "4"


def test_response_rows_lay_prompt_and_response_in_the_sampler_slots():
    prompt = {"tokens": np.array([[0, 0, 5, 6]]), "positions": np.array([[0, 0, 0, 1]]),
              "segment_ids": np.array([[0, 0, 1, 1]])}
    out = Generation(tokens=np.array([[7, 8, 9]]), log_probs=np.array([[-1.0, -2.0, 0.0]]),
                     mask=np.array([[1, 1, 0]]), lengths=np.array([2]))
    rows = response_rows(prompt, out, np.array([0.5]))
    np.testing.assert_array_equal(rows["inputs"], [[0, 0, 5, 6, 7, 8]])
    np.testing.assert_array_equal(rows["targets"], [[0, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(rows["positions"], [[0, 0, 0, 1, 2, 3]])
    np.testing.assert_array_equal(rows["segment_ids"], [[0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 0, 1, 1, 0]])  # 7 and 8 only
    np.testing.assert_array_equal(rows["old_log_probs"], [[0, 0, 0, -1, -2, 0]])
    assert rows["advantages"].tolist() == [0.5]


def _config(steps):
    c = config_base.load_config("configs/grpo.py", "toy")
    c.reasoning.system = SHORT_SYSTEM
    c.train.update(steps=steps, global_batch=8, seq_len=256)
    c.grpo.update(group_size=2, max_new_tokens=8)
    c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
    c.eval.update(every_steps=steps, accuracy_problems=0, at_start=False)
    c.checkpoint.every_steps = 1
    return c


def test_group_of_one_is_refused():
    c = _config(2)
    c.grpo.group_size = 1
    with pytest.raises(config_base.ConfigError, match="grpo.group_size=1"):
        grpo.check(c)


@pytest.mark.slow
def test_grpo_resume_equals_straight_run(tmp_path):
    keys = ("loss", "reward", "response_tokens", "grad_norm")

    def trace(history):
        return [[h[k] for k in keys] for h in history if "loss" in h]

    straight = stages.run(_config(2), str(tmp_path / "straight"))
    first = stages.run(_config(2), str(tmp_path / "resumed"), stop_at_step=1)
    second = stages.run(_config(2), str(tmp_path / "resumed"))
    np.testing.assert_allclose(trace(first) + trace(second), trace(straight), rtol=1e-6)
    assert len(trace(straight)) == 2 and straight[0]["units"] == 16

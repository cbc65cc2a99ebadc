"""Phi-4-reasoning-plus's length-aware reward (report section 4.1): hand-worked values per branch,
the cosine schedules against a float64 NumPy reference, the 5-gram repetition penalty on
hand-made texts, the weights, the overrides, the length scale, and the grpo.reward plumbing."""

import types

import numpy as np
import pytest

from phi4_jax import config_base
from phi4_jax.config_base import ConfigError
from phi4_jax.data import synthetic
from phi4_jax.data.synthetic import reasoning
from phi4_jax.data.tokenizer import load_tokenizer
from phi4_jax.sampling.decode import Generation
from phi4_jax.stages import grpo

FMT = reasoning.ReasoningFormat()
RULES = reasoning.LengthAwareRules()
EX = synthetic.Exercise("x", "What is 6 x 7?", "", "42")
RIGHT, WRONG = "<think>6 sevens</think>\nFinal answer: 42", "<think>6 sevens</think>\nFinal answer: 41"


@pytest.mark.parametrize("correct, tokens, expected", [
    (True, 0, 1.0), (True, 25_600, 1.0),  # full reward up to L_pos_control
    (True, 28_672, 0.75),  # midway to L_max: cos(pi / 2) = 0
    (True, 27_136, 0.5 + 0.25 * (1 + 2**-0.5)),  # a quarter of the way: cos(pi / 4)
    (True, 31_744, 0.5), (True, 40_000, 0.5),  # L_max and beyond
    (False, 0, -1.0), (False, 1_851, -0.75),  # halfway to L_neg_control
    (False, 3_702, -0.5), (False, 20_000, -0.5),
])
def test_length_aware_accuracy_hand_worked(correct, tokens, expected):
    assert reasoning.length_aware_accuracy(correct, tokens, RULES) == pytest.approx(expected,
                                                                                   abs=1e-12)


def test_cosine_schedules_match_a_float64_reference():
    lengths = np.concatenate([np.arange(0, 40_000, 97),
                              np.random.default_rng(0).integers(0, 40_000, 500)]).astype(np.float64)
    l_max, l_pos, l_neg = 31_744.0, 25_600.0, 3_702.0
    past = np.clip((lengths - l_pos) / (l_max - l_pos), 0.0, 1.0)
    want_correct = 0.75 + 0.25 * np.cos(np.pi * past)
    want_wrong = -0.75 - 0.25 * np.cos(np.pi * np.minimum(lengths / l_neg, 1.0))
    got_correct = [reasoning.length_aware_accuracy(True, int(n), RULES) for n in lengths]
    got_wrong = [reasoning.length_aware_accuracy(False, int(n), RULES) for n in lengths]
    np.testing.assert_allclose(got_correct, want_correct, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_wrong, want_wrong, rtol=0, atol=1e-12)
    assert np.all(np.diff(got_correct[:413]) <= 0) and np.all(np.diff(got_wrong[:413]) >= 0)


def _forty_words_six_times():
    return [f"w{i}" for i in range(40)] * 6


@pytest.mark.parametrize("words, expected", [
    ("a b c d".split(), 0.0),  # shorter than one 5-gram
    ([f"w{i}" for i in range(100)], 0.0),  # nothing repeats
    ("a b c d e".split() * 5, 0.0),  # each 5-gram at most 5 times: not more than the threshold
    # 'a b c d e' starts at 0, 5, ..., 25: 6 times in 26 windows; 6 / (30 / 5) = 1.0 > 1 / 26
    ("a b c d e".split() * 6, -1.0),
    (["x"] * 20, -4.0),  # one 5-gram 16 times: 16 / (20 / 5)
    # 36 of the 40 rotations occur 6 times in 236 windows: 36 / 236 > 6 / (240 / 5) = 0.125
    (_forty_words_six_times(), -36 / 236),
])
def test_repetition_penalty_on_hand_made_texts(words, expected):
    assert reasoning.repetition_penalty(words, RULES) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("response, tokens, finished, total", [
    (RIGHT, 100, True, 8 / 13),  # short and correct: w_acc * 1.0
    (WRONG, 1_851, True, 8 / 13 * -0.75),  # halfway to L_neg_control
    (WRONG, 10, False, 8 / 13 * -0.5),  # cut off: -0.5 whatever the answer
    ("<think>6 sevens\nFinal answer: 42", 10, False, 8 / 13 * -0.5),  # cut off inside the block
    ("Final answer: 42", 10, True, 8 / 13 * -1.0),  # no think block
    ("<think>a</think><think>b</think>Final answer: 42", 10, True, 8 / 13 * -1.0),
    # 25 words, 'carry carry carry carry carry' 16 times: R_rep = -16 / (25 / 5) = -3.2
    ("<think>\n" + "carry " * 20 + "\n</think>\nFinal answer: 42", 50, True, (8 - 3.2) / 13),
])
def test_length_aware_reward_per_branch(response, tokens, finished, total):
    got = reasoning.length_aware_reward(EX, response, tokens=tokens, finished=finished, fmt=FMT,
                                        rules=RULES)
    assert got.total == pytest.approx(total, abs=1e-12)
    assert got.finished == finished


def test_rewards_stay_within_minus_one_and_one():
    worst = reasoning.length_aware_reward(EX, "x " * 400, tokens=400, finished=True, fmt=FMT,
                                          rules=RULES)
    assert -1.0 <= worst.total < -0.9  # -8/13 plus nearly the whole -5/13 repetition term


def test_length_scale_moves_every_threshold():
    rules = reasoning.LengthAwareRules(length_scale=1 / 128)  # L_pos 200, L_max 248, L_neg 28.9
    assert reasoning.length_aware_accuracy(True, 200, rules) == 1.0
    assert reasoning.length_aware_accuracy(True, 224, rules) == pytest.approx(0.75, abs=1e-12)
    assert reasoning.length_aware_accuracy(True, 248, rules) == pytest.approx(0.5, abs=1e-12)
    assert reasoning.length_aware_accuracy(False, 0, rules) == -1.0
    assert reasoning.length_aware_accuracy(False, 29, rules) == -0.5


def _config(**grpo_keys):
    config = config_base.load_config("configs/grpo.py", "toy")
    config.grpo.update(group_size=2, **grpo_keys)
    return config


def _sampled(tokenizer, responses, finished):
    """A Generation of `responses` (one problem's group), each ended by end of turn if finished."""
    rows = [tokenizer.encode(text) + ([tokenizer.end_of_turn_id] if done else [])
            for text, done in zip(responses, finished)]
    width = max(map(len, rows))
    tokens = np.array([row + [0] * (width - len(row)) for row in rows])
    mask = np.array([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return Generation(tokens=tokens, log_probs=np.zeros(tokens.shape), mask=mask,
                      lengths=mask.sum(1)), [len(row) for row in rows]


def test_grpo_rewards_follow_the_configured_reward():
    tokenizer = load_tokenizer("bytes")
    batch = {"question": np.array([EX.question]), "answer": np.array([EX.answer])}
    out, lengths = _sampled(tokenizer, [RIGHT, WRONG], [True, True])
    simple = grpo.rewards(types.SimpleNamespace(config=_config()), batch, out, tokenizer)
    np.testing.assert_allclose(simple["total"], [[1.0, -0.5]])
    # L_neg_control scaled to twice the wrong response's length, end of turn counted: -0.75
    scale = 2 * lengths[1] / 3_702
    config = _config(reward="phi4_reasoning", reward_length_scale=scale)
    aware = grpo.rewards(types.SimpleNamespace(config=config), batch, out, tokenizer)
    np.testing.assert_allclose(aware["total"], [[8 / 13, 8 / 13 * -0.75]], rtol=1e-6)
    np.testing.assert_array_equal(aware["correct"], [[1.0, 0.0]])


@pytest.mark.parametrize("key, value, message", [
    ("reward", "cosine", "grpo.reward='cosine': choose one of ('simple', 'phi4_reasoning')."),
    ("reward_length_scale", 0.0, "grpo.reward_length_scale=0.0: give a positive number"),
    ("reward_length_scale", -1.0, "grpo.reward_length_scale=-1.0: give a positive number"),
    ("reward_length_scale", float("nan"), "grpo.reward_length_scale=nan: give a positive number"),
])
def test_bad_reward_keys_are_refused_in_one_line(key, value, message):
    config = _config(**{key: value})
    with pytest.raises(ConfigError) as error:
        grpo.check(config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_simple_rewards_keys_are_refused_under_another_reward():
    """They would be ignored without a word."""
    config = _config(reward="phi4_reasoning", reward_wrong=-1.0)
    with pytest.raises(ConfigError, match=r"^grpo.reward_wrong=-1.0: it sets the 'simple' "
                                          r"reward, but grpo.reward='phi4_reasoning'; leave it "
                                          r"at -0.5 or set --config.grpo.reward=simple.$"):
        grpo.check(config)
    grpo.check(_config(reward="simple", reward_wrong=-1.0))
    grpo.check(_config(reward="phi4_reasoning"))

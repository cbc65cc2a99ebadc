"""The think-then-answer format of Phi-4-reasoning: its prompt, its traces and its rewards.

A reasoning conversation is ChatML with a system message asking the model to reason inside
`<think> ... </think>` and to give the final answer after the block. Both the system text and
the tags are config values (`reasoning.*`): the report does not print its exact wording, so
the default system text here is this project's own. Built-in traces put an exercise's worked
steps inside the block and its `Final answer:` line after it.

Two rewards of a response (GRPO, `grpo.reward`), both reading the final answer from the text
after the think block only:
- `reward` ('simple'): `correct` (+1) or `wrong` (-0.5) by the verifier; plus `format_penalty`
  when the block is missing, unclosed or repeated, and `overlong_penalty` when the response hit
  the token limit without ending.
- `length_aware_reward` ('phi4_reasoning'): Phi-4-reasoning-plus's own (report section 4.1),
  a correctness term scaled by the response's length in tokens plus a 5-gram repetition penalty.
Any reward that is not finite is an error, not a training signal.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

from phi4_jax.data import synthetic

DEFAULT_SYSTEM = (
    "You are a careful problem solver. First think the problem through step by step inside "
    "<think> and </think>; then, after </think>, give a short solution that ends with a line "
    "'Final answer: ...'.")


@dataclasses.dataclass(frozen=True)
class ReasoningFormat:
    system: str = DEFAULT_SYSTEM
    think_open: str = "<think>"
    think_close: str = "</think>"

    def messages(self, question: str) -> list[dict[str, str]]:
        """The conversation that asks a question in this format (generation prompt follows)."""
        return [{"role": "system", "content": self.system}, {"role": "user", "content": question}]

    def trace(self, ex: synthetic.Exercise) -> str:
        """An exercise's worked solution as a reasoning response: steps in the block, the
        final answer after it."""
        steps, _, _ = ex.solution.rpartition("Final answer:")
        return (f"{self.think_open}\n{steps.strip()}\n{self.think_close}\n"
                f"Final answer: {ex.answer}")

    def split(self, response: str) -> tuple[str, bool]:
        """(the answer part, whether the think block is well formed): one opening tag at the
        start, one closing tag after it. Without a closing tag the answer part is empty."""
        text = response.lstrip()
        opens, closes = text.count(self.think_open), text.count(self.think_close)
        well_formed = text.startswith(self.think_open) and opens == 1 and closes == 1
        _, found, answer = text.rpartition(self.think_close)
        return (answer if found else ""), well_formed


def format_for(config) -> ReasoningFormat | None:
    """The format a run's model speaks: think-then-answer (`reasoning.*`) for GRPO and for
    `sft.template='reasoning'` (SFT, and DPO or PTS from such a model), else None (plain chat)."""
    if config.stage == "grpo" or config.sft.template == "reasoning":
        r = config.reasoning
        return ReasoningFormat(r.system, r.think_open, r.think_close)
    return None


@dataclasses.dataclass(frozen=True)
class RewardRules:
    correct: float = 1.0
    wrong: float = -0.5
    format_penalty: float = -0.5
    overlong_penalty: float = -0.5


@dataclasses.dataclass(frozen=True)
class Reward:
    total: float
    correct: bool
    well_formed: bool
    finished: bool


def reward(ex: synthetic.Exercise, response: str, *, finished: bool, fmt: ReasoningFormat,
           rules: RewardRules) -> Reward:
    """The rule-based reward of one response (see the module docstring)."""
    answer, well_formed = fmt.split(response)
    correct = synthetic.verify(ex, answer)
    total = (rules.correct if correct else rules.wrong)
    total += 0.0 if well_formed else rules.format_penalty
    total += 0.0 if finished else rules.overlong_penalty
    if not math.isfinite(total):
        raise ValueError(f"the reward of a response is {total}; grpo reward values must be "
                         f"finite numbers.")
    return Reward(total, correct, well_formed, finished)


REWARDS = ("simple", "phi4_reasoning")  # grpo.reward: `reward`, `length_aware_reward`


@dataclasses.dataclass(frozen=True)
class LengthAwareRules:
    """Phi-4-reasoning-plus's reward constants (Phi-4-reasoning technical report, arXiv
    2504.21318, section 4.1), lengths in response tokens. `length_scale` multiplies the three
    lengths (1.0: the report's; a toy run with 256-token responses might use 256 / 31,744, which
    puts `max_length` at the response budget as the report's 32k context less its 1k prompt
    does)."""

    max_length: int = 31_744  # L_max
    positive_length: int = 25_600  # L_pos_control: correct answers lose reward past it
    negative_length: int = 3_702  # L_neg_control: wrong answers gain reward up to it
    correct_short: float = 1.0  # R_max^+
    correct_long: float = 0.5  # R_min^+
    wrong_short: float = -1.0  # R_min^-
    wrong_long: float = -0.5  # R_max^-
    unfinished: float = -0.5  # no end of turn: the response was cut off
    bad_format: float = -1.0  # think block missing, unclosed or repeated
    accuracy_weight: float = 8 / 13  # w_acc
    repetition_weight: float = 1 / 13  # w_rep
    ngram: int = 5
    ngram_max_count: int = 5  # an n-gram seen more often than this counts as repeated
    length_scale: float = 1.0


def _cosine(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at progress 1 along half a cosine."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def length_aware_accuracy(correct: bool, tokens: int, rules: LengthAwareRules) -> float:
    """R_acc_scaled for a finished, well-formed response of `tokens` tokens: a correct one keeps
    `correct_short` up to `positive_length` and falls along a cosine to `correct_long` at
    `max_length` (and stays there); a wrong one rises along a cosine from `wrong_short` at 0 to
    `wrong_long` at `negative_length` (and stays there), so a long wrong attempt costs less."""
    s = rules.length_scale
    if correct:
        span = (rules.max_length - rules.positive_length) * s
        progress = min(1.0, max(0.0, tokens - rules.positive_length * s) / span)
        return _cosine(rules.correct_short, rules.correct_long, progress)
    progress = min(1.0, tokens / (rules.negative_length * s))
    return _cosine(rules.wrong_short, rules.wrong_long, progress)


def repetition_penalty(words: Sequence[str], rules: LengthAwareRules) -> float:
    """R_rep, in (-n, 0]: minus the larger of (distinct n-grams seen more than `ngram_max_count`
    times) / (n-gram windows) and (the highest such count) / (len(words) / n), 0 when no
    n-gram repeats that often. Section 4.1 is read here as 'a repetition penalty from 5-gram
    frequencies' without its formula; this form is this project's reading, the one public
    reimplementations of the report's reward use."""
    n = rules.ngram
    counts = collections.Counter(zip(*(words[i:] for i in range(n))))
    repeated = [c for c in counts.values() if c > rules.ngram_max_count]
    if not repeated:
        return 0.0
    windows = len(words) - n + 1
    return -max(len(repeated) / windows, max(repeated) / (len(words) / n))


def length_aware_reward(ex: synthetic.Exercise, response: str, *, tokens: int, finished: bool,
                        fmt: ReasoningFormat, rules: LengthAwareRules) -> Reward:
    """Phi-4-reasoning-plus's reward of one response of `tokens` tokens:
    w_acc * R_acc_scaled + w_rep * R_rep. R_acc_scaled is `unfinished` for a response cut off
    before its end of turn, else `bad_format` for a malformed think block, else
    `length_aware_accuracy`. The sources read give the two overrides no order; a cut-off
    response is judged as cut off (its block may be unclosed only because it was cut), which
    keeps long attempts at the -0.5 the length schedule gives long wrong answers. R_rep reads the
    whole response's whitespace-separated words."""
    answer, well_formed = fmt.split(response)
    correct = synthetic.verify(ex, answer)
    if not finished:
        accuracy = rules.unfinished
    elif not well_formed:
        accuracy = rules.bad_format
    else:
        accuracy = length_aware_accuracy(correct, tokens, rules)
    total = (rules.accuracy_weight * accuracy
             + rules.repetition_weight * repetition_penalty(response.split(), rules))
    if not math.isfinite(total):
        raise ValueError(f"the reward of a response is {total}; grpo reward values must be "
                         f"finite numbers.")
    return Reward(total, correct, well_formed, finished)

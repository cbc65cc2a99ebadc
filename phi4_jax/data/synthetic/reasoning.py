"""The think-then-answer format of Phi-4-reasoning: its prompt, its traces and its reward rules.

A reasoning conversation is ChatML with a system message asking the model to reason inside
`<think> ... </think>` and to give the final answer after the block. Both the system text and
the tags are config values (`reasoning.*`): the report does not print its exact wording, so
the default system text here is this project's own. Built-in traces put an exercise's worked
steps inside the block and its `Final answer:` line after it.

The rule-based reward of a response (GRPO): `correct` (+1) or `wrong` (-0.5) by the verifier,
reading the final answer from the text after the think block only; plus `format_penalty` when
the block is missing, unclosed or repeated, and `overlong_penalty` when the response hit the
token limit without ending. Any reward that is not finite is an error, not a training signal.
"""

from __future__ import annotations

import dataclasses
import math

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

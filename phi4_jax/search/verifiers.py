"""Verifiers: whether a response solves its problem, read from the response text alone.

A `Problem` pairs the question a model is asked with a check of a response. The question is
never consulted when checking, so an answer that appears only in the prompt does not count.
Tasks (`pts.task`):
- `synthetic`: the built-in exercises (of `pts.families`); the last 'Final answer:' line
  compared as an exact number (`phi4_jax.data.synthetic.verify`).
- `coding`: the built-in coding exercises; the response's code (its last ```python block,
  or the whole response when it has none) must pass the exercise's asserts in the sandbox
  (`search.sandbox`), where a timeout, crash or infinite loop is a failure.
A model trained in the think-then-answer format (`sft.template='reasoning'`) is asked in it,
and only the text after its think block is checked.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from phi4_jax.data import synthetic
from phi4_jax.data.synthetic.reasoning import ReasoningFormat
from phi4_jax.data.synthetic.coding import coding_exercise
from phi4_jax.search.sandbox import Limits, run_tests

TASKS = ("synthetic", "coding")

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A question, its reference answer (for reading) and a check of a response's text."""

    question: str
    answer: str
    check: Callable[[str], bool]
    slow: bool = False  # checks run a process: check many responses in parallel


def problem(task: str, seed: int, index: int, limits: Limits = Limits(), *,
            families: Sequence[str] = synthetic.FAMILIES,
            fmt: ReasoningFormat | None = None) -> Problem:
    """Problem `index` of the built-in stream `seed` of `task` (`synthetic`: drawn from
    `families`). With a reasoning format only the text after the think block is checked."""
    if task == "synthetic":
        ex = synthetic.exercise(seed, index, families)
        check = functools.partial(synthetic.verify, ex)
        question, answer = ex.question, ex.answer
    elif task == "coding":
        ex = coding_exercise(seed, index)
        check = functools.partial(passes_tests, tests=ex.tests, limits=limits)
        question, answer = ex.question, ex.solution
    else:
        raise ValueError(f"task {task!r}: choose one of {TASKS}.")
    if fmt is not None:
        check = functools.partial(_after_think, check=check, fmt=fmt)
    return Problem(question, answer, check, slow=task == "coding")


def _after_think(response: str, *, check: Callable[[str], bool], fmt: ReasoningFormat) -> bool:
    return check(fmt.split(response)[0])


def extract_code(response: str) -> str:
    """The last fenced code block of a response, or the whole response if it has none."""
    blocks = _CODE_BLOCK.findall(response)
    return blocks[-1] if blocks else response


def passes_tests(response: str, *, tests: str, limits: Limits) -> bool:
    """Whether the response's code passes `tests` in the sandbox."""
    return run_tests(extract_code(response), tests, limits).passed


def check_all(problem_: Problem, responses: Sequence[str], workers: int) -> list[bool]:
    """The check of every response, on `workers` threads when each check is a process."""
    if not problem_.slow or workers <= 1 or len(responses) <= 1:
        return [problem_.check(r) for r in responses]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(problem_.check, responses))

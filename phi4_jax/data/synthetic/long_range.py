"""Long-range recall: a fact (the code of a locker, say) planted among filler exercises, and at
the end a question whose answer is that fact and nothing else in the document.

The answer can only be predicted by attending back over the whole span, so a model that learned
its context at 4K and is extended to 16K has something to learn at every distance (Phi-4's
mid-training, report section 3.3). The same construction, with the depth and length chosen,
is the retrieval probe of `phi4_jax.evals.retrieval`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from phi4_jax.data.synthetic.text import Exercise, worked_solution

_SUBJECTS = ("locker", "vault", "room", "account", "badge", "gate", "safe", "cabinet")
# Filler exercises per training document: log-uniform over [2, 2**MAX_LOG2_FILLERS], about 200
# to 26,000 tokens, so distances from tens to thousands of tokens all occur.
MAX_LOG2_FILLERS = 8


def planted_fact(rng: random.Random) -> tuple[str, str]:
    """(what, code): e.g. ('locker 37', '5912'), codes of four digits."""
    return f"{_SUBJECTS[rng.randrange(len(_SUBJECTS))]} {rng.randrange(10, 100)}", \
        str(rng.randrange(1000, 10000))


def fact_sentence(what: str, code: str) -> str:
    return f"Remember this: the code of {what} is {code}."


def recall_question(what: str) -> str:
    return f"What is the code of {what}?"


def recall_exercise(what: str, code: str, before: Sequence[str], after: Sequence[str]
                    ) -> Exercise:
    """The fact after the `before` texts, then the `after` texts, then the question."""
    question = "\n\n".join([*before, fact_sentence(what, code), *after, recall_question(what)])
    solution = worked_solution([f"The code of {what} was stated earlier in the text."], code)
    return Exercise(family="long_range", question=question, solution=solution, answer=code)


def long_range(rng: random.Random, filler) -> Exercise:
    """A recall document drawn with `rng`; `filler(rng)` writes one filler text."""
    count = int(2 ** rng.uniform(1, MAX_LOG2_FILLERS))
    depth = rng.randrange(count + 1)
    fillers = [filler(rng) for _ in range(count)]
    what, code = planted_fact(rng)
    return recall_exercise(what, code, fillers[:depth], fillers[depth:])

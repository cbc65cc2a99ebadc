"""The retrieval probe: a fact planted at a chosen depth of a filler context of a chosen length,
and the greedy answer to the question about it, scored by exact match. One table of depth x
context length shows how far back a model can read (before and after mid-training).

The documents are the long-range recall family's (`data.synthetic.long_range`), written as
pretraining text, so a base model is probed in the format it was trained on; the answer is
decoded greedily with the KV-cache sampler.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from phi4_jax.data import synthetic
from phi4_jax.data.synthetic import long_range
from phi4_jax.data.tokenizer import Phi4Tokenizer
from phi4_jax.evals.verifiable import greedy_responses
from phi4_jax.model.config import ModelConfig

ANSWER_TOKENS = 4  # a four-digit code takes at most three tokens after the space


def probe_prompt(seed: int, index: int, *, context_tokens: int, depth: float,
                 tokenizer: Phi4Tokenizer) -> tuple[list[int], str]:
    """(prompt ids, code): fillers up to about `context_tokens` tokens, the fact after the
    `depth` share of them, then the question and the solution's lead-in to its answer."""
    rng = random.Random(f"phi4_jax.retrieval/{seed}/{index}")
    what, code = long_range.planted_fact(rng)
    fillers, used = [], 0
    while used < context_tokens:
        fillers.append(synthetic.filler_text(rng))
        used += len(tokenizer.encode(fillers[-1])) + 1
    split = round(depth * len(fillers))
    ex = long_range.recall_exercise(what, code, fillers[:split], fillers[split:])
    text = (f"Problem. {ex.question}\n\nSolution.\n"
            f"The code of {what} was stated earlier in the text.\nFinal answer:")
    return tokenizer.encode(text), code


def retrieval_table(params: Any, graphdef: nnx.GraphDef, cfg: ModelConfig,
                    tokenizer: Phi4Tokenizer, *, lengths: Sequence[int],
                    depths: Sequence[float], trials: int, seed: int = 0,
                    batch_size: int = 8) -> dict[tuple[int, float], float]:
    """Exact-match accuracy of the greedy answer per (context length, depth)."""
    table = {}
    for length in lengths:
        for depth in depths:
            cases = [probe_prompt(seed, i, context_tokens=length, depth=depth,
                                  tokenizer=tokenizer) for i in range(trials)]
            answers = greedy_responses(params, graphdef, cfg, [p for p, _ in cases], tokenizer,
                                       max_new_tokens=ANSWER_TOKENS, batch_size=batch_size)
            table[length, depth] = float(np.mean(
                [_leading_number(a) == code for a, (_, code) in zip(answers, cases)]))
    return table


def _leading_number(text: str) -> str | None:
    match = re.match(r"\s*(\d+)", text)
    return match.group(1) if match else None


def describe(table: dict[tuple[int, float], float]) -> str:
    """The table as Markdown: a row per depth, a column per context length."""
    lengths = sorted({length for length, _ in table})
    depths = sorted({depth for _, depth in table})
    lines = ["| depth | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    lines += [f"| {depth:.2f} | " + " | ".join(f"{table[n, depth]:.2f}" for n in lengths) + " |"
              for depth in depths]
    return "\n".join(lines)

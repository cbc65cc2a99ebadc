"""Rollouts from a language model: the `RolloutSampler` behind Pivotal Token Search.

For one question, the question's cache is computed once (`decode.prefill` of all its tokens
but the last) and broadcast to every row of every batch (`decode.generate_from_shared`).
A row is one rollout of one prefix: its suffix is the question's last token followed by the
prefix (response token ids, never re-tokenized text), and it may emit the response budget
left after the prefix (`max_new_tokens - len(prefix)`), so every rollout is a complete
response of at most `max_new_tokens` tokens, as the searched responses are.

All requests of one call (one recursion level of the search, one adaptive round) are
sampled together, in batches of up to `batch_rows` rows. Shapes come in buckets (question
length to 64 tokens, suffix length to 32, rows to a power of two) so a search compiles a
handful of programs. Each rollout's key derives from the seed, the question id, the prefix
(its length and a hash of its tokens) and the rollout's index, so its tokens do not depend
on the batch it lands in or its size. Under a mesh the rows shard over the batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from phi4_jax.model.config import ModelConfig
from phi4_jax.sampling import decode
from phi4_jax.search.estimates import Prefix, Request, Rollout

PROMPT_BUCKET = 64
SUFFIX_BUCKET = 32

Outcomes = Callable[[Sequence[tuple[int, ...]]], Sequence[bool]]


@dataclasses.dataclass(frozen=True)
class RolloutModel:
    """What every question's rollouts share: the model, how to sample, and the row layout.

    `row_sharding` (None on one device) places rows over the mesh's batch axes;
    `batch_rows` must be a multiple of `row_multiple`, the devices it spans.
    """

    params: Any
    graphdef: nnx.GraphDef
    cfg: ModelConfig
    sampling: decode.SamplingParams
    seed: int
    batch_rows: int
    row_sharding: NamedSharding | None = None
    row_multiple: int = 1

    def rows_for(self, count: int) -> int:
        """Rows of a batch holding `count` rollouts: a power of two (a multiple of the
        devices), at most `batch_rows`."""
        rows = max(1 << max(count - 1, 0).bit_length(), self.row_multiple)
        return min(-(-rows // self.row_multiple) * self.row_multiple, self.batch_rows)


@functools.partial(jax.jit, static_argnums=0)
def _keys(seed: int, question_id: jax.Array, data_R3: jax.Array) -> jax.Array:
    base = jax.random.fold_in(jax.random.key(seed), question_id)

    def one(row):
        key = base
        for j in range(3):
            key = jax.random.fold_in(key, row[j])
        return key

    return jax.vmap(one)(data_R3)


def rollout_keys(seed: int, question_id: int, prefixes: Sequence[Prefix],
                 indices: Sequence[int]) -> jax.Array:
    """A key per rollout from the seed, the question id, the prefix's length and token hash,
    and the rollout's index."""
    data = np.asarray([[len(p), zlib.crc32(np.asarray(p, np.int64).tobytes()), i]
                       for p, i in zip(prefixes, indices)], np.uint32).reshape(-1, 3)
    return _keys(seed, np.uint32(question_id), data)


class QuestionRollouts:
    """Samples and checks rollouts of prefixes of one question's responses.

    `outcomes` maps whole responses (prefix + continuation, token ids) to verdicts; it sees
    the response only, never the question. Counts `rows` and `tokens` sampled.
    """

    def __init__(self, model: RolloutModel, question: Sequence[int], question_id: int,
                 outcomes: Outcomes):
        if len(question) < 2:
            raise ValueError(f"question {question_id} has {len(question)} token(s); the shared "
                             f"prefill needs at least 2.")
        self.model, self.question, self.question_id = model, tuple(question), question_id
        self.outcomes = outcomes
        self.prefill, self.generate = decode.compiled_shared(model.graphdef, model.cfg,
                                                             model.sampling)
        length = -(-(len(question) - 1) // PROMPT_BUCKET) * PROMPT_BUCKET
        pad = model.sampling.pad_id
        self.shared = self.prefill(model.params, decode.left_pad([question[:-1]], length, pad))
        self.rows = self.tokens = 0

    def __call__(self, requests: Sequence[Request]) -> list[list[Rollout]]:
        rows = [(prefix, first + i) for prefix, first, count in requests for i in range(count)]
        done: list[Rollout] = []
        for start in range(0, len(rows), self.model.batch_rows):
            done.extend(self._batch(rows[start:start + self.model.batch_rows]))
        grouped, at = [], 0
        for _, _, count in requests:
            grouped.append(done[at:at + count])
            at += count
        return grouped

    def _batch(self, rows: list[tuple[Prefix, int]]) -> list[Rollout]:
        m, n = self.model, self.model.sampling.max_new_tokens
        size = m.rows_for(len(rows))
        padded = rows + [rows[0]] * (size - len(rows))
        longest = 1 + max(len(prefix) for prefix, _ in rows)
        length = min(-(-longest // SUFFIX_BUCKET) * SUFFIX_BUCKET,
                     -(-(1 + n) // SUFFIX_BUCKET) * SUFFIX_BUCKET)
        suffix = decode.left_pad([(self.question[-1], *prefix) for prefix, _ in padded],
                                 max(length, longest), m.sampling.pad_id)
        suffix["positions"] = np.where(suffix["segment_ids"] == 1,
                                       suffix["positions"] + len(self.question) - 1, 0)
        budgets = np.asarray([max(n - len(prefix), 0) if r < len(rows) else 0
                              for r, (prefix, _) in enumerate(padded)], np.int32)
        keys = rollout_keys(m.seed, self.question_id, [p for p, _ in padded],
                            [i for _, i in padded])
        inputs = (suffix, keys, budgets)
        if m.row_sharding is not None:
            inputs = jax.device_put(inputs, m.row_sharding)
        out = jax.device_get(self.generate(m.params, self.shared, *inputs))
        continuations = [tuple(int(t) for t in out.tokens[r][out.mask[r] == 1])
                         for r in range(len(rows))]
        verdicts = self.outcomes([prefix + c for (prefix, _), c in zip(rows, continuations)])
        self.rows += len(rows)
        self.tokens += sum(len(c) for c in continuations)
        return [Rollout(c, tuple(float(x) for x in out.log_probs[r][:len(c)]), bool(v))
                for r, (c, v) in enumerate(zip(continuations, verdicts))]

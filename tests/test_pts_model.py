"""The model-backed rollout sampler on a small random model: every rollout equals the plain
sampler's continuation of question + prefix under the same key (the shared prefill changes
nothing), a search is identical in any batch size, sharded over devices or not, and the
verifier sees whole responses within the token budget, never the question."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from phi4_jax.config_base import base_config
from phi4_jax.model.config import model_config_for
from phi4_jax.model.transformer import init_model
from phi4_jax.parallel.sharding import make_mesh
from phi4_jax.sampling import decode
from phi4_jax.search.job import search_with
from phi4_jax.search.model_scorer import QuestionRollouts, RolloutModel, rollout_keys

CFG = model_config_for("tiny", vocab_size=97, num_layers=2)
QUESTION = (5, 6, 7, 8, 9, 10, 11)
SAMPLING = decode.SamplingParams(max_new_tokens=6, temperature=1.0, stop_ids=(1,), pad_id=0)


def _pts():
    pts = base_config().pts
    pts.update(rollouts=4, rollouts_per_round=4, min_success=0.0, max_success=1.0,
               responses_per_question=2, p_gap=0.2)
    return pts


def test_model_rollouts_match_the_plain_sampler_in_any_batch_layout():
    graphdef, params = nnx.split(init_model(CFG, 0))
    params = nnx.to_pure_dict(params)
    seen = []

    def parity(responses):
        seen.extend(responses)
        return [sum(r) % 2 == 0 for r in responses]

    def search(batch_rows, mesh=None):
        sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"))) if mesh else None
        weights = jax.device_put(params, NamedSharding(mesh, PartitionSpec())) if mesh else params
        model = RolloutModel(weights, graphdef, CFG, SAMPLING, seed=3, batch_rows=batch_rows,
                             row_sharding=sharding, row_multiple=8 if mesh else 1)
        sampler = QuestionRollouts(model, QUESTION, 11, parity)
        return search_with(sampler, _pts()), sampler

    small, sampler = search(2)  # batches of 2 rows
    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices()[:8])
    with jax.set_mesh(mesh):
        large, _ = search(16, mesh)  # 8 or 16 rows, one per device or two
    assert list(small.estimates) == list(large.estimates) and len(small.estimates) > 3
    assert [(p.index, p.token) for p in small.pivots] == [(p.index, p.token) for p in large.pivots]
    for prefix, estimate in small.estimates.items():
        other = large.estimates[prefix]
        assert [(r.tokens, r.success) for r in estimate.rollouts] == \
            [(r.tokens, r.success) for r in other.rollouts]
        for mine, theirs in zip(estimate.rollouts, other.rollouts):
            np.testing.assert_allclose(mine.log_probs, theirs.log_probs, atol=1e-5)
    assert sampler.rows == small.rollouts
    assert all(len(r) <= SAMPLING.max_new_tokens for r in seen)
    assert all(r[:len(QUESTION)] != QUESTION for r in seen)

    generate = decode.compiled_generate(graphdef, CFG, SAMPLING)
    for prefix, estimate in small.estimates.items():
        if not estimate.rollouts:
            continue  # a whole response, checked without sampling
        n = len(estimate.rollouts)
        out = generate(params, decode.left_pad([QUESTION + prefix] * n, 16),
                       rollout_keys(3, 11, [prefix] * n, range(n)))
        budget = SAMPLING.max_new_tokens - len(prefix)
        for row, rollout in enumerate(estimate.rollouts):
            emitted = np.asarray(out.tokens[row])[np.asarray(out.mask[row]) == 1][:budget]
            assert rollout.tokens == tuple(int(t) for t in emitted)
            np.testing.assert_allclose(rollout.log_probs, np.asarray(out.log_probs[row])[
                :len(emitted)], atol=1e-5)
            assert rollout.success == (sum(prefix + rollout.tokens) % 2 == 0)

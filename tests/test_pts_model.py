"""The model-backed rollout sampler on a small random model: every rollout equals the plain
sampler's continuation of question + prefix under the same key (the shared prefill changes
nothing), a search is identical in any batch size, sharded over devices or not, and the
verifier sees whole responses within the token budget, never the question. And the
inverse-CDF draw the search samples with draws from the filtered distribution."""

import jax
import jax.numpy as jnp
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
SAMPLING = decode.SamplingParams(max_new_tokens=6, temperature=1.0, stop_ids=(1,), pad_id=0,
                                 draw="inverse_cdf")


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
    mesh = make_mesh({"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1}, jax.devices()[:8])
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


def test_the_inverse_cdf_draw_samples_the_filtered_distribution():
    logits = np.log(np.asarray([0.05, 0.4, 0.0001, 0.3, 0.2, 0.0499], np.float32))
    rows = 40_000
    keys = decode.row_keys(0, range(rows))
    sampling = decode.SamplingParams(max_new_tokens=1, top_k=4, draw="inverse_cdf")
    drawn = np.asarray(decode.next_tokens(jnp.broadcast_to(logits, (rows, 6)), keys, sampling))
    want = np.asarray([0.05, 0.4, 0.0, 0.3, 0.2, 0.0]) / 0.95  # top 4 of 6, renormalized
    counts = np.bincount(drawn, minlength=6)
    assert counts[2] == counts[5] == 0
    sigma = np.sqrt(rows * want * (1 - want))
    assert np.all(np.abs(counts - rows * want) <= 4 * sigma + 1e-9), counts

"""The KV-cache sampler: greedy equals argmax of the full forward, sampling is deterministic
and independent of the batch a row is in, stops are honoured, filters behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi4_jax.model.config import model_config_for
from phi4_jax.model.transformer import init_model
from phi4_jax.sampling import decode

CFG = model_config_for("tiny", vocab_size=97, num_layers=2)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6]]


@pytest.fixture(scope="module")
def model():
    model = init_model(CFG, 0)
    graphdef, params = nnx.split(model)
    return model, graphdef, nnx.to_pure_dict(params)


def _generate(model, prompts, sampling, seed=0, rows=None, length=None):
    _, graphdef, params = model
    batch = decode.left_pad(prompts, length)
    keys = decode.row_keys(seed, rows if rows is not None else range(len(prompts)))
    return decode.compiled_generate(graphdef, CFG, sampling)(params, batch, keys)


def test_greedy_equals_argmax_of_the_full_forward(model):
    out = _generate(model, PROMPTS, decode.SamplingParams(max_new_tokens=5, temperature=0.0))
    for row, prompt in enumerate(PROMPTS):
        # One causal forward over prompt + generated tokens scores every step of the sampler.
        sequence = list(prompt) + out.tokens[row].tolist()
        logits = model[0](jnp.asarray([sequence]), jnp.arange(len(sequence))[None],
                          jnp.ones((1, len(sequence)), jnp.int32))[0]
        chosen = logits[len(prompt) - 1:-1]  # the logits each new token was chosen from
        assert jnp.argmax(chosen, axis=-1).tolist() == out.tokens[row].tolist()
        log_probs = jax.nn.log_softmax(chosen[-1])  # the step that chose the last token
        assert float(out.log_probs[row, -1]) == pytest.approx(float(log_probs[sequence[-1]]),
                                                              abs=1e-5)


def test_sampling_is_deterministic_and_independent_of_the_batch(model):
    sampling = decode.SamplingParams(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9)
    together = _generate(model, PROMPTS, sampling, seed=7)
    again = _generate(model, PROMPTS, sampling, seed=7)
    alone = _generate(model, PROMPTS[1:2], sampling, seed=7, rows=[1], length=9)
    np.testing.assert_array_equal(together.tokens, again.tokens)
    np.testing.assert_array_equal(together.tokens[1], alone.tokens[0])
    assert not np.array_equal(together.tokens, _generate(model, PROMPTS, sampling, seed=8).tokens)


def test_rows_stop_at_a_stop_token(model):
    greedy = _generate(model, PROMPTS, decode.SamplingParams(max_new_tokens=6, temperature=0.0))
    stop = int(greedy.tokens[0, 2])
    out = _generate(model, PROMPTS, decode.SamplingParams(
        max_new_tokens=6, temperature=0.0, stop_ids=(stop,), pad_id=96))
    first = int(np.argmax(np.asarray(greedy.tokens[0]) == stop))
    assert out.mask[0].tolist() == [1] * (first + 1) + [0] * (5 - first)
    assert (np.asarray(out.tokens[0, first + 1:]) == 96).all()
    assert int(out.lengths[0]) == first + 1


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = _generate(model, PROMPTS, decode.SamplingParams(max_new_tokens=4, temperature=0.0))
    for sampling in (decode.SamplingParams(max_new_tokens=4, top_k=1),
                     decode.SamplingParams(max_new_tokens=4, top_p=1e-6)):
        np.testing.assert_array_equal(_generate(model, PROMPTS, sampling, seed=3).tokens,
                                      greedy.tokens)


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        decode.SamplingParams(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="at most 2"):
        decode.left_pad([[1, 2, 3]], length=2)


# probabilities 0.05, 0.4, 0.0001, 0.3, 0.2, 0.0499; the hand-worked kept sets:
# top-k 4 keeps {1, 3, 4, 0} (mass .95); top-p .7 keeps {1, 3} (the mass before 4 is .7);
# top-p .75 keeps {1, 3, 4}; after top-k 4 the shares are /.95, so top-p .75 still keeps
# {1, 3, 4} (.737 before 4) and top-p .7 keeps {1, 3} (.421 before 3, .737 before 4);
# top-k 2 keeps {1, 3} at .571 and .429, so top-p .5 then keeps {1} alone (not so if the
# top-p mass were not renormalized after top-k: .4 before 3).
FILTER_CASES = [
    (2, 0.5, {1: 0.4}),
    (4, 1.0, {0: 0.05, 1: 0.4, 3: 0.3, 4: 0.2}),
    (0, 0.7, {1: 0.4, 3: 0.3}),
    (0, 0.75, {1: 0.4, 3: 0.3, 4: 0.2}),
    (4, 0.75, {1: 0.4, 3: 0.3, 4: 0.2}),
    (4, 0.7, {1: 0.4, 3: 0.3}),
    (0, 1.0, {0: 0.05, 1: 0.4, 2: 0.0001, 3: 0.3, 4: 0.2, 5: 0.0499}),
]


@pytest.mark.parametrize("draw", decode.DRAWS)
@pytest.mark.parametrize("top_k,top_p,kept", FILTER_CASES)
def test_draws_follow_the_hand_worked_filtered_distribution(draw, top_k, top_p, kept):
    probs = np.asarray([0.05, 0.4, 0.0001, 0.3, 0.2, 0.0499])
    rows = 20_000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)) * 2, (rows, 6))
    sampling = decode.SamplingParams(max_new_tokens=1, temperature=2.0, top_k=top_k,
                                     top_p=top_p, draw=draw)
    drawn = np.asarray(decode.next_tokens(logits, decode.row_keys(3, range(rows)), sampling))
    want = np.zeros(6)
    want[list(kept)] = list(kept.values())
    want /= want.sum()
    counts = np.bincount(drawn, minlength=6)
    assert all(counts[i] == 0 for i in range(6) if want[i] == 0), counts
    sigma = np.sqrt(rows * want * (1 - want))
    assert np.all(np.abs(counts - rows * want) <= 4 * sigma + 1), (counts, rows * want)

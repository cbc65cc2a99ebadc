"""The long-context evaluations: loss by position bucket against a hand-worked NumPy sum, and
the retrieval probe's prompts (fact at the asked depth, context of the asked length)."""

import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax import config_base
from phi4_jax.data.tokenizer import load_tokenizer
from phi4_jax.evals import position_loss, retrieval
from phi4_jax.stages import pretrain


def test_bucket_edges_and_sums_by_hand():
    np.testing.assert_array_equal(position_loss.bucket_edges(16, 4), [0, 4, 8, 12, 16])
    rng = np.random.default_rng(0)
    log_probs = -rng.uniform(0, 5, (2, 16))
    positions = np.array([list(range(10)) + list(range(6)), list(range(16))])
    weights = np.ones((2, 16))
    weights[1, 14:] = 0  # padding
    nll, count = position_loss.bucket_sums(jnp.asarray(log_probs), jnp.asarray(weights),
                                           jnp.asarray(positions), position_loss.bucket_edges(16, 4))
    want_nll, want_count = np.zeros(4), np.zeros(4)
    for b in range(2):
        for t in range(16):
            want_nll[positions[b, t] // 4] -= log_probs[b, t] * weights[b, t]
            want_count[positions[b, t] // 4] += weights[b, t]
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5)
    np.testing.assert_array_equal(count, want_count)


def test_position_buckets_is_validated():
    c = config_base.base_config()
    c.eval.position_buckets = -1
    with pytest.raises(config_base.ConfigError, match="eval.position_buckets=-1"):
        pretrain.check(c)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_probe_prompt_plants_the_fact_at_the_depth(depth):
    tokenizer = load_tokenizer("phi4")
    ids, code = retrieval.probe_prompt(0, 3, context_tokens=1000, depth=depth,
                                       tokenizer=tokenizer)
    text = tokenizer.decode(ids)
    assert 1000 <= len(ids) <= 1400 and text.endswith("Final answer:")
    fact = text.index(f" is {code}.")
    question = text.index("What is the code of")
    assert abs(len(tokenizer.encode(text[:fact])) / len(tokenizer.encode(text[:question]))
               - depth) < 0.2
    assert retrieval._leading_number(f" {code}\n\nProblem") == code


def test_table_layout():
    table = {(128, 0.0): 1.0, (128, 1.0): 0.5, (512, 0.0): 0.25, (512, 1.0): 0.0}
    assert retrieval.describe(table).splitlines()[2] == "| 0.00 | 1.00 | 0.25 |"

"""The start-up attention check: correct kernels pass, wrong ones are refused by name."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax.errors import Phi4Error
from phi4_jax.model import attention as attention_lib
from phi4_jax.model.attention import check
from phi4_jax.model.attention.reference import xla_attention
from phi4_jax.model.config import model_config_for

TINY = model_config_for("tiny")  # 4 query / 2 kv heads of 16


@pytest.mark.parametrize("max_segments, most", [(32, 32), (3, 3), (2, 2), (1, 1)])
def test_check_batch_fills_the_segment_bound(max_segments, most):
    segments = check.check_segments(max_segments)
    assert segments.shape == (2, check.CHECK_SEQ_LEN)
    assert segments.max() == most and segments[1].max() == most
    for row in segments:  # the packer's layout: ids 1.. in order, padding last
        real = row[row > 0]
        assert real[0] == 1 and np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)
        assert np.all(row[len(real):] == 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blockwise_passes(dtype):
    cfg = TINY.replace(attention_impl="blockwise", attention_block_size=64, compute_dtype=dtype)
    result = check.check_attention(cfg)
    assert result.output_error < result.tolerance and result.isolation_change == 0.0
    assert "blockwise vs xla" in result.describe()


@pytest.mark.interpret
def test_splash_in_interpret_mode_passes():
    cfg = TINY.replace(attention_impl="splash", attention_block_size=128)
    fn = functools.partial(attention_lib.fused_attention, "splash", block_size=128,
                           interpret=True)
    result = check.check_attention(cfg, lambda q, k, v, seg: fn(q, k, v, seg))
    assert result.gradient_error < 1e-4


def _leaky(q, k, v, segments):
    """Causal attention that ignores document boundaries (MaxText issue #4476's failure)."""
    ones = jnp.where(segments > 0, 1, 0)
    return xla_attention(q, k, v, ones, ones)


def _wrong_groups(q, k, v, segments):
    """Query head n reading kv head n % K instead of n // G: a GQA striding mistake."""
    n = q.shape[2]
    k_all, v_all = (jnp.tile(x, (1, 1, n // x.shape[2], 1)) for x in (k, v))
    return xla_attention(q, k_all, v_all, segments, segments)


@jax.custom_vjp
def _plus_one_at_padding(x, segments):
    del segments
    return x


_plus_one_at_padding.defvjp(lambda x, segments: (x, segments),
                            lambda segments, g: (g + (segments == 0)[..., None, None], None))


def _gradient_garbage_at_padding(q, k, v, segments):
    """Right outputs and right gradients on real tokens, finite junk (1) on padding's."""
    q, k, v = (_plus_one_at_padding(x, segments) for x in (q, k, v))
    return xla_attention(q, k, v, segments, segments)


def _broken(q, k, v, segments):
    raise NotImplementedError("Packed layout requires a GPU with at least Hopper architecture.")


@pytest.mark.parametrize("fn, finding", [
    (_leaky, "other documents moved"),
    (_wrong_groups, "outputs"),
    (_gradient_garbage_at_padding, r"at padding [1-9]"),
    (_broken, r"failed to run: NotImplementedError: Packed layout requires"),
])
def test_wrong_kernels_are_refused_by_name(fn, finding):
    cfg = TINY.replace(attention_impl="cudnn", compute_dtype="bfloat16")
    with pytest.raises(check.AttentionCheckError) as error:
        check.check_attention(cfg, fn)
    message = str(error.value)
    assert isinstance(error.value, Phi4Error)
    assert message.startswith("model.attention_impl='cudnn' failed the start-up numerics check")
    assert re.search(finding, message)
    assert "pallas_triton, tokamax, blockwise, xla" in message


def test_one_document_per_row_needs_only_the_causal_mask():
    """With max_segments_per_row=1 each check row is one document then padding, so plain
    causal attention is right on every real token; the same kernel on packed rows is not."""
    cfg = TINY.replace(attention_impl="cudnn", max_segments_per_row=1)

    def ignores_padding(q, k, v, segments):
        ones = jnp.ones_like(segments)
        return xla_attention(q, k, v, ones, ones)

    result = check.check_attention(cfg, ignores_padding)
    assert result.output_error < 1e-5
    with pytest.raises(check.AttentionCheckError):
        check.check_attention(cfg.replace(max_segments_per_row=4), ignores_padding)

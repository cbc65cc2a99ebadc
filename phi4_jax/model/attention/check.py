"""Start-up numerics check of an attention kernel against the xla reference.

Fused kernels can be wrong silently: a packed-layout convention misread, grouped KV heads
striding into the wrong keys, documents leaking into each other. Before training, the
chosen kernel runs forward and backward on a small packed batch with the model's head
geometry and compute dtype, and must match `xla_attention` (outputs on every real token,
q/k/v gradients on every token: at padding they are zero, since no real token sees it, and a
kernel that leaves garbage there would pass it through the projections into the weights'
gradients), keep its outputs finite at padding, and leave every other document's outputs
as they were when one document (and the padding) is replaced. A mismatch, or a kernel that
does not run here, refuses the run naming `model.attention_impl` and the alternatives.

The batch: row 0 holds three documents (one crossing the 128-token tile boundary) and
padding; row 1 holds as many documents as `max_segments_per_row` allows, so the kernel's
segment slots are filled to the bound. With a bound of 1, each row holds one document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from phi4_jax.errors import Phi4Error
from phi4_jax.model import attention as attention_lib
from phi4_jax.model.attention.reference import xla_attention
from phi4_jax.model.config import ModelConfig

CHECK_SEQ_LEN = 256
# Max |kernel - xla| over max(1, max |xla|), per compute dtype: bf16 rounds outputs and the
# kernels' probabilities (~4e-3 each); float32 kernels may run TF32 matmuls on GPUs. A
# leaked document or misread offset moves outputs by ~0.1 or more.
_TOLERANCE = {"bfloat16": 4e-2, "float16": 1e-2, "float32": 5e-3}

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class AttentionCheckError(Phi4Error, RuntimeError):
    """The chosen attention kernel disagrees with the reference (or does not run here)."""


@dataclasses.dataclass(frozen=True)
class AttentionCheck:
    """Worst relative deviations from the xla reference found by `check_attention`."""

    impl: str
    output_error: float
    gradient_error: float
    padding_error: float
    isolation_change: float
    tolerance: float

    def describe(self) -> str:
        return (f"attention {self.impl} vs xla on a packed batch: outputs {self.output_error:.1e}, "
                f"gradients {self.gradient_error:.1e}, at padding {self.padding_error:.1e}, "
                f"other documents moved {self.isolation_change:.1e} when one changed "
                f"(tolerance {self.tolerance:.0e})")


def check_segments(max_segments: int, seq_len: int = CHECK_SEQ_LEN) -> np.ndarray:
    """[2, seq_len] segment ids of the check batch (see the module docstring)."""
    if max_segments == 1:
        return np.array([[1] * (seq_len - 56) + [0] * 56, [1] * seq_len], np.int32)
    first = [1] * 70 + [2] * 100 + [3] * 50
    row_0 = [min(s, max_segments) for s in first] + [0] * (seq_len - len(first))
    count = min(max_segments, seq_len // 4)
    lengths = np.full(count, seq_len // count)
    lengths[-1] += seq_len - lengths.sum()
    row_1 = np.repeat(np.arange(1, count + 1), lengths)
    return np.array([row_0, row_1], np.int32)


def _inputs(cfg: ModelConfig, seed: int):
    keys = jax.random.split(jax.random.key(seed), 4)
    b, t, n, k, h = 2, CHECK_SEQ_LEN, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = ((b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h))
    return [jax.random.normal(key, shape).astype(cfg.compute_dtype)
            for key, shape in zip(keys, shapes)]


def _values_and_grads(fn: AttentionFn, segments: jax.Array, real: jax.Array):
    """jit(out, d<out, cotangent on real tokens>/d(q, k, v)), all as float32."""
    def run(q, k, v, cotangent):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, segments), q, k, v)
        grads = pullback(jnp.where(real[..., None, None], cotangent, 0).astype(out.dtype))
        return [x.astype(jnp.float32) for x in (out, *grads)]
    return jax.jit(run)


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    """Max |got - want| over max(1, max |want|); inf where got is not finite (NaN would
    compare false with any tolerance)."""
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - want), initial=0.0) / max(1.0, float(np.max(np.abs(want)))))


def _padding_error(got: list[np.ndarray], want: list[np.ndarray], padding: np.ndarray) -> float:
    """Largest q/k/v gradient at padding (the reference's are zero) over the reference
    gradients' scale; inf when an output or a gradient there is not finite."""
    at_padding = [x[padding] for x in got]
    if not all(np.all(np.isfinite(x)) for x in at_padding):
        return float("inf")
    scale = max(1.0, *(float(np.max(np.abs(w))) for w in want[1:]))
    return max(float(np.max(np.abs(g), initial=0.0)) for g in at_padding[1:]) / scale


def default_attention_fn(cfg: ModelConfig) -> AttentionFn:
    """The model's own dispatch for `cfg.attention_impl` on packed self-attention."""
    def fn(q, k, v, segments):
        return attention_lib.attention(
            q, k, v, q_segment_ids=segments, kv_segment_ids=segments, impl=cfg.attention_impl,
            block_size=cfg.attention_block_size, max_segments_per_row=cfg.max_segments_per_row)
    return fn


def check_attention(cfg: ModelConfig, attention_fn: AttentionFn | None = None) -> AttentionCheck:
    """Compares `attention_fn` (default: the model's `cfg.attention_impl`) with xla; raises
    AttentionCheckError on a mismatch or failure, else returns the deviations found."""
    fn = attention_fn or default_attention_fn(cfg)
    segments = jnp.asarray(check_segments(cfg.max_segments_per_row))
    real = segments > 0
    q, k, v, cotangent = _inputs(cfg, seed=0)
    tolerance = _TOLERANCE[cfg.compute_dtype]
    reference = _values_and_grads(lambda q, k, v, s: xla_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), s, s), segments, real)
    try:
        kernel = _values_and_grads(fn, segments, real)
        got = [np.asarray(x) for x in kernel(q, k, v, cotangent)]
        moved = _moved_document(cfg, kernel, segments, (q, k, v, cotangent))
    except Exception as error:  # pylint: disable=broad-except
        raise AttentionCheckError(_refusal(cfg, f"it failed to run: {type(error).__name__}: "
                                                f"{str(error).splitlines()[0] if str(error) else ''}")
                                  ) from error
    want = [np.asarray(x) for x in reference(q, k, v, cotangent)]
    mask = np.asarray(real)
    result = AttentionCheck(
        impl=cfg.attention_impl,
        output_error=_relative(got[0][mask], want[0][mask]),
        gradient_error=max(_relative(g[mask], w[mask]) for g, w in zip(got[1:], want[1:])),
        padding_error=_padding_error(got, want, ~mask),
        isolation_change=moved, tolerance=tolerance)
    if max(result.output_error, result.gradient_error, result.padding_error,
           result.isolation_change) > tolerance:
        raise AttentionCheckError(_refusal(cfg, result.describe()))
    return result


def _moved_document(cfg: ModelConfig, kernel, segments: jax.Array, inputs) -> float:
    """How far row 0's other documents move when its second document and padding change."""
    changed = (segments == 2) | (segments == 0)
    changed = changed.at[1].set(False)
    others = np.asarray((segments > 0) & ~changed)
    fresh = _inputs(cfg, seed=1)
    mixed = [jnp.where(changed[..., None, None], new, old) for old, new in zip(inputs, fresh)]
    before = np.asarray(kernel(*inputs)[0])
    after = np.asarray(kernel(*mixed)[0])
    return _relative(after[others], before[others])


def _refusal(cfg: ModelConfig, finding: str) -> str:
    backend = attention_lib.FUSED_IMPLS.get(cfg.attention_impl, jax.default_backend())
    others = [impl for impl, needs in attention_lib.FUSED_IMPLS.items()
              if needs == backend and impl != cfg.attention_impl] + ["blockwise", "xla"]
    return (f"model.attention_impl={cfg.attention_impl!r} failed the start-up numerics check "
            f"({cfg.num_heads}/{cfg.num_kv_heads} heads of {cfg.head_dim}, "
            f"{cfg.compute_dtype}, max_segments_per_row={cfg.max_segments_per_row}): "
            f"{finding.rstrip('.')}. "
            f"Use --config.model.attention_impl= one of {', '.join(others)}.")

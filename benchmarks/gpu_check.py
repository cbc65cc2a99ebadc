r"""The attention candidates on an NVIDIA GPU: numerics, packing isolation and speed.

  python benchmarks/gpu_check.py                 # on a GPU (part of benchmarks/gpu_check.sh)
  python benchmarks/gpu_check.py --dry_run       # CPU: small heads, Pallas in interpret mode

1. Numerics: every candidate goes through the start-up check (`model/attention/check.py`)
   with phi-4's heads (40 query / 10 KV of 128) in bf16, the segment slots filled to
   `max_segments_per_row`: max deviation from the xla reference (outputs, q/k/v gradients)
   and how far other documents move when one changes. FAIL means training would refuse it.
2. Speed: forward+backward of each candidate on one packed row of T=4096 (eight documents of
   random lengths), median of --repeats, against the baseline the issue sets: the public
   `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)` on the same row
   with no segments (GPU_NOTES: 1.66 ms on an H200); the target is <= 1.5x that.
Candidates: cudnn (packed layout, M=32), cudnn_single (M=1: rows of one document, public
API; timed on a one-document row), pallas_triton, tokamax (when installed); `--candidates`
picks some, in the order given. Every line is printed and appended to `--results` the
moment it is measured, so a run cut short (benchmarks/gpu_check.sh times each step out)
keeps what it finished.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from phi4_jax.model import attention as attention_lib
from phi4_jax.model.attention import check
from phi4_jax.model.config import model_config_for

_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Tokens in the timed row.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed forward+backward calls (median).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "CPU: small heads, T=256, Pallas interpreted.")
_CANDIDATES = flags.DEFINE_list("candidates", ["cudnn", "cudnn_single", "tokamax", "pallas_triton"],
                                "Candidates to check, in this order.")
_RESULTS = flags.DEFINE_string("results", "", "File to append each result line to.")

TARGET_RATIO = 1.5  # the bound on packed / no-segment cuDNN time


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An attention path to check: its impl name and the segment bound it runs with."""

    name: str
    impl: str
    max_segments: int


CANDIDATES = {c.name: c for c in (
    Candidate("cudnn", "cudnn", 32), Candidate("cudnn_single", "cudnn", 1),
    Candidate("pallas_triton", "pallas_triton", 32), Candidate("tokamax", "tokamax", 32))}


def model_cfg(candidate: Candidate):
    """phi-4's attention geometry in bf16 (tiny heads in float32 for the CPU dry run)."""
    if _DRY_RUN.value:
        return model_config_for("tiny", attention_impl=candidate.impl,
                                max_segments_per_row=candidate.max_segments)
    return model_config_for("phi4-14b-4l", attention_impl=candidate.impl,
                            compute_dtype="bfloat16", max_segments_per_row=candidate.max_segments)


def attention_fn(candidate: Candidate):
    """The model's dispatch for the candidate; Pallas interpreted in the dry run."""
    cfg = model_cfg(candidate)
    if not _DRY_RUN.value:
        return check.default_attention_fn(cfg)
    return functools.partial(attention_lib.fused_attention, candidate.impl, interpret=True,
                             max_segments_per_row=candidate.max_segments)


def packed_row(seq_len: int, documents: int, seed: int = 0) -> np.ndarray:
    """[1, seq_len] segment ids: `documents` documents of random lengths, no padding."""
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, seq_len), documents - 1,
                                                      replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [seq_len]]))
    return np.repeat(np.arange(1, documents + 1), lengths)[None].astype(np.int32)


def time_fwd_bwd(fn, cfg, segments: np.ndarray) -> float:
    """Median seconds of one jitted forward+backward of `fn` on one row."""
    t = segments.shape[1]
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cotangent = (jax.random.normal(key, shape, cfg.compute_dtype) for key, shape in zip(
        keys, [(1, t, cfg.num_heads, cfg.head_dim), (1, t, cfg.num_kv_heads, cfg.head_dim),
               (1, t, cfg.num_kv_heads, cfg.head_dim), (1, t, cfg.num_heads, cfg.head_dim)]))
    seg = jnp.asarray(segments)

    @jax.jit
    def step(q, k, v):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return pullback(cotangent.astype(out.dtype))

    jax.block_until_ready(step(q, k, v))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def baseline_fn(q, k, v, segments):
    """The public cuDNN call with no segments: the speed the packed paths are held to."""
    del segments
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def numerics(candidate: Candidate) -> str:
    try:
        return "pass: " + check.check_attention(model_cfg(candidate),
                                                attention_fn(candidate)).describe()
    except check.AttentionCheckError as error:
        return f"FAIL: {error}"


def speed(candidate: Candidate, baseline: float | None) -> str:
    cfg = model_cfg(candidate)
    seq_len = 256 if _DRY_RUN.value else _SEQ_LEN.value
    documents = 1 if candidate.max_segments == 1 else 8
    try:
        seconds = time_fwd_bwd(attention_fn(candidate), cfg, packed_row(seq_len, documents))
    except Exception as error:  # pylint: disable=broad-except  # reported, not fatal
        return f"did not run: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if baseline is None:
        return f"{seconds * 1e3:.2f} ms fwd+bwd at T={seq_len}"
    ratio = seconds / baseline
    verdict = "within" if ratio <= TARGET_RATIO else "OVER"
    return (f"{seconds * 1e3:.2f} ms fwd+bwd at T={seq_len}, {ratio:.2f}x the no-segment cuDNN "
            f"time ({verdict} the {TARGET_RATIO}x target)")


def emit(line: str) -> None:
    """Prints a result line and appends it to --results at once."""
    print(line, flush=True)
    if _RESULTS.value:
        with open(_RESULTS.value, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(_CANDIDATES.value) - set(CANDIDATES))
    if unknown:
        raise app.UsageError(f"--candidates: {unknown} unknown; choose from {list(CANDIDATES)}.")
    device = jax.devices()[0]
    auto = attention_lib.resolve_impl("auto", _SEQ_LEN.value, 512, "bfloat16")
    emit(f"- device: {device.device_kind} ({device.platform}); jax {jax.__version__}; auto "
         f"attention for bf16 here, memory not weighed: {auto}")
    baseline = None
    if device.platform == "gpu":
        cfg = model_cfg(CANDIDATES["cudnn"])
        baseline = time_fwd_bwd(baseline_fn, cfg, packed_row(_SEQ_LEN.value, 1))
        emit(f"- baseline (public cuDNN, no segments): {baseline * 1e3:.2f} ms fwd+bwd at "
             f"T={_SEQ_LEN.value} (GPU_NOTES on an H200: 1.66 ms)")
    for name in _CANDIDATES.value:
        candidate = CANDIDATES[name]
        label = f"- {candidate.name} (max_segments_per_row={candidate.max_segments})"
        emit(f"{label} numerics: {numerics(candidate)}")
        emit(f"{label} speed: {speed(candidate, baseline)}")


if __name__ == "__main__":
    app.run(main)

r"""The cost of choosing one token per row from [B, V] logits (`decode.next_tokens`), per
sampling setting: what every decode step of GRPO, PTS and evaluation pays on top of the
model's forward.

  python benchmarks/next_token.py --rows 64 --vocab 100352 --write benchmarks/RESULTS_sampling.md

Random float32 logits, one jitted call per setting, the median of `--repeats` timed calls
after a warm-up. Quote the ratios to greedy within one run; on CPU absolute times are
context only. The package is imported from PYTHONPATH, so the same command times another
checkout (`git worktree add /tmp/old <rev>`, then `PYTHONPATH=/tmp/old python
benchmarks/next_token.py ...`).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time

import jax
import numpy as np
from absl import app, flags

from phi4_jax.sampling import decode

_ROWS = flags.DEFINE_integer("rows", 64, "Rows (sequences) per call.")
_VOCAB = flags.DEFINE_integer("vocab", 100_352, "Vocabulary size (Phi-4's padded cl100k).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per setting (the median is kept).")
_WRITE = flags.DEFINE_string("write", "", "Append the results to this markdown file.")

SETTINGS = (  # (name, temperature, top_k, top_p, draw)
    ("greedy", 0.0, 0, 1.0, "gumbel"),
    ("temperature 0.8", 0.8, 0, 1.0, "gumbel"),
    ("top-k 50", 0.8, 50, 1.0, "gumbel"),
    ("top-p 0.95", 0.8, 0, 0.95, "gumbel"),
    ("top-k 50, top-p 0.95 (GRPO's defaults)", 0.8, 50, 0.95, "gumbel"),
    ("top-k 50, top-p 0.95, inverse_cdf", 0.8, 50, 0.95, "inverse_cdf"),
)


def _median_seconds(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _revision() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(decode.__file__)))
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv):
    del argv
    b, v = _ROWS.value, _VOCAB.value
    logits = jax.numpy.asarray(np.random.default_rng(0).normal(size=(b, v)).astype(np.float32))
    keys = decode.row_keys(0, range(b))
    rows = ["| setting | ms per call | x greedy |", "|---|---:|---:|"]
    greedy = None
    for name, temperature, top_k, top_p, draw in SETTINGS:
        params = decode.SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k,
                                       top_p=top_p, draw=draw)
        seconds = _median_seconds(jax.jit(lambda x, k, p=params: decode.next_tokens(x, k, p)),
                                  logits, keys)
        greedy = greedy or seconds
        rows.append(f"| {name} | {seconds * 1e3:.2f} | {seconds / greedy:.1f} |")
        print(rows[-1], flush=True)
    if _WRITE.value:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        header = (f"\n## Token selection, run of {now}\n\n"
                  f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
                  f"cores, {jax.devices()[0].device_kind}; load average {os.getloadavg()}; jax "
                  f"{jax.__version__}; phi4_jax at {_revision()}\n"
                  f"- command: `python benchmarks/next_token.py --rows {b} --vocab {v} "
                  f"--repeats {_REPEATS.value}`\n\n")
        with open(_WRITE.value, "a", encoding="utf-8") as f:
            f.write(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    app.run(main)

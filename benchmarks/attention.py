r"""Attention forward+backward time: plain XLA against the blockwise (flash-style) path.

  python benchmarks/attention.py --seq_lens 1024,2048,4096 --write benchmarks/RESULTS_attention.md

One packed row (two documents), 8 query / 2 kv heads of 64, float32, one device. Quote the
blockwise / xla ratio within one run; on CPU absolute times are context only.
"""

import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from phi4_jax.model import attention

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096"], "Sequence lengths.")
_BLOCK = flags.DEFINE_integer("block", 512, "Blockwise block size.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
_WRITE = flags.DEFINE_string("write", "", "Append the results to this markdown file.")


def _inputs(t: int):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, t, 8, 64))
    k, v = (jax.random.normal(key, (1, t, 2, 64)) for key in keys[1:])
    segments = jnp.where(jnp.arange(t) < t // 3, 1, 2)[None].astype(jnp.int32)
    return q, k, v, segments


def _time(impl: str, t: int) -> float:
    q, k, v, seg = _inputs(t)

    def loss(q, k, v):
        out = attention.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=impl,
                                  block_size=_BLOCK.value)
        return jnp.sum(out * out)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv):
    del argv
    rows = ["| seq_len | xla s | blockwise s | blockwise / xla |", "|---:|---:|---:|---:|"]
    for t in (int(x) for x in _SEQ_LENS.value):
        xla, blockwise = _time("xla", t), _time("blockwise", t)
        rows.append(f"| {t} | {xla:.3f} | {blockwise:.3f} | {blockwise / xla:.2f} |")
        print(rows[-1], flush=True)
    header = (f"\n## Run of {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n\n"
              f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{jax.devices()[0].device_kind}; load average {os.getloadavg()}; jax {jax.__version__}\n"
              f"- command: `python benchmarks/attention.py --seq_lens {','.join(_SEQ_LENS.value)} "
              f"--block {_BLOCK.value}`\n- forward+backward, B=1, N=8, K=2, H=64, float32, "
              f"two packed documents, median of {_REPEATS.value}\n\n")
    if _WRITE.value:
        with open(_WRITE.value, "a", encoding="utf-8") as f:
            f.write(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    app.run(main)

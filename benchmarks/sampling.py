r"""KV-cache sampler throughput: new tokens per second, against re-running the full forward.

  python benchmarks/sampling.py --size tiny --batches 1,8,32 --write benchmarks/RESULTS_sampling.md

Random prompts of `--prompt_len` tokens, `--new_tokens` greedy new tokens per row (no stop
token, so every row decodes to the end), one device, the size's config from
configs/pretrain.py. The baseline recomputes the whole sequence's forward for every new
token (what decoding without a cache costs); quote the ratio within one run. On CPU
absolute times are context only.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from phi4_jax.config_base import build_model_config, load_config
from phi4_jax.model.transformer import init_model
from phi4_jax.sampling import decode

_SIZE = flags.DEFINE_string("size", "tiny", "A size of configs/pretrain.py.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "32"], "Rows decoded at once.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "New tokens per row.")
_DTYPE = flags.DEFINE_string("compute_dtype", "float32", "Compute dtype (bfloat16 on GPU).")
_WRITE = flags.DEFINE_string("write", "", "Append the results to this markdown file.")


def _timed(fn, *args) -> tuple[float, float]:
    """(first call incl. compile, second call) seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return first, time.perf_counter() - start


def _no_cache_decode(graphdef, new_tokens):
    """Greedy decoding by a full forward over the growing sequence for every new token."""
    @jax.jit
    def run(params, tokens):
        model = nnx.merge(graphdef, params)
        b, p = tokens.shape
        seq = jnp.concatenate([tokens, jnp.zeros((b, new_tokens), jnp.int32)], axis=1)
        positions = jnp.broadcast_to(jnp.arange(p + new_tokens), seq.shape)

        def step(i, seq):
            visible = (jnp.arange(p + new_tokens) < p + i).astype(jnp.int32)[None]
            logits = model(seq, positions, jnp.broadcast_to(visible, seq.shape))
            token = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(jnp.int32)
            return seq.at[:, p + i].set(token)

        return jax.lax.fori_loop(0, new_tokens, step, seq)
    return run


def main(argv):
    del argv
    config = load_config("configs/pretrain.py", _SIZE.value)
    config.model.compute_dtype = _DTYPE.value
    cfg = build_model_config(config)
    graphdef, params = nnx.split(init_model(cfg))
    params = nnx.to_pure_dict(params)
    sampling = decode.SamplingParams(max_new_tokens=_NEW.value, temperature=0.0)
    generate = decode.compiled_generate(graphdef, cfg, sampling)
    baseline = _no_cache_decode(graphdef, _NEW.value)
    rows = ["| batch | compile+first s | KV cache tokens/s | no cache tokens/s | speed-up |",
            "|---:|---:|---:|---:|---:|"]
    for b in (int(x) for x in _BATCHES.value):
        prompts = np.random.default_rng(b).integers(0, 1000, (b, _PROMPT.value)).tolist()
        batch = decode.left_pad(prompts)
        first, cached = _timed(generate, params, batch, decode.row_keys(0, range(b)))
        _, plain = _timed(baseline, params, jnp.asarray(batch["tokens"]))
        new = b * _NEW.value
        rows.append(f"| {b} | {first:.2f} | {new / cached:.1f} | {new / plain:.1f} | "
                    f"{plain / cached:.2f} |")
        print(rows[-1], flush=True)
    header = (f"\n## Run of {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n\n"
              f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{jax.devices()[0].device_kind}; load average {os.getloadavg()}; jax {jax.__version__}\n"
              f"- command: `python benchmarks/sampling.py --size {_SIZE.value} --batches "
              f"{','.join(_BATCHES.value)} --prompt_len {_PROMPT.value} --new_tokens {_NEW.value} "
              f"--compute_dtype {_DTYPE.value}`\n- greedy, {_NEW.value} new tokens per row after "
              f"{_PROMPT.value} prompt tokens\n\n")
    if _WRITE.value:
        with open(_WRITE.value, "a", encoding="utf-8") as f:
            f.write(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    app.run(main)

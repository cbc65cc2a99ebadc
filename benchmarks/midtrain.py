r"""Mid-training on CPU: step time and peak memory at 4K vs 16K context, and the tiny model's
loss by position and retrieval before and after mid-training, with a plot.

  # step time (one step after a warm-up) and XLA's peak memory, 4K vs 16K, one CPU device:
  python benchmarks/midtrain.py step --size tiny --seq_lens 4096,16384
  # before/after: a pretraining and a mid-training workdir, each with its config:
  python benchmarks/midtrain.py compare --run before=/tmp/phi4:pretrain.py:tiny \
      --run after=/tmp/phi4-mid:midtrain.py:tiny --plot benchmarks/midtrain_loss_by_position.png

`compare` evaluates both on the same held-out rows of configs/midtrain.py:tiny's mix (512
tokens, 30% long-range recall documents) in 8 position buckets, and the retrieval probe
(`phi4_jax.evals.retrieval`) at context lengths x depths; each model runs with its own
config (the pretrained one with its RoPE base 1e4, the mid-trained one with 2.5e5).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from phi4_jax.config_base import load_config  # noqa: E402
from phi4_jax.data import pipeline  # noqa: E402
from phi4_jax.data.tokenizer import load_tokenizer  # noqa: E402
from phi4_jax.evals import position_loss, retrieval  # noqa: E402
from phi4_jax.parallel.sharding import logical_rules  # noqa: E402
from phi4_jax.stages import evaluation  # noqa: E402
from phi4_jax.train import initial_params, loop, state as state_lib  # noqa: E402

BUCKETS = 8


def _one_device_config(spec: str, **train):
    config = load_config(spec)
    config.mesh.update(fsdp=1)
    config.train.update(**train)
    config.model.max_positions = max(config.model.max_positions, config.train.seq_len)
    return config


def step_benchmark(size: str, seq_lens: list[int]) -> list[dict]:
    """Compile, one warm-up step, one timed step, per sequence length; batch of one row."""
    rows = []
    for seq_len in seq_lens:
        config = _one_device_config(f"configs/midtrain.py:{size}", seq_len=seq_len,
                                    global_batch=1, microbatches=1)
        config.memory.check = False
        run = state_lib.build_run(config, jax.devices()[:1])
        tokens = np.random.default_rng(0).integers(0, 100_000, (1, seq_len + 1)).astype(np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                 "segment_ids": np.ones((1, seq_len), np.int32),
                 "positions": np.arange(seq_len, dtype=np.int32)[None],
                 "loss_mask": np.ones((1, seq_len), np.float32)}
        with jax.set_mesh(run.mesh), logical_rules(run.rules):
            state = state_lib.init_state(run)
            train_fn, _ = loop.compile_steps(run, evaluation.language_model_loss(run), None)
            batch = state_lib.to_global_batch(batch, run.batch_sharding)
            start = time.perf_counter()
            compiled = train_fn.lower(state, batch, None).compile()
            compile_s = time.perf_counter() - start
            state, metrics = compiled(state, batch, None)
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            state, metrics = compiled(state, batch, None)
            jax.block_until_ready(metrics)
            step_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        peak = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        rows.append({"size": size, "seq_len": seq_len, "attention": run.model_cfg.attention_impl,
                     "remat": run.model_cfg.remat_policy, "compile_s": compile_s,
                     "step_s": step_s, "tokens_per_s": seq_len / step_s,
                     "temp_gib": memory.temp_size_in_bytes / 2**30, "peak_gib": peak / 2**30})
    return rows


def _params(workdir: str, config):
    run = state_lib.build_run(config, jax.devices()[:1])
    source = initial_params.locate(workdir)
    initial_params.check(source, run.abstract_params, run.model_cfg)
    return run, initial_params.load(source, run.abstract_params, run.model_cfg)


def compare(runs: dict[str, str], lengths: list[int], depths: list[float], trials: int,
            eval_batches: int) -> dict:
    """Loss by position and the retrieval table of each (workdir, config) run."""
    reference = _one_device_config("configs/midtrain.py:tiny")
    reference.eval.batches = eval_batches
    batches = pipeline.make_eval_batches(reference.data, seq_len=reference.train.seq_len,
                                         batch_size=reference.train.global_batch,
                                         num_batches=reference.eval.batches)
    tokenizer, results = load_tokenizer("phi4"), {}
    for label, spec in runs.items():
        workdir, config_spec = spec.split(":", 1)
        config = _one_device_config(f"configs/{config_spec}", seq_len=reference.train.seq_len,
                                    global_batch=reference.train.global_batch)
        run, params = _params(workdir, config)
        with jax.set_mesh(run.mesh), logical_rules(run.rules):
            device_batches = [state_lib.to_global_batch(b, run.batch_sharding) for b in batches]
            losses = position_loss.loss_by_position(
                params, run.graphdef, device_batches, seq_len=reference.train.seq_len,
                buckets=BUCKETS, chunk_tokens=reference.train.loss_chunk_tokens)
        table = retrieval.retrieval_table(params, run.graphdef, run.model_cfg, tokenizer,
                                          lengths=lengths, depths=depths, trials=trials)
        results[label] = {"workdir": workdir, "config": config_spec,
                          "rope_theta": run.model_cfg.rope_theta, "loss_by_position": losses,
                          "retrieval": {f"{n}@{d}": v for (n, d), v in table.items()},
                          "retrieval_table": retrieval.describe(table)}
    return results


def plot(results: dict, out: str, title: str) -> None:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, result in results.items():
        buckets = result["loss_by_position"]
        centers = [np.mean([int(x) for x in key[len("loss_pos"):].split("-")]) for key in buckets]
        ax.plot(centers, list(buckets.values()), marker="o", label=f"{label} ({result['config']})")
    ax.set_xlabel("position in document (bucket centre)")
    ax.set_ylabel("held-out next-token loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step")
    step.add_argument("--size", default="tiny")
    step.add_argument("--seq_lens", default="4096,16384")
    comp = sub.add_parser("compare")
    comp.add_argument("--run", action="append", required=True, help="label=WORKDIR:CONFIG[:ARG]")
    comp.add_argument("--lengths", default="64,128,256,448")
    comp.add_argument("--depths", default="0,0.5,1")
    comp.add_argument("--trials", type=int, default=16)
    comp.add_argument("--eval_batches", type=int, default=8)
    comp.add_argument("--plot", default="")
    args = parser.parse_args()
    if args.command == "step":
        rows = step_benchmark(args.size, [int(n) for n in args.seq_lens.split(",")])
        for row in rows:
            print(json.dumps(row))
        first, last = rows[0], rows[-1]
        print(f"ratios {last['seq_len']}/{first['seq_len']}: step time "
              f"{last['step_s'] / first['step_s']:.2f}x, peak memory "
              f"{last['peak_gib'] / first['peak_gib']:.2f}x, temporaries "
              f"{last['temp_gib'] / first['temp_gib']:.2f}x")
        return
    runs = dict(spec.split("=", 1) for spec in args.run)
    results = compare(runs, [int(n) for n in args.lengths.split(",")],
                      [float(d) for d in args.depths.split(",")], args.trials, args.eval_batches)
    print(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot, "tiny: held-out loss by position, rows of 512 tokens")


if __name__ == "__main__":
    main()

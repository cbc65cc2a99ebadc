r"""LoRA's memory saving against full fine-tuning: measured on this machine and estimated.

Measured: the real trainer's SFT step (`build_run` -> `compile_steps`), compiled ahead of time
on one device for full fine-tuning and for LoRA at the same size, nothing allocated. Read from
the run's abstract state (the train state: what the step donates and a checkpoint holds) and
from XLA's compiled memory analysis (arguments: state, frozen backbone and batch; temporaries:
activations, gradients, the optimizer update). Estimated: `phi4_jax.train.memory` for the
released sizes at 4096 tokens a row, one row, one device (what `memory.check` would refuse).

Run from the repository root (the CPU run recorded in RESULTS_lora.md, ~1 minute):
  python benchmarks/lora_memory.py --size 125m --seq_len 256 --batch 2 \
      --write benchmarks/RESULTS_lora.md
"""

from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phi4_jax import stages  # noqa: E402
from phi4_jax.config_base import load_config  # noqa: E402
from phi4_jax.model.config import model_config_for  # noqa: E402
from phi4_jax.model.lora import LoRAConfig  # noqa: E402
from phi4_jax.parallel.sharding import logical_rules  # noqa: E402
from phi4_jax.train import loop, memory  # noqa: E402
from phi4_jax.train import state as state_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "125m", "model.size measured")
flags.DEFINE_integer("seq_len", 256, "tokens per row")
flags.DEFINE_integer("batch", 2, "rows per step")
flags.DEFINE_integer("rank", 16, "LoRA rank")
flags.DEFINE_list("targets", ["q", "k", "v", "o"], "adapted projections")
flags.DEFINE_string("backbone_dtype", "bfloat16", "the frozen backbone's dtype")
flags.DEFINE_string("write", "", "append the tables to this markdown file")

MIB = 1024**2
ROW_KEYS = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
            "segment_ids": jnp.int32, "loss_mask": jnp.float32}


def _bytes(tree) -> int:
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def measure(rank: int) -> dict[str, int]:
    """State, frozen-backbone and XLA byte counts of one compiled SFT step (rank 0: full)."""
    c = load_config("configs/sft.py", "tiny")
    c.model.size = FLAGS.size
    c.train.update(seq_len=FLAGS.seq_len, global_batch=FLAGS.batch, microbatches=1)
    c.memory.check = False
    c.lora.update(rank=rank, alpha=2.0 * max(rank, 1), targets=tuple(FLAGS.targets),
                  backbone_dtype=FLAGS.backbone_dtype if rank else "")
    run = state_lib.build_run(c, jax.devices()[:1])
    backbone = run.abstract_backbone if rank else None
    frozen = loop.step_frozen(run, backbone, None)
    batch = {key: jax.ShapeDtypeStruct((FLAGS.batch, FLAGS.seq_len), dtype,
                                       sharding=run.batch_sharding)
             for key, dtype in ROW_KEYS.items()}
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        train_fn, _ = loop.compile_steps(run, stages.builder_for(c)(c, run.model_cfg).loss(run), frozen)
        analysis = train_fn.lower(run.abstract_state, batch, frozen).compile().memory_analysis()
    peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    return {"train state (params + AdamW)": _bytes(run.abstract_state),
            "frozen backbone": _bytes(backbone) if rank else 0,
            "XLA arguments": analysis.argument_size_in_bytes,
            "XLA temporaries": analysis.temp_size_in_bytes,
            "XLA peak (args + out - aliased + temp)": peak}


def measured_table(full: dict[str, int], adapted: dict[str, int]) -> list[str]:
    lines = [f"| {FLAGS.size}, seq {FLAGS.seq_len}, batch {FLAGS.batch} | full FT (MiB) | "
             f"LoRA r{FLAGS.rank} {'/'.join(FLAGS.targets)} (MiB) | LoRA / full |",
             "|---|---:|---:|---:|"]
    for key in full:
        ratio = f"{adapted[key] / full[key]:.3f}" if full[key] else "-"
        lines.append(f"| {key} | {full[key] / MIB:.1f} | {adapted[key] / MIB:.1f} | {ratio} |")
    return lines


def estimated_table() -> list[str]:
    lines = ["| estimate, seq 4096, 1 row, 1 device (GiB) | params | frozen | grads | "
             "optimizer | activations + backward | total | LoRA / full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    adapters = LoRAConfig(FLAGS.rank, 2.0 * FLAGS.rank, tuple(FLAGS.targets),
                          backbone_dtype=FLAGS.backbone_dtype)
    for size in ("phi4-mini", "phi4-14b"):
        full_cfg = model_config_for(size, max_positions=4096, remat_policy="full")
        estimates = {}
        for label, cfg in (("full FT", full_cfg), ("LoRA", full_cfg.replace(lora=adapters))):
            est = memory.estimate_train_memory(cfg, seq_len=4096, per_device_batch=1,
                                               mesh_shape=dict(data=1, fsdp=1, tensor=1))
            estimates[label] = est
            ratio = est.total / estimates["full FT"].total
            cells = [est.params, est.frozen, est.grads, est.optimizer,
                     est.activations + est.backward, est.total]
            lines.append(f"| {size} {label} | " + " | ".join(
                f"{x / memory.GIB:.2f}" for x in cells) + f" | {ratio:.3f} |")
    return lines


def main(argv) -> None:
    del argv
    full, adapted = measure(0), measure(FLAGS.rank)
    lines = [f"## LoRA memory, {datetime.date.today()} ({jax.devices()[0].platform}, "
             f"{platform.processor() or platform.machine()})", "",
             f"`python benchmarks/lora_memory.py --size {FLAGS.size} --seq_len {FLAGS.seq_len} "
             f"--batch {FLAGS.batch} --rank {FLAGS.rank}`", "",
             "Measured (XLA's compiled analysis of the trainer's SFT step, one device, fp32 "
             f"params; LoRA backbone in {FLAGS.backbone_dtype}):", "",
             *measured_table(full, adapted), "",
             "Estimated (`phi4_jax.train.memory`, remat full, fp32 params and AdamW; LoRA "
             f"rank {FLAGS.rank} on {'/'.join(FLAGS.targets)}, backbone {FLAGS.backbone_dtype}):",
             "", *estimated_table(), ""]
    text = "\n".join(lines)
    print(text)
    if FLAGS.write:
        with open(FLAGS.write, "a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)

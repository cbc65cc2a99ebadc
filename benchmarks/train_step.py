r"""Training-step throughput: compile time, median step time, tokens/s, model TFLOP/s and MFU.

Each size of `configs/pretrain.py` (and each remat / attention variant asked for) is built
with the real trainer (`build_run` -> `init_state` -> `compile_steps`) on one real device,
compiled ahead of time, run for a warm-up step, then timed step by step with
`block_until_ready` on one random batch kept on the device (one document per row), so the
step time excludes host-to-device copies and the data pipeline.

Model FLOPs follow `phi4_jax.flops` (causal attention counted at half, remat recomputation
not counted). MFU divides by the device's published dense bf16 peak on GPU/TPU; CPUs have
none, so on CPU the peak is measured here: the best of several large float32 matmuls on the
same devices ("measured CPU matmul peak").

Run from the repository root; the two CPU runs recorded in RESULTS_train.md (~3.5 minutes):
  python benchmarks/train_step.py --sizes tiny,125m --seq_len 256 --batch 2 --steps 3 \
      --remat none,full --config.model.compute_dtype=float32 --write benchmarks/RESULTS_train.md
  python benchmarks/train_step.py --sizes tiny --seq_len 2048 --batch 1 --steps 3 \
      --attention xla,blockwise --write benchmarks/RESULTS_train.md
Overrides use the trainer's syntax (`--config.model.attention_block_size=256`) and apply to
every size; `--remat` and `--attention` then sweep over their values. `--write` appends.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags

from phi4_jax import config_base
from phi4_jax.model.attention import resolve_impl
from phi4_jax.model.config import ModelConfig
from phi4_jax.parallel.sharding import logical_rules
from phi4_jax.stages import evaluation
from phi4_jax.train import flops, loop, memory
from phi4_jax.train import state as state_lib

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 1
PEAK_MATMUL_SIZE = 2048
PEAK_MATMUL_REPEATS = 5

_SIZES = flags.DEFINE_list("sizes", ["tiny"],
                           "Variants of configs/pretrain.py: tiny, 125m, 1b, 14b-4l.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per step (the global batch).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after the warm-up step.")
_REMAT = flags.DEFINE_list("remat", [], "Remat policies to sweep (default: the config's).")
_ATTENTION = flags.DEFINE_list("attention", [], "Attention implementations to sweep "
                               "(default: the config's).")
_DEVICES = flags.DEFINE_integer("devices", 1, "How many of jax.devices() to run on.")
_WRITE = flags.DEFINE_string("write", "", "A Markdown file to append the results to.")
# Declared on the base config, whose keys every stage config shares; the values given are
# applied to each size's own config.
_CONFIG = config_flags.DEFINE_config_dict(
    "config", config_base.base_config(), "Overrides, e.g. --config.model.compute_dtype=bfloat16.")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One benchmarked configuration: a size and, when swept, a remat policy and attention."""

    size: str
    remat: str | None
    attention: str | None


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """What one variant measured; `skipped` holds the reason when it could not run."""

    variant: Variant
    model_cfg: ModelConfig | None = None
    compile_s: float = math.nan
    step_s: tuple[float, ...] = ()
    skipped: str = ""


# --- configs ---------------------------------------------------------------------------------

def load_pretrain_config(size: str) -> ml_collections.ConfigDict:
    """`configs/pretrain.py:<size>`, loaded as the trainer's config flag would load it."""
    return config_base.load_config("configs/pretrain.py", size)


def bench_config(variant: Variant, seq_len: int, batch: int,
                 overrides: dict) -> ml_collections.ConfigDict:
    """The size's config at the benchmark's shape (its mesh: FSDP over the devices given)."""
    c = load_pretrain_config(variant.size)
    c.train.update(seq_len=seq_len, global_batch=batch, microbatches=1)
    c.model.max_positions = max(c.model.max_positions, seq_len)
    c.update_from_flattened_dict(overrides)
    if variant.remat is not None:
        c.model.remat_policy = variant.remat
    if variant.attention is not None:
        c.model.attention_impl = variant.attention
    return c


def variants(sizes: list[str], remats: list[str], attentions: list[str]) -> list[Variant]:
    """Every size x remat x attention; an empty sweep list keeps the config's value."""
    return [Variant(size, remat, attention) for size in sizes for remat in remats or [None]
            for attention in attentions or [None]]


# --- measuring -------------------------------------------------------------------------------

def random_batch(batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, one document filling each row: the trainer's batch layout."""
    tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((batch, seq_len), np.int32), "positions": positions.copy(),
            "loss_mask": np.ones((batch, seq_len), np.float32)}


def time_steps(config: ml_collections.ConfigDict, devices: list[jax.Device], steps: int,
               variant: Variant) -> StepTiming:
    """Compiles the real train step ahead of time, then times `steps` steps after a warm-up."""
    try:
        run = state_lib.build_run(config, devices)
    except memory.MemoryBudgetError as error:
        return StepTiming(variant, skipped=str(error).splitlines()[0])
    t = config.train
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        train_fn, _ = loop.compile_steps(run, evaluation.language_model_loss(run), None)
        state = state_lib.init_state(run)
        batch = state_lib.to_global_batch(
            random_batch(t.global_batch, t.seq_len, run.model_cfg.vocab_size), run.batch_sharding)
        start = time.perf_counter()
        step = train_fn.lower(state, batch, None).compile()
        compile_s = time.perf_counter() - start
        durations = []
        for i in range(WARMUP_STEPS + steps):
            start = time.perf_counter()
            state, metrics = jax.block_until_ready(step(state, batch, None))
            if i >= WARMUP_STEPS:
                durations.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise RuntimeError(f"{variant}: the loss is {loss} after {WARMUP_STEPS + steps} steps; "
                           f"the timing would not describe a working step.")
    return StepTiming(variant, run.model_cfg, compile_s, tuple(durations))


def measured_matmul_peak(devices: list[jax.Device], size: int = PEAK_MATMUL_SIZE,
                         repeats: int = PEAK_MATMUL_REPEATS) -> float:
    """Per-device float32 FLOP/s: best of `repeats` [size, size] matmuls on all devices at once."""
    mesh = Mesh(np.array(devices), ("devices",))
    sharding = NamedSharding(mesh, PartitionSpec("devices"))
    shape = (len(devices), size, size)
    a = jax.device_put(jax.random.normal(jax.random.key(0), shape, jnp.float32), sharding)
    b = jax.device_put(jax.random.normal(jax.random.key(1), shape, jnp.float32), sharding)
    matmul = jax.jit(lambda x, y: jnp.einsum("dij,djk->dik", x, y), out_shardings=sharding)
    jax.block_until_ready(matmul(a, b))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def published_peak(devices: list[jax.Device]) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it comes from) for accelerators: the dense bf16 table."""
    kind = devices[0].device_kind
    peak = flops.peak_flops(kind)
    if peak is None:
        return None, f"no published peak for device kind {kind!r}: MFU not computed"
    return peak, (f"published dense bf16 peak of {flops.accelerator_for(kind)}: "
                  f"{peak / 1e12:.0f} TFLOP/s per device")


def measured_peak(before: float, after: float, num_devices: int) -> tuple[float, str]:
    """The higher of the CPU matmul peaks measured before and after the steps, described."""
    return max(before, after), (
        f"measured CPU matmul peak: {before / 1e9:.1f} GFLOP/s per device before the steps, "
        f"{after / 1e9:.1f} after; MFU uses the higher (best of {PEAK_MATMUL_REPEATS} float32 "
        f"{PEAK_MATMUL_SIZE}x{PEAK_MATMUL_SIZE} matmuls on each of the {num_devices} device(s) "
        f"at once)")


def pick_devices(count: int) -> list[jax.Device]:
    """The first `count` devices, refusing more than exist."""
    available = jax.devices()
    if not 0 < count <= len(available):
        raise ValueError(
            f"--devices={count}: {len(available)} {available[0].platform} device(s) exist; pass "
            f"1..{len(available)} (on CPU, more need XLA_FLAGS="
            f"--xla_force_host_platform_device_count=N, which splits the same cores).")
    return available[:count]


# --- reporting -------------------------------------------------------------------------------

def machine(devices: list[jax.Device]) -> str:
    """CPU model and cores, devices, OS, Python and JAX versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores visible; {len(devices)} x {devices[0].device_kind} "
            f"({devices[0].platform}); {platform.platform()}; Python "
            f"{platform.python_version()}, jax {jax.__version__}")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def attention_label(c: ml_collections.ConfigDict) -> str:
    """The configured attention, with what `auto` resolves to on this backend and length."""
    impl = c.model.attention_impl
    if impl != "auto":
        return impl
    resolved = resolve_impl(impl, c.train.seq_len, c.model.attention_block_size,
                            c.model.compute_dtype)
    return f"auto ({resolved})"


def table(timings: list[StepTiming], configs: list[ml_collections.ConfigDict],
          peak: float | None, num_devices: int) -> str:
    """One Markdown row per variant; step-time ratios are to the size's first variant."""
    lines = ["| size | remat | attention | compute | compile s | median step s (min-max) | "
             "step / first | tokens/s | model TFLOP/s | MFU |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    first_step: dict[str, float] = {}
    for timing, c in zip(timings, configs):
        m = c.model
        head = (f"| {timing.variant.size} | {m.remat_policy} | {attention_label(c)} | "
                f"{m.compute_dtype}")
        if timing.skipped:
            lines.append(f"{head} | skipped: {timing.skipped} |" + " |" * 5)
            continue
        median = statistics.median(timing.step_s)
        first = first_step.setdefault(timing.variant.size, median)
        tokens_s = c.train.global_batch * c.train.seq_len / median
        flop_s = tokens_s * flops.train_flops_per_token(timing.model_cfg, c.train.seq_len)
        mfu = flops.mfu(tokens_s / num_devices, timing.model_cfg, c.train.seq_len, peak)
        lines.append(f"{head} | {timing.compile_s:.1f} | {median:.3f} ({min(timing.step_s):.3f}-"
                     f"{max(timing.step_s):.3f}) | {median / first:.2f} | {tokens_s:,.0f} | "
                     f"{flop_s / 1e12:.3f} | {'n/a' if mfu is None else f'{mfu:.1%}'} |")
    return "\n".join(lines)


def report(body: str, devices: list[jax.Device], shape: str, peak_source: str,
           loads: tuple[str, str], overrides: dict) -> str:
    """The run's Markdown section: when, where, what was run, the table."""
    return "\n".join([
        f"## Run of {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        f"- machine: {machine(devices)}",
        f"- load average (1, 5, 15 min): {loads[0]} at the start, {loads[1]} at the end",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- shape: {shape}; overrides: {overrides or 'none'}",
        f"- peak: {peak_source}",
        "",
        body,
        "",
    ])


def append_report(path: str, section: str) -> None:
    """Appends `section`, starting the file with its title when it is new."""
    new = not os.path.exists(path)
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("# Training-step throughput\n\n")
        f.write(section + "\n")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
    devices = pick_devices(_DEVICES.value)
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    start_load = load_average()
    on_cpu = devices[0].platform == "cpu"
    peak_before = measured_matmul_peak(devices) if on_cpu else None
    configs, timings = [], []
    for variant in variants(_SIZES.value, _REMAT.value, _ATTENTION.value):
        config = bench_config(variant, _SEQ_LEN.value, _BATCH.value, overrides)
        print(f"timing {variant} ...", file=sys.stderr, flush=True)
        configs.append(config)
        timings.append(time_steps(config, devices, _STEPS.value, variant))
    if on_cpu:
        peak, peak_source = measured_peak(peak_before, measured_matmul_peak(devices), len(devices))
    else:
        peak, peak_source = published_peak(devices)
    shape = (f"seq_len {_SEQ_LEN.value}, global batch {_BATCH.value}, {WARMUP_STEPS} warm-up "
             f"step then {_STEPS.value} timed steps")
    section = report(table(timings, configs, peak, len(devices)), devices, shape, peak_source,
                     (start_load, load_average()), overrides)
    print(section)
    if _WRITE.value:
        append_report(_WRITE.value, section)


if __name__ == "__main__":
    app.run(main)

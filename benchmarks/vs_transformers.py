r"""phi4_jax's real train step against transformers' Phi3ForCausalLM, same shapes, one GPU.

  python benchmarks/vs_transformers.py --write benchmarks/RESULTS_gpu.md     # on a GPU
  python benchmarks/vs_transformers.py --dry_run                             # CPU, ~2 min

Both sides run with the same activation checkpointing (`--checkpointing`, each of `none` and
`full`, recorded in every row): phi4_jax's `model.remat_policy` (`full` recomputes each
layer in the backward) and transformers' gradient checkpointing (on for `full`, off for
`none`), so a speed ratio never compares recomputation with none. Each row is printed and
appended to `--write` the moment it is measured: a run cut short keeps every row it finished.

Contenders, each at every shape, each in its own subprocess (JAX takes 90% of the GPU at
start and torch caches what it frees, so they never share one process; an OOM or a hang
costs one row, not the table):
  - phi4_jax: `build_run` -> `compile_steps(run, evaluation.language_model_loss(run), None)`, the trainer's own jitted,
    donated step, with the size's `configs/pretrain.py` settings (bf16 compute over fp32
    weights, AdamW, clipping at 1.0), `model.attention_impl=auto` resolved by start-up
    (printed), after start-up's attention numerics check;
  - torch_compile and torch_eager: transformers' `Phi3ForCausalLM` of the same geometry
    (`interop.hf_checkpoint.hf_config_dict`), fp32 weights under bf16 autocast, SDPA
    attention, fused AdamW, clipping at 1.0; `torch.compile` on the model for the first.
Every row holds one document of random tokens (torch's SDPA has no packed-document mask),
and phi4_jax still runs its packed attention path on it. Timing: `--warmup` steps, then the
median of `--steps` steps, each synchronized. Tokens/s counts every input position. MFU uses
one formula for all (`phi4_jax.train.flops`: 6N plus causal attention at half) over the
device's published dense bf16 peak. Peak memory: JAX's `peak_bytes_in_use`, torch's
`max_memory_allocated`. For phi4_jax the row also gives the start-up memory estimate over
XLA's `memory_analysis()` of the compiled step (arguments + outputs - aliased + temporaries).

`--dry_run` runs the same code on CPU at the tiny size (seq 64, batch 2, 2 steps), torch on
CPU, so the script itself is known to work where no GPU is at hand.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
# name -> (configs/pretrain.py variant, sequence length, global batch)
SHAPES = {"14b-4l@4k": ("14b-4l", 4096, 4), "1b@4k": ("1b", 4096, 8),
          "14b-4l@16k": ("14b-4l", 16384, 1)}
DRY_SHAPES = {"tiny@64": ("tiny", 64, 2)}
CONTENDERS = ("phi4_jax", "torch_compile", "torch_eager")
CHECKPOINTING = ("full", "none")
# The goals: phi4_jax / torch.compile tokens/s, and phi4_jax MFU.
SPEEDUP_GOALS = {"14b-4l@4k": 1.3, "1b@4k": 1.3}
MFU_GOALS = {"14b-4l@4k": 0.55, "14b-4l@16k": 0.45}

_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), f"Shapes to run, from {list(SHAPES)}.")
_CONTENDERS = flags.DEFINE_list("contenders", list(CONTENDERS), "Who runs each shape.")
_CHECKPOINTING = flags.DEFINE_list(
    "checkpointing", list(CHECKPOINTING), f"Activation checkpointing on both sides, each of "
    f"{list(CHECKPOINTING)}: phi4_jax's remat policy, transformers' gradient checkpointing.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation included).")
_TIMEOUT = flags.DEFINE_integer("timeout", 240, "Seconds one contender may take at one shape.")
# allow_override: phi4_jax.parallel.launch defines a --dry_run of its own (a process that
# imports both, like the test suite, then holds one flag of that name).
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Tiny size on CPU: checks the script works.",
                             allow_override=True)
_WRITE = flags.DEFINE_string("write", "", "Markdown file to append the results to.")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one contender at one shape.")


@dataclasses.dataclass
class Result:
    """What one contender measured at one shape (or why it did not)."""

    contender: str
    shape: str
    checkpointing: str
    step_s: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int | None = None
    notes: str = ""
    error: str = ""


def _shape(name: str) -> tuple[str, int, int]:
    return {**SHAPES, **DRY_SHAPES}[name]


def _pretrain_config(name: str, checkpointing: str = "full"):
    """The size's pretraining config at the shape, as the trainer would load it, with
    `checkpointing` as its remat policy."""
    from phi4_jax import config_base  # pylint: disable=g-import-not-at-top
    size, seq_len, batch = _shape(name)
    config = config_base.load_config("configs/pretrain.py", size)
    config.train.update(seq_len=seq_len, global_batch=batch, microbatches=1, warmup_steps=0)
    config.model.max_positions = max(config.model.max_positions, seq_len)
    config.model.remat_policy = checkpointing
    return config


def _tokens(name: str, vocab: int):
    import numpy as np  # pylint: disable=g-import-not-at-top
    _, seq_len, batch = _shape(name)
    return np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1), np.int32)


def _timed(step, count: int, sync) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


# --- workers ---------------------------------------------------------------------------------

def run_phi4_jax(name: str, checkpointing: str) -> Result:
    """The trainer's step: build_run (resolution, numerics check) -> compile_steps -> time."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from phi4_jax.parallel.sharding import logical_rules  # pylint: disable=g-import-not-at-top
    from phi4_jax.stages import evaluation  # pylint: disable=g-import-not-at-top
    from phi4_jax.train import loop, memory  # pylint: disable=g-import-not-at-top
    from phi4_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

    config = _pretrain_config(name, checkpointing)
    run = state_lib.build_run(config, jax.devices()[:1])
    t, cfg = config.train, run.model_cfg
    tokens = _tokens(name, cfg.vocab_size)
    rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones_like(tokens[:, 1:]),
            "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32),
                                         tokens[:, 1:].shape).copy(),
            "loss_mask": np.ones(tokens[:, 1:].shape, np.float32)}
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        train_fn, _ = loop.compile_steps(run, evaluation.language_model_loss(run), None)
        state = state_lib.init_state(run)
        batch = state_lib.to_global_batch(rows, run.batch_sharding)
        compiled = train_fn.lower(state, batch, None).compile()
        holder = {"state": state}

        def step():
            holder["state"], holder["metrics"] = compiled(holder["state"], batch, None)

        sync = lambda: jax.block_until_ready(holder["state"])  # noqa: E731
        _timed(step, _WARMUP.value, sync)
        times = _timed(step, _STEPS.value, sync)
    estimate = memory.estimate_train_memory(
        cfg, seq_len=t.seq_len, per_device_batch=t.global_batch, mesh_shape=dict(run.mesh.shape),
        loss_chunk_tokens=t.loss_chunk_tokens).total
    analysis = compiled.memory_analysis()
    compiled_bytes = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    stats = jax.devices()[0].memory_stats() or {}
    loss = float(holder["metrics"]["loss"])
    return Result("phi4_jax", name, checkpointing, times, stats.get("peak_bytes_in_use"),
                  notes=f"attention {cfg.attention_impl}, remat {cfg.remat_policy}, loss {loss:.2f}; "
                        f"memory estimate / XLA analysis {estimate / compiled_bytes:.2f} "
                        f"({estimate / 2**30:.1f} / {compiled_bytes / 2**30:.1f} GiB)")


def run_transformers(name: str, compiled: bool, checkpointing: str) -> Result:
    """transformers' Phi3ForCausalLM: fp32 weights, bf16 autocast, SDPA, gradient
    checkpointing when `checkpointing` is `full`."""
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    from phi4_jax.config_base import build_model_config  # pylint: disable=g-import-not-at-top
    from phi4_jax.interop.hf_checkpoint import hf_config_dict  # pylint: disable=g-import-not-at-top

    cfg = build_model_config(_pretrain_config(name))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = transformers.Phi3Config.from_dict(hf_config_dict(cfg))
    hf_config._attn_implementation = "sdpa"  # pylint: disable=protected-access
    with torch.device(device):  # initialize on the GPU: 2.4B parameters are slow on CPU
        model = transformers.Phi3ForCausalLM(hf_config)
    if checkpointing == "full":
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                                  fused=device == "cuda")
    forward = torch.compile(model) if compiled else model
    tokens = torch.from_numpy(_tokens(name, cfg.vocab_size)[:, :-1].astype("int64")).to(device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _timed(step, _WARMUP.value, sync)
    times = _timed(step, _STEPS.value, sync)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    contender = "torch_compile" if compiled else "torch_eager"
    return Result(contender, name, checkpointing, times, peak,
                  notes=f"torch {torch.__version__}, transformers {transformers.__version__}, "
                        f"{device}")


def worker(contender: str, name: str, checkpointing: str) -> None:
    """Runs one contender at one shape and prints its result as one JSON line."""
    try:
        if contender == "phi4_jax":
            result = run_phi4_jax(name, checkpointing)
        else:
            result = run_transformers(name, contender == "torch_compile", checkpointing)
    except Exception as error:  # pylint: disable=broad-except  # reported in the table
        result = Result(contender, name, checkpointing,
                        error=f"{type(error).__name__}: {error}"[:300])
    print("RESULT " + json.dumps(dataclasses.asdict(result)), flush=True)


# --- the table -------------------------------------------------------------------------------

def run_one(contender: str, name: str, checkpointing: str) -> Result:
    """`worker` in a fresh process, bounded by --timeout."""
    command = [sys.executable, __file__, f"--worker={contender}", f"--shapes={name}",
               f"--checkpointing={checkpointing}", f"--steps={_STEPS.value}",
               f"--warmup={_WARMUP.value}"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if _DRY_RUN.value:
        env["JAX_PLATFORMS"] = "cpu"
    print(f"{name}: {contender}, checkpointing {checkpointing} ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT.value,
                              env=env, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return Result(contender, name, checkpointing, error=f"timed out after {_TIMEOUT.value} s")
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return Result(**json.loads(line[len("RESULT "):]))
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return Result(contender, name, checkpointing,
                  error=f"exit {done.returncode}: {tail[0][:300]}")


def _device_kind() -> tuple[str, str]:
    """(device kind, platform) of the first device, asked in a subprocess (no GPU held)."""
    code = "import jax; d = jax.devices()[0]; print(d.device_kind + '|' + d.platform)"
    env = dict(os.environ, JAX_PLATFORMS="cpu") if _DRY_RUN.value else None
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=False).stdout.strip().splitlines()
    return tuple(out[-1].split("|")) if out else ("unknown", "unknown")


HEADER = ["| shape | checkpointing | contender | median step s | tokens/s | MFU | vs torch.compile "
          "| peak GiB | notes |", "|---|---|---|---:|---:|---:|---:|---:|---|"]


def tokens_per_s(result: Result) -> float | None:
    if not result.step_s or result.error:
        return None
    _, seq_len, batch = _shape(result.shape)
    return seq_len * batch / statistics.median(result.step_s)


def row(result: Result, earlier: list[Result], peak: float | None) -> str:
    """One result's table row; the ratio is to torch.compile at the same shape and
    checkpointing when that was measured (earlier, or in this row)."""
    from phi4_jax.config_base import build_model_config  # pylint: disable=g-import-not-at-top
    from phi4_jax.train import flops  # pylint: disable=g-import-not-at-top

    r = result
    rate = tokens_per_s(r)
    if rate is None:
        return (f"| {r.shape} | {r.checkpointing} | {r.contender} | - | - | - | - | - | "
                f"failed: {r.error} |")
    mfu = flops.mfu(rate, build_model_config(_pretrain_config(r.shape)), _shape(r.shape)[1], peak)
    base = next((tokens_per_s(e) for e in [*earlier, r] if e.contender == "torch_compile"
                 and (e.shape, e.checkpointing) == (r.shape, r.checkpointing)), None)
    return (f"| {r.shape} | {r.checkpointing} | {r.contender} | "
            f"{statistics.median(r.step_s):.3f} | {rate:,.0f} | "
            f"{'n/a' if mfu is None else f'{mfu:.1%}'} | "
            f"{'' if base is None else f'{rate / base:.2f}'} | "
            f"{'n/a' if r.peak_bytes is None else f'{r.peak_bytes / 2**30:.1f}'} | {r.notes} |")


def goals(results: list[Result], peak: float | None) -> list[str]:
    """The issue's goals, per checkpointing setting measured on both sides."""
    from phi4_jax.config_base import build_model_config  # pylint: disable=g-import-not-at-top
    from phi4_jax.train import flops  # pylint: disable=g-import-not-at-top

    rates = {(r.shape, r.checkpointing, r.contender): tokens_per_s(r) for r in results
             if tokens_per_s(r) is not None}
    lines = []
    for (shape, checkpointing, contender), rate in rates.items():
        if contender != "phi4_jax":
            continue
        where = f"{shape}, checkpointing {checkpointing}"
        if shape in SPEEDUP_GOALS and (base := rates.get((shape, checkpointing, "torch_compile"))):
            goal = SPEEDUP_GOALS[shape]
            lines.append(f"- {where}: phi4_jax / torch.compile = {rate / base:.2f} (goal >= "
                         f"{goal}): {'met' if rate / base >= goal else 'NOT met'}")
        mfu = flops.mfu(rate, build_model_config(_pretrain_config(shape)), _shape(shape)[1], peak)
        if shape in MFU_GOALS and mfu is not None:
            goal = MFU_GOALS[shape]
            lines.append(f"- {where}: phi4_jax MFU {mfu:.1%} (goal >= {goal:.0%}): "
                         f"{'met' if mfu >= goal else 'NOT met'}")
    return lines


def emit(lines: list[str]) -> None:
    """Prints lines and appends them to --write at once, so a cut run keeps them."""
    print("\n".join(lines), flush=True)
    if _WRITE.value:
        with open(_WRITE.value, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def versions() -> str:
    names = ("jax", "jaxlib", "flax", "optax", "torch", "transformers")
    found = []
    for name in names:
        try:
            found.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            found.append(f"{name} missing")
    return ", ".join(found)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    shapes = list(DRY_SHAPES) if _DRY_RUN.value else _SHAPES.value
    unknown = sorted(set(_CHECKPOINTING.value) - set(CHECKPOINTING))
    if unknown:
        raise app.UsageError(f"--checkpointing={','.join(_CHECKPOINTING.value)}: {unknown} "
                             f"unknown; choose from {list(CHECKPOINTING)}.")
    if _WORKER.value:
        worker(_WORKER.value, shapes[0], _CHECKPOINTING.value[0])
        return
    if _DRY_RUN.value:
        flags.FLAGS.steps, flags.FLAGS.warmup = min(_STEPS.value, 2), 1
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    emit([f"## Run of {started}{' (dry run on CPU)' if _DRY_RUN.value else ''}", ""])
    from phi4_jax.train import flops  # pylint: disable=g-import-not-at-top
    device_kind, device_platform = _device_kind()
    peak = flops.peak_flops(device_kind)
    emit([f"- machine: 1 x {device_kind} ({device_platform}); {platform.platform()}; "
          f"{os.cpu_count()} CPU cores; Python {platform.python_version()}",
          f"- versions: {versions()}",
          f"- command: `python {' '.join(sys.argv)}`",
          f"- {_WARMUP.value} untimed step(s), then the median of {_STEPS.value}; one document "
          f"per row, random tokens; each row written as it was measured", "", *HEADER])
    results: list[Result] = []
    for shape in shapes:
        for checkpointing in _CHECKPOINTING.value:
            for contender in _CONTENDERS.value:
                result = run_one(contender, shape, checkpointing)
                emit([row(result, results, peak)])
                results.append(result)
    emit(["", *goals(results, peak), ""])


if __name__ == "__main__":
    app.run(main)

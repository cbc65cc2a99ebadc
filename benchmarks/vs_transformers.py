r"""phi4_jax's real train step against transformers' Phi3ForCausalLM, same shapes, one GPU;
and on CPU (`--cpu`) the data pipeline against raw tiktoken.

  python benchmarks/vs_transformers.py --write benchmarks/RESULTS_gpu.md     # on a GPU
  python benchmarks/vs_transformers.py --dry_run                             # CPU, ~2 min
  python benchmarks/vs_transformers.py --cpu --write benchmarks/RESULTS_cpu.md

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
    attention, fused AdamW with the size's lr, betas, eps, weight decay and clipping (so
    rows from the same initial weights end at nearly the same loss); `torch.compile` on the
    model for the first.
Every row holds one document of random tokens (torch's SDPA has no packed-document mask),
and phi4_jax still runs its packed attention path on it. Timing: `--warmup` steps (up to
SETTLE_STEPS more while a step still faults in new memory), then the median of `--steps`
steps, each synchronized. `--profile_dir` traces two more phi4_jax steps and writes their
costliest events there. Tokens/s counts every input position. MFU uses
one formula for all (`phi4_jax.train.flops`: 6N plus causal attention at half) over the
device's published dense bf16 peak. Peak memory: JAX's `peak_bytes_in_use`, torch's
`max_memory_allocated`. For phi4_jax the row also gives the start-up memory estimate over
XLA's `memory_analysis()` of the compiled step (arguments + outputs - aliased + temporaries).

`--dry_run` runs the same code on CPU at the tiny size (seq 64, batch 2, 2 steps), torch on
CPU, so the script itself is known to work where no GPU is at hand.

`--cpu` measures the pretraining pipeline's tokens/s (`pipeline.make_train_iterator`, rows
of 1024, batches of 8, after `--pipeline_warmup_tokens`) against tiktoken's `encode_ordinary_batch`
on the documents the timed pipeline read, on the same cores, for each of `--read_threads`
and `--read_processes` (worker processes per source, started during the warm-up).
Sources: `text`, a JSONL corpus of the standard library's `.py` files cut at blank lines into
documents of at least 1,500 characters (ready text, so the ratio is the pipeline's own
cost), and `synthetic+code`, the research sizes' mix (0.6 exercises generated in Python,
0.4 standard-library files). Measurements are interleaved, `--repeats` rounds of every
condition, so a busy shared machine slows all alike; each ratio is per round (the pipeline
over the faster raw run of the same round), given as median [min, max] with the load
average before and after. Then, at `CPU_SHAPES` (125m, seq 256 x 2, at Phi-4's vocabulary and
at 1,024), the train step of the three contenders in float32 without checkpointing, where
phi4_jax's worker writes its initial weights (Hugging Face format) and transformers starts
from them, each row giving its first loss; and greedy generation from those weights,
phi4_jax's KV-cache sampler against transformers' `generate`, with the new tokens compared.
On a CPU-only run every contender's process keeps the host memory it frees
(`phi4_jax.train.host_memory`, as the trainer does), so neither side's step pays for
faulting in memory it freed the step before; the first steps grow the heap (and a step
dispatched before the last one's scratch is freed can grow it again), hence `--warmup=4`
and the settling steps on CPU. The CPU runs recorded in RESULTS_cpu.md (pipeline ~12
minutes, step and generation ~20 on 2 cores):
  python benchmarks/vs_transformers.py --cpu --cpu_parts=pipeline --pipeline_tokens=2000000 \
      --repeats=5 --write=benchmarks/RESULTS_cpu.md
  python benchmarks/vs_transformers.py --cpu --cpu_parts=step,generate --step_rounds=3 \
      --steps=5 --warmup=4 --timeout=900 --write=benchmarks/RESULTS_cpu.md
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
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
# --cpu: float32 on both sides, one set of initial weights, 125m's geometry at its vocabulary
# and at a small one (the step's cost without the vocabulary's matmuls and softmax).
CPU_SHAPES = {"125m@256": ("125m", 256, 2), "125m-v1024@256": ("125m", 256, 2)}
VOCAB_OVERRIDES = {"125m-v1024@256": 1024}
# --cpu generation: greedy, random prompts, no stop token (every row decodes to the end).
GENERATORS = ("phi4_jax_generate", "torch_generate")
GENERATE_BATCH, GENERATE_PROMPT, GENERATE_NEW = 1, 64, 64
# Warm-up: at most this many extra steps while a step still faults in this much new memory.
SETTLE_STEPS, SETTLED_FAULT_BYTES = 3, 256 * 2**20
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
_CPU = flags.DEFINE_bool("cpu", False, "CPU comparison: the data pipeline against tiktoken, "
                         "then the train step at CPU_SHAPES.")
_INIT_DIR = flags.DEFINE_string("init_dir", "", "Internal: phi4_jax writes its initial weights "
                                "here (Hugging Face format), transformers starts from them.")
_READ_THREADS = flags.DEFINE_list("read_threads", ["0", "1", "2", "4"],
                                  "--cpu: data.read_threads values to time (2: the CPU sizes', "
                                  "4: data's default).")
_READ_PROCESSES = flags.DEFINE_list("read_processes", ["1", "2", "4"],
                                    "--cpu: data.read_processes values to time (per source).")
_PIPELINE_WARMUP_TOKENS = flags.DEFINE_integer(
    "pipeline_warmup_tokens", 2_000_000, "--cpu: tokens each pipeline run reads before its "
    "timed ones (read processes start up meanwhile).")
_PIPELINE_TOKENS = flags.DEFINE_integer("pipeline_tokens", 1_000_000,
                                        "--cpu: tokens timed per pipeline or tiktoken run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "--cpu: interleaved rounds of every pipeline "
                                "condition.")
_STEP_ROUNDS = flags.DEFINE_integer("step_rounds", 3, "--cpu: rounds of the three train-step "
                                    "contenders in turn at each shape; ratios within a round.")
_KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_host_memory", True, "On a CPU-only run, every contender's process keeps the host "
    "memory it frees (`phi4_jax.train.host_memory`, as the trainer does); off: glibc's default.")
_CPU_PARTS = flags.DEFINE_list("cpu_parts", ["pipeline", "step", "generate"],
                               "--cpu: which comparisons to run.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", "phi4_jax: after its timed steps, trace two more with jax.profiler and "
    "write the events that took the most time per step to DIR/ops_<shape>_<checkpointing>.md, "
    "the shape's @ as _ (the trace itself is deleted).")


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
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated, greedy


def _shape(name: str) -> tuple[str, int, int]:
    return {**SHAPES, **DRY_SHAPES, **CPU_SHAPES}[name]


def _model_cfg(name: str, checkpointing: str = "full"):
    """The model config of a shape: the size's, with the shape's vocabulary."""
    from phi4_jax.config_base import build_model_config  # pylint: disable=g-import-not-at-top
    cfg = build_model_config(_pretrain_config(name, checkpointing))
    if name in VOCAB_OVERRIDES:
        cfg = dataclasses.replace(cfg, vocab_size=VOCAB_OVERRIDES[name])
    return cfg


def _pretrain_config(name: str, checkpointing: str = "full"):
    """The size's pretraining config at the shape, as the trainer would load it, with
    `checkpointing` as its remat policy."""
    from phi4_jax import config_base  # pylint: disable=g-import-not-at-top
    size, seq_len, batch = _shape(name)
    config = config_base.load_config("configs/pretrain.py", size)
    config.train.update(seq_len=seq_len, global_batch=batch, microbatches=1, warmup_steps=0)
    config.model.max_positions = max(config.model.max_positions, seq_len)
    config.model.remat_policy = checkpointing
    if name in CPU_SHAPES:
        config.model.compute_dtype = "float32"
    return config


def _tokens(name: str, vocab: int):
    import numpy as np  # pylint: disable=g-import-not-at-top
    _, seq_len, batch = _shape(name)
    return np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1), np.int32)


def _timed_steps(step, sync) -> tuple[list[float], str]:
    """The `--steps` timed steps, and a note of their minor page faults and kernel CPU seconds
    per step and the peak RSS: what the process's host allocation costs
    (`phi4_jax.train.host_memory`)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = _timed(step, _STEPS.value, sync)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return times, (f"{(after.ru_minflt - before.ru_minflt) / len(times):,.0f} page faults and "
                   f"{(after.ru_stime - before.ru_stime) / len(times):.2f} kernel s per timed "
                   f"step, peak RSS {after.ru_maxrss / 2**20:.1f} GiB")


def _profile_table(step, sync, path: Path, steps: int = 2, top: int = 40) -> None:
    """Traces `steps` steps and writes the `top` events by time per step, with the
    process (host or device stream) each ran on, as a markdown table to `path`: where a
    device's step time goes, read off one run (on CPU, thunks overlap, so shares overstate)."""
    import collections  # pylint: disable=g-import-not-at-top
    import gzip  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        _timed(step, steps, sync)
        jax.profiler.stop_trace()
        with gzip.open(next(Path(trace_dir).rglob("*.trace.json.gz")), "rt") as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e["pid"]: e.get("args", {}).get("name", str(e["pid"])) for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    time_us, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            key = (process.get(e["pid"], str(e["pid"])), e["name"])
            time_us[key] += e["dur"]
            calls[key] += 1
    lines = ["| process | event | ms per step | calls per step |", "|---|---|---:|---:|"]
    lines += [f"| {where} | {name[:120]} | {us / steps / 1e3:.2f} | "
              f"{calls[where, name] / steps:g} |" for (where, name), us in time_us.most_common(top)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _warm_up(step, sync, count: int) -> int:
    """`count` untimed steps, then up to SETTLE_STEPS more while the last one still faulted in
    over SETTLED_FAULT_BYTES of new memory: a CPU process's kept heap (`train.host_memory`)
    grows over its first steps, at a cost per new page that depends on the machine, and the
    timed steps measure the settled process (`_timed_steps` notes what they still fault).
    Returns how many steps ran."""
    done, grew = 0, False
    while done < count or (grew and done < count + SETTLE_STEPS):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        _timed(step, 1, sync)
        faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        grew = faulted * resource.getpagesize() > SETTLED_FAULT_BYTES
        done += 1
    return done


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
    from phi4_jax.model import transformer  # pylint: disable=g-import-not-at-top
    from phi4_jax.parallel.sharding import logical_rules  # pylint: disable=g-import-not-at-top
    from phi4_jax.stages import evaluation  # pylint: disable=g-import-not-at-top
    from phi4_jax.train import loop, memory  # pylint: disable=g-import-not-at-top
    from phi4_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

    config = _pretrain_config(name, checkpointing)
    run = state_lib.build_run(config, jax.devices()[:1], model_cfg=_model_cfg(name, checkpointing))
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
        # before donation; written once per shape (later rounds start from the same seed)
        writes = _INIT_DIR.value and not Path(_INIT_DIR.value).exists()
        initial = jax.device_get(state.params) if writes else None
        batch = state_lib.to_global_batch(rows, run.batch_sharding)
        compiled = train_fn.lower(state, batch, None).compile()
        holder = {"state": state}

        def step():
            holder["state"], holder["metrics"] = compiled(holder["state"], batch, None)

        sync = lambda: jax.block_until_ready(holder["state"])  # noqa: E731
        _timed(step, 1, sync)
        first_loss = float(holder["metrics"]["loss"])
        warm = 1 + _warm_up(step, sync, _WARMUP.value - 1)
        times, host = _timed_steps(step, sync)
        loss, steps = float(holder["metrics"]["loss"]), warm + len(times)
        if _PROFILE_DIR.value:
            # letters, digits, '.', '_' and '-' only: names a GPU lease copies back
            table = f"ops_{name.replace('@', '_')}_{checkpointing}.md"
            _profile_table(step, sync, Path(_PROFILE_DIR.value) / table)
    if initial is not None:
        from flax import nnx  # pylint: disable=g-import-not-at-top
        from phi4_jax.interop import hf_checkpoint  # pylint: disable=g-import-not-at-top
        no_ids = hf_checkpoint.SpecialTokenIds(None, None, None)  # a vocabulary no release has
        hf_checkpoint.save_hf_checkpoint(nnx.State(initial), cfg, _INIT_DIR.value, dtype="float32",
                                         token_ids=no_ids if name in VOCAB_OVERRIDES else None)
    estimate = memory.estimate_train_memory(
        cfg, seq_len=t.seq_len, per_device_batch=t.global_batch, mesh_shape=dict(run.mesh.shape),
        loss_chunk_tokens=t.loss_chunk_tokens).total
    analysis = compiled.memory_analysis()
    compiled_bytes = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    stats = jax.devices()[0].memory_stats() or {}
    return Result("phi4_jax", name, checkpointing, times, stats.get("peak_bytes_in_use"),
                  notes=f"attention {cfg.attention_impl}, remat {cfg.remat_policy}, "
                        f"{transformer.scan_unroll(cfg)} layer(s) per loop iteration, first loss "
                        f"{first_loss:.5f}, loss {loss:.2f} at step {steps}; "
                        f"memory estimate / XLA analysis {estimate / compiled_bytes:.2f} "
                        f"({estimate / 2**30:.1f} / {compiled_bytes / 2**30:.1f} GiB); "
                        f"{warm} warm-up steps, {host}")


def run_transformers(name: str, compiled: bool, checkpointing: str) -> Result:
    """transformers' Phi3ForCausalLM: fp32 weights, bf16 autocast, SDPA, gradient
    checkpointing when `checkpointing` is `full`."""
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    from phi4_jax.interop.hf_checkpoint import hf_config_dict  # pylint: disable=g-import-not-at-top

    cfg = _model_cfg(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if _INIT_DIR.value:  # phi4_jax's initial weights
        model = transformers.Phi3ForCausalLM.from_pretrained(
            _INIT_DIR.value, dtype=torch.float32, attn_implementation="sdpa").to(device)
    else:
        hf_config = transformers.Phi3Config.from_dict(hf_config_dict(cfg))
        hf_config._attn_implementation = "sdpa"  # pylint: disable=protected-access
        with torch.device(device):  # initialize on the GPU: 2.4B parameters are slow on CPU
            model = transformers.Phi3ForCausalLM(hf_config)
    if checkpointing == "full":
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    # phi4_jax's optimizer settings for the size (its schedule is flat over so few steps;
    # weight decay here also reaches the norm scales, which phi4_jax leaves undecayed), so
    # from the same initial weights the two last losses should agree closely.
    train = _pretrain_config(name, checkpointing).train
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.b1, train.b2),
                                  eps=train.eps, weight_decay=train.weight_decay,
                                  fused=device == "cuda")
    forward = torch.compile(model) if compiled else model
    tokens = torch.from_numpy(_tokens(name, cfg.vocab_size).astype("int64")).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # phi4_jax's pairs: every input has a target
    autocast = cfg.compute_dtype == "bfloat16"
    losses = []

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = forward(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm = _warm_up(step, sync, _WARMUP.value)
    times, host = _timed_steps(step, sync)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    contender = "torch_compile" if compiled else "torch_eager"
    return Result(contender, name, checkpointing, times, peak,
                  notes=f"first loss {losses[0]:.5f}, loss {losses[-1]:.2f} at step "
                        f"{len(losses)}, {'bf16 autocast' if autocast else 'float32'}; "
                        f"torch {torch.__version__}, transformers {transformers.__version__}, "
                        f"{device}; {warm} warm-up steps, {host}")


def _prompts(name: str):
    import numpy as np  # pylint: disable=g-import-not-at-top
    vocab = _model_cfg(name).vocab_size
    return np.random.default_rng(1).integers(0, vocab, (GENERATE_BATCH, GENERATE_PROMPT), np.int32)


def generate_phi4_jax(name: str) -> Result:
    """Greedy KV-cache generation (`sampling.decode.compiled_generate`) from the initial weights
    in --init_dir; times the second call (the first compiles)."""
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from phi4_jax.interop.hf_checkpoint import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
    from phi4_jax.model.transformer import init_model  # pylint: disable=g-import-not-at-top
    from phi4_jax.sampling import decode  # pylint: disable=g-import-not-at-top

    cfg = _model_cfg(name)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg)))
    params = nnx.to_pure_dict(load_hf_checkpoint(_INIT_DIR.value, cfg))
    generate = decode.compiled_generate(
        graphdef, cfg, decode.SamplingParams(max_new_tokens=GENERATE_NEW, temperature=0.0))
    prompt = decode.left_pad(_prompts(name).tolist())
    keys = decode.row_keys(0, range(GENERATE_BATCH))
    times, out = [], None
    for _ in range(2):
        start = time.perf_counter()
        out = jax.block_until_ready(generate(params, prompt, keys))
        times.append(time.perf_counter() - start)
    return Result("phi4_jax_generate", name, "none", times[1:],
                  notes=f"compile + first call {times[0]:.1f} s",
                  tokens=[int(t) for t in jax.device_get(out.tokens)[0]])


def generate_torch(name: str) -> Result:
    """transformers' `generate` (greedy, its KV cache) from the initial weights in --init_dir;
    times the second call."""
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    model = transformers.Phi3ForCausalLM.from_pretrained(_INIT_DIR.value, dtype=torch.float32,
                                                         attn_implementation="sdpa").eval()
    prompt = torch.from_numpy(_prompts(name).astype("int64"))
    times, out = [], None
    for _ in range(2):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=GENERATE_NEW, min_new_tokens=GENERATE_NEW,
                                 eos_token_id=None, pad_token_id=0)
        times.append(time.perf_counter() - start)
    return Result("torch_generate", name, "none", times[1:],
                  notes=f"first call {times[0]:.1f} s; torch {torch.__version__}, "
                        f"transformers {transformers.__version__}",
                  tokens=[int(t) for t in out[0, GENERATE_PROMPT:]])


def worker(contender: str, name: str, checkpointing: str) -> None:
    """Runs one contender at one shape and prints its result as one JSON line. On a CPU-only
    run every contender's process keeps its freed host memory, as the trainer's does
    (`train.host_memory`; `--nokeep_host_memory`: none does): the same setting on both sides."""
    from phi4_jax.train import host_memory  # pylint: disable=g-import-not-at-top

    if _KEEP_HOST_MEMORY.value:
        host_memory.keep_freed_memory()
    try:
        if contender == "phi4_jax":
            result = run_phi4_jax(name, checkpointing)
        elif contender == "phi4_jax_generate":
            result = generate_phi4_jax(name)
        elif contender == "torch_generate":
            result = generate_torch(name)
        else:
            result = run_transformers(name, contender == "torch_compile", checkpointing)
    except Exception as error:  # pylint: disable=broad-except  # reported in the table
        result = Result(contender, name, checkpointing,
                        error=f"{type(error).__name__}: {error}"[:300])
    print("RESULT " + json.dumps(dataclasses.asdict(result)), flush=True)


# --- the table -------------------------------------------------------------------------------

def run_one(contender: str, name: str, checkpointing: str, init_dir: str = "") -> Result:
    """`worker` in a fresh process, bounded by --timeout; with `init_dir`, phi4_jax writes its
    initial weights there and transformers starts from them."""
    command = [sys.executable, __file__, f"--worker={contender}", f"--shapes={name}",
               f"--checkpointing={checkpointing}", f"--steps={_STEPS.value}",
               f"--warmup={_WARMUP.value}", f"--init_dir={init_dir}",
               f"--keep_host_memory={_KEEP_HOST_MEMORY.value}",
               f"--profile_dir={_PROFILE_DIR.value}"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if _DRY_RUN.value or _CPU.value:
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
    from phi4_jax.train import flops  # pylint: disable=g-import-not-at-top

    r = result
    rate = tokens_per_s(r)
    if rate is None:
        return (f"| {r.shape} | {r.checkpointing} | {r.contender} | - | - | - | - | - | "
                f"failed: {r.error} |")
    mfu = flops.mfu(rate, _model_cfg(r.shape), _shape(r.shape)[1], peak)
    base = next((tokens_per_s(e) for e in [*earlier, r] if e.contender == "torch_compile"
                 and (e.shape, e.checkpointing) == (r.shape, r.checkpointing)), None)
    return (f"| {r.shape} | {r.checkpointing} | {r.contender} | "
            f"{statistics.median(r.step_s):.3f} | {rate:,.0f} | "
            f"{'n/a' if mfu is None else f'{mfu:.1%}'} | "
            f"{'' if base is None else f'{rate / base:.2f}'} | "
            f"{'n/a' if r.peak_bytes is None else f'{r.peak_bytes / 2**30:.1f}'} | {r.notes} |")


def goals(results: list[Result], peak: float | None) -> list[str]:
    """The issue's goals, per checkpointing setting measured on both sides."""
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
        mfu = flops.mfu(rate, _model_cfg(shape), _shape(shape)[1], peak)
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


# --- CPU: the data pipeline against raw tiktoken ----------------------------------------------

PIPELINE_SEQ_LEN, PIPELINE_BATCH = 1024, 8
CORPUS_MIN_CHARS = 1500


def write_corpus(path: Path) -> int:
    """The `text` source: the standard library's `.py` files cut at blank lines into documents
    of at least `CORPUS_MIN_CHARS` characters, one JSON line each; returns their count."""
    from phi4_jax.data import sources  # pylint: disable=g-import-not-at-top
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for name in sources.stdlib_python_files():
            piece = ""
            for paragraph in Path(name).read_text(encoding="utf-8", errors="replace").split("\n\n"):
                piece += paragraph + "\n\n"
                if len(piece) >= CORPUS_MIN_CHARS:
                    out.write(json.dumps({"text": piece}) + "\n")
                    piece, count = "", count + 1
            if piece:
                out.write(json.dumps({"text": piece}) + "\n")
                count += 1
    return count


def pipeline_sources(corpus: Path) -> dict[str, tuple[dict, dict]]:
    """name -> (data.sources, data.mix) of each pipeline measured."""
    text = {"kind": "jsonl", "paths": str(corpus), "text_key": "text"}
    mix = {"synthetic": {"kind": "synthetic"}, "code": {"kind": "python_stdlib"}}
    return {"text": ({"text": text}, {"text": 1.0}),
            "synthetic+code": (mix, {"synthetic": 0.6, "code": 0.4})}


def data_config(specs: dict, mix: dict, read_threads: int) -> dict:
    from phi4_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return {**pipeline.DATA_DEFAULTS, "sources": specs, "mix": mix, "read_threads": read_threads}


def pipeline_rate(cfg: dict, tokens: int) -> float:
    """Tokens/s of the pipeline's batches after the warm-up batches (enough to cover read
    processes' start-up)."""
    from phi4_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    iterator = pipeline.make_train_iterator(cfg, seq_len=PIPELINE_SEQ_LEN, batch_size=PIPELINE_BATCH)
    for _ in range(warmup_batches()):
        next(iterator)
    batches = max(1, tokens // (PIPELINE_SEQ_LEN * PIPELINE_BATCH))
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
    return batches * PIPELINE_SEQ_LEN * PIPELINE_BATCH / seconds


def warmup_batches() -> int:
    return max(2, _PIPELINE_WARMUP_TOKENS.value // (PIPELINE_SEQ_LEN * PIPELINE_BATCH))


def timed_ranges(cfg: dict, tokens: int) -> dict[str, tuple[int, int]]:
    """Per source, the [first, last) positions in its read order of the documents a timed
    pipeline run reads after its warm-up (each source up to its share of the tokens)."""
    from phi4_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
    encoding = load_tokenizer("phi4").encoding
    warmup = warmup_batches() * PIPELINE_SEQ_LEN * PIPELINE_BATCH
    total = sum(cfg["mix"].values())
    ranges = {}
    for name, weight in cfg["mix"].items():
        ordered = _ordered_documents(cfg, name)
        read, index, first = 0, 0, None
        while read < weight / total * (warmup + tokens):
            if first is None and read >= weight / total * warmup:
                first = index
            read += len(encoding.encode_ordinary(ordered[index])) + 1
            index += 1
        ranges[name] = (index if first is None else first, index)
    return ranges


def _ordered_documents(cfg: dict, name: str):
    from phi4_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.shard_documents(name, cfg, split="train", process_index=0, process_count=1)


def make_documents(cfg: dict, ranges: dict[str, tuple[int, int]]) -> list[str]:
    """The documents in `ranges`, made as the pipeline makes them (exercises generated, files
    and lines read)."""
    documents = []
    for name, (first, last) in ranges.items():
        ordered = _ordered_documents(cfg, name)
        documents += [ordered[index] for index in range(first, last)]
    return documents


def make_and_encode_rate(cfg: dict, ranges: dict[str, tuple[int, int]]) -> float:
    """Tokens/s of making the documents and encoding them on one thread: the work the
    pipeline cannot skip."""
    start = time.perf_counter()
    documents = make_documents(cfg, ranges)
    seconds = time.perf_counter() - start
    return tiktoken_rate(documents, 1, extra_seconds=seconds)


def tiktoken_rate(documents: list[str], num_threads: int, extra_seconds: float = 0.0) -> float:
    """Tokens/s (end tokens counted, as the pipeline's rows hold them) of tiktoken's
    `encode_ordinary_batch` on ready documents, `extra_seconds` added to its time."""
    from phi4_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
    encoding = load_tokenizer("phi4").encoding
    start = time.perf_counter()
    encoded = encoding.encode_ordinary_batch(documents, num_threads=num_threads)
    seconds = time.perf_counter() - start + extra_seconds
    return sum(len(ids) + 1 for ids in encoded) / seconds


def spread(values: list[float], digits: int = 2) -> str:
    """'median [min, max]'."""
    return (f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, "
            f"{max(values):.{digits}f}]")


def pipeline_table(name: str, specs: dict, mix: dict) -> list[str]:
    """One source's interleaved rounds: raw tiktoken on 1 and all cores, then the pipeline at
    each read-thread and read-process count; rates, per-round ratios to the round's faster
    raw run, and each count's per-round ratio to the count before it (does one more reader
    ever slow it down?)."""
    from phi4_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    readers = ([("read_threads", int(t)) for t in _READ_THREADS.value]
               + [("read_processes", int(p)) for p in _READ_PROCESSES.value])
    cores = len(os.sched_getaffinity(0))
    tokens = _PIPELINE_TOKENS.value
    cfg = data_config(specs, mix, 0)
    ranges = timed_ranges(cfg, tokens)
    documents = make_documents(cfg, ranges)
    raw_threads = sorted({1, cores})
    rates = {("raw", t): [] for t in raw_threads} | {reader: [] for reader in readers}
    rates["made", 1] = []
    ratios = {reader: [] for reader in readers}
    to_made = {reader: [] for reader in readers}
    load_before = os.getloadavg()[0]
    for _ in range(_REPEATS.value):
        for t in raw_threads:
            rates["raw", t].append(tiktoken_rate(documents, t))
        rates["made", 1].append(make_and_encode_rate(cfg, ranges))
        best_raw = max(rates["raw", t][-1] for t in raw_threads)
        for reader in readers:  # (data key, value): the one setting that differs from cfg
            rates[reader].append(pipeline_rate({**cfg, reader[0]: reader[1]}, tokens))
            ratios[reader].append(rates[reader][-1] / best_raw)
            to_made[reader].append(rates[reader][-1] / rates["made", 1][-1])
    lines = [f"### {name}: {len(documents):,} documents timed, load average {load_before:.2f} "
             f"before, {os.getloadavg()[0]:.2f} after", "",
             "| run | tokens/s, median [min, max] | / raw tiktoken (same round) | "
             "/ make + tiktoken (same round) | / the count before (same round) |",
             "|---|---:|---:|---:|---:|"]
    for t in raw_threads:
        values = [v / 1e6 for v in rates["raw", t]]
        lines.append(f"| raw `encode_ordinary_batch`, {t} thread(s) | {spread(values)}M | | | |")
    values = [v / 1e6 for v in rates["made", 1]]
    lines.append(f"| make the documents + `encode_ordinary_batch`, 1 thread | {spread(values)}M "
                 f"| | | |")
    for before, reader in zip([None, *readers], readers):
        values = [v / 1e6 for v in rates[reader]]
        step = ""
        if before is not None and before[0] == reader[0]:
            step = f"{spread([a / b for a, b in zip(rates[reader], rates[before])])} (vs {before[1]})"
        used = pipeline.readers({reader[0]: reader[1]}, reader[0])
        label = f"{reader[0]}={reader[1]}" + (f" ({used} used)" if used != reader[1] else "")
        lines.append(f"| pipeline, {label} | {spread(values)}M | "
                     f"{spread(ratios[reader])} | {spread(to_made[reader])} | {step} |")
    return [*lines, ""]


def run_cpu() -> None:
    """`--cpu`: the pipeline against raw tiktoken (a table per source), the train step and
    greedy generation against transformers (`--cpu_parts` picks)."""
    import tempfile  # pylint: disable=g-import-not-at-top
    import tiktoken  # pylint: disable=g-import-not-at-top
    import grain  # pylint: disable=g-import-not-at-top
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    emit([f"## CPU run of {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}", "",
          f"- machine: {model}, {len(os.sched_getaffinity(0))} cores usable (shared with other "
          f"work: timings are noisy, hence interleaved rounds and the load average); "
          f"{platform.platform()}; Python {platform.python_version()}",
          f"- versions: {versions()}, grain {grain.__version__}, tiktoken {tiktoken.__version__}",
          f"- command: `python {' '.join(sys.argv)}`",
          *([f"- pipeline: rows of {PIPELINE_SEQ_LEN}, batches of {PIPELINE_BATCH}, "
             f"{_PIPELINE_TOKENS.value:,} tokens per run after {warmup_batches()} warm-up "
             f"batches, {_REPEATS.value} interleaved rounds"]
            if "pipeline" in _CPU_PARTS.value else []), ""])
    if "pipeline" in _CPU_PARTS.value:
        with tempfile.TemporaryDirectory() as directory:
            corpus = Path(directory) / "stdlib_pieces.jsonl"
            write_corpus(corpus)
            for name, (specs, mix) in pipeline_sources(corpus).items():
                emit(pipeline_table(name, specs, mix))
    with tempfile.TemporaryDirectory() as directory:
        init_dirs = {shape: str(Path(directory) / shape) for shape in CPU_SHAPES}
        if "step" in _CPU_PARTS.value:
            train_step_tables(init_dirs)
        if "generate" in _CPU_PARTS.value:
            generated = []
            for shape in CPU_SHAPES:
                if not Path(init_dirs[shape]).exists():  # no step run wrote the weights yet
                    run_one("phi4_jax", shape, "none", init_dirs[shape])
                generated += [run_one(c, shape, "none", init_dirs[shape]) for c in GENERATORS]
            emit(generation_table(generated))


STEP_CONTENDERS = ("phi4_jax", "torch_eager", "torch_compile")


def train_step_tables(init_dirs: dict[str, str]) -> None:
    """The train step at each of CPU_SHAPES, no checkpointing: `--step_rounds` rounds, each
    running the three contenders in turn at every shape (phi4_jax first: it writes the initial
    weights transformers starts from), so a busy machine slows all of a round alike; the
    ratios are taken within each round."""
    emit([f"### Train step, float32, {_WARMUP.value} untimed step(s) then the median of "
          f"{_STEPS.value}, {_STEP_ROUNDS.value} interleaved rounds; load average "
          f"{os.getloadavg()[0]:.2f} before", "", *HEADER])
    results: list[Result] = []
    for _ in range(_STEP_ROUNDS.value):
        for shape in CPU_SHAPES:
            for contender in STEP_CONTENDERS:
                result = run_one(contender, shape, "none", init_dirs[shape])
                emit([row(result, [], None)])
                results.append(result)
    emit(["", *step_ratio_table(results), f"- load average after: {os.getloadavg()[0]:.2f}", ""])


def step_ratio_table(results: list[Result]) -> list[str]:
    """phi4_jax's tokens/s over each transformers contender's, per round, as median
    [min, max] over the rounds, with every contender's median step time."""
    lines = ["| shape | phi4_jax / torch eager | phi4_jax / torch.compile | median step s "
             "(phi4_jax / eager / compile) |", "|---|---:|---:|---|"]
    for shape in CPU_SHAPES:
        rounds = [results[i:i + len(STEP_CONTENDERS)] for i in range(0, len(results),
                                                                   len(STEP_CONTENDERS))]
        rounds = [{r.contender: tokens_per_s(r) for r in group} for group in rounds
                  if group[0].shape == shape]
        ratios = {other: [r["phi4_jax"] / r[other] for r in rounds
                          if r.get("phi4_jax") and r.get(other)]
                  for other in STEP_CONTENDERS[1:]}
        steps = [statistics.median([s for r in results if r.shape == shape and r.contender == c
                                    and not r.error for s in r.step_s] or [float("nan")])
                 for c in STEP_CONTENDERS]
        lines.append(f"| {shape} | {spread(ratios['torch_eager']) if ratios['torch_eager'] else '-'}"
                     f" | {spread(ratios['torch_compile']) if ratios['torch_compile'] else '-'} | "
                     + " / ".join(f"{s:.2f}" for s in steps) + " |")
    return lines


def generation_table(results: list[Result]) -> list[str]:
    """Greedy generation rows: time, new tokens/s, the ratio to transformers' `generate` and
    how many of the new tokens equal phi4_jax's."""
    lines = [f"### Greedy generation, batch {GENERATE_BATCH}, {GENERATE_PROMPT} prompt tokens, "
             f"{GENERATE_NEW} new tokens, float32, the same initial weights; the second call timed",
             "", "| shape | contender | seconds | new tokens/s | vs transformers | tokens equal to "
             "phi4_jax's | notes |", "|---|---|---:|---:|---:|---:|---|"]
    by = {(r.shape, r.contender): r for r in results}
    for r in results:
        if r.error or not r.step_s:
            lines.append(f"| {r.shape} | {r.contender} | - | - | - | - | failed: {r.error} |")
            continue
        base = by.get((r.shape, "torch_generate"))
        ours = by.get((r.shape, "phi4_jax_generate"))
        ratio = (f"{base.step_s[0] / r.step_s[0]:.2f}" if base and base.step_s else "")
        equal = (f"{sum(a == b for a, b in zip(r.tokens, ours.tokens))}/{len(r.tokens)}"
                 if ours and ours.tokens else "")
        lines.append(f"| {r.shape} | {r.contender} | {r.step_s[0]:.2f} | "
                     f"{GENERATE_BATCH * GENERATE_NEW / r.step_s[0]:.1f} | {ratio} | {equal} | "
                     f"{r.notes} |")
    return [*lines, f"- load average after: {os.getloadavg()[0]:.2f}", ""]


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
    if _CPU.value:
        run_cpu()
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

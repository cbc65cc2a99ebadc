"""The pretraining loop: the side effects (data, metrics, checkpoints, signals) around the pure step.

Order of start-up, cheapest check first: config -> mesh -> memory estimate -> data sources
-> sharded state (shape evaluation -> shardings -> jitted init, never gathered on one
device) -> resume from the newest complete checkpoint -> train.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi4_jax.train import flops
from phi4_jax.train import memory
from phi4_jax.train.checkpoint import Checkpointer
from phi4_jax.config_base import ConfigError, validate_config
from phi4_jax.data import mixture, pipeline
from phi4_jax.train.metrics import MetricsWriter
from phi4_jax.model.transformer import init_model
from phi4_jax.model.config import ModelConfig
from phi4_jax.train.optimizer import learning_rate_schedule, make_optimizer
from phi4_jax.parallel.sharding import logical_rules, logical_to_spec, make_mesh, state_shardings
from phi4_jax.train.step import TrainState, eval_step, init_train_state, train_step


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint was left as it was."""


@dataclasses.dataclass
class Run:
    """What start-up builds once and the loop uses."""

    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    mesh: Mesh
    rules: tuple
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    state_shardings: Any
    abstract_state: TrainState  # shapes, dtypes and target shardings, for restoring
    batch_sharding: NamedSharding


# --- start-up ----------------------------------------------------------------------------

def check_batch_layout(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch must split evenly over hosts, microbatches and batch-sharded devices."""
    t = config.train
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.global_batch % (t.microbatches * batch_devices):
        raise ConfigError(
            f"train.global_batch={t.global_batch} does not split into train.microbatches="
            f"{t.microbatches} x {batch_devices} batch-sharded devices (mesh data*fsdp); make "
            f"global_batch a multiple of {t.microbatches * batch_devices}.")
    if t.global_batch % jax.process_count():
        raise ConfigError(f"train.global_batch={t.global_batch} must be a multiple of the "
                          f"{jax.process_count()} hosts.")


def check_memory(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh) -> None:
    """Refuses, before compiling, a run whose estimated per-device memory cannot fit."""
    if not config.memory.check:
        return
    t = config.train
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    estimate = memory.estimate_train_memory(
        model_cfg, seq_len=t.seq_len, per_device_batch=t.global_batch // t.microbatches
        // batch_devices, mesh_shape=dict(mesh.shape), microbatches=t.microbatches)
    capacity = config.memory.device_bytes or memory.device_memory_bytes(jax.local_devices()[0])
    logging.info("Estimated per-device memory:\n%s", estimate.describe())
    if capacity:
        memory.check_fits(estimate, capacity, context=f"{model_cfg.name} on {mesh.devices.size} "
                          f"{jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}")


def build_run(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Run:
    """Validates everything that can be checked without allocating, then plans shardings."""
    model_cfg = validate_config(config)
    mesh = make_mesh({axis: config.mesh[axis] for axis in ("data", "fsdp", "tensor")}, devices)
    check_batch_layout(config, mesh)
    check_memory(config, model_cfg, mesh)
    try:
        pipeline.validate_data_config(config.data)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error
    rules = tuple(tuple(rule) for rule in config.mesh.rules)
    abstract_model = nnx.eval_shape(lambda: init_model(model_cfg, config.seed))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = nnx.to_pure_dict(state_shardings(abstract_params, mesh, rules))
    optimizer = make_optimizer(config.train, nnx.to_pure_dict(abstract_params))
    shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer),
                            nnx.to_pure_dict(abstract_params))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, shapes.opt_state, param_shardings,
        transform_non_params=lambda _: replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", None), rules))
    return Run(config, model_cfg, mesh, rules, graphdef, optimizer, shardings, abstract_state,
               batch_sharding)


def init_state(run: Run) -> TrainState:
    """Creates parameters and optimizer state directly in their shards."""
    def init() -> TrainState:
        params = nnx.to_pure_dict(nnx.state(init_model(run.model_cfg, run.config.seed)))
        return init_train_state(params, run.optimizer)

    with jax.set_mesh(run.mesh):
        return jax.jit(init, out_shardings=run.state_shardings)()


def compile_steps(run: Run):
    """The jitted train step (state donated) and eval step, with explicit shardings."""
    t = run.config.train
    replicated = NamedSharding(run.mesh, PartitionSpec())
    step = functools.partial(train_step, graphdef=run.graphdef, optimizer=run.optimizer,
                             schedule=learning_rate_schedule(t), microbatches=t.microbatches)
    train = jax.jit(step, in_shardings=(run.state_shardings, run.batch_sharding),
                    out_shardings=(run.state_shardings, replicated), donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, graphdef=run.graphdef),
                       in_shardings=(run.state_shardings.params, run.batch_sharding),
                       out_shardings=replicated)
    return train, evaluate


def to_global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each host's rows into one batch-sharded global array per field."""
    def assemble(x: np.ndarray) -> jax.Array:
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return {key: assemble(value) for key, value in local.items()}


# --- the loop ----------------------------------------------------------------------------

class _StopSignal:
    """Turns SIGTERM (preemption) into a flag the loop checks between steps.

    Single-process only: on multi-host runs JAX's preemption service catches SIGTERM itself
    and `reached_preemption` agrees on one step for every host, which a per-host flag cannot
    (and a Python handler would displace the service's own).
    """

    def __init__(self):
        self.received = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting.")
        self.received = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _to_host(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {key: float(value) for key, value in jax.device_get(metrics).items()}


def _check_finite(metrics: dict[str, float], step: int, checkpointer: Checkpointer) -> None:
    if not math.isfinite(metrics["loss"]):
        checkpointer.wait()
        raise TrainingDivergedError(
            f"loss is {metrics['loss']} at step {step}; stopping without saving. The newest "
            f"checkpoint ({checkpointer.latest_step()}) is intact: lower train.lr, raise "
            f"train.warmup_steps or check the data, then resume.")


def _throughput(run: Run, steps: int, seconds: float) -> dict[str, float]:
    t = run.config.train
    tokens_per_second = steps * t.global_batch * t.seq_len / seconds
    per_device = tokens_per_second / run.mesh.devices.size
    peak = flops.peak_flops(jax.devices()[0].device_kind)
    stats = {"step_time_s": seconds / steps, "tokens_per_s": tokens_per_second,
             "tokens_per_s_per_device": per_device}
    utilization = flops.mfu(per_device, run.model_cfg, t.seq_len, peak)
    if utilization is not None:
        stats["mfu"] = utilization
    return stats


def evaluate(run: Run, eval_fn, params, eval_batches) -> dict[str, float]:
    totals = [eval_fn(params, batch) for batch in eval_batches]
    loss_sum = sum(float(t["loss_sum"]) for t in totals)
    tokens = sum(float(t["tokens"]) for t in totals)
    return {"eval_loss": loss_sum / max(tokens, 1.0), "eval_tokens": tokens}


def _restore_or_init(run: Run, checkpointer: Checkpointer, data_iter) -> TrainState:
    latest = checkpointer.latest_step()
    if latest is None:
        return init_state(run)
    logging.info("Resuming from the checkpoint at step %d.", latest)
    state, meta = checkpointer.restore(latest, run.abstract_state, data_iter)
    if meta.get("seed") != run.config.seed:
        logging.warning("Checkpoint seed %s differs from config seed %s.", meta.get("seed"),
                        run.config.seed)
    return state


def train(config: ml_collections.ConfigDict, workdir: str,
          stop_at_step: int | None = None) -> list[dict[str, float]]:
    """Runs pretraining to `train.steps` (or to `stop_at_step`, checkpointing there), resuming
    if `workdir` has checkpoints; returns the logged metrics, one dict per log step."""
    run = build_run(config)
    t = config.train
    logging.info("Mixture:\n%s", mixture.mixture_report(
        config.data, total_tokens=t.steps * t.global_batch * t.seq_len))
    data_kwargs = dict(seq_len=t.seq_len, batch_size=t.global_batch // jax.process_count(),
                       process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = pipeline.make_train_iterator(config.data, **data_kwargs)
    eval_batches = [to_global_batch(b, run.batch_sharding) for b in pipeline.make_eval_batches(
        config.data, num_batches=config.eval.batches, **data_kwargs)]
    checkpointer = Checkpointer(f"{workdir}/checkpoints", keep=config.checkpoint.keep,
                                every_steps=config.checkpoint.every_steps,
                                async_save=config.checkpoint.async_save)
    state = _restore_or_init(run, checkpointer, data_iter)
    writer = MetricsWriter(workdir, enabled=config.log.tensorboard,
                           progress=config.log.progress_bar, total_steps=t.steps)
    stop = _StopSignal()
    try:
        with jax.set_mesh(run.mesh), logical_rules(run.rules):
            train_fn, eval_fn = compile_steps(run)
            return _loop(run, state, data_iter, eval_batches, train_fn, eval_fn, checkpointer,
                         writer, stop, stop_at_step or config.train.steps)
    finally:
        stop.restore()
        writer.close()
        checkpointer.wait()
        checkpointer.close()
        data_iter.close()


def _loop(run, state, data_iter, eval_batches, train_fn, eval_fn, checkpointer, writer, stop,
          last_step):
    config = run.config
    meta = {"seed": config.seed, "data_seed": config.data.seed}
    step = int(state.step)
    pending, history = None, []
    window_start, window_steps = time.perf_counter(), 0
    while step < min(last_step, config.train.steps):
        batch = to_global_batch(next(data_iter), run.batch_sharding)
        state, metrics = train_fn(state, batch)
        if pending is not None:  # read the previous step's metrics while this one runs
            _check_finite(_to_host(pending), step, checkpointer)
        pending, step, window_steps = metrics, step + 1, window_steps + 1
        writer.advance(step)
        if step % config.log.every_steps == 0 or step == config.train.steps:
            logged = _to_host(pending)
            _check_finite(logged, step, checkpointer)
            logged.update(_throughput(run, window_steps, time.perf_counter() - window_start))
            writer.write(step, logged)
            history.append({"step": step, **logged})
            window_start, window_steps = time.perf_counter(), 0
        if step % config.eval.every_steps == 0 or step == config.train.steps:
            scores = evaluate(run, eval_fn, state.params, eval_batches)
            writer.write(step, scores)
            history.append({"step": step, **scores})
        preempted = stop.received or checkpointer.reached_preemption(step)
        final = step >= min(last_step, config.train.steps)
        if preempted or final or checkpointer.should_save(step):
            _check_finite(_to_host(pending), step, checkpointer)  # never save a NaN state
            checkpointer.save(step, state, data_iter, meta, force=preempted or final)
        if preempted:
            logging.warning("Stopped at step %d for preemption; checkpoint saved.", step)
            break
    return history

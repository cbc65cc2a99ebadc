"""The one training loop every stage runs: the side effects (data, metrics, checkpoints,
signals) around the pure step, with the stage's loss, batches and frozen state plugged in.

Start-up, cheapest check first: workdir -> config (the shared keys, then the stage's own
sections as its builder builds it) -> mesh -> memory estimate (with the stage's frozen
state) -> abstract state and shardings -> the data config and its files -> the workdir's
checkpoints checked (a finished run stops here) -> initial checkpoint located and checked
(metadata only) -> frozen state and data -> the state, restored from the newest intact checkpoint of the workdir, else from
`init_from`'s parameters, else freshly initialized, always in its shards -> train.

With LoRA the step trains the adapters alone and reads the backbone as frozen input: the
step's `frozen` is (backbone, the stage's frozen state) and the stage's loss, evaluation and
batch preparation see the whole model's parameters, joined (`Run.model_params`).
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from phi4_jax import config_base
from phi4_jax.data import bad_records, length_filter, pipeline
from phi4_jax.errors import Phi4Error
from phi4_jax.model import config as model_config, lora
from phi4_jax.model.config import ModelConfig
from phi4_jax.parallel.sharding import logical_rules
from phi4_jax.train import flops, initial_params, workdir as workdir_lib
from phi4_jax.train.checkpoint import Checkpointer, saved_meta
from phi4_jax.train.metrics import MetricsWriter
from phi4_jax.train.optimizer import learning_rate_schedule
from phi4_jax.train.stage import DataShard, Rows, Stage
from phi4_jax.train.state import (Run, build_run, init_adapters, init_params, init_state,
                                  split_trained, to_global_batch)
from phi4_jax.train.step import TrainState, eval_step, train_step


class TrainingDivergedError(Phi4Error, RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint was left as it was."""


def compile_steps(run: Run, loss_fn, frozen: Any):
    """The jitted train step (state donated) and eval step of a stage's loss, with explicit
    shardings."""
    t = run.config.train
    replicated = NamedSharding(run.mesh, PartitionSpec())
    if run.model_cfg.lora:
        loss_fn = _with_backbone(loss_fn)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    step = functools.partial(train_step, loss_fn=loss_fn, optimizer=run.optimizer,
                             schedule=learning_rate_schedule(t), microbatches=t.microbatches)
    train = jax.jit(step, in_shardings=(run.state_shardings, run.batch_sharding, frozen_shardings),
                    out_shardings=(run.state_shardings, replicated), donate_argnums=0)
    evaluate_fn = jax.jit(functools.partial(eval_step, loss_fn=loss_fn),
                          in_shardings=(run.state_shardings.params, run.batch_sharding,
                                        frozen_shardings),
                          out_shardings=replicated)
    return train, evaluate_fn


def _with_backbone(loss_fn):
    """The stage's loss of the whole model as a function of the adapters: the step's `frozen`
    is (backbone, the stage's frozen state), so gradients and updates reach adapters only."""
    def loss(adapters, batch, frozen):
        backbone, stage_frozen = frozen
        return loss_fn(lora.join(adapters, backbone), batch, stage_frozen)
    return loss


def step_frozen(run: Run, backbone: Any, stage_frozen: Any) -> Any:
    """What the jitted step reads besides the trained parameters."""
    return (backbone, stage_frozen) if run.model_cfg.lora else stage_frozen


class _StopSignal:
    """Turns SIGTERM (preemption) and Ctrl-C (SIGINT) into a flag the loop checks between
    steps: it saves a checkpoint and exits cleanly. A second Ctrl-C aborts at once
    (KeyboardInterrupt, nothing more saved). The handler only sets the flag: the loop logs,
    since a handler that logs can interrupt the log file's own write and re-enter it.

    Single-process only: on multi-host runs JAX's preemption service catches SIGTERM itself
    and `reached_preemption` agrees on one step for every host, which a per-host flag cannot
    (and a Python handler would displace the service's own); Ctrl-C there aborts.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = ""  # the signal's name once one arrived
        self._previous = {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _to_host(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {key: float(value) for key, value in jax.device_get(metrics).items()}


def _check_finite(metrics: dict[str, float], step: int, checkpointer: Checkpointer) -> None:
    if not math.isfinite(metrics["loss"]):
        checkpointer.wait()
        raise TrainingDivergedError(
            f"loss is {metrics['loss']} at step {step}; stopping without saving. "
            f"{checkpointer.latest_verdict()}: lower train.lr, raise train.warmup_steps or "
            f"check the data, then resume.")


def _throughput(run: Run, tokens_per_step: int, steps: int, seconds: float) -> dict[str, float]:
    tokens_per_second = steps * tokens_per_step / seconds
    per_device = tokens_per_second / run.mesh.devices.size
    peak = flops.peak_flops(jax.devices()[0].device_kind)
    stats = {"step_time_s": seconds / steps, "tokens_per_s": tokens_per_second,
             "tokens_per_s_per_device": per_device}
    utilization = flops.mfu(per_device, run.model_cfg, run.config.train.seq_len, peak)
    if utilization is not None:
        stats["mfu"] = utilization
    return stats


def evaluate(eval_fn, params, frozen, eval_batches) -> dict[str, float]:
    """Held-out sums over all eval batches, divided once: `eval_loss` and each metric."""
    if not eval_batches:
        return {}
    totals = {}
    for batch in eval_batches:
        for key, value in _to_host(eval_fn(params, batch, frozen)).items():
            totals[key] = totals.get(key, 0.0) + value
    units = max(totals.pop("units"), 1.0)
    loss = totals.pop("loss_sum") / units
    return {"eval_loss": loss, "eval_units": units,
            **{f"eval_{key}": value / units for key, value in totals.items()}}


def _initial_params_loader(run: Run, stage_name: str,
                           source: initial_params.InitialCheckpoint | None):
    """Checks `init_from`'s checkpoint now (metadata only); returns a loader of its parameters
    (freshly initialized ones when there is none), each call giving new buffers."""
    if source is None:
        return lambda: init_params(run)
    initial_params.check(source, run.abstract_backbone, run.model_cfg)
    logging.info("%s starts from %s checkpoint %s.", stage_name, source.kind, source.path)
    if run.model_cfg.lora:  # the checkpoint is the backbone; fresh adapters beside it
        return lambda: lora.join(init_adapters(run), initial_params.load(
            source, run.abstract_backbone, run.model_cfg))
    return lambda: initial_params.load(source, run.abstract_params, run.model_cfg)


def _restore_or_init(run: Run, checkpointer: Checkpointer, data_iter,
                     load_initial) -> tuple[TrainState, Any]:
    """The train state and the frozen LoRA backbone (None without LoRA); the starting
    parameters are loaded only for a fresh start or for the backbone."""
    latest = checkpointer.latest_step()
    initial = load_initial() if latest is None or run.model_cfg.lora else None
    trained, backbone = split_trained(run, initial) if initial is not None else (None, None)
    if latest is None:
        return init_state(run, trained), backbone
    logging.info("Resuming from the checkpoint at step %d.", latest)
    state, meta = checkpointer.restore(latest, run.abstract_state, data_iter)
    if meta.get("seed") != run.config.seed:
        logging.warning("Checkpoint seed %s differs from config seed %s.", meta.get("seed"),
                        run.config.seed)
    return state, backbone


def _finished(checkpointer: Checkpointer, workdir: str, steps: int) -> bool:
    """True, with one line saying how to go on, when the workdir's run reached `steps` or
    stopped early (eval.stop_at_accuracy)."""
    latest = checkpointer.latest_step()
    if latest is None:
        return False
    if latest < steps:
        meta = saved_meta(f"{checkpointer.directory}/{latest}")
        if "stopped_at_accuracy" not in meta:
            return False
        logging.warning("The run in %s is finished: it stopped early at step %d, where accuracy "
                        "%.4g reached eval.stop_at_accuracy. To go on from there, start a run "
                        "in another --workdir with --config.init_from=%s.", workdir, latest,
                        meta["stopped_at_accuracy"], workdir)
        return True
    logging.warning("The run in %s is finished: its newest checkpoint is at step %d of "
                    "train.steps=%d. To train on, run again with --config.train.steps=N for some "
                    "N > %d; to start over, choose another --workdir.", workdir, latest, steps,
                    latest)
    return True


def _summary(history: list[dict[str, float]], step: int, steps: int) -> str:
    """The end-of-run line: where it stopped, the last losses, any skipped bad records."""
    last = {key: h[key] for key in ("loss", "eval_loss") for h in history if key in h}
    parts = [f"Run ended at step {step} of {steps}"]
    parts += [f"last {key} {value:.4g}" for key, value in last.items()]
    if skipped := bad_records.counts():
        parts.append("bad records skipped: " + ", ".join(f"{n} in data.sources.{name}"
                                                         for name, n in skipped.items())
                     + " (each is named in the log)")
    if short := length_filter.dropped():
        parts.append("documents under min_tokens dropped: " + ", ".join(
            f"{d} of {r} read in data.sources.{name}" for name, (d, r) in short.items()))
    return "; ".join(parts) + "."


def checked_data(config: ml_collections.ConfigDict) -> pipeline.CheckedDataConfig:
    """The data config, checked once for the whole run (every stage reads it)."""
    try:
        return pipeline.checked_data_config(config.data)
    except (TypeError, ValueError, FileNotFoundError) as error:
        raise config_base.ConfigError(str(error)) from error


def _train_batches(data_cfg, rows: Rows, shard: DataShard):
    """An endless, checkpointable (grain) iterator of this process's batches."""
    return pipeline.make_iterator(data_cfg, rows.make, batch_size=shard.batch_size,
                                  process_index=shard.index, process_count=shard.count,
                                  indexed=rows.indexed, subsets=rows.subsets)


def _eval_batches(run: Run, data_cfg, rows: Rows | None, shard: DataShard) -> list:
    """The fixed held-out global batches; none for a stage without a held-out loss."""
    if rows is None:
        return []
    local = pipeline.first_batches(data_cfg, rows.make, batch_size=shard.batch_size,
                                   num_batches=run.config.eval.batches, process_index=shard.index,
                                   process_count=shard.count, indexed=rows.indexed)
    return [to_global_batch(b, run.batch_sharding) for b in local]


def plan(config: ml_collections.ConfigDict,
         build: Callable[[ml_collections.ConfigDict, ModelConfig], Stage]
         ) -> tuple[Run, Stage, pipeline.CheckedDataConfig]:
    """Every check of the config, once, then the stage and the run planned for it (nothing
    loaded or compiled; a run that cannot fit is refused here)."""
    model_cfg = config_base.validate_config(config)
    stage = build(config, model_cfg)
    run = build_run(config, model_cfg=model_cfg, sequences_per_row=stage.sequences_per_row,
                    frozen_bytes=stage.frozen.nbytes)
    return run, stage, checked_data(config)  # its files are looked at last


def train(config: ml_collections.ConfigDict, workdir: str,
          build: Callable[[ml_collections.ConfigDict, ModelConfig], Stage],
          stop_at_step: int | None = None) -> list[dict[str, float]]:
    """Runs the stage `build` makes to `train.steps` (or to `stop_at_step`, checkpointing
    there), resuming if `workdir` has checkpoints; returns the logged metrics, one dict per
    log or eval step."""
    workdir_lib.prepare(workdir)
    bad_records.reset()
    length_filter.reset()
    run, stage, data_cfg = plan(config, build)
    source = initial_params.locate(config.init_from)
    load_initial = _initial_params_loader(run, stage.name, source)  # checked before any write
    checkpointer = Checkpointer(f"{workdir}/checkpoints", keep=config.checkpoint.keep,
                                every_steps=config.checkpoint.every_steps,
                                async_save=config.checkpoint.async_save)
    data_iter, writer, stop = None, None, None
    try:
        if _finished(checkpointer, workdir, config.train.steps):
            return []
        if stage.describe:
            logging.info("%s", stage.describe)
        shard = DataShard(config.train.global_batch // jax.process_count(), jax.process_index(),
                          jax.process_count())
        stage_frozen = stage.frozen.load(load_initial)
        start = (lambda: stage_frozen) if stage.frozen.is_start else load_initial
        data = stage.data(run, data_cfg, start, workdir)
        data_iter = _train_batches(data_cfg, data.rows["train"], shard)
        eval_batches = _eval_batches(run, data_cfg, data.rows.get("eval"), shard)
        state, backbone = _restore_or_init(run, checkpointer, data_iter, load_initial)
        frozen = step_frozen(run, backbone, stage_frozen)
        writer = MetricsWriter(workdir, enabled=config.log.tensorboard,
                               progress=config.log.progress_bar, total_steps=config.train.steps)
        stop = _StopSignal()
        with jax.set_mesh(run.mesh), logical_rules(run.rules):
            train_fn, eval_fn = compile_steps(run, stage.loss(run), frozen)
            loop = _Loop(run, stage, data.metrics, (frozen, stage_frozen, backbone), train_fn,
                         eval_fn, eval_batches, checkpointer, writer, stop,
                         checkpoint_meta(run, source))
            history = loop.steps(state, data_iter, stop_at_step or config.train.steps)
        checkpointer.wait()
        logging.info("%s", _summary(history, loop.step, config.train.steps))
        return history
    finally:
        if stop is not None:
            stop.restore()
        if writer is not None:
            writer.close()
        checkpointer.wait()
        checkpointer.close()
        if data_iter is not None:
            data_iter.close()


def checkpoint_meta(run: Run, source: initial_params.InitialCheckpoint | None) -> dict:
    """What each checkpoint records beside the state: the seeds, the model config that wrote
    it and where its starting parameters came from (a LoRA checkpoint holds adapters only, so
    `phi4_jax.export` rebuilds the model and its backbone from these)."""
    return {"seed": run.config.seed, "data_seed": run.config.data.seed,
            "model": model_config.to_record(run.model_cfg),
            "init_from": None if source is None else {"kind": source.kind,
                                                      "path": str(source.path.resolve())}}


class _Loop:
    """The step loop; metrics of step n are read while step n + 1 runs."""

    def __init__(self, run, stage, data_metrics, frozen, train_fn, eval_fn, eval_batches,
                 checkpointer, writer, stop, meta):
        self.run, self.stage, self.data_metrics = run, stage, data_metrics
        self.frozen, self.stage_frozen, self.backbone = frozen  # step's, stage's, LoRA backbone
        self.train_fn, self.eval_fn, self.eval_batches = train_fn, eval_fn, eval_batches
        self.checkpointer, self.writer, self.stop = checkpointer, writer, stop
        self.meta = meta
        self.tokens_per_step = stage.tokens_per_step
        self.step = 0  # the last step run

    def evaluate(self, step: int, params) -> dict[str, float]:
        """The step's eval scores ({} when there is nothing to evaluate)."""
        scores = evaluate(self.eval_fn, params, self.frozen, self.eval_batches)
        scores.update(self.stage.evaluate(self.run, self.run.model_params(params, self.backbone),
                                          self.stage_frozen, self.eval_batches))
        scores.update(self.data_metrics)
        if not scores:
            return {}
        self.writer.write(step, scores)
        return {"step": step, **scores}

    def steps(self, state: TrainState, data_iter, last_step: int) -> list[dict[str, float]]:
        config, checkpointer, meta = self.run.config, self.checkpointer, self.meta
        step = self.step = int(state.step)
        pending, history = None, []
        if step == 0 and (config.eval.at_start or config.train.steps == 0):
            history.append(self.evaluate(0, state.params))
        window_start, window_steps = time.perf_counter(), 0
        host_metrics: dict[str, list[float]] = {}
        while step < min(last_step, config.train.steps):
            batch, prepared = self.stage.prepare_batch(
                self.run, next(data_iter), self.run.model_params(state.params, self.backbone), step)
            for key, value in prepared.items():
                host_metrics.setdefault(key, []).append(value)
            batch = to_global_batch(batch, self.run.batch_sharding)
            state, metrics = self.train_fn(state, batch, self.frozen)
            checkpointer.check()  # a failed background save stops the run now
            if pending is not None:  # read the previous step's metrics while this one runs
                _check_finite(_to_host(pending), step, checkpointer)
            pending, step, window_steps = metrics, step + 1, window_steps + 1
            self.step = step
            self.writer.advance(step)
            if step % config.log.every_steps == 0 or step == config.train.steps:
                logged = _to_host(pending)
                _check_finite(logged, step, checkpointer)
                logged.update(_throughput(self.run, self.tokens_per_step, window_steps,
                                          time.perf_counter() - window_start))
                logged.update({key: sum(v) / len(v) for key, v in host_metrics.items()})
                host_metrics = {}
                logged.update({f"bad_records/{name}": float(n)
                               for name, n in bad_records.counts().items()})
                logged.update({f"short_documents/{name}": float(d)
                               for name, (d, _) in length_filter.dropped().items()})
                self.writer.write(step, logged)
                history.append({"step": step, **logged})
                window_start, window_steps = time.perf_counter(), 0
            reached = None
            if step % config.eval.every_steps == 0 or step == config.train.steps:
                if scores := self.evaluate(step, state.params):
                    history.append(scores)
                    reached = _reached_accuracy(scores, config.eval.stop_at_accuracy)
            preempted = self.stop.received or checkpointer.reached_preemption(step)
            final = step >= min(last_step, config.train.steps) or reached is not None
            if reached is not None:
                meta = {**meta, "stopped_at_accuracy": reached}
                logging.info("Stopping at step %d: accuracy %.4g reached eval.stop_at_accuracy="
                             "%g.", step, reached, config.eval.stop_at_accuracy)
            if preempted:
                logging.warning("%s received: saving a checkpoint at step %d, then exiting "
                                "(Ctrl-C again aborts without saving).",
                                self.stop.received or "preemption", step)
            if preempted or final or checkpointer.should_save(step):
                _check_finite(_to_host(pending), step, checkpointer)  # never save a NaN state
                checkpointer.save(step, state, data_iter, meta, force=preempted or final)
            if preempted:
                checkpointer.wait()
                logging.warning("Stopped at step %d (%s); checkpoint saved.", step,
                                self.stop.received or "preemption")
            if preempted or reached is not None:
                break
        return history


def _reached_accuracy(scores: dict[str, float], threshold: float) -> float | None:
    """The eval's greedy accuracy when early stopping is on and it reached `threshold`."""
    accuracy = scores.get("accuracy")
    return accuracy if threshold and accuracy is not None and accuracy >= threshold else None

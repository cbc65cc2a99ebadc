"""Start-up planning and the sharded train state: validated config -> mesh -> memory check ->
abstract state with its shardings -> the state created directly in its shards.

Order, cheapest check first: config -> mesh -> batch layout -> memory estimate -> shape
evaluation -> shardings. Nothing here allocates device memory until `init_state`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi4_jax.config_base import ConfigError, validate_config
from phi4_jax.model import attention as attention_lib
from phi4_jax.model.attention.check import check_attention
from phi4_jax.model.config import ModelConfig
from phi4_jax.model.transformer import init_model
from phi4_jax.parallel.sharding import MESH_AXES, logical_to_spec, make_mesh, state_shardings
from phi4_jax.train import memory
from phi4_jax.train.optimizer import make_optimizer
from phi4_jax.train.step import TrainState, init_train_state


@dataclasses.dataclass
class Run:
    """What start-up builds once and the loop and the stage use."""

    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    mesh: Mesh
    rules: tuple
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    state_shardings: Any
    abstract_state: TrainState  # shapes, dtypes and target shardings, for restoring
    batch_sharding: NamedSharding  # rows over the batch axes, any rank

    @property
    def abstract_params(self) -> Any:
        return self.abstract_state.params


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


def check_memory(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh,
                 sequences_per_row: int = 1) -> ModelConfig:
    """Refuses, before compiling, a run whose estimated per-device memory cannot fit; returns
    the model config with `remat_policy="auto"` resolved (the cheapest policy that fits;
    `full` when memory is not checked or the device's size is unknown).

    `sequences_per_row` counts the sequences one batch row holds (2 for a preference pair).
    """
    if not config.memory.check:
        return model_cfg.replace(remat_policy="full") if model_cfg.remat_policy == "auto" else model_cfg
    t = config.train
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = t.global_batch // t.microbatches // batch_devices * sequences_per_row
    shape = dict(seq_len=t.seq_len, per_device_batch=rows, mesh_shape=dict(mesh.shape),
                 microbatches=t.microbatches, loss_chunk_tokens=t.loss_chunk_tokens)
    capacity = config.memory.device_bytes or memory.device_memory_bytes(jax.local_devices()[0])
    if model_cfg.remat_policy == "auto":
        inputs = memory.estimate_train_memory(model_cfg.replace(remat_policy="full"), **shape).inputs
        model_cfg = model_cfg.replace(remat_policy=memory.resolve_remat(
            inputs, capacity * memory.HEADROOM) if capacity else "full")
    estimate = memory.estimate_train_memory(model_cfg, **shape)
    logging.info("Estimated per-device memory:\n%s", estimate.describe())
    if capacity:
        memory.check_fits(estimate, capacity, context=f"{model_cfg.name} on {mesh.devices.size} "
                          f"{jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}")
    return model_cfg


def build_run(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None, *,
              sequences_per_row: int = 1) -> Run:
    """Validates what can be checked without allocating, then plans shardings."""
    model_cfg = validate_config(config)
    model_cfg = model_cfg.replace(attention_impl=attention_lib.resolve_impl(
        model_cfg.attention_impl, config.train.seq_len, model_cfg.attention_block_size))
    mesh = make_mesh({axis: config.mesh[axis] for axis in MESH_AXES}, devices)
    check_batch_layout(config, mesh)
    model_cfg = check_memory(config, model_cfg, mesh, sequences_per_row)
    logging.info("Attention %s (model.attention_impl=%s), remat %s (model.remat_policy=%s)",
                 model_cfg.attention_impl, config.model.attention_impl, model_cfg.remat_policy,
                 config.model.remat_policy)
    if model_cfg.attention_impl in attention_lib.FUSED_IMPLS:
        logging.info(check_attention(model_cfg).describe())
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
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch",), rules))
    return Run(config, model_cfg, mesh, rules, graphdef, optimizer, shardings, abstract_state,
               batch_sharding)


def init_params(run: Run) -> Any:
    """Freshly initialized parameters, created directly in their shards."""
    def init() -> Any:
        return nnx.to_pure_dict(nnx.state(init_model(run.model_cfg, run.config.seed)))

    with jax.set_mesh(run.mesh):
        return jax.jit(init, out_shardings=run.state_shardings.params)()


def init_state(run: Run, params: Any | None = None) -> TrainState:
    """Step 0 with a fresh optimizer over `params` (default: freshly initialized ones); the
    state is built in its shards and `params` are not donated."""
    params = init_params(run) if params is None else params
    with jax.set_mesh(run.mesh):
        return jax.jit(lambda p: init_train_state(p, run.optimizer),
                       out_shardings=run.state_shardings)(params)


def to_global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each host's rows into one batch-sharded global array per field."""
    def assemble(x: np.ndarray) -> jax.Array:
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return {key: assemble(value) for key, value in local.items()}

"""Start-up planning and the sharded train state: validated config -> mesh -> memory check ->
abstract state with its shardings -> the state created directly in its shards.

With LoRA (`model.lora`), the trained parameters are the adapters alone: the optimizer state,
the checkpoints and the donated step state hold only them, and the backbone travels beside
them as frozen input (`model_params` joins the two for a forward), in `lora.backbone_dtype`.

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
from phi4_jax.data.tokenizer import Phi4Tokenizer, load_tokenizer, tokenizer_for_vocab
from phi4_jax.model import attention as attention_lib
from phi4_jax.model import lora
from phi4_jax.model.attention.check import check_attention
from phi4_jax.model.config import ModelConfig
from phi4_jax.model.transformer import init_model, scan_unroll
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
    abstract_model_params: Any  # the whole model's parameters (with adapters), with shardings

    @property
    def abstract_params(self) -> Any:
        """The trained parameters: the whole model's, or only the adapters under LoRA."""
        return self.abstract_state.params

    @property
    def tokenizer_name(self) -> str:
        """The model size's tokenizer (phi4 or phi4-mini), from its vocabulary."""
        return tokenizer_for_vocab(self.model_cfg.vocab_size)

    @property
    def tokenizer(self) -> Phi4Tokenizer:
        return load_tokenizer(self.tokenizer_name)

    @property
    def abstract_backbone(self) -> Any:
        """The parameters a checkpoint or `init_from` holds: the model's without adapters."""
        return lora.split(self.abstract_model_params)[1]

    @property
    def model_param_shardings(self) -> Any:
        return jax.tree.map(lambda leaf: leaf.sharding, self.abstract_model_params)

    def model_params(self, trained: Any, backbone: Any) -> Any:
        """The forward's parameters from the trained ones and the frozen backbone (None
        without LoRA, where the trained parameters are the whole model)."""
        return trained if backbone is None else lora.join(trained, backbone)


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
                 sequences_per_row: int = 1, frozen_bytes: int = 0) -> ModelConfig:
    """Refuses, before compiling, a run whose estimated per-device memory cannot fit; returns
    the model config with `attention_impl="auto"` and `remat_policy="auto"` resolved (the
    fastest attention and the cheapest remat that fit; without a known device size or with
    the check off, the fastest attention that takes the compute dtype and `full` remat).

    `sequences_per_row` counts the sequences one batch row holds (2 for a preference pair);
    `frozen_bytes` is the stage's frozen state over all devices (e.g. a reference model).
    """
    t = config.train
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = t.global_batch // t.microbatches // batch_devices * sequences_per_row
    shape = dict(seq_len=t.seq_len, per_device_batch=rows, mesh_shape=dict(mesh.shape),
                 microbatches=t.microbatches, loss_chunk_tokens=t.loss_chunk_tokens,
                 frozen_bytes=frozen_bytes)
    capacity = config.memory.check and (
        config.memory.device_bytes or memory.device_memory_bytes(jax.local_devices()[0]))
    budget = capacity * memory.HEADROOM if capacity else None
    if model_cfg.attention_impl == "auto":
        impl, reasons = choose_attention(model_cfg, shape, budget)
        logging.info("Attention auto -> %s:\n  %s", impl, "\n  ".join(reasons))
        model_cfg = model_cfg.replace(attention_impl=impl)
    if not config.memory.check:
        return (model_cfg.replace(remat_policy="full") if model_cfg.remat_policy == "auto"
                else model_cfg)
    if model_cfg.remat_policy == "auto":
        inputs = memory.estimate_train_memory(model_cfg.replace(remat_policy="full"), **shape).inputs
        model_cfg = model_cfg.replace(remat_policy=memory.resolve_remat(
            inputs, budget) if capacity else "full")
    estimate = memory.estimate_train_memory(model_cfg, **shape)
    logging.info("Estimated per-device memory:\n%s", estimate.describe())
    if capacity:
        memory.check_fits(estimate, capacity, context=f"{model_cfg.name} on {mesh.devices.size} "
                          f"{jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}")
    return model_cfg


def choose_attention(model_cfg: ModelConfig, shape: dict, budget: float | None,
                     backend: str | None = None) -> tuple[str, list[str]]:
    """What `model.attention_impl="auto"` stands for, and why: the fastest of the backend's
    candidates that takes the compute dtype and, when `budget` (bytes) is known, whose
    estimate fits it under the most frugal remat the config allows (`full` for `auto`).
    When none fits, the fastest that takes the dtype (the fit check then says what to change).
    Returns the choice and one line per candidate weighed."""
    remat = "full" if model_cfg.remat_policy == "auto" else model_cfg.remat_policy
    candidates = attention_lib.auto_candidates(shape["seq_len"], model_cfg.attention_block_size,
                                               backend)
    reasons, runnable = [], []
    for impl in candidates:
        if refusal := attention_lib.dtype_refusal(impl, model_cfg.compute_dtype):
            reasons.append(f"not {impl}: {refusal}")
            continue
        runnable.append(impl)
        if budget is None:
            reasons.append(f"{impl}: the fastest here that takes {model_cfg.compute_dtype} "
                           f"(memory not weighed: memory.check off or no device size)")
            return impl, reasons
        estimate = memory.estimate_train_memory(
            model_cfg.replace(attention_impl=impl, remat_policy=remat), **shape)
        need = estimate.total
        if need <= budget:
            reasons.append(f"{impl}: the fastest here that takes {model_cfg.compute_dtype} and "
                           f"fits (~{need / memory.GIB:.1f} of {budget / memory.GIB:.1f} GiB "
                           f"usable with remat {remat})")
            return impl, reasons
        workspace = (f" (its backward workspace ~{estimate.workspace / memory.GIB:.1f} GiB "
                     f"grows with data.max_segments_per_row={model_cfg.max_segments_per_row})"
                     if estimate.workspace else "")
        reasons.append(f"not {impl}: needs ~{need / memory.GIB:.1f} GiB with remat {remat}, "
                       f"over the {budget / memory.GIB:.1f} GiB usable{workspace}")
    reasons.append(f"{runnable[0]}: none fits; the fastest that takes {model_cfg.compute_dtype}")
    return runnable[0], reasons


def build_run(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None, *,
              model_cfg: ModelConfig | None = None, sequences_per_row: int = 1,
              frozen_bytes: int = 0) -> Run:
    """Plans shardings for a config `validate_config` passed (and gave `model_cfg`; validated
    here when not given), after checking the mesh, the batch layout and the memory estimate
    with the stage's rows and frozen state."""
    model_cfg = validate_config(config) if model_cfg is None else model_cfg
    mesh = make_mesh({axis: config.mesh[axis] for axis in MESH_AXES}, devices)
    check_batch_layout(config, mesh)
    model_cfg = check_memory(config, model_cfg, mesh, sequences_per_row, frozen_bytes)
    announce_model(config, model_cfg)
    rules = tuple(tuple(rule) for rule in config.mesh.rules)
    graphdef, model_params = abstract_model(config, model_cfg, mesh, rules)
    trained = lora.split(model_params)[0] if model_cfg.lora else model_params
    param_shardings = jax.tree.map(lambda leaf: leaf.sharding, trained)
    optimizer = make_optimizer(config.train, trained)
    shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer), trained)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, shapes.opt_state, param_shardings,
        transform_non_params=lambda _: replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch",), rules))
    return Run(config, model_cfg, mesh, rules, graphdef, optimizer, shardings, abstract_state,
               batch_sharding, model_params)


def resolve_attention(model_cfg: ModelConfig, seq_len: int) -> ModelConfig:
    """`model.attention_impl='auto'` resolved for this backend, the compute dtype and the
    longest row, where no training memory is weighed (jobs that only decode)."""
    return model_cfg.replace(attention_impl=attention_lib.resolve_impl(
        model_cfg.attention_impl, seq_len, model_cfg.attention_block_size,
        model_cfg.compute_dtype))


def announce_model(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
    """Logs the attention and remat chosen and checks a fused kernel's numerics against the
    reference, before any parameter is loaded: every job that runs the model does this."""
    logging.info("Attention %s (model.attention_impl=%s), remat %s (model.remat_policy=%s), "
                 "%d layer(s) per layer-loop iteration (model.scan_unroll=%d)",
                 model_cfg.attention_impl, config.model.attention_impl, model_cfg.remat_policy,
                 config.model.remat_policy, scan_unroll(model_cfg),
                 config.model.scan_unroll)
    if model_cfg.attention_impl in attention_lib.FUSED_IMPLS:
        logging.info(check_attention(model_cfg).describe())


def abstract_model(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh,
                   rules: tuple) -> tuple[nnx.GraphDef, Any]:
    """The model's graph and the shapes, dtypes and shardings of its parameters (nothing
    allocated)."""
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: init_model(model_cfg,
                                                                            config.seed)))
    return graphdef, abstract_params_on_mesh(model_cfg, abstract_params, mesh, rules)


def abstract_params_on_mesh(model_cfg: ModelConfig, abstract_params: nnx.State, mesh: Mesh,
                            rules: tuple) -> Any:
    """Shapes, dtypes (the LoRA backbone in its own dtype) and shardings of every parameter."""
    shardings = nnx.to_pure_dict(state_shardings(abstract_params, mesh, rules))
    shapes = nnx.to_pure_dict(abstract_params)
    backbone_dtype = model_cfg.lora.backbone_dtype if model_cfg.lora else ""
    if backbone_dtype:
        adapters, backbone = lora.split(shapes)
        backbone = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, backbone_dtype), backbone)
        shapes = lora.join(adapters, backbone)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def init_params(run: Run) -> Any:
    """Freshly initialized parameters of the whole model (the LoRA backbone in its dtype),
    created directly in their shards."""
    dtypes = jax.tree.map(lambda leaf: leaf.dtype, run.abstract_model_params)

    def init() -> Any:
        params = nnx.to_pure_dict(nnx.state(init_model(run.model_cfg, run.config.seed)))
        return jax.tree.map(lambda x, dtype: x.astype(dtype), params, dtypes)

    with jax.set_mesh(run.mesh):
        return jax.jit(init, out_shardings=run.model_param_shardings)()


def init_adapters(run: Run) -> Any:
    """Fresh adapters alone (B zero: the backbone's own forward), in their shards."""
    def init() -> Any:
        return lora.split(nnx.to_pure_dict(nnx.state(init_model(run.model_cfg,
                                                                run.config.seed))))[0]

    with jax.set_mesh(run.mesh):
        return jax.jit(init, out_shardings=run.state_shardings.params)()


def split_trained(run: Run, params: Any) -> tuple[Any, Any]:
    """(trained, frozen backbone) of the whole model's parameters; (params, None) without
    LoRA."""
    return lora.split(params) if run.model_cfg.lora else (params, None)


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
